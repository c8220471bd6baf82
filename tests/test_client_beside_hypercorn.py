"""The client wheel installs into a fresh environment with Hypercorn 0.18 (h2 4) and calls the
service (which runs from the test's own environment, with purerpc and h2 3, in a subprocess).

The fresh environment gets its packages from the package index, as a backend team's would.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import trio

from .helpers import build_client_wheel, relay_and_service

PROBE = """
import importlib.metadata as md, sys
import hypercorn.trio, h2, trio, trio_mailer_client

async def main(port):
    async with trio_mailer_client.open_mailer(f"127.0.0.1:{port}") as mailer:
        result = await mailer.send_pass("backend@example.com", "31337")
        status = await mailer.status(result.message_id)
    print(md.version("hypercorn"), md.version("h2"), type(result).__name__, status.state.name)

trio.run(main, int(sys.argv[1]))
"""


async def test_client_wheel_works_beside_hypercorn_0_18(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """pip installs the client wheel with hypercorn>=0.18 (no conflict, ``pip check`` clean);
    in that environment both import, and the client's call is accepted by the service."""
    wheel = build_client_wheel(tmp_path / "wheels")
    venv = tmp_path / "backend-venv"
    python = venv / "bin" / "python"
    with trio.fail_after(600):
        await trio.run_process([sys.executable, "-m", "venv", str(venv)])
        await trio.run_process(
            [str(python), "-m", "pip", "install", "--quiet", str(wheel), "hypercorn>=0.18"],
            capture_stdout=True,
            capture_stderr=True,
        )
        await trio.run_process([str(python), "-m", "pip", "check"], capture_stdout=True)
        async with relay_and_service(relay_tls, ca_file, tmp_path) as (relay, _service, port):
            result = await trio.run_process(
                [str(python), "-c", PROBE, str(port)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr.decode()
            await relay.wait_for_mails(1)
    hypercorn, h2, kind, _state = result.stdout.decode().split()
    assert tuple(map(int, hypercorn.split(".")[:2])) >= (0, 18)
    assert int(h2.split(".")[0]) >= 4
    assert kind == "Accepted"
    assert b"31337" in relay.received[0].data
