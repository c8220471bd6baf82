"""End to end, in-process: the real gRPC server, the real smtplib thread, the fake relay over TLS.

Real clock (STYLE 12); each test under ``trio.fail_after``.
"""

from __future__ import annotations

import email
import email.policy
import logging
import ssl

import purerpc
import pytest
import trio

from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.v1.mailer_pb2 import MsgRequest

from .fakes.fault_relay import Fault
from .helpers import Harness, mailer_service


def parsed(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


async def send_pass(h: Harness, to: str = "user@example.com", code: str = "739201") -> str:
    reply = await h.stub.SendPass(MsgRequest(to=to, code=code))
    assert reply.sent, reply.reason
    return str(reply.message_id)


async def test_mail_arrives_over_implicit_tls_with_headers_and_body(start_harness) -> None:
    """SendPass -> one mail on the relay, with the right envelope, headers and body."""
    with trio.fail_after(10):
        async with start_harness(
            credentials=("bot", "pw"),
            require_auth=True,
            env={"MAILER_USER": "bot", "MAILER_PASSWORD": "pw"},
        ) as h:
            reply = await h.stub.SendPass(MsgRequest(to="user@example.com", code="739201"))
            assert reply.sent and reply.reason == ""
            await h.relay.wait_for_mails(1)
            [mail] = h.relay.received
            assert (mail.mail_from, mail.rcpt_to) == ("noreply@example.com", ("user@example.com",))
            message = parsed(mail.data)
            assert message["Message-ID"] == reply.message_id
            assert message["To"] == "user@example.com"
            assert message["From"] == "Acme <noreply@example.com>"
            assert message["Subject"] == "Your Acme password code"
            text = message.get_body(preferencelist=("plain",))
            assert text is not None
            assert "\n    739201\r\n" in text.get_content()
            assert "AUTH" in {verb for _, verb in h.relay.commands}


async def test_retrieve_mail_uses_its_own_template(start_harness) -> None:
    """SendRetrieve renders the account-retrieval template."""
    with trio.fail_after(10):
        async with start_harness() as h:
            reply = await h.stub.SendRetrieve(MsgRequest(to="user@example.com", code="R-1"))
            assert reply.sent
            await h.relay.wait_for_mails(1)
            assert parsed(h.relay.received[0].data)["Subject"] == "Recover your Acme account"


async def test_mail_arrives_over_starttls(start_harness) -> None:
    """In starttls mode the session upgrades before EHLO/AUTH/MAIL."""
    with trio.fail_after(10):
        async with start_harness(tls_mode="starttls", env={"MAILER_SMTP_TLS": "starttls"}) as h:
            await send_pass(h)
            await h.relay.wait_for_mails(1)
            verbs = [verb for _, verb in h.relay.commands]
            assert verbs[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]


async def test_relay_without_starttls_gets_no_mail(start_harness, caplog) -> None:
    """A relay that does not offer STARTTLS gets nothing: no plaintext fallback."""
    caplog.set_level(logging.WARNING, "trio_mailer")
    with trio.fail_after(10):
        async with start_harness(
            tls_mode="starttls",
            offer_starttls=False,
            env={"MAILER_SMTP_TLS": "starttls", "MAILER_SHUTDOWN_GRACE_S": "0"},
        ) as h:
            await send_pass(h)
            await trio.sleep(1.0)  # several reconnect attempts' worth
            assert h.relay.received == []
            verbs = {verb for _, verb in h.relay.commands}
            assert "MAIL" not in verbs and "AUTH" not in verbs
            assert "relay does not offer STARTTLS; refusing to send without TLS" in caplog.text
            assert await h.shutdown() == 1  # the mail was still waiting for a usable relay


async def test_many_mails_share_one_session_with_noop_probes(start_harness) -> None:
    """Ten mails go through one SMTP session, each reuse preceded by NOOP."""
    with trio.fail_after(15):
        async with start_harness(env={"MAILER_QUEUE_SIZE": "20", "MAILER_NOOP_IDLE_S": "0"}) as h:
            ids = [await send_pass(h, code=str(n)) for n in range(10)]
            await h.relay.wait_for_mails(10)
            assert {m.session_id for m in h.relay.received} == {1}
            assert [parsed(m.data)["Message-ID"] for m in h.relay.received] == ids
            assert h.relay.sessions_opened == 1
            verbs = [verb for _, verb in h.relay.commands]
            assert verbs.count("NOOP") == 9
            assert await h.shutdown() == 0
            assert h.relay.commands[-1] == (1, "QUIT")


async def test_dropped_session_is_replaced_and_the_next_mail_arrives(start_harness) -> None:
    """The relay drops the idle session; the probe notices and the mail goes on a new one."""
    with trio.fail_after(10):
        async with start_harness() as h:
            await send_pass(h, code="1")
            await h.relay.wait_for_mails(1)
            await h.relay.drop_sessions()
            await send_pass(h, code="2")
            await h.relay.wait_for_mails(2)
            assert [m.session_id for m in h.relay.received] == [1, 2]


async def test_noop_421_means_reconnect(start_harness) -> None:
    """A 421 answer to the probe replaces the session before the mail is sent."""
    with trio.fail_after(10):
        async with start_harness(env={"MAILER_NOOP_IDLE_S": "0"}) as h:
            await send_pass(h, code="1")
            await h.relay.wait_for_mails(1)
            h.relay.add_fault(Fault("NOOP", reply="421 4.3.2 shutting down"))
            await send_pass(h, code="2")
            await h.relay.wait_for_mails(2)
            assert [m.session_id for m in h.relay.received] == [1, 2]


async def test_connection_lost_before_the_dot_resends_the_same_mail(start_harness) -> None:
    """The relay drops the connection at DATA; the same mail arrives on a new session."""
    with trio.fail_after(10):
        async with start_harness() as h:
            h.relay.add_fault(Fault("DATA", drop=True))
            message_id = await send_pass(h)
            await h.relay.wait_for_mails(1)
            [mail] = h.relay.received
            assert parsed(mail.data)["Message-ID"] == message_id
            assert mail.session_id == 2


async def test_rejected_recipient_is_logged_and_the_session_reset(start_harness, caplog) -> None:
    """A 550 to RCPT is logged with the Message-ID and reply; RSET; the next mail arrives."""
    caplog.set_level(logging.INFO, "trio_mailer")
    with trio.fail_after(10):
        async with start_harness() as h:
            h.relay.add_fault(Fault("RCPT", reply="550 5.1.1 no such user"))
            rejected = await send_pass(h, to="nobody@example.com")
            delivered = await send_pass(h, to="user@example.com")
            await h.relay.wait_for_mails(1)
            assert [parsed(m.data)["Message-ID"] for m in h.relay.received] == [delivered]
            assert (
                f"failed {rejected} (attempts=1, last reply: RCPT rejected: 550 5.1.1 no such "
                "user): permanent failure"
            ) in caplog.text
            verbs = [verb for _, verb in h.relay.commands]
            assert verbs[verbs.index("RCPT") + 1] == "RSET"


async def test_full_queue_answers_sent_false_at_once(start_harness, free_port) -> None:
    """With the relay down, the queue fills and further calls get sent=false without waiting."""
    with trio.fail_after(10):
        async with start_harness(
            env={
                "MAILER_QUEUE_SIZE": "2",
                "MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}",
                "MAILER_SHUTDOWN_GRACE_S": "0",
            }
        ) as h:
            replies = []
            for n in range(6):
                with trio.fail_after(1):
                    request = MsgRequest(to="u@example.com", code=str(n))
                    replies.append(await h.stub.SendPass(request))
            accepted = [r for r in replies if r.sent]
            refused = [r for r in replies if not r.sent]
            # Two queued, plus at most one the sender already took off the queue.
            assert 2 <= len(accepted) <= 3
            assert refused and all(r.reason == "queue full" and r.message_id == "" for r in refused)
            assert replies[-1].sent is False
            assert await h.shutdown() == 1


async def test_mail_left_at_shutdown_is_logged_by_message_id(
    start_harness, free_port, caplog
) -> None:
    """Past the grace period every undelivered Message-ID is logged at ERROR; status 1."""
    caplog.set_level(logging.INFO, "trio_mailer")
    with trio.fail_after(10):
        async with start_harness(
            env={"MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}", "MAILER_SHUTDOWN_GRACE_S": "0.2"}
        ) as h:
            ids = [await send_pass(h, code=str(n)) for n in range(3)]
            assert await h.shutdown() == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[0].startswith("relay check failed: cannot connect")  # at start-up
    left = [e for e in errors if e.startswith("not delivered at shutdown")]
    refused = f"cannot connect to 127.0.0.1:{free_port}: Connection refused"
    assert left == [
        f"not delivered at shutdown: {message_id} (attempts=0, last reply: "
        + (f"relay unavailable: {refused}" if n == 0 else "none")
        + "); lost (in-memory outbox)"
        for n, message_id in enumerate(ids)
    ]


@pytest.mark.parametrize(
    ("to", "code", "detail"),
    [
        ("a@example.com, b@example.com", "1", "to: expected one address, got a list of 2"),
        ('"a@b.c"@evil.com', "1", "to: expected one address of the form local@domain"),
        ("user@example.com\r\nBcc: x@evil.com", "1", "to: control character '\\r'"),
        ("", "1", "to: expected one address, got an empty string"),
        ("user@example.com", "", "code: expected a non-empty code"),
        ("user@example.com", "x" * 129, "code: expected at most 128 characters, got 129"),
        ("user@example.com", "=?utf-8?q?x?=", "code: '=?' (an RFC 2047"),
    ],
)
async def test_invalid_request_gets_invalid_argument_and_sends_nothing(
    start_harness, to: str, code: str, detail: str
) -> None:
    """A malformed field -> INVALID_ARGUMENT naming it; nothing queued, nothing sent."""
    with trio.fail_after(10):
        async with start_harness() as h:
            with pytest.raises(purerpc.InvalidArgumentError) as info:
                await h.stub.SendPass(MsgRequest(to=to, code=code))
            assert info.value.status.status_message.startswith(detail)
            assert h.app.queue.statistics().queued == 0
            assert await h.shutdown() == 0
            assert h.relay.received == []
            assert "MAIL" not in {verb for _, verb in h.relay.commands}


async def test_a_shutdown_serves_the_call_on_its_way_and_delivers_the_queue(start_harness) -> None:
    """After shutdown starts, a call already on its way is served (the gRPC drain answers every
    stream up to its GOAWAY's last id; issue 22), and every accepted mail is delivered."""
    with trio.fail_after(10):
        async with start_harness() as h:
            h.relay.add_fault(Fault("DOT", delay_s=0.3, reply="250 2.0.0 queued"))
            ids = [await send_pass(h, code=str(n)) for n in range(3)]
            h.app.request_shutdown()
            ids.append(await send_pass(h, to="late@example.com", code="1"))
            assert await h.shutdown() == 0
            assert [parsed(m.data)["Message-ID"] for m in h.relay.received] == ids
            assert h.relay.commands[-1][1] == "QUIT"


async def test_a_draining_service_refuses_new_mail_with_unavailable() -> None:
    """Once the gRPC drain is over, the acceptance use case takes nothing: a call that still
    reaches it gets UNAVAILABLE "server is shutting down", and nothing is queued."""
    queue = MailQueue.open(5, 5)
    service = mailer_service(queue)
    service.accept.draining = True
    with pytest.raises(purerpc.RpcFailedError) as info:
        await service.SendPass(MsgRequest(to="late@example.com", code="1"))
    assert info.value.status.status_code == purerpc.StatusCode.UNAVAILABLE
    assert "shutting down" in info.value.status.status_message
    assert queue.statistics().queued == 0


async def test_shutdown_is_prompt_when_the_relay_stalls_mid_send(start_harness, caplog) -> None:
    """A send blocked in a socket read is cut off at the end of the grace period."""
    caplog.set_level(logging.ERROR, "trio_mailer")
    with trio.fail_after(10):
        async with start_harness(
            env={"MAILER_SMTP_TIMEOUT_S": "60", "MAILER_SHUTDOWN_GRACE_S": "0.5"}
        ) as h:
            h.relay.add_fault(Fault("DOT", delay_s=60))
            message_id = await send_pass(h)
            await h.relay.wait_for_command("DATA")
            started = trio.current_time()
            assert await h.shutdown() == 1
            assert trio.current_time() - started < 3
    assert f"not delivered at shutdown: {message_id}" in caplog.text


async def test_port_taken_fails_start_up(start_harness, relay_tls: ssl.SSLContext) -> None:
    """A second service on the same port fails with a clear error (no SO_REUSEPORT)."""
    from trio_mailer.app import MailerApp
    from trio_mailer.grpc.listener import BindError

    with trio.fail_after(10):
        async with start_harness() as h:
            second = MailerApp.from_config(
                h.app.config.__class__(**{**_fields(h.app.config), "serve_port": h.grpc_port})
            )
            with pytest.raises(BindError, match=f"cannot listen on 127.0.0.1:{h.grpc_port}"):
                await second.run()


async def test_listener_binds_only_the_configured_address(start_harness) -> None:
    """Bound to 127.0.0.1, the port is closed on another loopback address."""
    with trio.fail_after(10):
        async with start_harness() as h:
            with pytest.raises(OSError):
                stream = await trio.open_tcp_stream("127.0.0.2", h.grpc_port)
                await stream.aclose()


def _fields(config: object) -> dict[str, object]:
    import attrs

    return attrs.asdict(config, recurse=False)  # type: ignore[arg-type]


class _BrokenComposer:
    def compose(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError("secret internal detail /etc/passwd")


async def test_unexpected_error_is_internal_with_a_generic_message(start_harness, caplog) -> None:
    """An unexpected exception reaches the client as INTERNAL 'internal error', no repr."""
    caplog.set_level(logging.ERROR, "trio_mailer")
    with trio.fail_after(10):
        async with start_harness() as h:
            h.app.accept.composer = _BrokenComposer()  # type: ignore[assignment]
            with pytest.raises(purerpc.RpcFailedError) as info:
                await h.stub.SendPass(MsgRequest(to="user@example.com", code="1"))
    status = info.value.status
    assert (status.status_code, status.status_message) == (
        purerpc.StatusCode.INTERNAL,
        "internal error",
    )
    assert "secret internal detail" in caplog.text  # the detail goes to the log only


async def test_password_code_and_body_never_reach_the_logs(start_harness, caplog) -> None:
    """A full run with AUTH logs neither the SMTP password nor the code nor the body."""
    caplog.set_level(logging.DEBUG)
    password, code = "pw-Zq8x1-very-secret", "CODE-771133"
    with trio.fail_after(10):
        async with start_harness(
            credentials=("bot", password),
            require_auth=True,
            env={"MAILER_USER": "bot", "MAILER_PASSWORD": password},
        ) as h:
            await send_pass(h, code=code)
            await h.relay.wait_for_mails(1)
            assert await h.shutdown() == 0
    assert "delivered <" in caplog.text
    for secret in (password, code, "Your password code for"):
        assert secret not in caplog.text
