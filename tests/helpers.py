"""What several test files share: the fake relay's TLS and environment, the harness type, and
the subprocess helpers. Tests import from here, never from each other or from conftest."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import attrs
import grpc
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

from trio_mailer.app import MailerApp
from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.load_shedding import REFUSAL_WAIT_S, RefusalPacer
from trio_mailer.core.mail_lifecycle import MailRecord
from trio_mailer.core.message import MailComposer, OutgoingMail
from trio_mailer.core.rendering import MailKind, MailTemplates
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.delivery.sender import FinishedMail
from trio_mailer.grpc.mailer_service import ANONYMOUS_CALLER, Identify, MailerService
from trio_mailer.metrics import Metrics
from trio_mailer.service.accept_mail import AcceptMail
from trio_mailer.service.admission import AdmissionControl
from trio_mailer.service.mail_status import MailStatusLookup
from trio_mailer.store.outbox import MemoryOutbox, Outbox
from trio_mailer.store.status_board import StatusBoard
from trio_mailer.v1.mailer_grpc import MailerStub
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

from .fakes.fault_relay import FaultRelay


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
    return context


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

    relay: FaultRelay
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


FAST = {
    "MAILER_SMTP_TIMEOUT_S": "0.5",
    "MAILER_RETRY_BASE_S": "0.05",
    "MAILER_RETRY_MAX_S": "0.2",
    "MAILER_SHUTDOWN_GRACE_S": "0",
}


async def send_pass(h: Harness, to: str = "user@example.com", code: str = "1") -> str:
    reply = await h.stub.SendPass(MsgRequest(to=to, code=code))
    assert reply.sent, reply.reason
    return str(reply.message_id)


def message_ids(relay: FaultRelay) -> list[str]:
    ids = []
    for mail in relay.received:
        for line in mail.data.split(b"\r\n"):
            if line.startswith(b"Message-ID: "):
                ids.append(line.removeprefix(b"Message-ID: ").decode())
    return ids


LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


@attrs.define
class Service:
    """A ``python -m trio_mailer`` child process and everything it wrote to stderr so far."""

    process: trio.Process
    stderr: bytearray = attrs.Factory(bytearray)

    async def read_until(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        """Read stderr until ``pattern`` matches (or the process closes it)."""
        assert self.process.stderr is not None
        while (match := pattern.search(self.stderr)) is None:
            chunk = await self.process.stderr.receive_some()
            if not chunk:
                raise AssertionError(f"stderr ended without {pattern.pattern!r}:\n{self.text}")
            self.stderr += chunk
        return match

    async def finish(self) -> int:
        """Wait for exit, collecting the rest of stderr."""
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some():
            self.stderr += chunk
        return await self.process.wait()

    @property
    def text(self) -> str:
        return self.stderr.decode(errors="replace")


@asynccontextmanager
async def start_service(args: list[str], env: dict[str, str], cwd: Path) -> AsyncIterator[Service]:
    """Run ``python -m trio_mailer ARGS``; killed on the way out if the test left it running."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_mailer", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield Service(process)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            assert process.stderr is not None
            await process.stderr.aclose()


async def serve_until_it_exits(env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``serve`` that is expected to stop by itself; its exit status and stderr."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_mailer", "serve"],
            env=env,
            cwd=cwd,
            capture_stderr=True,
            check=False,
        )
    return result.returncode, result.stderr.decode()


@asynccontextmanager
async def silent_server(connected: trio.Event | None = None) -> AsyncIterator[int]:
    """A loopback TCP port that accepts connections and never says a word (a hung service);
    ``connected`` is set when the first connection arrives."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    streams: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        streams.append(stream)
        if connected is not None:
            connected.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, hold, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The current environment without MAILER_* leftovers, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(overrides)
    return env


T0 = 1_790_000_000.0  # a wall-clock unix time
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
TEMPLATES = MailTemplates.load(shipped_templates_dir())
COMPOSER = MailComposer(TEMPLATES, "noreply@example.com", "Acme")


def mail(n: int) -> OutgoingMail:
    """A small built mail number ``n``, as the sender gets it."""
    return OutgoingMail(
        message_id=f"<{n}@example.com>",
        kind=MailKind.PASSWORD,
        envelope_from="noreply@example.com",
        envelope_to=f"user{n}@example.com",
        data=b"Subject: x\r\n\r\nbody\r\n",
    )


def queued(
    n: int, *, accepted_at_unix: float | None = None, data: bytes | None = None
) -> MailRecord:
    """A freshly accepted mail number ``n``."""
    built = OutgoingMail(
        message_id=f"<{n}@x.example>",
        kind=MailKind.RETRIEVE if n % 2 else MailKind.PASSWORD,
        envelope_from="mailer@x.example",
        envelope_to=f"user{n}@y.example",
        data=data if data is not None else f"Subject: code\r\n\r\ncode {n:06d}\r\n".encode(),
    )
    return MailRecord.accepted(built, T0 + n if accepted_at_unix is None else accepted_at_unix)


@asynccontextmanager
async def running_service(
    relay_port: int, ca_file: Path, cwd: Path, **env: str
) -> AsyncIterator[tuple[Service, int]]:
    """``trio-mailer serve`` in a subprocess; yields it and its gRPC port."""
    full = subprocess_env(**relay_env(relay_port, ca_file, **env))
    async with start_service(["serve"], full, cwd) as service:
        port = int((await service.read_until(LISTENING)).group(1))
        yield service, port


@asynccontextmanager
async def relay_and_service(
    relay_tls: ssl.SSLContext, ca_file: Path, cwd: Path, **env: str
) -> AsyncIterator[tuple[FaultRelay, Service, int]]:
    relay = FaultRelay(ssl_context=relay_tls)
    async with trio.open_nursery() as nursery:
        relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
        async with running_service(relay_port, ca_file, cwd, **env) as (service, port):
            yield relay, service, port
        nursery.cancel_scope.cancel()


def _build_wheel(project: Path, pattern: str, out_dir: Path) -> Path:
    """Build the wheel of the project at ``project`` into ``out_dir`` (no build isolation)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out_dir),
            str(project),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = out_dir.glob(pattern)
    return wheel


def build_wheel(out_dir: Path) -> Path:
    """Build the service's wheel (pyproject.toml, hatchling) into ``out_dir``."""
    return _build_wheel(Path(__file__).resolve().parent.parent, "trio_mailer-*.whl", out_dir)


def build_client_wheel(out_dir: Path) -> Path:
    """Build trio-mailer-client's wheel (client/pyproject.toml) into ``out_dir``."""
    root = Path(__file__).resolve().parent.parent
    return _build_wheel(root / "client", "trio_mailer_client-*.whl", out_dir)


# Caller authentication: tokens and the certificates of a TLS-protected service.
TOKEN = "tok-6f1d2c9a8b7e4f30a1b2"
OTHER_TOKEN = "tok-0000000000000000dead"
HASHED_TOKEN = "tok-hashed-only-9e8d7c6b5a"


@attrs.frozen
class Pki:
    """Files for a TLS-protected service: its certificate, and a client CA with a client cert."""

    server_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path  # cert + key in one PEM
    expired_client_cert: Path
    stranger_cert: Path  # signed by a CA the service does not trust


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def tls_env(pki: Pki, *, mutual: bool) -> dict[str, str]:
    env = {"MAILER_TLS_CERT": str(pki.server_cert), "MAILER_TLS_KEY": str(pki.server_key)}
    if mutual:
        env["MAILER_TLS_CLIENT_CA"] = str(pki.client_ca)
    return env


# A relay's answer for a dead mailbox, and the suppression list on at its default.
ON = {**FAST, "MAILER_SUPPRESS_S": "604800"}  # the default (helpers.relay_env turns it off)
DEAD = "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown"


def mailer_service(
    queue: MailQueue,
    *,
    composer: MailComposer = COMPOSER,
    outbox: Outbox | None = None,
    board: StatusBoard | None = None,
    admission: AdmissionControl | None = None,
    metrics: Metrics | None = None,
    identify: Identify = lambda metadata: ANONYMOUS_CALLER,
    pacer: RefusalPacer | None = None,
    refusal_wait_s: float = REFUSAL_WAIT_S,
    wall_clock: Callable[[], float] = trio.current_time,
) -> MailerService:
    """The Mailer's handlers over real use cases, in-process: the parts a test does not give
    are fresh (a memory outbox, no limits, the wall clock tied to trio's)."""
    outbox = outbox if outbox is not None else MemoryOutbox()
    board = board if board is not None else StatusBoard()
    metrics = metrics if metrics is not None else Metrics()
    if admission is None:
        admission = AdmissionControl(outbox, window_s=86400.0, wall_clock=wall_clock)
    accept = AcceptMail(
        composer,
        queue,
        outbox,
        board,
        admission,
        metrics,
        pacer if pacer is not None else RefusalPacer(),
        refusal_wait_s,
        now=lambda: datetime.now(UTC),
        wall_clock=wall_clock,
    )
    return MailerService(accept, MailStatusLookup(board, outbox, admission), identify, metrics)


# ---- what several test files share: /metrics scrapes, stock grpcio calls ----


async def http_get(port: int, path: str) -> tuple[str, dict[str, str], str]:
    """A plain HTTP/1.1 GET; returns (status line, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body.decode()


async def scrape(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert h.app.metrics_port is not None
    status, headers, body = await http_get(h.app.metrics_port, "/metrics")
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def grpcio_call(port: int, credentials: grpc.ChannelCredentials | None) -> MsgReply | str:
    """One SendPass from a stock grpcio client; the status code's name on failure."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        call = channel.unary_unary(
            "/trio_mailer.v1.Mailer/SendPass",
            request_serializer=MsgRequest.SerializeToString,
            response_deserializer=MsgReply.FromString,
        )
        try:
            reply: MsgReply = call(MsgRequest(to="user@example.com", code="1"), timeout=5)
            return reply
        except grpc.RpcError as exc:
            return str(exc.code().name)


def credentials(pki: Pki, client_pem: Path | None = None) -> grpc.ChannelCredentials:
    chain = client_pem.read_bytes() if client_pem else None
    return grpc.ssl_channel_credentials(
        root_certificates=pki.server_ca.read_bytes(),
        private_key=chain,  # the PEM holds the key first, then the chain
        certificate_chain=chain,
    )
