"""A small SMTP server on Trio: the core of the dev capture relay and of the tests' fault relay.

Theory of operation
-------------------
``SMTPServer.serve`` accepts TCP connections and runs one session task per connection. A
session is a loop: read one CRLF-terminated line, then run the command. Replies are never built
from client text, so a client cannot inject reply lines.

Session state, per connection (``Session``)::

    tls_active     set by implicit TLS, or by a successful STARTTLS (which resets everything
                   below: RFC 3207 says to forget what the client said before TLS)
    greeted        EHLO/HELO seen; needed for AUTH and MAIL
    authenticated  AUTH succeeded; needed for MAIL when require_auth
    envelope       MAIL sets the sender, RCPT adds recipients, DATA + final "." consumes both;
                   EHLO, HELO and RSET clear it

A mail is recorded (``received``, one INFO log line, ``on_mail``) just *before* its 2xx reply is
written: once a client has read the 250, the mail is already visible to whoever drove it, so
nobody needs to race the server task.

Everything is bounded: line length, message size, commands and recipients per session,
concurrent sessions, and every read, write and TLS handshake (``idle_timeout_s``). A client
that breaks any of these, fails the TLS handshake or just goes away ends its own session with
one log line; the server keeps serving.

Hooks
-----
``SMTPServer`` is abstract, as trio's streams are: a server fills in all four hooks. The dev
capture relay (``capture_relay.py``) writes mails to files and answers with relay faults on
demand; the tests' fault relay (``tests/fakes/fault_relay.py``) scripts misbehaviour.

``command_received(session, verb)``
    called for every command line as it arrives, before it is handled (to observe). AUTH
    continuation lines hold credentials and never reach it.
``before_reply(session, command)``
    awaited before a known command, the greeting ("GREETING") or the end of a message ("DOT")
    is answered (``REPLY_COMMANDS``); it may wait, may raise ``EndSession`` to drop the
    connection, and returns a reply to send instead of the normal one (None: the normal one).
    A replaced reply never invents state: the command's *effect* (a state change, entering DATA
    mode, starting TLS, recording a mail) happens only when both the normal reply and the reply
    actually sent are positive (2xx/3xx). So "550" on RCPT refuses that recipient, "451" on DOT
    loses the mail, and "250" cannot make a refused command succeed. For AUTH the replacement is
    the *final* reply of the exchange, after any 334 prompts. Any reply starting with "421"
    closes the connection after it is sent (RFC 5321 section 3.8).
``write_reply(session, payload)``
    writes one encoded reply; ``session.write(payload)`` is the plain way (in pieces, slowly:
    a relay that stalls).
``keep_mail(mail, number)``
    a mail whose final "." takes effect, before it is recorded; returns it as kept (with the
    ``file_name`` it was written to, say). An ``OSError`` answers "451" and records nothing.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hmac
import itertools
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import NoReturn

import attrs
import trio

__all__ = [
    "IDLE_TIMEOUT_S",
    "MAX_COMMANDS_PER_SESSION",
    "MAX_LINE_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_RECIPIENTS",
    "MAX_SESSIONS",
    "REPLY_COMMANDS",
    "TLS_MODES",
    "EndSession",
    "ReceivedMail",
    "SMTPServer",
    "ServerStatistics",
    "Session",
]

MAX_LINE_BYTES = 8 * 1024
"""Longest command or message line, without its CRLF; longer gets "500" and the session closes."""
MAX_MESSAGE_BYTES = 10 * 1024 * 1024
"""Default cap on one message's size after dot-unstuffing; advertised as EHLO SIZE."""
MAX_COMMANDS_PER_SESSION = 10_000
MAX_RECIPIENTS = 1_000
"""Per message; RFC 5321 section 4.5.3.1.8 asks servers to accept at least 100."""
MAX_SESSIONS = 100
"""Default cap on concurrent sessions; further connections get "421" and are closed."""
IDLE_TIMEOUT_S = 300.0
"""Default budget for each read, write and TLS handshake (RFC 5321 section 4.5.3.2.7)."""
CLOSE_TIMEOUT_S = 2.0
"""Budget for the polite TLS close after QUIT; the socket is closed regardless."""

_RECEIVE_CHUNK_BYTES = 64 * 1024

REPLY_COMMANDS = frozenset(
    {"GREETING", "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "DOT"}
    | {"NOOP", "RSET", "QUIT"}
)
"""What ``before_reply`` can be asked about: the commands, plus "GREETING" and "DOT"."""
TLS_MODES = ("implicit", "starttls", "none")

# Addresses: anything but brackets, whitespace and control characters, so they are safe to log.
_ADDRESS = r"([^<>\s\x00-\x1f\x7f]*)"
_MAIL_FROM = re.compile(r"FROM:\s*<" + _ADDRESS + r">(?:\s+\S.*)?", re.IGNORECASE)
_RCPT_TO = re.compile(r"TO:\s*<" + _ADDRESS + r">(?:\s+\S.*)?", re.IGNORECASE)


@attrs.frozen
class ReceivedMail:
    """One mail that got a 2xx reply after its final "."."""

    mail_from: str
    """The MAIL FROM address, without <> ("" for the null sender)."""
    rcpt_to: tuple[str, ...]
    """The accepted RCPT TO addresses, without <>."""
    data: bytes
    """The message as received: dot-unstuffed, CRLF line ends, without the final ".\\r\\n"."""
    session_id: int
    """1-based number of the connection that carried it."""
    file_name: str | None = None
    """The file ``keep_mail`` wrote it to, if any (the capture relay's .eml in outbox_dir)."""


@attrs.frozen
class ServerStatistics:
    sessions_opened: int
    """Connections accepted so far, including those refused with "421 too many sessions"."""
    sessions_active: int
    mails_received: int
    """Mails recorded so far (not reduced by `history_limit`)."""


class _LineTooLongError(Exception):
    pass


class EndSession(Exception):
    """Ends one session; `reason` is logged once, at `log_level`."""

    def __init__(self, reason: str, *, log_level: int = logging.DEBUG) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_level = log_level


@attrs.define
class _LineReader:
    """Splits a byte stream into CRLF-terminated lines, refusing lines over `max_line_bytes`."""

    stream: trio.abc.ReceiveStream
    max_line_bytes: int
    _buffer: bytearray = attrs.field(init=False, factory=bytearray)
    # Where to resume the CRLF search, so a long line arriving in pieces is scanned once.
    _scanned: int = attrs.field(init=False, default=0)

    async def read_line(self) -> bytes:
        """Returns the next line without its CRLF.

        Raises:
            _LineTooLongError: the line is longer than `max_line_bytes`.
            EndSession: the client closed its side.
        """
        while True:
            end = self._buffer.find(b"\r\n", self._scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                self._scanned = 0
                if len(line) > self.max_line_bytes:
                    raise _LineTooLongError
                return line
            # The last byte may be the "\r" of a CRLF split across two reads.
            if len(self._buffer) > self.max_line_bytes + 1:
                raise _LineTooLongError
            self._scanned = max(0, len(self._buffer) - 1)
            chunk = await self.stream.receive_some(_RECEIVE_CHUNK_BYTES)
            if not chunk:
                raise EndSession("client closed the connection")
            self._buffer += chunk

    def has_line(self) -> bool:
        """Whether a complete line is already buffered (the client pipelined it)."""
        return b"\r\n" in self._buffer

    def discard_buffered(self) -> int:
        """Drops bytes received but not read yet; returns how many."""
        count = len(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return count


@attrs.define
class Session:
    """One connection's state (see the module docstring); handed to the hooks."""

    session_id: int
    stream: trio.abc.Stream
    reader: _LineReader
    tls_active: bool
    idle_timeout_s: float
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    finished: trio.Event = attrs.field(factory=trio.Event)
    greeted: bool = False
    authenticated: bool = False
    mail_from: str | None = None
    rcpt_to: list[str] = attrs.field(factory=list)
    command_count: int = 0

    def reset_envelope(self) -> None:
        self.mail_from = None
        self.rcpt_to = []

    def has_pipelined_line(self) -> bool:
        """Whether the client's next line has arrived already (it pipelined its commands)."""
        return self.reader.has_line()

    async def write(self, payload: bytes) -> None:
        """Writes `payload` as it is, within `idle_timeout_s` (the plain ``write_reply``)."""
        with trio.move_on_after(self.idle_timeout_s):
            await self.stream.send_all(payload)
            return
        raise EndSession("client stopped reading replies")

    def drop(self) -> None:
        """Closes the connection abruptly (no reply, no TLS close_notify); ``finished`` is set
        once it is closed."""
        self.cancel_scope.cancel()


def _is_positive(reply: str) -> bool:
    return reply[:1] in ("2", "3")


def _resolve(normal: str, replacement: str | None) -> tuple[str, bool]:
    """Returns (reply to send, whether the command takes effect); see the module docstring."""
    reply = normal if replacement is None else replacement
    return reply, _is_positive(normal) and _is_positive(reply)


def _decode_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters in `text`
        return None


_Handler = Callable[[Session, str, str | None], Awaitable[None]]


class SMTPServer(abc.ABC):
    """An SMTP server (RFC 5321 subset) that records what it accepts; a subclass fills in the
    hooks (see the module docstring).

    Args:
        ssl_context: server-side context; required unless `tls_mode` is "none".
        tls_mode: "implicit" (TLS from the first byte), "starttls" (plaintext greeting, then
            STARTTLS if `offer_starttls`) or "none".
        offer_starttls: in "starttls" mode, whether EHLO advertises STARTTLS and the command
            is accepted (otherwise 502).
        credentials: (user, password) that AUTH accepts; None accepts any.
        require_auth: MAIL before a successful AUTH gets 530.
        hostname: named in the greeting and EHLO reply.
        log: gets one INFO line per accepted mail (envelope, size, file; never the body) and
            one line per ended session; default: this module's logger.
        max_sessions: concurrent sessions; further connections get 421 and are closed.
        max_message_bytes: message size limit (552 above it), advertised as SIZE.
        idle_timeout_s: budget for each read, write and TLS handshake; then 421 and close.
        history_limit: if set, `received` keeps only about this many newest entries, so a
            long-running server does not grow without bound.
        pipelining: advertise RFC 2920 PIPELINING in EHLO (commands are handled in order either
            way).
        on_mail: called with each mail as it is recorded (the dev web inbox listens here).

    Raises:
        ValueError: `tls_mode` is unknown, or needs an `ssl_context` that is missing.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        tls_mode: str = "implicit",
        offer_starttls: bool = True,
        credentials: tuple[str, str] | None = None,
        require_auth: bool = False,
        hostname: str = "localhost",
        log: logging.Logger | None = None,
        max_sessions: int = MAX_SESSIONS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        history_limit: int | None = None,
        pipelining: bool = False,
        on_mail: Callable[[ReceivedMail], None] | None = None,
    ) -> None:
        if tls_mode not in TLS_MODES:
            raise ValueError(f"tls_mode: expected one of {', '.join(TLS_MODES)}, got {tls_mode!r}")
        if tls_mode != "none" and ssl_context is None:
            raise ValueError(f"ssl_context: required when tls_mode is {tls_mode!r}, got None")
        self._ssl_context = ssl_context
        self._tls_mode = tls_mode
        self._offer_starttls = offer_starttls
        self._credentials = (
            None
            if credentials is None
            else (credentials[0].encode("utf-8"), credentials[1].encode("utf-8"))
        )
        self._require_auth = require_auth
        self._hostname = hostname
        self.log = log if log is not None else logging.getLogger(__name__)
        self._max_sessions = max_sessions
        self._max_message_bytes = max_message_bytes
        self._idle_timeout_s = idle_timeout_s
        self.history_limit = history_limit
        self._pipelining = pipelining
        self._on_mail = on_mail

        self.received: list[ReceivedMail] = []
        self.sessions_opened = 0
        self._mails_received = 0
        self._mail_numbers = itertools.count(1)
        self._mail_arrived = trio.lowlevel.ParkingLot()
        self._active: dict[int, Session] = {}
        self._handlers: dict[str, _Handler] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "NOOP": self._noop,
            "RSET": self._rset,
            "QUIT": self._quit,
        }

    # ---- the hooks (see the module docstring) ----

    @abc.abstractmethod
    def command_received(self, session: Session, verb: str) -> None:
        """Called for every command line as it arrives (`verb` upper-cased), before handling."""

    @abc.abstractmethod
    async def before_reply(self, session: Session, command: str) -> str | None:
        """Awaited before `command` (one of REPLY_COMMANDS) is answered; returns a replacement
        reply or None. May raise EndSession to drop the connection without a reply."""

    @abc.abstractmethod
    async def write_reply(self, session: Session, payload: bytes) -> None:
        """Writes one encoded reply (``session.write`` writes it plainly)."""

    @abc.abstractmethod
    async def keep_mail(self, mail: ReceivedMail, number: int) -> ReceivedMail:
        """Keeps a mail about to be answered "250" (`number`: 1-based, per server); returns it
        as kept. Raises OSError to answer "451" instead."""

    # ---- public API ----

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            sessions_opened=self.sessions_opened,
            sessions_active=len(self._active),
            mails_received=self._mails_received,
        )

    def open_sessions(self) -> list[Session]:
        """The sessions open now (not those refused with "421 too many sessions")."""
        return list(self._active.values())

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Binds, reports the bound port through `task_status`, serves until cancelled.

        Give `host` as an address: with port 0 and a name resolving to several addresses, each
        listener gets its own port and only the first one is reported.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_port: int = listeners[0].socket.getsockname()[1]
        task_status.started(bound_port)
        await trio.serve_listeners(self._handle_connection, listeners)

    async def wait_for_mails(self, count: int) -> None:
        """Returns once `count` mails have been recorded since the server was made."""
        if self._mails_received >= count:
            await trio.lowlevel.checkpoint()
            return
        while self._mails_received < count:
            await self._mail_arrived.park()

    # ---- connection and session ----

    async def _handle_connection(self, transport: trio.SocketStream) -> None:
        self.sessions_opened += 1
        session_id = self.sessions_opened
        stream: trio.abc.Stream = transport
        implicit_tls = self._tls_mode == "implicit"
        if implicit_tls:
            assert self._ssl_context is not None  # checked in __init__
            stream = trio.SSLStream(transport, self._ssl_context, server_side=True)
        session = Session(
            session_id=session_id,
            stream=stream,
            reader=_LineReader(stream, MAX_LINE_BYTES),
            tls_active=implicit_tls,
            idle_timeout_s=self._idle_timeout_s,
        )
        refused = len(self._active) >= self._max_sessions
        if not refused:
            self._active[session_id] = session
        try:
            with session.cancel_scope:
                try:
                    if isinstance(stream, trio.SSLStream):
                        await self._handshake(session, stream)
                    if refused:
                        await self._close_with(session, "421 4.3.2 Too many sessions, closing")
                    await self._converse(session)
                except EndSession as exc:
                    self.log.log(
                        exc.log_level, "capture session %d ended: %s", session_id, exc.reason
                    )
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.log.debug("capture session %d: client went away: %r", session_id, exc)
                except Exception:
                    # A bug here must not stop a `dev` relay that other clients are using;
                    # the traceback goes to the log (and into a failing test's report).
                    self.log.exception("capture session %d failed", session_id)
        finally:
            self._active.pop(session_id, None)
            await trio.aclose_forcefully(session.stream)
            session.finished.set()

    async def _handshake(
        self, session: Session, ssl_stream: trio.SSLStream[trio.abc.Stream]
    ) -> None:
        with trio.move_on_after(self._idle_timeout_s):
            try:
                await ssl_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                # Usually a client that does not trust our CA: worth one INFO line in `dev`,
                # never a traceback.
                raise EndSession(
                    f"TLS handshake failed: {exc.__cause__ or exc}", log_level=logging.INFO
                ) from exc
            return
        raise EndSession("TLS handshake timed out", log_level=logging.INFO)

    async def _converse(self, session: Session) -> None:
        greeting = f"220 {self._hostname} ESMTP trio-mailer capture"
        replacement = await self.before_reply(session, "GREETING")
        await self._send(session, _resolve(greeting, replacement)[0])
        while True:
            line = await self._read_line(session)
            session.command_count += 1
            if session.command_count > MAX_COMMANDS_PER_SESSION:
                await self._close_with(session, "421 4.7.0 Too many commands, closing")
            verb, _, argument = line.decode("utf-8", errors="replace").partition(" ")
            verb = verb.upper()
            self.command_received(session, verb)
            handler = self._handlers.get(verb)
            if handler is None:
                await self._send(session, "502 5.5.2 Command not recognized")
                continue
            replacement = await self.before_reply(session, verb)
            await handler(session, argument.strip(), replacement)

    async def _read_line(self, session: Session) -> bytes:
        with trio.move_on_after(self._idle_timeout_s):
            try:
                return await session.reader.read_line()
            except _LineTooLongError:
                await self._close_with(session, "500 5.5.2 Line too long, closing")
        await self._close_with(session, "421 4.4.2 Idle timeout, closing")

    async def _send(self, session: Session, reply: str) -> None:
        lines = [line.rstrip("\r") for line in reply.split("\n")]
        payload = ("\r\n".join(lines) + "\r\n").encode("utf-8")
        await self.write_reply(session, payload)
        if reply.startswith("421"):
            raise EndSession(f"sent {lines[-1]!r}")

    async def _close_with(self, session: Session, reply: str) -> NoReturn:
        await self._send(session, reply)
        raise EndSession(f"sent {reply!r}")

    def _auth_offered(self, session: Session) -> bool:
        return session.tls_active or self._tls_mode == "none"

    def _starttls_offered(self, session: Session) -> bool:
        return self._tls_mode == "starttls" and self._offer_starttls and not session.tls_active

    # ---- commands ----

    async def _ehlo(self, session: Session, argument: str, replacement: str | None) -> None:
        if not argument:
            normal = "501 5.5.4 Syntax: EHLO domain"
        else:
            lines = [
                f"250-{self._hostname}",
                f"250-SIZE {self._max_message_bytes}",
                "250-8BITMIME",
                "250-ENHANCEDSTATUSCODES",
            ]
            if self._auth_offered(session):
                lines.append("250-AUTH PLAIN LOGIN")
            if self._starttls_offered(session):
                lines.append("250-STARTTLS")
            if self._pipelining:
                lines.append("250-PIPELINING")
            lines.append("250 HELP")
            normal = "\n".join(lines)
        await self._greeted(session, normal, replacement)

    async def _helo(self, session: Session, argument: str, replacement: str | None) -> None:
        normal = f"250 {self._hostname}" if argument else "501 5.5.4 Syntax: HELO domain"
        await self._greeted(session, normal, replacement)

    async def _greeted(self, session: Session, normal: str, replacement: str | None) -> None:
        """Answers EHLO or HELO; a positive answer starts the session afresh."""
        reply, takes_effect = _resolve(normal, replacement)
        if takes_effect:
            session.greeted = True
            session.reset_envelope()
        await self._send(session, reply)

    async def _starttls(self, session: Session, argument: str, replacement: str | None) -> None:
        if argument:
            normal = "501 5.5.4 Syntax: STARTTLS"
        elif session.tls_active:
            normal = "503 5.5.1 TLS already active"
        elif not self._starttls_offered(session):
            normal = "502 5.5.1 STARTTLS not offered"
        else:
            normal = "220 2.0.0 Ready to start TLS"
        reply, takes_effect = _resolve(normal, replacement)
        await self._send(session, reply)
        if not takes_effect:
            return
        # Bytes the client sent after STARTTLS but before the handshake were not protected;
        # acting on them is the STARTTLS command-injection hole (CVE-2011-0411), so drop them.
        if session.reader.discard_buffered():
            self.log.info(
                "capture session %d: discarded plaintext pipelined after STARTTLS",
                session.session_id,
            )
        assert self._ssl_context is not None  # checked in __init__
        ssl_stream = trio.SSLStream(session.stream, self._ssl_context, server_side=True)
        session.stream = ssl_stream
        session.reader = _LineReader(ssl_stream, MAX_LINE_BYTES)
        await self._handshake(session, ssl_stream)
        # RFC 3207 section 4.2: forget everything learned before TLS; the client must EHLO again.
        session.tls_active = True
        session.greeted = False
        session.authenticated = False
        session.reset_envelope()

    async def _auth(self, session: Session, argument: str, replacement: str | None) -> None:
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if not session.greeted:
            normal = "503 5.5.1 Send EHLO first"
        elif not self._auth_offered(session):
            normal = "538 5.7.11 Encryption required for requested authentication mechanism"
        elif session.authenticated:
            normal = "503 5.5.1 Already authenticated"
        elif session.mail_from is not None:
            normal = "503 5.5.1 AUTH not permitted during a mail transaction"
        elif mechanism == "PLAIN":
            normal = await self._auth_plain(session, initial)
        elif mechanism == "LOGIN":
            normal = await self._auth_login(session, initial)
        elif not mechanism:
            normal = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
        else:
            normal = "504 5.5.4 Unrecognized authentication mechanism"
        reply, takes_effect = _resolve(normal, replacement)
        if takes_effect:
            session.authenticated = True
        await self._send(session, reply)

    async def _auth_plain(self, session: Session, initial: str) -> str:
        """Runs AUTH PLAIN (RFC 4616) to its end; returns the final reply to send."""
        response: str | None = initial
        if not initial:
            await self._send(session, "334 ")
            response = await self._read_auth_response(session)
        elif initial == "=":  # RFC 4954: "=" is an empty initial response
            response = ""
        if response is None:
            return "501 5.7.0 Authentication cancelled"
        decoded = _decode_base64(response)
        parts = decoded.split(b"\0") if decoded is not None else []
        if len(parts) != 3:
            return "501 5.5.2 Malformed AUTH PLAIN response"
        return self._check_credentials(parts[1], parts[2])

    async def _auth_login(self, session: Session, initial: str) -> str:
        """Runs AUTH LOGIN to its end; returns the final reply to send."""
        user_b64: str | None = initial
        if not initial:
            await self._send(session, "334 VXNlcm5hbWU6")  # "Username:"
            user_b64 = await self._read_auth_response(session)
            if user_b64 is None:
                return "501 5.7.0 Authentication cancelled"
        await self._send(session, "334 UGFzc3dvcmQ6")  # "Password:"
        password_b64 = await self._read_auth_response(session)
        if user_b64 is None or password_b64 is None:
            return "501 5.7.0 Authentication cancelled"
        user = _decode_base64(user_b64)
        password = _decode_base64(password_b64)
        if user is None or password is None:
            return "501 5.5.2 Cannot decode AUTH LOGIN response"
        return self._check_credentials(user, password)

    async def _read_auth_response(self, session: Session) -> str | None:
        """Reads one AUTH continuation line; None when the client cancels with "*"."""
        # Continuation lines hold credentials: they never reach `command_received`.
        text = (await self._read_line(session)).decode("ascii", errors="replace").strip()
        return None if text == "*" else text

    def _check_credentials(self, user: bytes, password: bytes) -> str:
        if self._credentials is not None:
            expected_user, expected_password = self._credentials
            # compare_digest on both, combined with `&`, so timing says nothing about which failed.
            user_ok = hmac.compare_digest(user, expected_user)
            password_ok = hmac.compare_digest(password, expected_password)
            if not (user_ok & password_ok):
                return "535 5.7.8 Authentication credentials invalid"
        return "235 2.7.0 Authentication successful"

    async def _mail(self, session: Session, argument: str, replacement: str | None) -> None:
        match = _MAIL_FROM.fullmatch(argument)
        if not session.greeted:
            normal = "503 5.5.1 Send EHLO/HELO first"
        elif self._require_auth and not session.authenticated:
            normal = "530 5.7.0 Authentication required"
        elif session.mail_from is not None:
            normal = "503 5.5.1 Nested MAIL command"
        elif match is None:
            normal = "501 5.5.4 Syntax: MAIL FROM:<address>"
        else:
            normal = "250 2.1.0 Ok"
        reply, takes_effect = _resolve(normal, replacement)
        if takes_effect and match is not None:
            session.mail_from = match.group(1)
        await self._send(session, reply)

    async def _rcpt(self, session: Session, argument: str, replacement: str | None) -> None:
        match = _RCPT_TO.fullmatch(argument)
        if session.mail_from is None:
            normal = "503 5.5.1 Need MAIL before RCPT"
        elif match is None or not match.group(1):
            normal = "501 5.5.4 Syntax: RCPT TO:<address>"
        elif len(session.rcpt_to) >= MAX_RECIPIENTS:
            normal = "452 4.5.3 Too many recipients"
        else:
            normal = "250 2.1.5 Ok"
        reply, takes_effect = _resolve(normal, replacement)
        if takes_effect and match is not None:
            session.rcpt_to.append(match.group(1))
        await self._send(session, reply)

    async def _data(self, session: Session, argument: str, replacement: str | None) -> None:
        if argument:
            normal = "501 5.5.4 Syntax: DATA"
        elif session.mail_from is None:
            normal = "503 5.5.1 Need MAIL command"
        elif not session.rcpt_to:
            normal = "503 5.5.1 Need RCPT command"
        else:
            normal = "354 End data with <CR><LF>.<CR><LF>"
        reply, takes_effect = _resolve(normal, replacement)
        await self._send(session, reply)
        if takes_effect:
            await self._receive_message(session)

    async def _receive_message(self, session: Session) -> None:
        """Reads the message up to the final "." and answers it (the "DOT" reply)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await self._read_line(session)
            if line == b".":
                break
            if line.startswith(b"."):
                line = line[1:]  # dot-unstuffing, RFC 5321 section 4.5.2
            size += len(line) + 2
            if size <= self._max_message_bytes:
                chunks.append(line + b"\r\n")
            elif size <= 2 * self._max_message_bytes:
                # Keep reading (to answer 552 in step with the client) but keep nothing.
                chunks.clear()
            else:
                await self._close_with(session, "552 5.3.4 Message size exceeds fixed limit")
        mail = ReceivedMail(
            session.mail_from or "", tuple(session.rcpt_to), b"".join(chunks), session.session_id
        )
        # Whatever the reply, the transaction is over (RFC 5321 section 4.1.1.4).
        session.reset_envelope()

        replacement = await self.before_reply(session, "DOT")
        number = next(self._mail_numbers)
        if size > self._max_message_bytes:
            normal = "552 5.3.4 Message size exceeds fixed limit"
        else:
            normal = f"250 2.0.0 Ok: queued as C{number:06d}"
        reply, takes_effect = _resolve(normal, replacement)
        if takes_effect:
            try:
                mail = await self.keep_mail(mail, number)
            except OSError as exc:
                self.log.warning("capture: cannot keep the mail: %s", exc)
                reply, takes_effect = "451 4.3.0 Cannot store the message", False
        if takes_effect:
            self._record_mail(mail)
        await self._send(session, reply)

    def _record_mail(self, mail: ReceivedMail) -> None:
        self.received.append(mail)
        if self.history_limit is not None and len(self.received) > 2 * self.history_limit:
            del self.received[: -self.history_limit]
        self._mails_received += 1
        self.log.info(
            "captured mail from=<%s> to=%s size=%d file=%s",
            mail.mail_from,
            ",".join(f"<{address}>" for address in mail.rcpt_to),
            len(mail.data),
            mail.file_name or "-",
        )
        self._mail_arrived.unpark_all()
        if self._on_mail is not None:
            self._on_mail(mail)

    async def _noop(self, session: Session, argument: str, replacement: str | None) -> None:
        await self._send(session, _resolve("250 2.0.0 Ok", replacement)[0])

    async def _rset(self, session: Session, argument: str, replacement: str | None) -> None:
        normal = "501 5.5.4 Syntax: RSET" if argument else "250 2.0.0 Ok"
        reply, takes_effect = _resolve(normal, replacement)
        if takes_effect:
            session.reset_envelope()
        await self._send(session, reply)

    async def _quit(self, session: Session, argument: str, replacement: str | None) -> None:
        reply, takes_effect = _resolve("221 2.0.0 Bye", replacement)
        await self._send(session, reply)
        if takes_effect:
            # A polite close (TLS close_notify); the session's `finally` closes it regardless.
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await session.stream.aclose()
            raise EndSession("client quit")
