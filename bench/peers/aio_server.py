"""The Python peer: trio-mailer's SendPass as a team would build it on grpc.aio and aiosmtplib.

Not a baseline of one part (as ``bench/grpcio_server.py`` is for the gRPC stack) but the whole
job, written with the stock tools of an asyncio shop and none of trio-mailer's own code:

- **gRPC**: ``grpc.aio`` with the servicer class grpcio-tools generates from
  ``protos/trio_mailer/v1/mailer.proto`` at start-up (beside the committed ``mailer_pb2``);
- **validation**: a dot-atom address pattern and a code of 1 to 128 printable characters;
- **admission**: a bounded ``asyncio.Queue``; when it is full (counting the calls between the
  check and the put) the call is answered ``sent=false, reason="queue full"`` at once, before
  anything is built, as the API says (``protos/trio_mailer/v1/mailer.proto``, ``MsgReply``);
- **rendering**: Jinja2 on the shipped ``templates/mail/password.msg`` (its subject, text and
  html blocks, autoescaped for html), then ``email.message.EmailMessage`` with the SMTP policy;
- **durability**: ``sqlite3`` in WAL mode with ``synchronous=FULL``, one connection in a
  thread of its own (what ``aiosqlite`` does); the mail's row is committed before the reply,
  and its outcome after the relay's answer. Undelivered rows are queued again at start-up;
- **delivery**: one ``aiosmtplib.SMTP`` session with verified TLS (implicit or STARTTLS) and
  AUTH, reused for ``MAILER_SESSION_MAX_MESSAGES`` mails (100, nodemailer's default too), one
  mail at a time; a broken session is reopened after a backoff that doubles from
  ``MAILER_RETRY_BASE_S`` to ``MAILER_RETRY_MAX_S``; a 5xx reply fails the mail.

Configured by the ``MAILER_*`` variables the service reads (the subset above, plus
``MAILER_REMOTE_HOST``, ``MAILER_FROM``, ``MAILER_SERVICENAME``, ``MAILER_SMTP_CA_FILE``,
``MAILER_USER``/``MAILER_PASSWORD``, ``MAILER_SMTP_TLS``, ``MAILER_SMTP_TIMEOUT_S``,
``MAILER_SERVE_HOST``/``MAILER_SERVE_PORT``, ``MAILER_QUEUE_SIZE`` and ``MAILER_OUTBOX``, a
file path), so that the benchmark configures all three stacks alike. Only the default locale.
Prints "listening on HOST:PORT" and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import importlib.util
import logging
import os
import re
import signal
import sqlite3
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

# Not in the test extra: ``pip install -e '.[bench]'``. Without it this module still type-checks
# (the CI's ``mypy bench``), and the peer's test is skipped.
import aiosmtplib  # type: ignore[import-not-found, unused-ignore]
import grpc
import grpc.aio
import jinja2

from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
PROTO_FILE = Path("trio_mailer/v1/mailer.proto")
TEMPLATE = "mail/password.msg"
MAX_MESSAGE_BYTES = 4 * 1024  # the request limit trio-mailer applies
MAX_ADDRESS_CHARS = 254
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
CODE = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
FULL_LOG_INTERVAL_S = 1.0  # "queue full" is logged at most this often

log = logging.getLogger("peer.aio")
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    relay_host: str
    relay_port: int
    implicit_tls: bool
    ca_file: str | None
    user: str | None
    password: str | None
    smtp_timeout_s: float
    from_address: str
    service_name: str
    serve_host: str
    serve_port: int
    queue_size: int
    outbox: Path
    templates_dir: Path
    retry_base_s: float
    retry_max_s: float
    session_max_messages: int

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Settings:
        host, _, port = env["MAILER_REMOTE_HOST"].rpartition(":")
        tls = env.get("MAILER_SMTP_TLS", "implicit")
        if tls not in ("implicit", "starttls"):
            raise ValueError(f"MAILER_SMTP_TLS: expected implicit or starttls, got {tls!r}")
        outbox = env.get("MAILER_OUTBOX", "")
        if not outbox or outbox == "memory" or "://" in outbox:
            raise ValueError(f"MAILER_OUTBOX: expected a file path, got {outbox!r}")
        return cls(
            relay_host=host.strip("[]"),
            relay_port=int(port),
            implicit_tls=tls == "implicit",
            ca_file=env.get("MAILER_SMTP_CA_FILE"),
            user=env.get("MAILER_USER"),
            password=env.get("MAILER_PASSWORD"),
            smtp_timeout_s=float(env.get("MAILER_SMTP_TIMEOUT_S", "30")),
            from_address=env["MAILER_FROM"],
            service_name=env.get("MAILER_SERVICENAME", "trio-mailer"),
            serve_host=env.get("MAILER_SERVE_HOST", "127.0.0.1"),
            serve_port=int(env.get("MAILER_SERVE_PORT", "20100")),
            queue_size=int(env.get("MAILER_QUEUE_SIZE", "10")),
            outbox=Path(outbox),
            templates_dir=Path(env.get("MAILER_TEMPLATES_DIR", str(ROOT / "templates"))),
            retry_base_s=float(env.get("MAILER_RETRY_BASE_S", "1")),
            retry_max_s=float(env.get("MAILER_RETRY_MAX_S", "60")),
            session_max_messages=int(env.get("MAILER_SESSION_MAX_MESSAGES", "100")),
        )


@dataclass(frozen=True)
class Mail:
    message_id: str
    to: str
    raw: bytes


def validate(to: str, code: str) -> str | None:
    """The first problem with a request, naming its field; None when there is none."""
    if len(to) > MAX_ADDRESS_CHARS or not ADDRESS.fullmatch(to):
        return "to: expected one address such as user@example.com"
    if not CODE.fullmatch(code):
        return "code: expected 1 to 128 printable characters"
    return None


class Composer:
    """Renders the password mail with Jinja2 and builds it with ``EmailMessage``."""

    def __init__(self, templates_dir: Path, from_address: str, service_name: str) -> None:
        loader = jinja2.FileSystemLoader(templates_dir)
        common: dict[str, Any] = {
            "loader": loader,
            "undefined": jinja2.StrictUndefined,
            "keep_trailing_newline": True,
        }
        self._plain = jinja2.Environment(autoescape=False, **common).get_template(TEMPLATE)
        self._html = jinja2.Environment(autoescape=True, **common).get_template(TEMPLATE)
        self._from_address = from_address
        self._from = email.utils.formataddr((service_name, from_address))
        self._service_name = service_name
        self._domain = from_address.rpartition("@")[2]

    @staticmethod
    def _block(template: jinja2.Template, name: str, values: dict[str, str]) -> str:
        return "".join(template.blocks[name](template.new_context(values)))

    def render(self, to: str, code: str) -> tuple[str, str, str]:
        """Subject, text and html, as trio-mailer renders them."""
        values = {"to": to, "code": code, "service_name": self._service_name}
        subject = self._block(self._plain, "subject", values).strip()
        parts = []
        for template, block in ((self._plain, "text"), (self._html, "html")):
            part = self._block(template, block, values).removeprefix("\n")
            parts.append(part if part.endswith("\n") else part + "\n")
        return subject, parts[0], parts[1]

    def compose(self, to: str, code: str) -> Mail:
        subject, text, html = self.render(to, code)
        message_id = f"<{uuid.uuid4().hex}@{self._domain}>"
        message = EmailMessage(policy=email.policy.SMTP)
        message["From"] = self._from
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = email.utils.format_datetime(datetime.now(UTC))
        message["Message-ID"] = message_id
        message["Auto-Submitted"] = "auto-generated"
        message["Content-Language"] = "en"
        message.set_content(text)
        message.add_alternative(html, subtype="html")
        return Mail(message_id, to, message.as_bytes())

    @property
    def from_address(self) -> str:
        return self._from_address


class Outbox:
    """The SQLite outbox, used from one thread of its own (as ``aiosqlite`` does)."""

    def __init__(self, path: Path) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._path = path
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._conn is not None
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        def connect() -> None:
            # Autocommit: each statement is its own transaction, synced before it returns.
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS mail (message_id TEXT PRIMARY KEY, recipient TEXT "
                "NOT NULL, raw BLOB NOT NULL, state TEXT NOT NULL, accepted_at REAL NOT NULL, "
                "finished_at REAL)"
            )
            self._conn = conn

        await asyncio.get_running_loop().run_in_executor(self._executor, connect)

    async def add(self, mail: Mail) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO mail VALUES (?, ?, ?, 'queued', ?, NULL)",
                (mail.message_id, mail.to, mail.raw, time.time()),
            )
        )

    async def finish(self, message_id: str, state: str) -> None:
        await self._run(
            lambda c: c.execute(
                "UPDATE mail SET state = ?, finished_at = ? WHERE message_id = ?",
                (state, time.time(), message_id),
            )
        )

    async def unfinished(self, limit: int) -> list[Mail]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT message_id, recipient, raw FROM mail WHERE state = 'queued' "
                "ORDER BY accepted_at LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [Mail(*row) for row in rows]

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(lambda c: c.close())
        self._executor.shutdown()


class Sender:
    """Takes mail from the queue and delivers it over one reused aiosmtplib session."""

    def __init__(
        self, settings: Settings, outbox: Outbox, queue: asyncio.Queue[Mail], from_address: str
    ) -> None:
        self._settings = settings
        self._outbox = outbox
        self._queue = queue
        self._from = from_address
        self._tls = ssl.create_default_context(cafile=settings.ca_file)
        self._client: Any = None
        self._sent_on_session = 0

    async def run(self) -> None:
        while True:
            mail = await self._queue.get()
            await self._deliver(mail)

    async def _session(self) -> Any:
        if self._client is not None and (
            not self._client.is_connected
            or self._sent_on_session >= self._settings.session_max_messages
        ):
            await self._drop()
        if self._client is None:
            s = self._settings
            client = aiosmtplib.SMTP(
                hostname=s.relay_host,
                port=s.relay_port,
                username=s.user,
                password=s.password,
                use_tls=s.implicit_tls,
                start_tls=not s.implicit_tls,
                tls_context=self._tls,
                timeout=s.smtp_timeout_s,
            )
            await client.connect()
            self._client, self._sent_on_session = client, 0
        return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()

    async def _deliver(self, mail: Mail) -> None:
        delay_s = self._settings.retry_base_s
        while True:
            code = 0
            try:
                client = await self._session()
                await client.sendmail(self._from, [mail.to], mail.raw)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                code = exc.recipients[0].code
            except aiosmtplib.SMTPResponseException as exc:
                code = exc.code
            except (aiosmtplib.SMTPException, OSError) as exc:
                log.warning("relay: %s; again in %.0f s", exc, delay_s)
            else:
                self._sent_on_session += 1
                await self._outbox.finish(mail.message_id, "delivered")
                return
            if code >= 500:
                log.warning("relay refused %s: %d", mail.message_id, code)
                await self._outbox.finish(mail.message_id, "failed")
                return
            await self._drop()
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, self._settings.retry_max_s)


def generated_servicer_module() -> ModuleType:
    """``mailer_pb2_grpc``, generated by grpcio-tools into a temporary directory and loaded.

    Its ``mailer_pb2`` import resolves to the committed ``trio_mailer.v1.mailer_pb2``.
    """
    import grpc_tools  # type: ignore[import-untyped, unused-ignore]
    from grpc_tools import protoc  # type: ignore[import-untyped, unused-ignore]

    with tempfile.TemporaryDirectory(prefix="peer-aio-") as out:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
                f"--grpc_python_out={out}",
                str(PROTO_DIR / PROTO_FILE),
            ]
        )
        if status != 0:
            raise RuntimeError(f"grpcio-tools could not generate the servicer (status {status})")
        path = Path(out) / PROTO_FILE.with_name("mailer_pb2_grpc.py")
        spec = importlib.util.spec_from_file_location("mailer_pb2_grpc", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def make_servicer(
    base: type, composer: Composer, outbox: Outbox, queue: asyncio.Queue[Mail]
) -> object:
    """The Mailer servicer: ``base`` is the generated ``MailerServicer`` (UNIMPLEMENTED for the
    methods this peer leaves out)."""

    class Mailer(base):  # type: ignore[misc]
        def __init__(self) -> None:
            self._storing = 0  # calls past the room check whose mail is not yet queued
            self._refused = 0
            self._last_full_log = -1e9

        async def SendPass(  # the generated servicer's method name
            self, request: MsgRequest, context: grpc.aio.ServicerContext[MsgRequest, MsgReply]
        ) -> MsgReply:
            problem = validate(request.to, request.code)
            if problem is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            if queue.qsize() + self._storing >= queue.maxsize:
                self._refused += 1
                now = time.monotonic()
                if now - self._last_full_log >= FULL_LOG_INTERVAL_S:
                    log.warning("refusing mail: queue full (%d so far)", self._refused)
                    self._last_full_log = now
                return MsgReply(sent=False, reason="queue full")
            self._storing += 1
            try:
                mail = composer.compose(request.to, request.code)
                await outbox.add(mail)
            except sqlite3.Error:
                log.exception("cannot store a mail")
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "cannot store the mail right now; try again later"
                )
            finally:
                self._storing -= 1
            queue.put_nowait(mail)
            return MsgReply(sent=True, message_id=mail.message_id)

    return Mailer()


async def serve(settings: Settings) -> None:
    generated = generated_servicer_module()
    composer = Composer(settings.templates_dir, settings.from_address, settings.service_name)
    outbox = Outbox(settings.outbox)
    await outbox.open()
    queue: asyncio.Queue[Mail] = asyncio.Queue(settings.queue_size)
    for mail in await outbox.unfinished(settings.queue_size):
        queue.put_nowait(mail)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    generated.add_MailerServicer_to_server(
        make_servicer(generated.MailerServicer, composer, outbox, queue), server
    )
    port = server.add_insecure_port(f"{settings.serve_host}:{settings.serve_port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sender = asyncio.create_task(Sender(settings, outbox, queue, composer.from_address).run())
    await server.start()
    log.info("listening on %s:%d", settings.serve_host, port)
    await stop.wait()
    await server.stop(grace=1.0)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    await outbox.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = Settings.from_env(dict(os.environ))
    except (KeyError, ValueError) as exc:
        print(f"peer: bad configuration: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
