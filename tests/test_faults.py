"""Fault injection: the real smtplib path against the scripted fake relay, on the real clock.

Each case asserts the outcome: delivered once, retried, failed with the right reply, session
replaced, nothing lost. Short timeouts and retry delays keep it quick.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trustme

from .fakes.fault_relay import Fault, FaultRelay
from .helpers import FAST, message_ids, send_pass, server_context


async def deliver_one_with(start_harness, *faults: Fault, env: dict[str, str] | None = None):
    """Send one mail through a relay scripted with ``faults``; return (harness data)."""
    async with start_harness(env={**FAST, **(env or {})}) as h:
        for fault in faults:
            h.relay.add_fault(fault)
        message_id = await send_pass(h)
        [finished] = await h.wait_finished(1)
        assert finished.delivery.message_id == message_id
        return h, message_id, finished


async def test_421_to_noop_on_an_idle_session_replaces_it(start_harness) -> None:
    """The probe gets 421: a new session carries the mail, delivered once."""
    with trio.fail_after(10):
        async with start_harness(env={**FAST, "MAILER_NOOP_IDLE_S": "0"}) as h:
            await send_pass(h, code="1")
            await h.wait_finished(1)
            h.relay.add_fault(Fault("NOOP", reply="421 4.4.2 idle too long"))
            second = await send_pass(h, code="2")
            finished = await h.wait_finished(2)
            assert finished[1].delivered and finished[1].delivery.attempts == 1
            assert [m.session_id for m in h.relay.received] == [1, 2]
            assert message_ids(h.relay)[1] == second


async def test_connection_dropped_before_mail_is_sent_again(start_harness) -> None:
    """The relay hangs up at MAIL: same mail, new session, delivered once, no duplicate flag."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(start_harness, Fault("MAIL", drop=True))
    assert finished.delivered and finished.delivery.attempts == 2
    assert not finished.delivery.possible_duplicate
    assert message_ids(h.relay) == [message_id]
    assert h.relay.received[0].session_id == 2


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA", "DOT"])
async def test_421_at_any_command_means_reconnect_and_deliver(start_harness, command: str) -> None:
    """421 "closing" at MAIL, RCPT, DATA or after '.': new session, delivered once."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(
            start_harness, Fault(command, reply="421 4.3.2 service shutting down")
        )
    assert finished.delivered and finished.delivery.attempts == 2
    assert not finished.delivery.possible_duplicate
    assert message_ids(h.relay) == [message_id]
    assert h.relay.received[0].session_id == 2


@pytest.mark.parametrize("code", ["451 4.7.1 greylisted, try later", "454 4.7.0 TLS not available"])
@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA", "DOT"])
async def test_4xx_is_retried_on_the_reset_session(start_harness, command: str, code: str) -> None:
    """451/454 at MAIL, RCPT, DATA or '.': RSET, wait, try again, delivered once."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(start_harness, Fault(command, reply=code))
    assert finished.delivered and finished.delivery.attempts == 2
    assert message_ids(h.relay) == [message_id]
    assert h.relay.received[0].session_id == 1  # reused after RSET
    verbs = [verb for _, verb in h.relay.commands]
    assert "RSET" in verbs


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("MAIL", "550 5.7.1 sender rejected"),
        ("RCPT", "550 5.1.1 no such user"),
        ("DATA", "554 5.3.0 no data for you"),
        ("DOT", "552 5.3.4 message too big"),
    ],
)
async def test_5xx_fails_the_mail_with_the_reply(start_harness, command: str, reply: str) -> None:
    """A permanent reply: failed after one attempt, with that reply; nothing delivered."""
    with trio.fail_after(10):
        h, _, finished = await deliver_one_with(start_harness, Fault(command, reply=reply))
    assert not finished.delivered
    assert finished.reason == "permanent failure"
    assert finished.delivery.attempts == 1
    assert finished.delivery.last_reply == f"{command} rejected: {reply}"
    assert h.relay.received == []
    assert "RSET" in [verb for _, verb in h.relay.commands]


async def test_data_answered_without_354_replaces_the_session(start_harness) -> None:
    """DATA answered 250 instead of 354 is a protocol error: new session, delivered."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(
            start_harness, Fault("DATA", reply="250 2.0.0 sure")
        )
    assert finished.delivered and finished.delivery.attempts == 2
    assert message_ids(h.relay) == [message_id]
    assert h.relay.received[0].session_id == 2


async def test_connection_dropped_after_the_dot_is_a_possible_duplicate(start_harness) -> None:
    """Lost after '.' before the reply: sent again with the same Message-ID, flagged."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(start_harness, Fault("DOT", drop=True))
    assert finished.delivered and finished.delivery.possible_duplicate
    assert finished.delivery.attempts == 2
    assert message_ids(h.relay) == [message_id]


async def test_relay_that_takes_the_mail_but_answers_too_late_gets_it_twice(start_harness) -> None:
    """The reply to '.' comes after our timeout: outcome unknown, sent again, both arrive."""
    with trio.fail_after(10):
        async with start_harness(env=FAST) as h:
            h.relay.add_fault(Fault("DOT", delay_s=1.5, reply="250 2.0.0 finally"))
            message_id = await send_pass(h)
            [finished] = await h.wait_finished(1)
            await h.relay.wait_for_mails(2)
    assert finished.delivered and finished.delivery.possible_duplicate
    assert message_ids(h.relay) == [message_id, message_id]  # the documented duplicate


async def test_greeting_never_sent_times_out_and_reconnects(start_harness) -> None:
    """A relay that never greets is abandoned after the timeout; the next session works."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(
            start_harness, Fault("GREETING", delay_s=5)
        )
    assert h.relay.sessions_opened == 2
    assert finished.delivered and finished.delivery.attempts == 1
    assert message_ids(h.relay) == [message_id]


async def test_reply_that_stalls_mid_line_is_abandoned(start_harness) -> None:
    """Half a reply, then silence: the session is dropped within the timeout; delivered."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(
            start_harness, Fault("RCPT", stall_mid_reply_s=5)
        )
    assert finished.delivered and finished.delivery.attempts == 2
    assert message_ids(h.relay) == [message_id]


async def test_trickling_relay_is_cut_off_by_the_watchdog(start_harness) -> None:
    """A reply trickled a byte at a time never trips the socket timeout, but the call's
    overall budget (timeout x round trips) cuts it off; the mail goes on a new session."""
    with trio.fail_after(10):
        async with start_harness(env=FAST) as h:
            # 15 bytes, 0.3 s apart: every read returns within the 0.5 s socket timeout.
            h.relay.add_fault(Fault("MAIL", reply="250 2.1.0 Ok", trickle_s=0.3))
            start = trio.current_time()
            message_id = await send_pass(h)
            [finished] = await h.wait_finished(1)
            elapsed = trio.current_time() - start
    assert finished.delivered and finished.delivery.attempts == 2
    assert finished.delivery.last_reply.startswith("250")
    assert message_ids(h.relay) == [message_id]
    assert h.relay.received[0].session_id == 2
    # Cut off at the 4 x 0.5 s send budget, well before the trickle would have ended (~4.5 s).
    assert 2.0 <= elapsed < 4.0


async def test_reply_line_over_8_kib_replaces_the_session(start_harness) -> None:
    """An overlong reply line is a broken session, not a crash: delivered on a new one."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(
            start_harness, Fault("MAIL", reply="250 " + "x" * 9000)
        )
    assert finished.delivered and finished.delivery.attempts == 2
    assert message_ids(h.relay) == [message_id]


async def test_garbage_reply_replaces_the_session(start_harness) -> None:
    """A reply without a status code is a protocol error: new session, delivered."""
    with trio.fail_after(10):
        h, _, finished = await deliver_one_with(
            start_harness, Fault("RCPT", reply="hello there, no code")
        )
    assert finished.delivered and finished.delivery.attempts == 2
    assert h.relay.received[0].session_id == 2


async def test_auth_535_is_a_configuration_error_logged_once(start_harness, caplog) -> None:
    """Bad credentials: no mail, one ERROR line, backing off at the cap (no hammering)."""
    caplog.set_level(logging.INFO, "trio_mailer")
    with trio.fail_after(10):
        async with start_harness(
            credentials=("bot", "right"),
            env={
                **FAST,
                "MAILER_USER": "bot",
                "MAILER_PASSWORD": "wrong",
                "MAILER_RETRY_MAX_S": "0.5",
            },
        ) as h:
            await send_pass(h)
            await trio.sleep(1.3)
            assert await h.shutdown() == 1
            assert h.relay.received == []
            # 0.5 s apart at the cap, for the sender and for the start-up relay check (which
            # retries until a session succeeds): at most 3 each in 1.3 s, not a tight loop.
            assert 2 <= h.relay.sessions_opened <= 6
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    refused = [e for e in errors if "refuses our configuration" in e]
    assert refused == [
        "relay refuses our configuration: AUTH refused: 535 5.7.8 Authentication credentials "
        "invalid; retrying every 0.5s until it is fixed"
    ]


async def test_auth_454_is_transient(start_harness) -> None:
    """AUTH 454: back off and try again; delivered once the relay recovers."""
    with trio.fail_after(10):
        h, message_id, finished = await deliver_one_with(
            start_harness,
            # One mechanism per session (not PLAIN, then LOGIN): one refusal per session.
            Fault("AUTH", reply="454 4.7.0 temporary authentication failure"),
            env={"MAILER_USER": "bot", "MAILER_PASSWORD": "pw"},
        )
    assert finished.delivered
    assert message_ids(h.relay) == [message_id]
    assert h.relay.sessions_opened == 2


async def test_relay_refusing_connections_then_coming_back(
    start_harness, relay_tls, free_port: int
) -> None:
    """Connections refused for a while, then the relay starts: the waiting mail arrives."""
    relay = FaultRelay(ssl_context=relay_tls)
    with trio.fail_after(10):
        async with start_harness(env={**FAST, "MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}"}) as h:
            message_id = await send_pass(h)
            await trio.sleep(0.5)
            assert h.finished == []
            await h.nursery.start(relay.serve, "127.0.0.1", free_port)
            [finished] = await h.wait_finished(1)
            assert finished.delivered
            assert message_ids(relay) == [message_id]


@pytest.mark.parametrize("names", [("mail.example.net",), ()])
async def test_bad_relay_certificate_is_a_configuration_error(
    start_harness, ca: trustme.CA, caplog, names: tuple[str, ...]
) -> None:
    """Wrong host name, or an unknown CA: no mail, no plaintext fallback, one ERROR line."""
    caplog.set_level(logging.INFO, "trio_mailer")
    context = server_context(ca, *names) if names else server_context(trustme.CA())
    with trio.fail_after(10):
        async with start_harness(ssl_context=context, env=FAST) as h:
            await send_pass(h)
            await trio.sleep(0.6)
            assert await h.shutdown() == 1
            assert h.relay.received == []
    refused = [r for r in caplog.records if "refuses our configuration" in r.getMessage()]
    assert len(refused) == 1 and "certificate verify failed" in refused[0].getMessage()


async def test_ttl_expiring_while_retrying(start_harness) -> None:
    """A relay that defers forever: the mail fails when its time to live runs out."""
    with trio.fail_after(10):
        h, _, finished = await deliver_one_with(
            start_harness,
            Fault("RCPT", reply="451 4.7.1 try again later", times=-1),
            env={"MAILER_MESSAGE_TTL_S": "0.6", "MAILER_MAX_ATTEMPTS": "100"},
        )
    assert not finished.delivered
    assert finished.reason == "time to live (0.6s) would pass before the next attempt"
    assert finished.delivery.last_reply == "RCPT rejected: 451 4.7.1 try again later"
    assert h.relay.received == []


async def test_deferred_mail_does_not_block_the_mails_behind_it(start_harness) -> None:
    """450 for the first mail: the second is delivered before the first's retry."""
    with trio.fail_after(10):
        async with start_harness(
            env={**FAST, "MAILER_RETRY_BASE_S": "0.5", "MAILER_RETRY_MAX_S": "0.5"}
        ) as h:
            h.relay.add_fault(Fault("RCPT", reply="450 4.2.1 mailbox busy"))
            first = await send_pass(h, code="1")
            second = await send_pass(h, code="2")
            await h.wait_finished(2)
            assert message_ids(h.relay) == [second, first]


async def test_shutdown_during_backoff_reports_the_waiting_mail(start_harness, caplog) -> None:
    """Shutdown while a mail waits for its retry: prompt, status 1, the mail logged."""
    caplog.set_level(logging.ERROR, "trio_mailer")
    with trio.fail_after(10):
        async with start_harness(
            env={
                **FAST,
                "MAILER_RETRY_BASE_S": "30",
                "MAILER_RETRY_MAX_S": "30",
                "MAILER_SHUTDOWN_GRACE_S": "0.3",
            }
        ) as h:
            h.relay.add_fault(Fault("RCPT", reply="451 4.7.1 later"))
            message_id = await send_pass(h)
            while h.app.queue.statistics().retry_waiting == 0:
                await h.relay.wait_for_command("RSET")
                await trio.lowlevel.checkpoint()
            start = trio.current_time()
            assert await h.shutdown() == 1
            assert trio.current_time() - start < 2
    assert (
        f"not delivered at shutdown: {message_id} (attempts=1, last reply: RCPT rejected: "
        "451 4.7.1 later); lost (in-memory outbox)"
    ) in caplog.text


async def test_reply_text_is_escaped_in_the_log(start_harness, caplog) -> None:
    """Control characters and line breaks in a relay's reply cannot forge log lines."""
    caplog.set_level(logging.INFO, "trio_mailer")
    with trio.fail_after(10):
        await deliver_one_with(
            start_harness,
            Fault("RCPT", reply="550-5.1.1 first line\n550 5.1.1 \x1b[31mFAKE\x1b[0m second"),
        )
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed")]
    assert "\n" not in line and "\x1b" not in line
    assert "first line\\nsecond" not in line  # the two lines are joined, escaped
    assert "5.1.1 first line\\n5.1.1 \\x1b[31mFAKE\\x1b[0m second" in line
