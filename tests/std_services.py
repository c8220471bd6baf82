"""Helpers for the health and reflection tests: our server in-process, stock clients outside.

The stock clients (tests/grpc_std_client.py) run in a subprocess of their own: their protobuf
modules and ours declare the same message names, which one descriptor pool cannot hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from trio_mailer.grpc import health_service as health
from trio_mailer.grpc.health_service import HealthState, health_service
from trio_mailer.grpc.listener import bound_port, open_grpc_listener, serve_grpc
from trio_mailer.grpc.reflection_service import reflection_services
from trio_mailer.v1 import mailer_pb2
from trio_mailer.v1.mailer_grpc import MailerServicer

from .helpers import subprocess_env

CLIENT = Path(__file__).with_name("grpc_std_client.py")
MAILER = "trio_mailer.v1.Mailer"
POLL_S = 0.01


@asynccontextmanager
async def open_std_server(state: HealthState) -> AsyncIterator[int]:
    """Serve Health, both reflection versions and a (never called) Mailer on a free port."""
    services = [
        health_service(state),
        *reflection_services(
            [MAILER, health.SERVICE_NAME], [mailer_pb2.DESCRIPTOR, health.FILE_DESCRIPTOR]
        ),
        MailerServicer().service,
    ]
    async with trio.open_nursery() as nursery:
        listener = await open_grpc_listener("127.0.0.1", 0)
        port = bound_port(listener)
        await nursery.start(serve_grpc, listener, services)
        yield port
        nursery.cancel_scope.cancel()


async def run_client(*args: str) -> list[Any]:
    """Run the stock client to completion; its JSON lines."""
    result = await trio.run_process(
        [sys.executable, str(CLIENT), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


@attrs.define
class ClientProcess:
    """A running stock client: read its JSON lines one by one, write commands to its stdin."""

    process: trio.Process
    _buffer: bytearray = attrs.Factory(bytearray)

    async def next_line(self) -> Any:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some()
            if not data:
                raise EOFError(f"the client exited ({self.process.returncode}) mid-line")
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return json.loads(line)

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")


@asynccontextmanager
async def open_client(*args: str) -> AsyncIterator[ClientProcess]:
    """Start the stock client; on the way out close its stdin and wait (kill if it lingers)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(CLIENT), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=subprocess_env(),
    )
    try:
        yield ClientProcess(process)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                assert process.stdin is not None
                await process.stdin.aclose()
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (for server-side effects of a client going away, which no event
    announces); the caller's ``fail_after`` bounds the wait."""
    # No event to wait for: the server only learns of the departure from the connection.
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(POLL_S)
