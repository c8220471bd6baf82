"""The sender's timing and decisions, on the autojump mock clock with an in-trio fake session.

No threads here (STYLE 12): the fake session is plain Trio, so the mock clock's jumps only
skip the sender's own sleeps (reconnect backoff), which is exactly what is measured.
"""

from __future__ import annotations

import itertools

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_mailer.backoff import ReconnectBackoff
from trio_mailer.message import OutgoingMail
from trio_mailer.rendering import MailKind
from trio_mailer.sender import Sender
from trio_mailer.smtp_session import ConnectFailed, Delivered, Rejected, Reply, SessionLost


def mail(n: int) -> OutgoingMail:
    return OutgoingMail(
        message_id=f"<{n}@example.com>",
        kind=MailKind.PASSWORD,
        envelope_from="noreply@example.com",
        envelope_to=f"user{n}@example.com",
        data=b"Subject: x\r\n\r\nbody\r\n",
    )


Outcome = Delivered | Rejected | SessionLost


@attrs.define
class FakeRelay:
    """Scripted relay: connect failures, probe answers and send outcomes, in order."""

    connect_failures: int = 0
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
            raise ConnectFailed("connection refused")
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


async def run_sender(relay: FakeRelay, mails: list[OutgoingMail], **kwargs: object) -> Sender:
    """Feed ``mails`` through a sender until the channel ends."""
    sender = Sender(connect=relay.connect, **kwargs)  # type: ignore[arg-type]
    send, receive = trio.open_memory_channel[OutgoingMail](len(mails) or 1)
    for m in mails:
        send.send_nowait(m)
    send.close()
    with trio.fail_after(3600):
        await sender.run(receive)
    return sender


async def test_one_session_carries_many_mails_with_a_probe_before_each_reuse(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Mails share one session; NOOP precedes every mail but the first; QUIT at the end."""
    relay = FakeRelay()
    sender = await run_sender(relay, [mail(1), mail(2), mail(3)])
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
    sender = await run_sender(relay, [mail(1), mail(2)], backoff=ReconnectBackoff(0.5, 30))
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
    relay = FakeRelay(send_outcomes=[Rejected("RCPT", Reply(550, "no such user"))])
    sender = await run_sender(relay, [mail(1), mail(2)])
    assert relay.names() == [
        "connect #1",
        "send <1@example.com> on #1: Rejected",
        "rset",
        "probe ok",
        "send <2@example.com> on #1: Delivered",
        "quit",
    ]
    assert (sender.statistics().delivered, sender.statistics().failed) == (1, 1)


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
    sender = await run_sender(relay, [mail(1), mail(2)], max_attempts=3)
    sends = [what for what in relay.names() if what.startswith("send")]
    assert sends == [
        "send <1@example.com> on #1: SessionLost",
        "send <1@example.com> on #2: SessionLost",
        "send <1@example.com> on #3: SessionLost",
        "send <2@example.com> on #4: Delivered",
    ]
    assert (sender.statistics().delivered, sender.statistics().failed) == (1, 1)


async def test_cancelled_sender_keeps_the_in_flight_mail_and_closes_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancellation mid-send leaves in_flight set (for the shutdown report) and closes."""
    relay = FakeRelay()
    sender = Sender(connect=relay.connect)
    send, receive = trio.open_memory_channel[OutgoingMail](1)
    send.send_nowait(mail(1))
    with trio.move_on_after(0.005):  # shorter than one send
        await sender.run(receive)
    assert sender.in_flight == mail(1)
    assert relay.names() == ["connect #1", "close"]
    assert not sender.statistics().session_up


@pytest.mark.parametrize("after_data_end", [False, True])
async def test_lost_after_the_dot_is_sent_again(
    autojump_clock: trio.testing.MockClock, after_data_end: bool
) -> None:
    """Lost before or after the final '.', the mail is sent again (at least once)."""
    relay = FakeRelay(send_outcomes=[SessionLost("DOT: timed out", after_data_end=after_data_end)])
    await run_sender(relay, [mail(1)])
    assert relay.delivered == ["<1@example.com>"]
