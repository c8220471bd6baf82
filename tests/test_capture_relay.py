"""The SMTP-server core, as the dev capture relay and the tests' fault relay (both built on it),
driven by the stdlib smtplib client (in a thread, on the real clock)."""

from __future__ import annotations

import logging
import pathlib
import re
import smtplib
import ssl
import time

import pytest
import trio
import trio.testing
import trustme

from trio_mailer.dev.capture_relay import CaptureSMTPServer
from trio_mailer.dev.chaos import OFF, Chaos
from trio_mailer.dev.smtp_server import (
    MAX_LINE_BYTES,
    ReceivedMail,
    ServerStatistics,
    SMTPServer,
)

from .fakes.fault_relay import Fault, FaultRelay

HOST = "127.0.0.1"
TEST_TIMEOUT_S = 10.0
# smtplib blocks in its thread where trio.fail_after cannot reach; its own timeout bounds it.
CLIENT_TIMEOUT_S = 5.0
# smtplib would otherwise ask socket.getfqdn() for its EHLO name, which can stall on DNS.
CLIENT_NAME = "client.test"
LOGGER_NAME = "tests.capture_relay"

MESSAGE = (
    b"From: a@example.com\r\n"
    b"To: b@example.com\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"last line\r\n"
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", HOST).configure_cert(context)
    return context


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def start(nursery: trio.Nursery, server: SMTPServer) -> int:
    """Starts `server` in pytest-trio's nursery (cancelled when the test ends); returns its port."""
    port: int = await nursery.start(server.serve)
    return port


def smtps(port: int, context: ssl.SSLContext) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL(
        HOST, port, local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT_S, context=context
    )


def smtp_plain(port: int) -> smtplib.SMTP:
    return smtplib.SMTP(HOST, port, local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT_S)


async def read_reply(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """Reads one reply line from a raw stream; b"" at end of stream."""
    while b"\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    return line


async def refusal(
    port: int, context: ssl.SSLContext, error: type[smtplib.SMTPResponseException]
) -> tuple[int, bytes | str]:
    """Sends one mail that the server must refuse with ``error``; the reply's code and text."""

    def client() -> tuple[int, bytes | str]:
        with smtps(port, context) as smtp:
            with pytest.raises(error) as refused:
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            return refused.value.smtp_code, refused.value.smtp_error

    return await trio.to_thread.run_sync(client)


async def test_implicit_tls_mail_arrives_exactly(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A mail over implicit TLS is recorded with its exact envelope and dot-unstuffed data."""
    server = CaptureSMTPServer(ssl_context=server_context)
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> None:
            with smtps(port, client_context) as smtp:
                smtp.sendmail("a@example.com", ["b@example.com", "c@example.com"], MESSAGE)

        await trio.to_thread.run_sync(client)

    assert server.received == [
        ReceivedMail(
            mail_from="a@example.com",
            rcpt_to=("b@example.com", "c@example.com"),
            data=MESSAGE,
            session_id=1,
        )
    ]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("initial_response_ok", [True, False])
async def test_auth_accepts_right_credentials(
    nursery: trio.Nursery,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    mechanism: str,
    initial_response_ok: bool,
) -> None:
    """AUTH PLAIN/LOGIN, with or without an initial response, accept the configured user."""
    server = CaptureSMTPServer(
        ssl_context=server_context, credentials=("user", "pa55 word"), require_auth=True
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> tuple[int, bytes]:
            with smtps(port, client_context) as smtp:
                smtp.ehlo()
                smtp.user, smtp.password = "user", "pa55 word"
                authobject = getattr(smtp, f"auth_{mechanism.lower()}")
                reply = smtp.auth(mechanism, authobject, initial_response_ok=initial_response_ok)
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                return reply

        code, _ = await trio.to_thread.run_sync(client)

    assert code == 235
    assert len(server.received) == 1


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_refuses_wrong_password(
    nursery: trio.Nursery,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    mechanism: str,
) -> None:
    """A wrong password gets 535, and MAIL then still needs AUTH (530)."""
    server = CaptureSMTPServer(
        ssl_context=server_context, credentials=("user", "secret"), require_auth=True
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> tuple[int, int]:
            with smtps(port, client_context) as smtp:
                smtp.ehlo()
                smtp.user, smtp.password = "user", "wrong"
                authobject = getattr(smtp, f"auth_{mechanism.lower()}")
                with pytest.raises(smtplib.SMTPAuthenticationError) as auth_error:
                    smtp.auth(mechanism, authobject)
                with pytest.raises(smtplib.SMTPSenderRefused) as mail_error:
                    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                return auth_error.value.smtp_code, mail_error.value.smtp_code

        assert await trio.to_thread.run_sync(client) == (535, 530)
    assert server.received == []


async def test_require_auth_refuses_mail_without_auth(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """With require_auth, MAIL before AUTH gets 530 5.7.0 and nothing is recorded."""
    server = CaptureSMTPServer(ssl_context=server_context, require_auth=True)
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        refused = await refusal(port, client_context, smtplib.SMTPSenderRefused)
        assert refused == (530, b"5.7.0 Authentication required")
    assert server.received == []


async def test_starttls_offered_then_auth_and_mail(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """In starttls mode EHLO offers STARTTLS but not AUTH; after STARTTLS it offers AUTH only."""
    server = CaptureSMTPServer(
        ssl_context=server_context, tls_mode="starttls", credentials=("user", "secret")
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> list[tuple[bool, bool]]:
            offers = []
            with smtp_plain(port) as smtp:
                smtp.ehlo()
                offers.append((smtp.has_extn("starttls"), smtp.has_extn("auth")))
                smtp.starttls(context=client_context)
                smtp.ehlo()
                offers.append((smtp.has_extn("starttls"), smtp.has_extn("auth")))
                smtp.login("user", "secret")
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            return offers

        assert await trio.to_thread.run_sync(client) == [(True, False), (False, True)]
    assert [mail.data for mail in server.received] == [MESSAGE]


async def test_starttls_not_offered(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """With offer_starttls=False, smtplib refuses to start TLS and the command itself gets 502."""
    server = CaptureSMTPServer(
        ssl_context=server_context, tls_mode="starttls", offer_starttls=False
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> int:
            with smtp_plain(port) as smtp:
                with pytest.raises(smtplib.SMTPNotSupportedError):
                    smtp.starttls(context=client_context)
                code, _ = smtp.docmd("STARTTLS")
                return code

        assert await trio.to_thread.run_sync(client) == 502


async def test_mails_over_one_session_share_its_id(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """Mails sent over one connection carry that connection's id; the next connection's is 2."""
    server = CaptureSMTPServer(ssl_context=server_context)
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client(count: int) -> None:
            with smtps(port, client_context) as smtp:
                for index in range(count):
                    smtp.sendmail("a@example.com", [f"r{index}@example.com"], MESSAGE)

        await trio.to_thread.run_sync(client, 2)
        await trio.to_thread.run_sync(client, 1)

    assert [(mail.session_id, mail.rcpt_to) for mail in server.received] == [
        (1, ("r0@example.com",)),
        (1, ("r1@example.com",)),
        (2, ("r0@example.com",)),
    ]


async def test_rcpt_fault_refuses_recipient(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A scripted 550 on RCPT refuses the recipient, so no DATA is sent and nothing recorded."""
    server = FaultRelay(ssl_context=server_context)
    server.add_fault(Fault("RCPT", reply="550 5.1.1 No such user"))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> dict[str, tuple[int, bytes]]:
            with smtps(port, client_context) as smtp:
                with pytest.raises(smtplib.SMTPRecipientsRefused) as error:
                    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                return error.value.recipients

        refused = await trio.to_thread.run_sync(client)

    assert refused == {"b@example.com": (550, b"5.1.1 No such user")}
    assert server.received == []
    assert (1, "DATA") not in server.commands


async def test_dot_fault_loses_mail_once(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A scripted 451 after the final "." is not recorded; the fault fires once, the retry lands."""
    server = FaultRelay(ssl_context=server_context)
    server.add_fault(Fault("DOT", reply="451 4.3.0 Try again later"))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> int:
            with smtps(port, client_context) as smtp:
                with pytest.raises(smtplib.SMTPDataError) as error:
                    smtp.sendmail("a@example.com", ["first@example.com"], MESSAGE)
                smtp.sendmail("a@example.com", ["second@example.com"], MESSAGE)
                return error.value.smtp_code

        assert await trio.to_thread.run_sync(client) == 451

    assert [mail.rcpt_to for mail in server.received] == [("second@example.com",)]
    assert server.faults == []


async def test_data_fault_does_not_enter_data_mode(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A non-354 reply to DATA leaves the server reading commands, so the session goes on."""
    server = FaultRelay(ssl_context=server_context)
    server.add_fault(Fault("DATA", reply="451 4.3.0 Not now"))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> tuple[int, int]:
            with smtps(port, client_context) as smtp:
                with pytest.raises(smtplib.SMTPDataError) as error:
                    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                noop_code, _ = smtp.noop()
                # smtplib leaves the transaction open when the DATA command itself fails.
                smtp.rset()
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                return error.value.smtp_code, noop_code

        assert await trio.to_thread.run_sync(client) == (451, 250)
    assert len(server.received) == 1


async def test_noop_421_closes_connection(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A scripted 421 reply is sent, then the server closes the connection."""
    server = FaultRelay(ssl_context=server_context)
    server.add_fault(Fault("NOOP", reply="421 4.3.0 Closing"))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> tuple[int, bytes]:
            with smtps(port, client_context) as smtp:
                reply = smtp.noop()
                with pytest.raises(smtplib.SMTPServerDisconnected):
                    smtp.noop()
                return reply

        assert await trio.to_thread.run_sync(client) == (421, b"4.3.0 Closing")


async def test_drop_at_mail(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A drop fault on MAIL closes the connection without a reply."""
    server = FaultRelay(ssl_context=server_context)
    server.add_fault(Fault("MAIL", drop=True))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> None:
            with smtps(port, client_context) as smtp, pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)

        await trio.to_thread.run_sync(client)
    assert server.received == []


async def test_delay_fault_delays_reply(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A delay fault holds the reply back for delay_s, then answers normally; times=-1 repeats."""
    server = FaultRelay(ssl_context=server_context)
    server.add_fault(Fault("NOOP", delay_s=0.2, times=-1))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> list[tuple[int, float]]:
            results = []
            with smtps(port, client_context) as smtp:
                for _ in range(2):
                    started = time.monotonic()
                    code, _ = smtp.noop()
                    results.append((code, time.monotonic() - started))
            return results

        results = await trio.to_thread.run_sync(client)

    assert [code for code, _ in results] == [250, 250]
    assert all(elapsed >= 0.2 for _, elapsed in results)
    assert server.faults == [Fault("NOOP", delay_s=0.2, times=-1)]


async def test_outbox_dir_gets_eml_and_log_line(
    nursery: trio.Nursery,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each accepted mail becomes an .eml file equal to its data, plus one INFO line sans body."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    outbox = tmp_path / "outbox"  # does not exist yet: the server creates it
    server = CaptureSMTPServer(
        ssl_context=server_context, outbox_dir=outbox, log=logging.getLogger(LOGGER_NAME)
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> None:
            with smtps(port, client_context) as smtp:
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)

        arrived = trio.Event()

        async def wait_then_flag() -> None:
            await server.wait_for_mails(1)
            arrived.set()

        nursery.start_soon(wait_then_flag)
        await trio.testing.wait_all_tasks_blocked()
        assert not arrived.is_set()
        await trio.to_thread.run_sync(client)
        await arrived.wait()
        await server.wait_for_mails(1)  # already satisfied: returns at once

    files = sorted(outbox.iterdir())
    assert [re.fullmatch(r"\d{8}T\d{6}Z-000001\.eml", path.name) is not None for path in files] == [
        True
    ]
    assert files[0].read_bytes() == server.received[0].data == MESSAGE
    assert server.received[0].file_name == files[0].name  # the inbox deletes it by this name
    captured = [r.getMessage() for r in caplog.records if r.getMessage().startswith("captured")]
    assert captured == [
        f"captured mail from=<a@example.com> to=<b@example.com> size={len(MESSAGE)} "
        f"file={files[0].name}"
    ]


async def test_an_eml_that_cannot_be_written_gets_451_and_is_not_recorded(
    nursery: trio.Nursery,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """outbox_dir is a file, so no .eml can be written: the mail gets 451 after its "." (not
    250), nothing is recorded, one WARNING says why, and the session goes on."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    server = CaptureSMTPServer(
        ssl_context=server_context, outbox_dir=blocker, log=logging.getLogger(LOGGER_NAME)
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> tuple[int, bytes, int]:
            with smtps(port, client_context) as smtp:
                with pytest.raises(smtplib.SMTPDataError) as error:
                    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                noop_code, _ = smtp.noop()
                return error.value.smtp_code, error.value.smtp_error, noop_code

        assert await trio.to_thread.run_sync(client) == (
            451,
            b"4.3.0 Cannot store the message",
            250,
        )
    assert server.received == []
    assert server.statistics().mails_received == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("capture: cannot keep the mail: ")


async def test_drop_sessions_disconnects_clients(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """After drop_sessions() the client's next command fails with SMTPServerDisconnected."""
    server = FaultRelay(ssl_context=server_context)
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)
        smtp = await trio.to_thread.run_sync(smtps, port, client_context)
        try:
            assert (await trio.to_thread.run_sync(smtp.noop))[0] == 250
            assert server.statistics() == ServerStatistics(1, 1, 0)
            await server.drop_sessions()
            assert server.statistics() == ServerStatistics(1, 0, 0)
            with pytest.raises(smtplib.SMTPServerDisconnected):
                await trio.to_thread.run_sync(smtp.noop)
        finally:
            await trio.to_thread.run_sync(smtp.close)


async def test_untrusting_client_fails_handshake_and_server_goes_on(
    nursery: trio.Nursery,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that does not trust our CA fails the handshake; the next client is served."""
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    server = CaptureSMTPServer(ssl_context=server_context, log=logging.getLogger(LOGGER_NAME))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def untrusting_client() -> None:
            with pytest.raises(ssl.SSLCertVerificationError):
                smtps(port, ssl.create_default_context())

        def trusting_client() -> None:
            with smtps(port, client_context) as smtp:
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)

        await trio.to_thread.run_sync(untrusting_client)
        await trio.to_thread.run_sync(trusting_client)

    assert [mail.session_id for mail in server.received] == [2]
    handshake_lines = [
        record
        for record in caplog.records
        if record.getMessage().startswith("capture session 1 ended: TLS handshake failed")
    ]
    assert [record.levelno for record in handshake_lines] == [logging.INFO]
    assert not any(record.exc_info for record in caplog.records)
    assert all(record.levelno < logging.WARNING for record in caplog.records)


async def test_line_too_long_gets_500_and_close(nursery: trio.Nursery) -> None:
    """A command line of MAX_LINE_BYTES is served; one byte longer gets 500 and the close."""
    server = CaptureSMTPServer(tls_mode="none")
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)
        buffer = bytearray()
        async with await trio.open_tcp_stream(HOST, port) as stream:
            assert (await read_reply(stream, buffer)).startswith(b"220 ")
            longest = b"NOOP " + b"x" * (MAX_LINE_BYTES - len(b"NOOP "))
            await stream.send_all(longest + b"\r\n")
            assert await read_reply(stream, buffer) == b"250 2.0.0 Ok"
            await stream.send_all(longest + b"x\r\n")
            assert (await read_reply(stream, buffer)).startswith(b"500 ")
            assert await read_reply(stream, buffer) == b""


async def test_commands_records_verbs_never_credentials(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """`commands` lists (session, VERB) per command line; AUTH is recorded without its payload."""
    server = FaultRelay(ssl_context=server_context, credentials=("user", "secret"))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> int:
            with smtps(port, client_context) as smtp:
                smtp.login("user", "secret")
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                code, _ = smtp.docmd("XYZZY")
                smtp.noop()
                smtp.rset()
            return code

        assert await trio.to_thread.run_sync(client) == 502

    assert server.commands == [
        (1, "EHLO"),
        (1, "AUTH"),
        (1, "MAIL"),
        (1, "RCPT"),
        (1, "DATA"),
        (1, "XYZZY"),
        (1, "NOOP"),
        (1, "RSET"),
        (1, "QUIT"),
    ]


async def test_too_many_sessions_get_421(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """Past max_sessions a new connection is greeted with 421 and closed; the first one lives."""
    server = CaptureSMTPServer(ssl_context=server_context, max_sessions=1)
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> tuple[int, int]:
            with smtps(port, client_context) as first:
                with pytest.raises(smtplib.SMTPConnectError) as error:
                    smtps(port, client_context)
                code, _ = first.noop()
                return error.value.smtp_code, code

        assert await trio.to_thread.run_sync(client) == (421, 250)
    assert server.statistics().sessions_opened == 2


async def test_message_too_big_gets_552_and_session_goes_on(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A message over max_message_bytes gets 552 after its "."; the session stays in step."""
    server = CaptureSMTPServer(ssl_context=server_context, max_message_bytes=len(MESSAGE))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> int:
            with smtps(port, client_context) as smtp:
                with pytest.raises(smtplib.SMTPDataError) as error:
                    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE + b"x\r\n")
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                return error.value.smtp_code

        assert await trio.to_thread.run_sync(client) == 552
    assert [mail.data for mail in server.received] == [MESSAGE]


def test_fault_validates_command_and_times() -> None:
    """Fault upper-cases its command and rejects unknown commands and times=0."""
    assert Fault("noop").command == "NOOP"
    with pytest.raises(ValueError):
        Fault("BOGUS")
    with pytest.raises(ValueError, match="times"):
        Fault("NOOP", times=0)


def test_server_needs_ssl_context_for_tls() -> None:
    """Implicit TLS without an ssl_context is refused at construction."""
    with pytest.raises(ValueError, match="ssl_context"):
        CaptureSMTPServer(tls_mode="implicit")


TRY_LATER = "451 4.3.0 try again later"


async def test_chaos_refuses_the_next_mails_at_rcpt_then_turns_off(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """Chaos at rcpt, count 2: two mails get its reply to RCPT, the third lands; every change
    of the countdown is reported."""
    changes: list[Chaos] = []
    server = CaptureSMTPServer(ssl_context=server_context, on_chaos=changes.append)
    server.set_chaos(Chaos("rcpt", TRY_LATER, 2))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)

        def client() -> list[dict[str, tuple[int, bytes]]]:
            refusals = []
            with smtps(port, client_context) as smtp:
                for _ in range(2):
                    with pytest.raises(smtplib.SMTPRecipientsRefused) as error:
                        smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
                    refusals.append(error.value.recipients)
                    smtp.rset()
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            return refusals

        refusals = await trio.to_thread.run_sync(client)

    assert refusals == [{"b@example.com": (451, b"4.3.0 try again later")}] * 2
    assert len(server.received) == 1
    assert server.chaos == OFF
    assert changes == [Chaos("rcpt", TRY_LATER, 2), Chaos("rcpt", TRY_LATER, 1), OFF]


@pytest.mark.parametrize(
    ("stage", "reply", "error"),
    [
        ("mail", "550 5.7.1 not from you", smtplib.SMTPSenderRefused),
        ("data", "554 5.7.1 looks like spam", smtplib.SMTPDataError),
    ],
)
async def test_chaos_at_mail_or_data_refuses_the_mail_and_keeps_nothing(
    nursery: trio.Nursery,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    tmp_path: pathlib.Path,
    stage: str,
    reply: str,
    error: type[smtplib.SMTPResponseException],
) -> None:
    """Chaos at mail answers MAIL FROM; at data, the final "." (the content was sent): either
    way the mail is neither recorded nor written as a file."""
    outbox = tmp_path / "outbox"
    server = CaptureSMTPServer(ssl_context=server_context, outbox_dir=outbox)
    server.set_chaos(Chaos(stage, reply, 1))
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)
        code, text = await refusal(port, client_context, error)
    assert f"{code} {text!r}" == f"{reply[:3]} {reply[4:].encode()!r}"
    assert (server.received, server.chaos) == ([], OFF)
    assert not await trio.Path(outbox).exists()  # the relay makes it for its first file


async def test_chaos_at_connect_closes_open_sessions_and_refuses_the_greeting(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """Chaos at connect: a session already open is closed (its next command fails), so the
    next mail needs a new connection, whose greeting is the chaos reply."""
    server = CaptureSMTPServer(ssl_context=server_context)
    with trio.fail_after(TEST_TIMEOUT_S):
        port = await start(nursery, server)
        open_session = await trio.to_thread.run_sync(smtps, port, client_context)
        try:
            assert (await trio.to_thread.run_sync(open_session.noop))[0] == 250
            server.set_chaos(Chaos("connect", "421 4.3.2 going down", 1))
            with pytest.raises(smtplib.SMTPServerDisconnected):
                await trio.to_thread.run_sync(open_session.noop)
        finally:
            await trio.to_thread.run_sync(open_session.close)
        with pytest.raises(smtplib.SMTPConnectError) as error:
            await trio.to_thread.run_sync(smtps, port, client_context)
        assert error.value.smtp_code == 421
        assert server.chaos == OFF
        again = await trio.to_thread.run_sync(smtps, port, client_context)
        await trio.to_thread.run_sync(again.quit)
