"""The layers hold: the pure core loads no I/O library, and ``serve`` loads no test code.

Each check runs in a fresh interpreter (``sys.modules`` there holds exactly what the import
pulled in). The core's modules are found by listing its folder, so a new module is covered
the day it is added.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "trio_mailer" / "core"

# Top-level packages that do I/O, or run an event loop: none may load when a core module is
# imported. "Socket-level I/O" means the libraries that open connections (ssl, smtplib, http,
# the event loops, the database drivers). The bare ``socket`` module (and ``select`` and
# ``selectors``, which it imports) is allowed to *load*: the standard library's ``email.utils``,
# which the message builder needs, imports it for ``getfqdn``; loading it opens nothing. A core
# module may not import those itself, which ``test_core_modules_do_not_import_sockets`` checks.
IO_PACKAGES = frozenset(
    {
        "trio",
        "anyio",
        "asyncio",
        "sniffio",
        "outcome",
        "smtplib",
        "sqlite3",
        "_sqlite3",
        "ssl",
        "_ssl",
        "purerpc",
        "h2",
        "grpc",
        "prometheus_client",
        "psycopg",
        "psycopg2",
        "asyncpg",
        "socketserver",
        "trustme",
        # Traces are the shell's business (trio_mailer/tracing.py).
        "opentelemetry",
    }
)
IO_MODULES = frozenset({"http.client", "http.server", "urllib.request", "subprocess"})
SOCKET_MODULES = frozenset({"socket", "_socket", "select", "selectors"})

CORE_MODULES = sorted(
    "trio_mailer.core" + ("" if path.stem == "__init__" else f".{path.stem}")
    for path in CORE.glob("*.py")
)

_PROBE = """
import importlib, json, sys
before = set(sys.modules)
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def loaded_by(module: str) -> list[str]:
    """The modules that importing ``module`` in a fresh interpreter loads."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr}"
    return list(json.loads(result.stdout))


def io_modules(names: list[str]) -> list[str]:
    return [n for n in names if n.split(".")[0] in IO_PACKAGES or n in IO_MODULES]


def test_the_core_modules_are_found() -> None:
    """The folder listing finds the core (a typo in CORE would make the purity test vacuous)."""
    assert "trio_mailer.core.config" in CORE_MODULES
    assert "trio_mailer.core.errors" in CORE_MODULES
    assert len(CORE_MODULES) >= 10


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_loads_no_io_library(module: str) -> None:
    """Importing a core module alone loads no event loop, network, TLS or database library."""
    loaded = io_modules(loaded_by(module))
    assert loaded == [], f"{module} is in the pure core, yet importing it loaded {loaded}"


def test_the_probe_sees_an_io_library() -> None:
    """The check can fail: a shell module is caught loading trio and smtplib."""
    loaded = io_modules(loaded_by("trio_mailer.delivery.smtp_session"))
    assert "trio" in loaded and "smtplib" in loaded


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_modules_do_not_import_sockets(path: Path) -> None:
    """No core module imports socket, select or selectors itself (only email.utils may)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    forbidden = IO_PACKAGES | IO_MODULES | SOCKET_MODULES
    bad = sorted(name for name in imported if name in forbidden or name.split(".")[0] in forbidden)
    assert bad == [], f"trio_mailer/core/{path.name} imports {bad}"


@pytest.mark.parametrize("module", ["trio_mailer.cli", "trio_mailer.app"])
def test_serve_loads_no_test_code(module: str) -> None:
    """What `trio-mailer serve` imports pulls in neither tests.fakes nor the fault machinery."""
    loaded = loaded_by(module)
    test_code = [n for n in loaded if n.split(".")[0] == "tests" or n.endswith("fault_relay")]
    assert test_code == [], f"{module} loaded test code: {test_code}"


@pytest.mark.parametrize("name", ["smtp_server.py", "capture_relay.py"])
def test_the_fault_machinery_is_not_in_the_dev_relay(name: str) -> None:
    """The SMTP-server core and the dev relay define no Fault script, stall or trickle: that
    machinery lives in tests/fakes. (The dev relay's faults on demand, dev/chaos.py, are a dev
    feature: one reply at a stage, set from the inbox; the core knows nothing of them.)"""
    source = (ROOT / "trio_mailer" / "dev" / name).read_text(encoding="utf-8")
    names = {
        node.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    }
    assert not names & {"Fault", "FaultRelay", "add_fault", "drop_sessions", "_take_fault"}
    assert "trickle" not in source and "stall_mid_reply" not in source
    if name == "smtp_server.py":
        assert "chaos" not in source


def test_the_fault_relay_is_built_on_the_core_not_on_the_dev_relay() -> None:
    """tests/fakes/fault_relay.py needs the SMTP-server core only, not the dev capture relay."""
    loaded = loaded_by("tests.fakes.fault_relay")
    assert "trio_mailer.dev.smtp_server" in loaded
    assert "trio_mailer.dev.capture_relay" not in loaded


def test_the_serve_check_can_see_test_code() -> None:
    """The probe does notice the fault relay when something imports it."""
    assert "tests.fakes.fault_relay" in loaded_by("tests.fakes.fault_relay")


PROTOCOL_MODULES = sorted(
    "trio_mailer.grpc.protocol" + ("" if path.stem == "__init__" else f".{path.stem}")
    for path in (ROOT / "trio_mailer" / "grpc" / "protocol").glob("*.py")
)


@pytest.mark.parametrize("module", PROTOCOL_MODULES)
def test_the_http2_protocol_object_loads_no_event_loop(module: str) -> None:
    """The gRPC front's protocol layer (bytes in, events out) loads h2 but no event loop,
    network, TLS or gRPC library: the Trio layer (grpc/http2_server.py) owns all I/O."""
    loaded = [n for n in io_modules(loaded_by(module)) if n.split(".")[0] != "h2"]
    assert loaded == [], f"{module} is the protocol layer, yet importing it loaded {loaded}"
    assert "trio_mailer.grpc.protocol.connection" in PROTOCOL_MODULES
