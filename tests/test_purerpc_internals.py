"""Canary: the purerpc private parts trio_mailer relies on are still where it expects them.

When a purerpc upgrade breaks one, this fails naming it; adapt
trio_mailer/grpc/purerpc_internals.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import purerpc.client

from trio_mailer.grpc import purerpc_internals

ROOT = Path(__file__).resolve().parent.parent


def test_purerpc_private_parts_are_where_we_expect_them() -> None:
    assert purerpc_internals.problems() == []
    for module, name, what in purerpc_internals.PRIVATE_NAMES:
        assert module == "purerpc.client"
        assert hasattr(purerpc.client, name), f"{module}.{name} ({what}) moved"


def test_no_other_module_touches_purerpc_private_names() -> None:
    """Only purerpc_internals.py may use purerpc's ``_private`` attributes."""
    pattern = re.compile(
        r"_grpc_connection|_grpc_socket|message_read_buffers|\._streams\b|purerpc\.\w+\._\w+"
    )
    offenders = []
    for path in sorted((ROOT / "trio_mailer").rglob("*.py")):
        if path.name == "purerpc_internals.py" or "grpc_std" in path.parts or "v1" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_h2_method_the_listener_overrides_is_still_there() -> None:
    """http2_server._H2Connection overrides h2's _receive_window_update_frame."""
    import h2.connection

    assert callable(getattr(h2.connection.H2Connection, "_receive_window_update_frame", None)), (
        "h2.connection.H2Connection._receive_window_update_frame moved: adapt _H2Connection"
    )


def test_the_h2_flow_control_parts_the_listener_uses_are_still_there() -> None:
    """http2_server._H2Connection returns received bytes to the connection's window and to a
    stream's window separately, through h2's window manager and frame queue."""
    import h2.config
    import h2.connection
    import h2.stream

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    manager = getattr(conn, "_inbound_flow_control_window_manager", None)
    assert callable(getattr(manager, "process_bytes", None)), (
        "h2's connection window manager moved: adapt _H2Connection.acknowledge_connection_data"
    )
    assert callable(getattr(conn, "_prepare_for_sending", None)), (
        "h2.connection.H2Connection._prepare_for_sending moved: adapt _H2Connection"
    )
    assert callable(getattr(h2.stream.H2Stream, "acknowledge_received_data", None)), (
        "h2.stream.H2Stream.acknowledge_received_data moved: adapt _H2Connection"
    )
