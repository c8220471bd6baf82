"""Shared fixtures: a throwaway CA, the fake relay, and the service wired to it."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trustme

from trio_mailer.app import MailerApp
from trio_mailer.client import open_channel
from trio_mailer.core.config import Config, load_config
from trio_mailer.core.errors import exception_leaves
from trio_mailer.store.outbox import Outbox
from trio_mailer.v1.mailer_grpc import MailerStub

from .fakes.fault_relay import FaultRelay
from .helpers import HASHED_TOKEN, TOKEN, Harness, Pki, relay_env, server_context


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-mails",
        type=int,
        default=300,
        help="how many mails the soak test sends (default 300; try 5000 for a long run)",
    )
    parser.addoption("--soak-seed", type=int, default=20261127, help="the soak test's seed")


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """Keep the reason of a skip raised inside an async test.

    pytest-trio 0.8 finds a ``pytest.skip(reason)`` from inside the Trio run in an exception
    group and raises a bare ``pytest.skip()`` in its place, so the summary says
    ``_pytest/python.py:187: Skipped`` (the PostgreSQL tests without a server, for one). The
    bare skip carries the group as its ``__context__``: raise the original skip instead, with
    its reason and the line that raised it."""
    try:
        return (yield)
    except pytest.skip.Exception as bare:
        group = bare.__context__
        leaves = exception_leaves(group) if isinstance(group, BaseExceptionGroup) else []
        if bare.msg or len(leaves) != 1 or not isinstance(leaves[0], pytest.skip.Exception):
            raise
        raise leaves[0] from None


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def relay_tls(ca: trustme.CA) -> ssl.SSLContext:
    """The fake relay's server context: a certificate for 127.0.0.1 signed by ``ca``."""
    return server_context(ca)


@pytest.fixture
def start_harness(
    relay_tls: ssl.SSLContext, ca_file: Path
) -> Callable[..., AsyncIterator[Harness]]:
    """``async with start_harness(relay_kwargs..., env=...) as h``: relay + service + stub."""

    @asynccontextmanager
    async def start(
        *,
        env: dict[str, str] | None = None,
        relay: FaultRelay | None = None,
        configure: Callable[[Config], Config] | None = None,
        client_ssl: ssl.SSLContext | None = None,
        outbox: Outbox | None = None,
        **relay_kwargs: object,
    ) -> AsyncIterator[Harness]:
        if relay is None:
            relay_kwargs.setdefault("ssl_context", relay_tls)
            relay = FaultRelay(**relay_kwargs)  # type: ignore[arg-type]
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
            # The start-up relay check (one session: EHLO, TLS, AUTH, QUIT) comes first; the
            # tests script faults and read commands for the sessions that carry mail.
            # Its session is not part of any test: the relay's counters start after it.
            with trio.fail_after(60):
                await app.relay_checked.wait()
            relay.commands.clear()
            relay.sessions_opened = 0
            relay.pipelined_commands = 0
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    paths = {}
    server_ca.cert_pem.write_to_path(str(paths.setdefault("server_ca", root / "server-ca.pem")))
    server.cert_chain_pems[0].write_to_path(str(paths.setdefault("server_cert", root / "s.pem")))
    server.private_key_pem.write_to_path(str(paths.setdefault("server_key", root / "s.key")))
    client_ca.cert_pem.write_to_path(str(paths.setdefault("client_ca", root / "client-ca.pem")))
    client = client_ca.issue_cert("billing-service@example.com")
    client.private_key_and_cert_chain_pem.write_to_path(str(root / "client.pem"))
    long_ago = datetime.now(UTC) - timedelta(days=30)
    expired = client_ca.issue_cert(
        "old@example.com", not_before=long_ago - timedelta(days=1), not_after=long_ago
    )
    expired.private_key_and_cert_chain_pem.write_to_path(str(root / "expired.pem"))
    stranger = stranger_ca.issue_cert("stranger@example.com")
    stranger.private_key_and_cert_chain_pem.write_to_path(str(root / "stranger.pem"))
    return Pki(
        client_cert=root / "client.pem",
        expired_client_cert=root / "expired.pem",
        stranger_cert=root / "stranger.pem",
        **paths,
    )


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    digest = hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()
    path.write_text(f"# callers\n{TOKEN}\nsha256:{digest}\n")
    return path
