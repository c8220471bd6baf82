"""Shared fixtures: a throwaway CA, the fake relay, and the service wired to it."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from trio_mailer.app import MailerApp
from trio_mailer.client import open_channel
from trio_mailer.core.config import Config, load_config
from trio_mailer.delivery.sender import FinishedMail
from trio_mailer.dev.capture_relay import CaptureSMTPServer
from trio_mailer.store.outbox import Outbox
from trio_mailer.v1.mailer_grpc import MailerStub


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-mails",
        type=int,
        default=300,
        help="how many mails the soak test sends (default 300; try 5000 for a long run)",
    )
    parser.addoption("--soak-seed", type=int, default=20261127, help="the soak test's seed")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
    return context


@pytest.fixture(scope="session")
def relay_tls(ca: trustme.CA) -> ssl.SSLContext:
    """The fake relay's server context: a certificate for 127.0.0.1 signed by ``ca``."""
    return server_context(ca)


def relay_env(relay_port: int, ca_file: Path, **overrides: str) -> dict[str, str]:
    """MAILER_* variables for a service on a free port talking to the fake relay."""
    env = {
        "MAILER_REMOTE_HOST": f"127.0.0.1:{relay_port}",
        "MAILER_FROM": "noreply@example.com",
        "MAILER_SERVICENAME": "Acme",
        "MAILER_SMTP_CA_FILE": str(ca_file),
        "MAILER_SERVE_HOST": "127.0.0.1",
        "MAILER_SERVE_PORT": "0",
        "MAILER_SMTP_TIMEOUT_S": "5",
        "MAILER_SHUTDOWN_GRACE_S": "5",
        "MAILER_OUTBOX": "memory",
        # Most tests send many mails to one address, some after a 550 5.1.1 to it: the limit's
        # and the suppression list's own tests turn them back on.
        "MAILER_RECIPIENT_LIMIT": "0",
        "MAILER_SUPPRESS_S": "0",
    }
    env.update(overrides)
    return env


@attrs.define
class Harness:
    """A running fake relay and service, and a client stub for the service."""

    relay: CaptureSMTPServer
    relay_port: int
    app: MailerApp
    grpc_port: int
    stub: MailerStub
    nursery: trio.Nursery
    exit_status: list[int]
    stopped: trio.Event
    finished: list[FinishedMail] = attrs.Factory(list)
    _finished_lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    def record_finished(self, mail: FinishedMail) -> None:
        self.finished.append(mail)
        self._finished_lot.unpark_all()

    async def wait_finished(self, count: int) -> list[FinishedMail]:
        """Wait until ``count`` mails have reached their outcome (delivered or failed)."""
        while len(self.finished) < count:
            await self._finished_lot.park()
        return self.finished

    async def shutdown(self, *, force: bool = False) -> int:
        """Ask for the drain and wait for ``run`` to return its exit status."""
        self.app.request_shutdown(force=force)
        await self.stopped.wait()
        return self.exit_status[0]


@pytest.fixture
def start_harness(
    relay_tls: ssl.SSLContext, ca_file: Path
) -> Callable[..., AsyncIterator[Harness]]:
    """``async with start_harness(relay_kwargs..., env=...) as h``: relay + service + stub."""

    @asynccontextmanager
    async def start(
        *,
        env: dict[str, str] | None = None,
        relay: CaptureSMTPServer | None = None,
        configure: Callable[[Config], Config] | None = None,
        client_ssl: ssl.SSLContext | None = None,
        outbox: Outbox | None = None,
        **relay_kwargs: object,
    ) -> AsyncIterator[Harness]:
        if relay is None:
            relay_kwargs.setdefault("ssl_context", relay_tls)
            relay = CaptureSMTPServer(**relay_kwargs)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            config = load_config(relay_env(relay_port, ca_file, **(env or {})))
            if configure is not None:
                config = configure(config)
            app = MailerApp.from_config(config)
            app.outbox = outbox
            exit_status: list[int] = []
            stopped = trio.Event()

            async def run_app(task_status: trio.TaskStatus[int]) -> None:
                exit_status.append(await app.run(task_status=task_status))
                stopped.set()

            grpc_port = await nursery.start(run_app)
            async with open_channel("127.0.0.1", grpc_port, client_ssl) as channel:
                harness = Harness(
                    relay,
                    relay_port,
                    app,
                    grpc_port,
                    MailerStub(channel),
                    nursery,
                    exit_status,
                    stopped,
                )
                app.watch_finished(harness.record_finished)
                yield harness
            await harness.shutdown()
            nursery.cancel_scope.cancel()

    return start


@pytest.fixture
def free_port() -> Iterator[int]:
    """A loopback port with nothing listening on it (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


@pytest.fixture(autouse=True)
def _no_proxy_for_grpcio(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpcio honours http_proxy; loopback calls must never go through one."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_grpc_proxy", "*")


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The current environment without MAILER_* leftovers, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(overrides)
    return env
