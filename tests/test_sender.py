"""The sender's timing and decisions, on the autojump mock clock with an in-trio fake session.

No threads here (STYLE 12): the fake session is plain Trio, so the mock clock's jumps only
skip the sender's own sleeps (reconnect backoff), which is exactly what is measured.
"""

from __future__ import annotations

import itertools
import logging

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.retry_policy import ReconnectBackoff, RetryPolicy
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.delivery.sender import FinishedMail, Sender
from trio_mailer.delivery.smtp_session import (
    ConnectFailed,
    Delivered,
    Rejected,
    Reply,
    SessionLost,
)

from .helpers import mail
from .sender_helpers import build_sender

Outcome = Delivered | Rejected | SessionLost


@attrs.define
class FakeRelay:
    """Scripted relay: connect failures, probe answers and send outcomes, in order."""

    connect_failures: int = 0
    connect_error: ConnectFailed = attrs.Factory(lambda: ConnectFailed("connection refused"))
    probe_answers: list[bool] = attrs.Factory(list)
    send_outcomes: list[Outcome] = attrs.Factory(list)
    reset_ok: bool = True
    events: list[tuple[float, str]] = attrs.Factory(list)
    delivered: list[str] = attrs.Factory(list)
    sessions: int = 0

    def log(self, what: str) -> None:
        self.events.append((trio.current_time(), what))

    async def connect(self) -> FakeSession:
        await trio.lowlevel.checkpoint()
        if self.connect_failures > 0:
            self.connect_failures -= 1
            self.log("connect failed")
            raise self.connect_error
        self.sessions += 1
        self.log(f"connect #{self.sessions}")
        return FakeSession(self, self.sessions)

    def names(self) -> list[str]:
        return [what for _, what in self.events]


@attrs.define
class FakeSession:
    relay: FakeRelay
    number: int

    async def probe(self) -> bool:
        await trio.lowlevel.checkpoint()
        answer = self.relay.probe_answers.pop(0) if self.relay.probe_answers else True
        self.relay.log(f"probe {'ok' if answer else 'failed'}")
        return answer

    async def send(self, mail: OutgoingMail) -> Delivered | Rejected:
        await trio.sleep(0.01)  # one round of SMTP on a fast relay
        outcome = (
            self.relay.send_outcomes.pop(0)
            if self.relay.send_outcomes
            else Delivered(Reply(250, "ok"))
        )
        self.relay.log(f"send {mail.message_id} on #{self.number}: {type(outcome).__name__}")
        if isinstance(outcome, SessionLost):
            raise outcome
        if isinstance(outcome, Delivered):
            self.relay.delivered.append(mail.message_id)
        return outcome

    async def reset(self) -> bool:
        self.relay.log("rset")
        return self.relay.reset_ok

    async def close(self, *, quit: bool) -> None:
        self.relay.log("quit" if quit else "close")


async def run_sender(
    relay: FakeRelay, mails: list[OutgoingMail], **kwargs: object
) -> tuple[Sender, list[FinishedMail]]:
    """Feed ``mails`` through a sender until the queue has no more work."""
    finished: list[FinishedMail] = []
    kwargs.setdefault("backoff", ReconnectBackoff(base_s=0.5, cap_s=30))
    kwargs.setdefault("noop_idle_s", 0)  # probe before every reuse, unless a test says otherwise
    sender = build_sender(
        relay.connect,
        random=lambda: 1.0,  # the top of every jitter range: deterministic delays
        on_finished=finished.append,
        **kwargs,
    )
    queue = MailQueue.open(capacity=max(len(mails), 1), retry_capacity=10)
    for m in mails:
        queue.put_nowait(m)
    queue.close()
    with trio.fail_after(3600):
        await sender.run(queue)
    return sender, finished


async def test_one_session_carries_many_mails_with_a_probe_before_each_reuse(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Mails share one session; NOOP precedes every mail but the first; QUIT at the end."""
    relay = FakeRelay()
    sender, _ = await run_sender(relay, [mail(1), mail(2), mail(3)])
    assert relay.names() == [
        "connect #1",
        "send <1@example.com> on #1: Delivered",
        "probe ok",
        "send <2@example.com> on #1: Delivered",
        "probe ok",
        "send <3@example.com> on #1: Delivered",
        "quit",
    ]
    assert sender.statistics().delivered == 3
    assert sender.statistics().connects == 1


async def test_failed_probe_means_reconnect_before_sending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A probe that is not 250 replaces the session at once, and the mail goes on the new one."""
    relay = FakeRelay(probe_answers=[False])
    await run_sender(relay, [mail(1), mail(2)])
    assert relay.names() == [
        "connect #1",
        "send <1@example.com> on #1: Delivered",
        "probe failed",
        "close",
        "connect #2",
        "send <2@example.com> on #2: Delivered",
        "quit",
    ]
    # No backoff for a session the relay dropped while idle.
    times = dict((what, t) for t, what in relay.events)
    assert times["connect #2"] == times["probe failed"]


async def test_relay_down_is_retried_with_a_growing_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Failed connects wait 0.5, 1, 2, 4 s (doubling) and the mail is delivered once it is up."""
    relay = FakeRelay(connect_failures=4)
    start = trio.current_time()
    await run_sender(relay, [mail(1)], backoff=ReconnectBackoff(base_s=0.5, cap_s=30))
    connect_times = [t - start for t, what in relay.events if what.startswith("connect")]
    assert connect_times == pytest.approx([0.0, 0.5, 1.5, 3.5, 7.5])
    assert relay.delivered == ["<1@example.com>"]


async def test_delay_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    """A long outage retries at the cap, not at ever longer intervals."""
    relay = FakeRelay(connect_failures=8)
    start = trio.current_time()
    await run_sender(relay, [mail(1)], backoff=ReconnectBackoff(base_s=1, cap_s=5))
    connect_times = [t - start for t, what in relay.events if what.startswith("connect")]
    gaps = [b - a for a, b in itertools.pairwise(connect_times)]
    assert gaps == pytest.approx([1, 2, 4, 5, 5, 5, 5, 5])


async def test_session_lost_before_the_dot_sends_the_same_mail_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lost connection means reconnect and send the same mail again, after a short pause."""
    relay = FakeRelay(send_outcomes=[SessionLost("MAIL: reset", after_data_end=False)])
    sender, _ = await run_sender(relay, [mail(1), mail(2)])
    assert relay.names() == [
        "connect #1",
        "send <1@example.com> on #1: SessionLost",
        "close",
        "connect #2",
        "send <1@example.com> on #2: Delivered",
        "probe ok",
        "send <2@example.com> on #2: Delivered",
        "quit",
    ]
    assert relay.delivered == ["<1@example.com>", "<2@example.com>"]
    assert sender.statistics().failed == 0


async def test_rejected_mail_is_reported_and_the_session_reset_for_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 5xx is reported as failed, RSET cleans the session, and the next mail uses it."""
    relay = FakeRelay(send_outcomes=[Rejected("RCPT", Reply(550, "5.1.1 no such user"))])
    sender, finished = await run_sender(relay, [mail(1), mail(2)])
    assert relay.names() == [
        "connect #1",
        "send <1@example.com> on #1: Rejected",
        "rset",
        "probe ok",
        "send <2@example.com> on #1: Delivered",
        "quit",
    ]
    assert (sender.statistics().delivered, sender.statistics().failed) == (1, 1)
    assert finished[0] == FinishedMail(
        attrs.evolve(
            finished[0].delivery, attempts=1, last_reply="RCPT rejected: 550 5.1.1 no such user"
        ),
        delivered=False,
        reason="permanent failure",
    )
    assert finished[0].delivery.message_id == "<1@example.com>"


async def test_session_is_replaced_when_rset_fails(autojump_clock: trio.testing.MockClock) -> None:
    """A session that refuses RSET after a rejection is not reused."""
    relay = FakeRelay(send_outcomes=[Rejected("MAIL", Reply(451, "try later"))], reset_ok=False)
    await run_sender(relay, [mail(1), mail(2)])
    assert relay.names()[:5] == [
        "connect #1",
        "send <1@example.com> on #1: Rejected",
        "rset",
        "close",
        "connect #2",
    ]


async def test_a_mail_that_always_loses_the_session_fails_after_max_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sending again is bounded: the mail is reported failed, and the next one still goes."""
    lost = [SessionLost("DATA: reset", after_data_end=False) for _ in range(3)]
    relay = FakeRelay(send_outcomes=lost)
    sender, finished = await run_sender(
        relay, [mail(1), mail(2)], policy=RetryPolicy(max_attempts=3)
    )
    sends = [what for what in relay.names() if what.startswith("send")]
    assert sends == [
        "send <1@example.com> on #1: SessionLost",
        "send <1@example.com> on #2: SessionLost",
        "send <1@example.com> on #3: SessionLost",
        "send <2@example.com> on #4: Delivered",
    ]
    assert (sender.statistics().delivered, sender.statistics().failed) == (1, 1)
    assert finished[0].reason == "gave up after 3 attempts"
    assert finished[0].delivery.last_reply == "session lost at DATA: reset"


async def test_cancelled_sender_keeps_the_in_flight_mail_and_closes_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancellation mid-send leaves in_flight set (for the shutdown report) and closes."""
    relay = FakeRelay()
    sender = build_sender(relay.connect)
    queue = MailQueue.open(capacity=1, retry_capacity=1)
    queue.put_nowait(mail(1))
    with trio.move_on_after(0.005):  # shorter than one send
        await sender.run(queue)
    assert sender.in_flight is not None and sender.in_flight.mail == mail(1)
    assert relay.names() == ["connect #1", "close"]
    assert sender.statistics().sessions_up == 0


async def test_lost_after_the_dot_is_sent_again_as_a_possible_duplicate(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Outcome unknown: the same mail goes again and its delivery is flagged."""
    caplog.set_level(logging.INFO, "trio_mailer")
    relay = FakeRelay(send_outcomes=[SessionLost("DOT: timed out", after_data_end=True)])
    _, finished = await run_sender(relay, [mail(1)])
    assert relay.delivered == ["<1@example.com>"]
    assert finished[0].delivered and finished[0].delivery.possible_duplicate
    assert finished[0].delivery.attempts == 2
    assert "possible duplicate: the relay may already have it" in caplog.text
    assert "delivered <1@example.com> (attempts=2, reply: 250 ok) (possible duplicate)" in (
        caplog.text
    )


async def test_lost_before_the_dot_is_not_a_duplicate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Lost before the final '.': sent again, not flagged."""
    relay = FakeRelay(send_outcomes=[SessionLost("MAIL: reset", after_data_end=False)])
    _, finished = await run_sender(relay, [mail(1)])
    assert finished[0].delivered and not finished[0].delivery.possible_duplicate


async def test_transient_reply_is_retried_after_backoff_without_blocking_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 451 defers that mail by the backoff; the mails behind it go meanwhile."""
    relay = FakeRelay(send_outcomes=[Rejected("RCPT", Reply(451, "4.7.1 greylisted"))])
    start = trio.current_time()
    _, finished = await run_sender(
        relay, [mail(1), mail(2), mail(3)], policy=RetryPolicy(base_s=10, max_s=60)
    )
    assert relay.delivered == ["<2@example.com>", "<3@example.com>", "<1@example.com>"]
    retry_time = next(
        t for t, what in relay.events if what == "send <1@example.com> on #1: Delivered"
    )
    assert retry_time - start == pytest.approx(10.0, abs=0.1)  # rand=1.0: base * 2**0
    assert [f.delivery.attempts for f in finished] == [1, 1, 2]


async def test_transient_replies_back_off_exponentially_until_attempts_run_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """452 after 452: waits 1, 2, 4, 8 s (rand=1) and gives up after max_attempts."""
    deferrals = [Rejected("MAIL", Reply(452, "4.3.1 out of storage")) for _ in range(5)]
    relay = FakeRelay(send_outcomes=deferrals)
    start = trio.current_time()
    _, finished = await run_sender(
        relay, [mail(1)], policy=RetryPolicy(base_s=1, max_s=60, max_attempts=5)
    )
    send_times = [t - start for t, what in relay.events if what.startswith("send")]
    assert send_times == pytest.approx([0.01, 1.02, 3.03, 7.04, 15.05], abs=0.005)
    assert finished == [
        FinishedMail(finished[0].delivery, delivered=False, reason="gave up after 5 attempts")
    ]
    assert finished[0].delivery.last_reply == "MAIL rejected: 452 4.3.1 out of storage"


async def test_ttl_expiring_during_backoff_fails_the_mail_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A retry that would start after the time to live is not scheduled: failed now."""
    relay = FakeRelay(send_outcomes=[Rejected("RCPT", Reply(450, "mailbox busy"))])
    start = trio.current_time()
    _, finished = await run_sender(
        relay, [mail(1)], policy=RetryPolicy(base_s=100, max_s=100, ttl_s=50)
    )
    assert len(relay.delivered) == 0
    assert finished[0].reason == "time to live (50s) would pass before the next attempt"
    assert trio.current_time() - start < 1


async def test_ttl_passing_while_the_relay_is_down_fails_the_mail_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With the relay unreachable, the mail is reported failed when its time to live ends."""
    relay = FakeRelay(connect_failures=1000)
    start = trio.current_time()
    _, finished = await run_sender(
        relay,
        [mail(1)],
        policy=RetryPolicy(ttl_s=45),
        backoff=ReconnectBackoff(base_s=1, cap_s=10),
    )
    assert finished[0].reason == "time to live (45s) passed while the relay was unavailable"
    assert trio.current_time() - start == pytest.approx(45, abs=0.01)


async def test_configuration_errors_back_off_at_the_cap_and_log_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """AUTH 535: every retry waits the full cap, and the error is logged once, at ERROR."""
    caplog.set_level(logging.INFO, "trio_mailer")
    relay = FakeRelay(
        connect_failures=3,
        connect_error=ConnectFailed("AUTH refused: 535 5.7.8 bad credentials", config_error=True),
    )
    start = trio.current_time()
    await run_sender(relay, [mail(1)], backoff=ReconnectBackoff(base_s=1, cap_s=20))
    connect_times = [t - start for t, what in relay.events if what.startswith("connect")]
    assert connect_times == pytest.approx([0, 20, 40, 60])
    errors = [r for r in caplog.records if "refuses our configuration" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelname == "ERROR"
    assert "relay reachable again (after 3 failures)" in caplog.text


async def test_transient_connect_failures_are_logged_once_per_state_change(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten refused connects give one WARNING, then one INFO when the relay is back."""
    relay = FakeRelay(connect_failures=10)
    await run_sender(relay, [mail(1)])
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings] == [
        "relay unavailable: connection refused; retrying with backoff (up to 30s)"
    ]


async def test_jitter_spreads_reconnects(autojump_clock: trio.testing.MockClock) -> None:
    """With rand=0 the reconnect waits half a step: never zero, never a tight loop."""
    relay = FakeRelay(connect_failures=3)
    start = trio.current_time()
    finished: list[FinishedMail] = []
    sender = build_sender(
        relay.connect,
        backoff=ReconnectBackoff(base_s=2, cap_s=60),
        random=lambda: 0.0,
        on_finished=finished.append,
    )
    queue = MailQueue.open(1, 1)
    queue.put_nowait(mail(1))
    queue.close()
    await sender.run(queue)
    connect_times = [t - start for t, what in relay.events if what.startswith("connect")]
    assert connect_times == pytest.approx([0, 1, 3, 7])


async def run_sender_with_gaps(relay: FakeRelay, gaps_s: list[float], **kwargs: object) -> Sender:
    """Mail n+1 arrives gaps_s[n] after mail n was handed over."""
    sender = build_sender(relay.connect, random=lambda: 1.0, **kwargs)
    queue = MailQueue.open(capacity=len(gaps_s) + 1, retry_capacity=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run, queue)
        queue.put_nowait(mail(0))
        for n, gap in enumerate(gaps_s, start=1):
            await trio.sleep(gap)
            queue.put_nowait(mail(n))
        queue.close()
    return sender


async def test_probe_only_after_the_session_sat_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """NOOP before a mail only when the session was idle >= noop_idle_s."""
    relay = FakeRelay()
    await run_sender_with_gaps(relay, [0.1, 0.2, 5.0, 0.1], noop_idle_s=1.0)
    assert [w for w in relay.names() if not w.startswith("send")] == [
        "connect #1",
        "probe ok",  # only before mail 3, after 5 s idle
        "quit",
    ]
    assert len(relay.delivered) == 5


async def test_session_recycled_after_max_messages(autojump_clock: trio.testing.MockClock) -> None:
    """After max_messages mails the session says QUIT and the next mail opens a new one."""
    relay = FakeRelay()
    sender, _ = await run_sender(relay, [mail(n) for n in range(5)], max_messages=2)
    assert [w for w in relay.names() if not w.startswith(("send", "probe"))] == [
        "connect #1",
        "quit",
        "connect #2",
        "quit",
        "connect #3",
        "quit",
    ]
    assert sender.statistics().connects == 3
    assert len(relay.delivered) == 5


async def test_session_recycled_after_max_age(autojump_clock: trio.testing.MockClock) -> None:
    """A session older than max_age_s is replaced (with QUIT) before it carries another mail."""
    relay = FakeRelay()
    await run_sender_with_gaps(relay, [10.0, 50.0, 10.0], max_age_s=30.0, noop_idle_s=1000)
    assert [w for w in relay.names() if not w.startswith("send")] == [
        "connect #1",
        "quit",  # 60 s old when mail 2 came
        "connect #2",
        "quit",
    ]
    sends = [w.rsplit(" on ", 1)[1].split(":")[0] for w in relay.names() if w.startswith("send")]
    assert sends == ["#1", "#1", "#2", "#2"]
