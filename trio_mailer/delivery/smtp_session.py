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
does not verify, credentials the relay refuses (AUTH 535 and kin), a relay that does not offer
STARTTLS or any AUTH mechanism we speak.

A relay's reply is bounded: at most ``MAX_REPLY_LINES`` lines and ``MAX_REPLY_BYTES`` bytes
(smtplib's ``getreply`` keeps every continuation line with no limit on their number, so an
endless ``250-`` would grow memory without end); a longer reply ends the session. The smtplib
object exists before it connects (``smtplib.SMTP_SSL(host)`` would connect inside its
constructor, out of the watchdog's reach), and the raw socket is kept from the moment it exists,
so the watchdog can always shut it down and no worker thread outlives its session.

AUTH uses one mechanism (PLAIN, else LOGIN): ``smtplib.login`` would try each advertised one in
turn, costing two failures per wrong password in the relay's log (and fail2ban's count). After a
failed EHLO or AUTH the session says QUIT before closing.
"""

from __future__ import annotations

import queue
import re
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import outcome
import trio

from trio_mailer import tls
from trio_mailer.core.config import Config, TlsMode
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.smtp_replies import ReplyClass, classify, is_auth_config_error
from trio_mailer.logs import printable

R = TypeVar("R")

MAX_REPLY_LINES = 100  # lines in one reply (EHLO lists a dozen or two)
MAX_REPLY_BYTES = 64 * 1024  # bytes in one reply, all lines together
MAX_REPLY_LINE_BYTES = 8192  # one line; the same as smtplib's own limit
AUTH_MECHANISMS = ("PLAIN", "LOGIN")  # in order of preference; one is used, never both


class ReplyTooLarge(smtplib.SMTPException):
    """The relay's reply went past ``MAX_REPLY_LINES`` or ``MAX_REPLY_BYTES``."""


class _BoundedReplies(smtplib.SMTP):
    """smtplib with a cap on the size of one reply, and the raw socket kept for the watchdog."""

    raw_sock: socket.socket | None = None

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: Any = None
    ) -> tuple[int, bytes]:
        # smtplib's one private part we rely on: ``_host`` is the name TLS verifies (implicit
        # TLS and STARTTLS alike). Only its constructor sets it, and we construct without a
        # host so that nothing connects before the watchdog can reach the socket.
        self._host = host
        return super().connect(host, port, source_address)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        self.raw_sock = sock
        return sock

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's ``getreply``, but bounded in lines and bytes.

        Raises:
            smtplib.SMTPServerDisconnected: the connection closed or broke.
            ReplyTooLarge: the reply went past the caps (the connection is closed).
            smtplib.SMTPResponseException: a line longer than ``MAX_REPLY_LINE_BYTES``.
        """
        lines: list[bytes] = []
        total = 0
        if self.file is None:
            assert self.sock is not None
            self.file = self.sock.makefile("rb")
        while True:
            try:
                line = self.file.readline(MAX_REPLY_LINE_BYTES + 1)
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(
                    f"Connection unexpectedly closed: {exc}"
                ) from exc
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            if len(line) > MAX_REPLY_LINE_BYTES:
                self.close()
                raise smtplib.SMTPResponseException(500, "Line too long.")
            total += len(line)
            lines.append(line[4:].strip(b" \t\r\n"))
            if len(lines) > MAX_REPLY_LINES or total > MAX_REPLY_BYTES:
                self.close()
                raise ReplyTooLarge(
                    f"reply longer than {MAX_REPLY_LINES} lines or {MAX_REPLY_BYTES} bytes"
                )
            try:
                code = int(line[:3])
            except ValueError:
                code = -1
                break
            if line[3:4] != b"-":
                break
        return code, b"\n".join(lines)


class _BoundedSMTP(_BoundedReplies):
    pass


class _BoundedSMTPSSL(_BoundedReplies, smtplib.SMTP_SSL):
    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        raw = super()._get_socket(host, port, timeout)
        # Wrapped first and shaken hands with after, so the watchdog can shut the socket down
        # during the handshake too (wrapping detaches the raw socket object from its fd).
        sock = self.context.wrap_socket(
            raw,
            server_hostname=self._host,
            do_handshake_on_connect=False,
        )
        self.raw_sock = sock
        try:
            sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        return sock


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


class SessionLost(Exception):
    """The session broke while sending; the mail must go again on a new session."""

    def __init__(self, reason: str, *, after_data_end: bool, closing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after_data_end = after_data_end
        self.closing = closing  # the relay said 421: it is closing (overloaded, at a limit)


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
        # Built without a host, so nothing connects before ``self._smtp`` is set: the watchdog
        # can shut the socket down at any moment of the connect.
        if s.tls is TlsMode.IMPLICIT:
            smtp = _BoundedSMTPSSL(
                timeout=s.timeout_s, context=self._ssl_context, local_hostname=s.local_hostname
            )
        else:
            smtp = _BoundedSMTP(timeout=s.timeout_s, local_hostname=s.local_hostname)
        self._smtp = smtp
        if self._aborted:
            # The Trio side gave up on this connect before it began.
            self.close()
            raise ConnectFailed("connect abandoned")
        try:
            code, text = smtp.connect(s.host, s.port)
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise ConnectFailed(
                f"cannot connect to {s.host}:{s.port}: {_describe_error(exc)}",
                config_error=isinstance(exc, ssl.SSLCertVerificationError),
            ) from exc
        try:
            if code != 220:
                raise ConnectFailed(f"greeting refused: {_reply(code, text)}")
            self._ehlo(smtp)
            if s.tls is TlsMode.STARTTLS:
                if not smtp.has_extn("starttls"):
                    raise ConnectFailed(
                        "relay does not offer STARTTLS; refusing to send without TLS",
                        config_error=True,
                    )
                code, text = smtp.starttls(context=self._ssl_context)
                if code != 220:
                    raise ConnectFailed(f"STARTTLS refused: {_reply(code, text)}")
                self._ehlo(smtp)
            if s.user is not None and s.password is not None:
                self._auth(smtp, s.user, s.password)
            self._pipelining = s.pipelining and smtp.has_extn("pipelining")
        except ConnectFailed:
            self.quit()
            raise
        except smtplib.SMTPAuthenticationError as exc:
            self.quit()
            raise ConnectFailed(
                f"AUTH refused: {_describe_error(exc)}",
                config_error=is_auth_config_error(exc.smtp_code),
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            self.quit()
            raise ConnectFailed(
                f"session set-up failed: {_describe_error(exc)}",
                config_error=isinstance(exc, ssl.SSLCertVerificationError),
            ) from exc

    @staticmethod
    def _auth(smtp: smtplib.SMTP, user: str, password: str) -> None:
        """AUTH with one mechanism: a wrong password costs one failure, not one per mechanism.

        Raises:
            ConnectFailed: the relay offers no AUTH, or none of ``AUTH_MECHANISMS``.
            smtplib.SMTPAuthenticationError: the relay refused the credentials.
        """
        if not smtp.has_extn("auth"):
            raise ConnectFailed(
                "relay does not offer AUTH, but MAILER_USER is set", config_error=True
            )
        offered = smtp.esmtp_features["auth"].upper().split()
        mechanism = next((m for m in AUTH_MECHANISMS if m in offered), None)
        if mechanism is None:
            raise ConnectFailed(
                f"relay offers AUTH {printable(' '.join(offered))}, none of "
                f"{', '.join(AUTH_MECHANISMS)}",
                config_error=True,
            )
        smtp.user, smtp.password = user, password
        authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        smtp.auth(mechanism, authobject)

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
        """Send one mail, checking every reply (pipelined when the relay offers PIPELINING).

        Raises:
            SessionLost: the connection broke, timed out, or the relay said 421.
        """
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
        # The same command lines as the pipelined path (the addresses were validated at
        # admission): smtplib's ``mail()``/``rcpt()`` would parse each address back first.
        smtp.send(f"MAIL FROM:<{mail.envelope_from}>\r\n")
        code, text = smtp.getreply()
        if classify("MAIL", code) is not ReplyClass.SUCCESS:
            return self._not_accepted("MAIL", code, text)
        smtp.send(f"RCPT TO:<{mail.envelope_to}>\r\n")
        code, text = smtp.getreply()
        if classify("RCPT", code) is not ReplyClass.SUCCESS:
            return self._not_accepted("RCPT", code, text)
        smtp.send(b"DATA\r\n")
        code, text = smtp.getreply()
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
            raise SessionLost(
                f"{command}: {_reply(code, text)}", after_data_end=False, closing=True
            )
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
        # The raw socket exists from the first moment of the connect (before the TLS handshake);
        # the TLS socket wraps the same file descriptor.
        sock = getattr(smtp, "raw_sock", None) or getattr(smtp, "sock", None)
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

    def __init__(self, blocking: BlockingSmtp, timeout_s: float, relay: str = "") -> None:
        self._blocking = blocking
        self._timeout_s = timeout_s
        self._worker = SessionThread()
        self.relay = relay  # "host:port", for the logs and metrics

    def busy(self) -> bool:
        """True while the worker thread is still using this session."""
        return self._worker.busy()

    @classmethod
    async def connect(
        cls, settings: RelaySettings, ssl_context: ssl.SSLContext | None
    ) -> ThreadedSmtpSession:
        """Open a session.

        Raises:
            ConnectFailed: with the reason.
        """
        session = cls(
            BlockingSmtp(settings, ssl_context),
            settings.timeout_s,
            relay=(
                f"[{settings.host}]:{settings.port}"
                if ":" in settings.host
                else f"{settings.host}:{settings.port}"
            ),
        )
        try:
            await session._call(session._blocking.connect, round_trips=CONNECT_ROUND_TRIPS)
        except _WatchdogExpired:
            session._worker.stop()
            raise ConnectFailed("session set-up timed out") from None
        except BaseException:
            session._worker.stop()
            raise
        return session

    async def _call(
        self, fn: Callable[..., R], *args: object, round_trips: int = 1, last: bool = False
    ) -> R:
        with trio.move_on_after(self._timeout_s * round_trips):
            try:
                return await self._worker.run(fn, *args, last=last)
            except trio.Cancelled:
                self._blocking.shutdown_socket()
                raise
        raise _WatchdogExpired()

    async def probe(self) -> bool:
        try:
            return await self._call(self._blocking.noop)
        except _WatchdogExpired:
            return False

    async def reset(self) -> bool:
        try:
            return await self._call(self._blocking.reset)
        except _WatchdogExpired:
            return False

    async def send(self, mail: OutgoingMail) -> Delivered | Rejected:
        try:
            return await self._call(self._blocking.send, mail, round_trips=SEND_ROUND_TRIPS)
        except _WatchdogExpired:
            raise SessionLost("timed out", after_data_end=self._blocking.data_end_sent) from None

    async def close(self, *, quit: bool) -> None:
        try:
            if self._worker.stopped:
                # A close was given already (and maybe abandoned): the thread runs it, then
                # ends; the socket was shut down if that close was cancelled.
                await trio.lowlevel.checkpoint()
                return
            await self._call(self._blocking.quit if quit else self._blocking.close, last=True)
        except _WatchdogExpired:
            pass


class SessionThread:
    """The one worker thread of a session: runs its calls one at a time, in order.

    The thread is one long ``trio.to_thread.run_sync`` call (started at the first call, from a
    system task, with a ``CapacityLimiter(1)`` of its own) that serves a ``queue.SimpleQueue``;
    each result wakes the waiting task through the Trio token. That is about half the cost of
    a ``trio.to_thread.run_sync`` hop per call (no limiter, no thread-cache hand-off), and a
    mail is one hop. Calls run strictly in the order given, so the connection is never used by
    two threads at once, also after a call was abandoned (its caller cancelled): the next call
    waits in the queue until it has finished. The serving loop ends after the call marked
    ``last`` (the close), and the thread goes back to Trio's thread cache.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._started = False
        self._outstanding = 0  # calls given to the thread and not yet finished (abandoned too)
        self._stopped = False

    def busy(self) -> bool:
        return self._outstanding > 0

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def run(self, fn: Callable[..., R], *args: object, last: bool = False) -> R:
        """Run ``fn(*args)`` in the thread; on cancellation, abandon it (it finishes alone).

        Raises:
            trio.ClosedResourceError: the thread was stopped (after its last call).
            whatever ``fn`` raises.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._stopped:
            raise trio.ClosedResourceError("the session's thread has ended")
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._host, name="trio-mailer smtp session")
        job = _Job(fn, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        self._outstanding += 1
        self._jobs.put(job)
        if last:
            self.stop()

        def abort(_: object) -> trio.lowlevel.Abort:
            job.abandoned = True  # read by the thread under the GIL; it then wakes nobody
            return trio.lowlevel.Abort.SUCCEEDED

        result: R = await trio.lowlevel.wait_task_rescheduled(abort)  # unwrapped by trio
        return result

    def stop(self) -> None:
        """End the thread once the calls already given have run."""
        if not self._stopped:
            self._stopped = True
            if self._started:
                self._jobs.put(None)

    async def _host(self) -> None:
        # Abandoned when the run ends with the loop still waiting (its session never closed):
        # the thread then serves what is queued and stops at the None that stop() queues.
        await trio.to_thread.run_sync(
            self._serve, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1)
        )

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            result = outcome.capture(job.fn, *job.args)
            try:
                job.token.run_sync_soon(self._deliver, job, result)
            except trio.RunFinishedError:
                self._outstanding -= 1  # nobody is left to tell

    def _deliver(self, job: _Job, result: outcome.Outcome[object]) -> None:
        # In the Trio thread.
        self._outstanding -= 1
        if not job.abandoned:
            trio.lowlevel.reschedule(job.task, result)


@attrs.define(eq=False)
class _Job:
    fn: Callable[..., object]
    args: tuple[object, ...]
    task: trio.lowlevel.Task
    token: trio.lowlevel.TrioToken
    abandoned: bool = False


class _WatchdogExpired(Exception):
    """A call ran past its overall time budget; its socket has been shut down."""
