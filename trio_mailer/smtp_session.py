"""One SMTP session to the relay: smtplib, driven from Trio through a worker thread.

Theory of operation
-------------------
``BlockingSmtp`` owns one ``smtplib`` connection and does the blocking work: connect with
verified TLS (implicit, or STARTTLS that must be offered), EHLO, AUTH, then per mail MAIL, RCPT,
DATA, the message and the final ".", each step's reply checked. Every socket operation is
bounded by the configured timeout.

``ThreadedSmtpSession`` is what the sender talks to. Each call hops to a worker thread through
``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)`` of its own, so the smtplib object is
never used by two threads at once. When the caller is cancelled (shutdown past its grace
period), the call is abandoned and the socket is shut down from the Trio side, which makes the
blocked thread's read fail at once; the limiter stays held until that thread has finished, so
nothing else touches the connection meanwhile. That shutdown is the one thing done to the
connection from outside its thread.

Outcomes of ``send``: ``Delivered`` (2xx after the final "."), ``Rejected`` (a 4xx/5xx reply to
MAIL, RCPT, DATA or the final "."; the session stays usable after a RSET), or the exception
``SessionLost`` (connection closed, timed out, garbled, or a 421 "closing" reply): the session is
gone, and ``after_data_end`` says whether the final "." had been sent, in which case the relay
may have taken the mail.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from .config import Config, TlsMode
from .logs import printable
from .message import OutgoingMail

R = TypeVar("R")

_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


@attrs.frozen
class RelaySettings:
    """What a session needs from the config (no mail-building settings)."""

    host: str
    port: int
    tls: TlsMode
    timeout_s: float
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    local_hostname: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> RelaySettings:
        return cls(
            host=config.relay_host,
            port=config.relay_port,
            tls=config.smtp_tls,
            timeout_s=config.smtp_timeout_s,
            user=config.smtp_user,
            password=config.smtp_password,
        )


def make_relay_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that verifies the relay's certificate and host name.

    Trusts the system store, plus ``ca_file`` when given.

    Raises:
        ssl.SSLError, OSError: ``ca_file`` cannot be read as PEM certificates.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


@attrs.frozen
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {printable(self.text)}"


@attrs.frozen
class Delivered:
    reply: Reply


@attrs.frozen
class Rejected:
    command: str  # "MAIL", "RCPT", "DATA" or "DOT" (the reply to the final ".")
    reply: Reply


class ConnectFailed(Exception):
    """No usable session: refused, timed out, TLS failed, STARTTLS missing, AUTH refused."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionLost(Exception):
    """The session broke while sending; the mail must go again on a new session."""

    def __init__(self, reason: str, *, after_data_end: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after_data_end = after_data_end


def _reply(code: int, text: bytes | str) -> Reply:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return Reply(code, text)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed: {exc.verify_message}"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{exc.smtp_code} {printable(_reply(exc.smtp_code, exc.smtp_error).text)}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return printable(str(exc) or type(exc).__name__)


class BlockingSmtp:
    """One smtplib connection. Every method blocks; call them from one thread at a time."""

    def __init__(self, settings: RelaySettings, ssl_context: ssl.SSLContext | None) -> None:
        self._settings = settings
        self._ssl_context = ssl_context
        self._smtp: smtplib.SMTP | None = None

    def connect(self) -> None:
        """Open the session: connect, TLS, EHLO, AUTH.

        Raises:
            ConnectFailed: with a reason fit for the log.
        """
        s = self._settings
        smtp: smtplib.SMTP
        try:
            if s.tls is TlsMode.IMPLICIT:
                smtp = smtplib.SMTP_SSL(
                    s.host,
                    s.port,
                    timeout=s.timeout_s,
                    context=self._ssl_context,
                    local_hostname=s.local_hostname,
                )
            else:
                smtp = smtplib.SMTP(
                    s.host, s.port, timeout=s.timeout_s, local_hostname=s.local_hostname
                )
        except (OSError, smtplib.SMTPException) as exc:
            raise ConnectFailed(
                f"cannot connect to {s.host}:{s.port}: {_describe_error(exc)}"
            ) from exc
        self._smtp = smtp
        try:
            self._ehlo(smtp)
            if s.tls is TlsMode.STARTTLS:
                if not smtp.has_extn("starttls"):
                    raise ConnectFailed(
                        "relay does not offer STARTTLS; refusing to send without TLS"
                    )
                code, text = smtp.starttls(context=self._ssl_context)
                if code != 220:
                    raise ConnectFailed(f"STARTTLS refused: {_reply(code, text)}")
                self._ehlo(smtp)
            if s.user is not None and s.password is not None:
                smtp.login(s.user, s.password)
        except ConnectFailed:
            self.close()
            raise
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise ConnectFailed(f"session set-up failed: {_describe_error(exc)}") from exc

    @staticmethod
    def _ehlo(smtp: smtplib.SMTP) -> None:
        code, text = smtp.ehlo()
        if code != 250:
            raise ConnectFailed(f"EHLO refused: {_reply(code, text)}")

    def noop(self) -> bool:
        """True when the session answers NOOP with 250 (a 421 comes back without raising)."""
        if self._smtp is None:
            return False
        try:
            code, _ = self._smtp.noop()
        except (OSError, smtplib.SMTPException):
            return False
        return code == 250

    def reset(self) -> bool:
        """RSET after a rejected command; False when the session did not take it."""
        if self._smtp is None:
            return False
        try:
            code, _ = self._smtp.rset()
        except (OSError, smtplib.SMTPException):
            return False
        return code == 250

    def send(self, mail: OutgoingMail) -> Delivered | Rejected:
        """Send one mail in lockstep, checking every reply.

        Raises:
            SessionLost: the connection broke, timed out, or the relay said 421.
        """
        smtp = self._smtp
        if smtp is None:
            raise SessionLost("no session", after_data_end=False)
        command = "MAIL"
        data_end_sent = False
        try:
            code, text = smtp.mail(mail.envelope_from)
            if code != 250:
                return self._rejected(command, code, text)
            command = "RCPT"
            code, text = smtp.rcpt(mail.envelope_to)
            if code not in (250, 251):
                return self._rejected(command, code, text)
            command = "DATA"
            code, text = smtp.docmd("DATA")
            if code != 354:
                return self._rejected(command, code, text)
            command = "DOT"
            payload = _LEADING_DOT.sub(b"..", mail.data)
            if not payload.endswith(b"\r\n"):
                payload += b"\r\n"
            # From here on the relay may take the mail even if we never hear its reply.
            data_end_sent = True
            smtp.send(payload + b".\r\n")
            code, text = smtp.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise SessionLost(
                f"{command}: {_describe_error(exc)}", after_data_end=data_end_sent
            ) from exc
        if 200 <= code < 300:
            return Delivered(_reply(code, text))
        return self._rejected(command, code, text)

    def _rejected(self, command: str, code: int, text: bytes) -> Rejected:
        if code == 421:
            # RFC 5321 3.8: the relay is closing the channel; the mail was not taken.
            self.close()
            raise SessionLost(f"{command}: {_reply(code, text)}", after_data_end=False)
        return Rejected(command, _reply(code, text))

    def quit(self) -> None:
        """Say QUIT and close; errors are irrelevant at this point."""
        if self._smtp is None:
            return
        try:
            self._smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass
        self.close()

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def shutdown_socket(self) -> None:
        """Unblock a thread stuck in a socket call on this session (called from Trio).

        ``close()`` would not wake a blocked ``recv``; ``shutdown`` does. The base-class method is
        used so that an ``SSLSocket`` does not drop its TLS state under the other thread.
        """
        smtp = self._smtp
        sock = getattr(smtp, "sock", None)
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class ThreadedSmtpSession:
    """The async face of ``BlockingSmtp``: each call runs in a worker thread."""

    def __init__(self, blocking: BlockingSmtp) -> None:
        self._blocking = blocking
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def connect(
        cls, settings: RelaySettings, ssl_context: ssl.SSLContext | None
    ) -> ThreadedSmtpSession:
        """Open a session.

        Raises:
            ConnectFailed: with the reason.
        """
        session = cls(BlockingSmtp(settings, ssl_context))
        await session._call(session._blocking.connect)
        return session

    async def _call(self, fn: Callable[..., R], *args: object) -> R:
        try:
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self._limiter, abandon_on_cancel=True
            )
        except trio.Cancelled:
            self._blocking.shutdown_socket()
            raise

    async def probe(self) -> bool:
        return await self._call(self._blocking.noop)

    async def reset(self) -> bool:
        return await self._call(self._blocking.reset)

    async def send(self, mail: OutgoingMail) -> Delivered | Rejected:
        return await self._call(self._blocking.send, mail)

    async def close(self, *, quit: bool) -> None:
        await self._call(self._blocking.quit if quit else self._blocking.close)
