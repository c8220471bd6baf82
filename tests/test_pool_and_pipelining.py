"""The sender pool, PIPELINING, idle probing and recycling, on the real smtplib path."""

from __future__ import annotations

import collections

import pytest
import trio

from .fakes.fault_relay import Fault
from .helpers import FAST, message_ids, send_pass


def transactions_by_session(commands: list[tuple[int, str]]) -> dict[int, list[str]]:
    by_session: dict[int, list[str]] = collections.defaultdict(list)
    for session_id, verb in commands:
        by_session[session_id].append(verb)
    return by_session


def assert_one_transaction_at_a_time(verbs: list[str]) -> None:
    """Within one session: MAIL, RCPT, DATA in order, never a second MAIL before the first ends."""
    open_transaction = False
    for verb in verbs:
        if verb == "MAIL":
            assert not open_transaction, f"two MAILs at once in {verbs}"
            open_transaction = True
        elif verb in ("DATA", "RSET", "QUIT"):
            open_transaction = False


async def test_pool_of_four_sessions_shares_the_queue(start_harness) -> None:
    """MAILER_SMTP_SESSIONS=4: four sessions carry the mail, one transaction each at a time."""
    with trio.fail_after(20):
        async with start_harness(env={"MAILER_SMTP_SESSIONS": "4", "MAILER_QUEUE_SIZE": "40"}) as h:
            h.relay.add_fault(Fault("DOT", delay_s=0.05, reply="250 2.0.0 ok", times=-1))
            ids = [await send_pass(h, code=str(n)) for n in range(24)]
            await h.wait_finished(24)
            assert await h.shutdown() == 0
    assert sorted(message_ids(h.relay)) == sorted(ids)
    sessions = transactions_by_session(h.relay.commands)
    assert len(sessions) == 4
    for verbs in sessions.values():
        assert_one_transaction_at_a_time(verbs)
        assert verbs[-1] == "QUIT"
    assert all(m.session_id in sessions for m in h.relay.received)
    # The work is spread: every session carried some of it.
    carried = collections.Counter(m.session_id for m in h.relay.received)
    assert len(carried) == 4


async def test_pipelining_sends_the_envelope_in_one_write(start_harness) -> None:
    """With PIPELINING offered, MAIL, RCPT and DATA arrive together for every mail."""
    with trio.fail_after(10):
        async with start_harness(pipelining=True, env={"MAILER_QUEUE_SIZE": "20"}) as h:
            ids = [await send_pass(h, code=str(n)) for n in range(5)]
            await h.wait_finished(5)
    assert message_ids(h.relay) == ids
    assert h.relay.pipelined_commands == 2 * 5  # MAIL and RCPT each had the next one behind it


async def test_without_pipelining_the_envelope_goes_in_lockstep(start_harness) -> None:
    """A relay that does not offer PIPELINING gets one command at a time."""
    with trio.fail_after(10):
        async with start_harness(env={"MAILER_QUEUE_SIZE": "20"}) as h:
            for n in range(3):
                await send_pass(h, code=str(n))
            await h.wait_finished(3)
    assert h.relay.pipelined_commands == 0


@pytest.mark.parametrize(
    ("fault", "attempts", "delivered"),
    [
        (Fault("MAIL", reply="451 4.3.0 later"), 2, True),
        (Fault("RCPT", reply="452 4.2.2 full"), 2, True),
        (Fault("DATA", reply="451 4.3.0 later"), 2, True),
        (Fault("RCPT", reply="550 5.1.1 unknown user"), 1, False),
        (Fault("MAIL", reply="553 5.1.8 bad sender"), 1, False),
        (Fault("MAIL", reply="421 4.3.2 closing"), 2, True),
        (Fault("RCPT", reply="garbage"), 2, True),
    ],
)
async def test_every_pipelined_reply_is_checked(
    start_harness, fault: Fault, attempts: int, delivered: bool
) -> None:
    """Each of the three pipelined replies is read and acted on, not just the last."""
    with trio.fail_after(10):
        async with start_harness(pipelining=True, env=FAST) as h:
            h.relay.add_fault(fault)
            message_id = await send_pass(h)
            [finished] = await h.wait_finished(1)
            if not delivered:
                # The session is still in step: a second mail goes through.
                await send_pass(h, code="2")
                await h.wait_finished(2)
    assert finished.delivered is delivered
    assert finished.delivery.attempts == attempts
    if delivered:
        assert message_ids(h.relay) == [message_id]
    else:
        assert finished.delivery.last_reply.startswith(f"{fault.command} rejected: {fault.reply}")
        assert message_id not in message_ids(h.relay)
        assert len(h.relay.received) == 1


async def test_354_after_a_refused_recipient_is_ended_cleanly(start_harness) -> None:
    """RCPT refused but DATA answered 354 (a sloppy relay): '.', then RSET; nothing delivered."""
    with trio.fail_after(10):
        async with start_harness(pipelining=True, env=FAST) as h:
            h.relay.add_fault(Fault("RCPT", reply="550 5.1.1 unknown user"))
            h.relay.add_fault(Fault("DATA", reply="354 go ahead anyway"))
            message_id = await send_pass(h)
            second = await send_pass(h, code="2")
            finished = await h.wait_finished(2)
    assert [f.delivered for f in finished] == [False, True]
    assert finished[0].delivery.last_reply == "RCPT rejected: 550 5.1.1 unknown user"
    assert message_ids(h.relay) == [second]
    assert message_id not in message_ids(h.relay)


async def test_recycled_session_says_quit(start_harness) -> None:
    """MAILER_SESSION_MAX_MESSAGES=2: every second mail the session QUITs and a new one opens."""
    with trio.fail_after(10):
        async with start_harness(env={"MAILER_SESSION_MAX_MESSAGES": "2"}) as h:
            for n in range(5):
                await send_pass(h, code=str(n))
            await h.wait_finished(5)
            assert await h.shutdown() == 0
    sessions = transactions_by_session(h.relay.commands)
    assert len(sessions) == 3
    assert [verbs.count("MAIL") for verbs in sessions.values()] == [2, 2, 1]
    assert all(verbs[-1] == "QUIT" for verbs in sessions.values())
