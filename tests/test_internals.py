"""Canary: the private parts of purerpc, h2 and hpack that trio_mailer relies on are still
where it expects them, and no other module touches them.

When an upgrade breaks one, this fails naming it; adapt trio_mailer/grpc/internals.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from trio_mailer.grpc import internals

ROOT = Path(__file__).resolve().parent.parent


def test_the_private_parts_are_where_we_expect_them() -> None:
    assert internals.problems() == []
    assert {name for _, _, name, _ in internals.PRIVATE_NAMES} >= {
        "_Channel",
        "_receive_window_update_frame",
        "_prepare_for_sending",
        "_inbound_flow_control_window_manager",
        "resized",
    }


def test_no_other_module_touches_private_names() -> None:
    """Only internals.py may use purerpc's, h2's and hpack's ``_private`` attributes."""
    pattern = re.compile(
        r"_grpc_connection|_grpc_socket|message_read_buffers|\._streams\b|purerpc\.\w+\._\w+"
        r"|_receive_\w+_frame|_prepare_for_sending|_inbound_flow_control|header_table\.resized"
        r"|GRPCProtoStream"
    )
    offenders = []
    for path in sorted((ROOT / "trio_mailer").rglob("*.py")):
        if path.name == "internals.py" or "grpc_std" in path.parts or "v1" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_problems_names_what_moved(monkeypatch) -> None:
    """The canary itself: with a part gone, ``problems()`` says which."""
    import h2.connection
    import purerpc.client

    monkeypatch.delattr(purerpc.client, "_Channel")
    monkeypatch.delattr(h2.connection.H2Connection, "_prepare_for_sending")
    found = internals.problems()
    assert any("_Channel" in p for p in found)
    assert any("_prepare_for_sending" in p for p in found)


def test_a_closed_client_ignores_the_servers_drain_ping() -> None:
    """trio_mailer's purerpc client, closed by its own GOAWAY while a server's drain (GOAWAY,
    PING) is on its way, reads those frames without a ProtocolError."""
    import h2.config
    import h2.connection

    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.state_machine = internals._GoAwayTolerantStates()
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.close_connection()  # the client goes first
    server.ping(b"drain...")
    client.receive_data(server.data_to_send())  # stock h2 3.x: ProtocolError here
    assert client.state_machine.state is h2.connection.ConnectionState.CLOSED
