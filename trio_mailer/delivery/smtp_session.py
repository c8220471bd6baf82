"""One SMTP session to the relay: smtplib, driven from Trio through a worker thread.

Theory of operation
-------------------
``BlockingSmtp`` owns one ``smtplib`` connection and does the blocking work: connect with
verified TLS (implicit, or STARTTLS that must be offered), EHLO, AUTH, then per mail MAIL, RCPT,
DATA, the message and the final ".", each step's reply checked. When the relay offers
PIPELINING (RFC 2920), MAIL, RCPT and DATA go in one write and their three replies are read and
checked in order: two round trips per mail instead of four. Every socket operation is bounded by
the configured timeout.

One whole mail is one call into the worker thread (not one per command): a thread hop costs
a wake-up of the Trio loop each way, and under ingress load every hop also waits for the GIL.

``ThreadedSmtpSession`` is what the sender talks to. Each call hops to a worker thread through
``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)`` of its own, so the smtplib object is
never used by two threads at once. When the caller is cancelled (shutdown past its grace
period), the call is abandoned and the socket is shut down from the Trio side, which makes the
blocked thread's read fail at once; the limiter stays held until that thread has finished, so
nothing else touches the connection meanwhile. That shutdown is the one thing done to the
connection from outside its thread.

Every call also has an overall watchdog on the Trio side: the configured timeout times the
number of round trips the call makes. smtplib's per-operation timeouts catch a relay that goes
silent; the watchdog also catches one that trickles a byte at a time. On expiry the socket is
shut down (as on cancellation) and the call fails as "timed out".

Outcomes of ``send`` (replies classified by ``smtp_replies.classify``): ``Delivered`` (2xx after
the final "."), ``Rejected`` (a 4xx/5xx reply to MAIL, RCPT, DATA or the final "."; the session
stays usable after a RSET), or the exception ``SessionLost`` (connection closed, timed out, a
garbled or out-of-place reply, or 421 "closing"): the session is gone, and ``after_data_end``
says whether the final "." had been sent without a clear answer, in which case the relay may
have taken the mail.

``ConnectFailed.config_error`` marks failures that retrying soon will not fix: a certificate that
does not verify, or credentials the relay refuses (AUTH 535 and kin).
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

from trio_mailer import tls
from trio_mailer.core.config import Config, TlsMode
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.smtp_replies import ReplyClass, classify, is_auth_config_error
from trio_mailer.logs import printable

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
    pipelining: bool = True  # use RFC 2920 PIPELINING when the relay offers it

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
    return tls.client_context(ca_file, system_store_too=True)


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

    def __init__(self, reason: str, *, config_error: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.config_error = config_error


class ProbeFailed(Exception):
    """NOOP was not answered 250: the session is gone, and nothing of the mail was sent."""


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
        self._pipelining = False
        self._aborted = False
        # Set just before the final "." is written; read from the Trio side after the socket
        # was shut down, when it can no longer change from False to a sent ".".
        self.data_end_sent = False

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
                f"cannot connect to {s.host}:{s.port}: {_describe_error(exc)}",
                config_error=isinstance(exc, ssl.SSLCertVerificationError),
            ) from exc
        self._smtp = smtp
        if self._aborted:
            # The Trio side gave up on this connect while it was under way.
            self.close()
            raise ConnectFailed("connect abandoned")
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
            self._pipelining = s.pipelining and smtp.has_extn("pipelining")
        except ConnectFailed:
            self.close()
            raise
        except smtplib.SMTPAuthenticationError as exc:
            self.close()
            raise ConnectFailed(
                f"AUTH refused: {_describe_error(exc)}",
                config_error=is_auth_config_error(exc.smtp_code),
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise ConnectFailed(
                f"session set-up failed: {_describe_error(exc)}",
                config_error=isinstance(exc, ssl.SSLCertVerificationError),
            ) from exc

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

    def send(self, mail: OutgoingMail, probe_first: bool = False) -> Delivered | Rejected:
        """Send one mail, checking every reply (pipelined when the relay offers PIPELINING).

        With ``probe_first``, NOOP first, in the same thread hop.

        Raises:
            ProbeFailed: the NOOP was not answered 250; nothing of the mail was sent.
            SessionLost: the connection broke, timed out, or the relay said 421.
        """
        if probe_first and not self.noop():
            self.close()
            raise ProbeFailed()
        smtp = self._smtp
        if smtp is None:
            raise SessionLost("no session", after_data_end=False)
        command = "MAIL"
        self.data_end_sent = False
        try:
            if self._pipelining:
                rejected = self._envelope_pipelined(smtp, mail)
            else:
                rejected = self._envelope_lockstep(smtp, mail)
            if rejected is not None:
                return rejected
            command = "DOT"
            payload = _LEADING_DOT.sub(b"..", mail.data)
            if not payload.endswith(b"\r\n"):
                payload += b"\r\n"
            # From here on the relay may take the mail even if we never hear its reply.
            self.data_end_sent = True
            smtp.send(payload + b".\r\n")
            code, text = smtp.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise SessionLost(
                f"{command}: {_describe_error(exc)}", after_data_end=self.data_end_sent
            ) from exc
        if classify(command, code) is ReplyClass.SUCCESS:
            return Delivered(_reply(code, text))
        return self._not_accepted(command, code, text)

    def _envelope_lockstep(self, smtp: smtplib.SMTP, mail: OutgoingMail) -> Rejected | None:
        """MAIL, RCPT, DATA one at a time; None once DATA got 354."""
        code, text = smtp.mail(mail.envelope_from)
        if classify("MAIL", code) is not ReplyClass.SUCCESS:
            return self._not_accepted("MAIL", code, text)
        code, text = smtp.rcpt(mail.envelope_to)
        if classify("RCPT", code) is not ReplyClass.SUCCESS:
            return self._not_accepted("RCPT", code, text)
        code, text = smtp.docmd("DATA")
        if classify("DATA", code) is not ReplyClass.INTERMEDIATE:
            return self._not_accepted("DATA", code, text)
        return None

    def _envelope_pipelined(self, smtp: smtplib.SMTP, mail: OutgoingMail) -> Rejected | None:
        """RFC 2920: MAIL, RCPT and DATA in one write, then their three replies, each checked.

        Returns None once DATA got 354, else the first rejection. If DATA was accepted after an
        earlier command failed, the transaction is ended with an empty "." (RFC 2920 3.1).
        """
        smtp.send(f"MAIL FROM:<{mail.envelope_from}>\r\nRCPT TO:<{mail.envelope_to}>\r\nDATA\r\n")
        first_failure: tuple[str, int, bytes] | None = None
        data_accepted = False
        for command in ("MAIL", "RCPT", "DATA"):
            code, text = smtp.getreply()
            kind = classify(command, code)
            if kind is ReplyClass.CLOSING or kind is ReplyClass.PROTOCOL_ERROR:
                return self._not_accepted(command, code, text)  # raises SessionLost
            if command == "DATA":
                data_accepted = kind is ReplyClass.INTERMEDIATE
                if not data_accepted and first_failure is None:
                    first_failure = (command, code, text)
            elif kind is not ReplyClass.SUCCESS and first_failure is None:
                first_failure = (command, code, text)
        if first_failure is None:
            return None
        if data_accepted:
            smtp.send(b".\r\n")
            smtp.getreply()
        return self._not_accepted(*first_failure)

    def _not_accepted(self, command: str, code: int, text: bytes) -> Rejected:
        """A reply other than the expected one: a rejection, or the end of the session.

        Raises:
            SessionLost: 421 (closing; the mail was not taken) or a protocol error (after the
                final "." the relay's intent is then unknown).
        """
        kind = classify(command, code)
        if kind in (ReplyClass.TRANSIENT, ReplyClass.PERMANENT):
            return Rejected(command, _reply(code, text))
        self.close()
        if kind is ReplyClass.CLOSING:
            raise SessionLost(f"{command}: {_reply(code, text)}", after_data_end=False)
        raise SessionLost(
            f"{command}: unexpected reply {_reply(code, text)}",
            after_data_end=command == "DOT",
        )

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
        self._aborted = True
        smtp = self._smtp
        sock = getattr(smtp, "sock", None)
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


# Round trips per call, for the watchdog: greeting, EHLO, STARTTLS, EHLO, AUTH (up to 3 for
# LOGIN); MAIL, RCPT, DATA, the data and its reply.
CONNECT_ROUND_TRIPS = 8
SEND_ROUND_TRIPS = 4


class ThreadedSmtpSession:
    """The async face of ``BlockingSmtp``: each call runs in a worker thread."""

    def __init__(self, blocking: BlockingSmtp, timeout_s: float) -> None:
        self._blocking = blocking
        self._timeout_s = timeout_s
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def connect(
        cls, settings: RelaySettings, ssl_context: ssl.SSLContext | None
    ) -> ThreadedSmtpSession:
        """Open a session.

        Raises:
            ConnectFailed: with the reason.
        """
        session = cls(BlockingSmtp(settings, ssl_context), settings.timeout_s)
        try:
            await session._call(session._blocking.connect, round_trips=CONNECT_ROUND_TRIPS)
        except _WatchdogExpired:
            raise ConnectFailed("session set-up timed out") from None
        return session

    async def _call(self, fn: Callable[..., R], *args: object, round_trips: int = 1) -> R:
        with trio.move_on_after(self._timeout_s * round_trips):
            try:
                return await trio.to_thread.run_sync(
                    fn, *args, limiter=self._limiter, abandon_on_cancel=True
                )
            except trio.Cancelled:
                self._blocking.shutdown_socket()
                raise
        raise _WatchdogExpired()

    async def reset(self) -> bool:
        try:
            return await self._call(self._blocking.reset)
        except _WatchdogExpired:
            return False

    async def send(self, mail: OutgoingMail, *, probe_first: bool = False) -> Delivered | Rejected:
        try:
            return await self._call(
                self._blocking.send,
                mail,
                probe_first,
                round_trips=SEND_ROUND_TRIPS + probe_first,
            )
        except _WatchdogExpired:
            raise SessionLost("timed out", after_data_end=self._blocking.data_end_sent) from None

    async def close(self, *, quit: bool) -> None:
        try:
            await self._call(self._blocking.quit if quit else self._blocking.close)
        except _WatchdogExpired:
            pass


class _WatchdogExpired(Exception):
    """A call ran past its overall time budget; its socket has been shut down."""
