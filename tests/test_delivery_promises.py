"""Issue 10's regressions for the sender pool, on the autojump clock with in-trio fakes.

Each test is named after the behaviour that failed before the fix. No threads here (STYLE 12).
"""

from __future__ import annotations

import logging

import attrs
import pytest
import trio
import trio.testing

from trio_mailer.core.mail_lifecycle import MailRecord, MailState
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.retry_policy import ReconnectBackoff, RetryPolicy
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.delivery.sender import FinishedMail, Sender
from trio_mailer.delivery.smtp_session import ConnectFailed, Delivered, Rejected, Reply
from trio_mailer.store.outbox import MemoryOutbox
from trio_mailer.store.status_board import StatusBoard

from .helpers import mail
from .sender_helpers import build_sender


@attrs.define
class LimitedRelay:
    """An in-trio relay with the limits real MTAs have.

    ``max_connections``: concurrent sessions per client (Postfix
    smtpd_client_connection_count_limit); more are refused. ``per_session_cap``: mails per
    session, after which MAIL answers ``452 4.5.3`` (OpenSMTPD). ``up``: False refuses every
    connect; ``drop_idle``: live sessions fail their next probe.
    """

    max_connections: int = 100
    per_session_cap: int | None = None
    up: bool = True
    open_sessions: int = 0
    connects: int = 0
    delivered: list[tuple[str, int]] = attrs.Factory(list)  # (message id, session number)
    sends_after_up: int = 0
    generation: int = 0  # bumped when the relay drops every idle session

    async def connect(self) -> LimitedSession:
        await trio.lowlevel.checkpoint()
        if not self.up:
            raise ConnectFailed("connection refused")
        if self.open_sessions >= self.max_connections:
            raise ConnectFailed("421 4.7.0 too many connections from your host")
        self.open_sessions += 1
        self.connects += 1
        return LimitedSession(self, self.connects, self.generation)


@attrs.define
class LimitedSession:
    relay: LimitedRelay
    number: int
    generation: int
    carried: int = 0
    closed: bool = False

    async def probe(self) -> bool:
        await trio.lowlevel.checkpoint()
        return self.relay.up and self.generation == self.relay.generation

    async def send(self, mail: OutgoingMail) -> Delivered | Rejected:
        await trio.sleep(0.01)
        cap = self.relay.per_session_cap
        if cap is not None and self.carried >= cap:
            return Rejected("MAIL", Reply(452, "4.5.3 Too many messages sent"))
        self.carried += 1
        self.relay.delivered.append((mail.message_id, self.number))
        return Delivered(Reply(250, "ok"))

    async def reset(self) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def close(self, *, quit: bool) -> None:
        await trio.lowlevel.checkpoint()
        if not self.closed:
            self.closed = True
            self.relay.open_sessions -= 1


def pool(relay: LimitedRelay, size: int, finished: list[FinishedMail], **kwargs: object) -> list:
    kwargs.setdefault("backoff", ReconnectBackoff(base_s=1, cap_s=30))
    kwargs.setdefault("policy", RetryPolicy(base_s=1, max_s=30, ttl_s=600))
    return [
        build_sender(relay.connect, random=lambda: 1.0, on_finished=finished.append, **kwargs)
        for _ in range(size)
    ]


async def run_pool(senders: list[Sender], queue: MailQueue) -> None:
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            for sender in senders:
                nursery.start_soon(sender.run, queue)


async def test_a_pool_does_not_hold_mail_in_a_sender_that_cannot_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 item 2: 4 sessions against a relay that allows one connection: all 20 delivered,
    none waits in a sender that cannot connect until it expires."""
    relay = LimitedRelay(max_connections=1)
    finished: list[FinishedMail] = []
    senders = pool(relay, 4, finished, policy=RetryPolicy(ttl_s=60))
    queue = MailQueue.open(capacity=20, retry_capacity=20)
    for n in range(20):
        queue.put_nowait(mail(n))
    queue.close()
    start = trio.current_time()
    await run_pool(senders, queue)
    assert sorted(f.outcome for f in finished) == ["delivered"] * 20
    assert len({session for _, session in relay.delivered}) == 1
    assert trio.current_time() - start < 5  # nobody waited out a backoff holding mail


async def test_a_4xx_session_cap_opens_a_new_session_instead_of_failing_mail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 item 3: OpenSMTPD's 452 4.5.3 after its per-session cap: 30 mails over a cap of
    10 all arrive, on three sessions, with no mail failed."""
    relay = LimitedRelay(per_session_cap=10)
    finished: list[FinishedMail] = []
    [sender] = pool(relay, 1, finished, max_messages=1000)
    queue = MailQueue.open(capacity=30, retry_capacity=5)
    for n in range(30):
        queue.put_nowait(mail(n))
    queue.close()
    await run_pool([sender], queue)
    assert [f.outcome for f in finished] == ["delivered"] * 30
    assert [session for _, session in relay.delivered] == [1] * 10 + [2] * 10 + [3] * 10
    assert sender.statistics().retries == 2  # one immediate retry per cap


async def test_recycling_counts_attempts_not_only_deliveries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """MAILER_SESSION_MAX_MESSAGES applies when mails fail too: 5xx still count towards it."""
    relay = LimitedRelay()
    finished: list[FinishedMail] = []

    async def refusing_send(self: LimitedSession, mail: OutgoingMail) -> Rejected:
        await trio.sleep(0.01)
        self.carried += 1
        return Rejected("RCPT", Reply(550, "5.1.1 no such user"))

    [sender] = pool(relay, 1, finished, max_messages=2)
    queue = MailQueue.open(capacity=6, retry_capacity=5)
    for n in range(6):
        queue.put_nowait(mail(n))
    queue.close()
    original = LimitedSession.send
    LimitedSession.send = refusing_send  # type: ignore[method-assign,assignment]
    try:
        await run_pool([sender], queue)
    finally:
        LimitedSession.send = original  # type: ignore[method-assign]
    assert [f.outcome for f in finished] == ["failed"] * 6
    assert relay.connects == 3


async def test_an_outage_past_the_ttl_while_a_session_idles_does_not_stop_the_service(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 1: the relay drops an idle session and stays away past the time to live.
    The mail expires, its status is stored, nothing raises, no status change is refused."""
    relay = LimitedRelay()
    finished: list[FinishedMail] = []
    board = StatusBoard()
    outbox = MemoryOutbox()
    [sender] = pool(
        relay, 1, finished, policy=RetryPolicy(ttl_s=60), noop_idle_s=1, board=board, outbox=outbox
    )
    queue = MailQueue.open(capacity=2, retry_capacity=2)

    async def accept(n: int) -> None:
        record = MailRecord.accepted(mail(n), accepted_at_unix=sender.wall_clock())
        await outbox.add(record)
        board.track(record)
        queue.put_nowait(mail(n))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run, queue)
        await accept(1)
        await trio.sleep(30)  # delivered; the session idles
        relay.up = False
        relay.generation += 1
        await accept(2)
        await trio.sleep(120)
        queue.close()
    assert [f.outcome for f in finished] == ["delivered", "expired"]
    stored = await outbox.get(mail(2).message_id)
    assert stored is not None and stored.state is MailState.EXPIRED
    assert "refused status change" not in caplog.text


async def test_retries_continue_until_the_ttl_not_a_fixed_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 item 4: greylisting (4xx for 300 s) with the default policy: the mail arrives."""
    relay = LimitedRelay()
    finished: list[FinishedMail] = []
    greylisted_until = trio.current_time() + 300

    async def greylisting_send(self: LimitedSession, mail: OutgoingMail) -> Delivered | Rejected:
        await trio.sleep(0.01)
        if trio.current_time() < greylisted_until:
            return Rejected("RCPT", Reply(450, "4.2.0 greylisted, try again later"))
        self.relay.delivered.append((mail.message_id, self.number))
        return Delivered(Reply(250, "ok"))

    sender = build_sender(relay.connect, on_finished=finished.append)  # default policy
    queue = MailQueue.open(capacity=1, retry_capacity=1)
    queue.put_nowait(mail(1))
    queue.close()
    original = LimitedSession.send
    LimitedSession.send = greylisting_send  # type: ignore[method-assign,assignment]
    try:
        await run_pool([sender], queue)
    finally:
        LimitedSession.send = original  # type: ignore[method-assign]
    assert [f.outcome for f in finished] == ["delivered"]
    assert finished[0].delivery.attempts > 8


async def test_an_attempt_is_stored_as_started_before_data(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 item 7: while the relay holds DATA, the outbox already says SENDING with the
    attempt counted, so a kill -9 now is known as a possible duplicate at the next start."""
    relay = LimitedRelay()
    board = StatusBoard()
    outbox = MemoryOutbox()
    in_data = trio.Event()

    async def hanging_send(self: LimitedSession, mail: OutgoingMail) -> Delivered:
        in_data.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    sender = build_sender(relay.connect, board=board, outbox=outbox)
    record = MailRecord.accepted(mail(1), accepted_at_unix=sender.wall_clock())
    await outbox.add(record)
    board.track(record)
    queue = MailQueue.open(capacity=1, retry_capacity=1)
    queue.put_nowait(mail(1))
    original = LimitedSession.send
    LimitedSession.send = hanging_send  # type: ignore[method-assign,assignment]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.run, queue)
            await in_data.wait()
            stored = await outbox.get(mail(1).message_id)
            nursery.cancel_scope.cancel()  # the "kill"
    finally:
        LimitedSession.send = original  # type: ignore[method-assign]
    assert stored is not None
    assert (stored.state, stored.attempts) == (MailState.SENDING, 1)


async def test_status_says_why_a_mail_waits_while_the_relay_refuses_our_credentials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 item 11: GetStatus (the board) gives the refusal as the waiting mail's reason."""
    board = StatusBoard()

    async def refuse() -> LimitedSession:
        await trio.lowlevel.checkpoint()
        raise ConnectFailed("AUTH refused: 535 5.7.8 bad credentials", config_error=True)

    sender = build_sender(refuse, board=board, backoff=ReconnectBackoff(base_s=1, cap_s=10))
    record = MailRecord.accepted(mail(1), accepted_at_unix=sender.wall_clock())
    board.track(record)
    queue = MailQueue.open(capacity=1, retry_capacity=1)
    queue.put_nowait(mail(1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run, queue)
        await trio.sleep(5)
        now = board.get(mail(1).message_id)
        nursery.cancel_scope.cancel()
    assert now is not None and now.state is MailState.QUEUED
    assert "AUTH refused: 535 5.7.8 bad credentials" in now.last_reply_text


async def test_the_mail_goes_to_whichever_sender_has_a_session(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Work stealing: a sender whose connect fails gives the mail back at once."""
    caplog.set_level(logging.INFO, "trio_mailer")
    relay = LimitedRelay(max_connections=1)
    finished: list[FinishedMail] = []
    first, second = pool(relay, 2, finished)
    queue = MailQueue.open(capacity=4, retry_capacity=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.run, queue)
        queue.put_nowait(mail(0))
        await trio.sleep(1)  # first now holds the relay's one connection
        nursery.start_soon(second.run, queue)
        for n in range(1, 4):
            queue.put_nowait(mail(n))
        await trio.sleep(0.5)
        queue.close()
    assert [f.outcome for f in finished] == ["delivered"] * 4
    assert first.statistics().delivered == 4


async def test_a_connect_that_ends_past_the_ttl_does_not_send_the_mail_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The time to live passes while the connect is under way: expired, never sent late."""
    relay = LimitedRelay()
    finished: list[FinishedMail] = []

    async def slow_connect() -> LimitedSession:
        await trio.sleep(90)  # a relay that takes its time over the greeting and TLS
        return await relay.connect()

    sender = build_sender(slow_connect, policy=RetryPolicy(ttl_s=60), on_finished=finished.append)
    queue = MailQueue.open(capacity=1, retry_capacity=1)
    queue.put_nowait(mail(1))
    queue.close()
    await run_pool([sender], queue)
    assert [f.outcome for f in finished] == ["expired"]
    assert relay.delivered == []
