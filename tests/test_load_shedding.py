"""Queue-full refusals are paced (core.load_shedding), so a flood of retrying callers leaves the
loop to delivery; a paced call never waits past its bound or its deadline, and takes room that
appears while it waits."""

from __future__ import annotations

import datetime
import itertools

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_mailer.core.load_shedding import DEADLINE_MARGIN_S, RefusalPacer
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.grpc.mailer_service import QUEUE_FULL_REASON, MailerService
from trio_mailer.store.outbox import MemoryOutbox
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

from .helpers import COMPOSER, mail

# -- the pure pacer --


def test_turns_come_one_interval_apart_in_order_of_arrival() -> None:
    pacer = RefusalPacer(per_s=10.0)
    assert [pacer.turn_s(0.0, 5.0) for _ in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_a_turn_later_than_the_bound_is_answered_at_the_bound_and_takes_no_turn() -> None:
    pacer = RefusalPacer(per_s=1.0)
    assert pacer.turn_s(0.0, 0.5) == 0.0  # takes the turn at 0
    assert pacer.turn_s(0.0, 0.5) == 0.5  # the next turn (1.0) is too late: at its bound
    assert pacer.turn_s(0.0, 3.0) == 1.0  # so 1.0 is still free


def test_turns_do_not_pile_up_while_nobody_is_refused() -> None:
    pacer = RefusalPacer(per_s=10.0)
    assert pacer.turn_s(0.0, 1.0) == 0.0
    assert pacer.turn_s(7.0, 8.0) == 7.0  # long after: at once


def test_no_pacing_when_off_or_when_the_bound_has_passed() -> None:
    assert RefusalPacer(per_s=0.0).turn_s(3.0, 10.0) == 3.0
    pacer = RefusalPacer(per_s=1.0)
    assert pacer.turn_s(0.0, 10.0) == 0.0
    assert pacer.turn_s(2.0, 1.0) == 2.0  # a deadline already behind: at once


@given(
    per_s=st.floats(0.5, 1000.0),
    arrivals=st.lists(
        st.tuples(st.floats(0.0, 100.0), st.floats(-1.0, 10.0)), min_size=1, max_size=50
    ),
)
def test_turns_are_never_early_late_or_closer_than_the_interval(
    per_s: float, arrivals: list[tuple[float, float]]
) -> None:
    """Whatever the arrivals, each answer is between its arrival and its bound, and the turns
    taken (answers before the bound) are at least 1/per_s apart."""
    pacer = RefusalPacer(per_s=per_s)
    now, taken = 0.0, []
    for gap, wait in sorted(arrivals):
        now = max(now, gap)
        latest = now + wait
        turn = pacer.turn_s(now, latest)
        assert now <= turn <= max(now, latest)
        if turn < latest:
            taken.append(turn)
    assert all(b - a >= 1.0 / per_s * (1 - 1e-9) for a, b in itertools.pairwise(taken))


# -- the service --


class Request:
    """What purerpc hands a handler as ``request``: the parsed headers."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self.custom_metadata: list[tuple[str, str]] = []


def full_service(per_s: float, wait_s: float = 10.0) -> tuple[MailerService, MailQueue]:
    queue = MailQueue.open(capacity=1, retry_capacity=5)
    queue.put_nowait(mail(1))
    assert queue.full()
    service = MailerService(
        COMPOSER,
        queue,
        outbox=MemoryOutbox(),
        refusal_pacer=RefusalPacer(per_s=per_s),
        refusal_wait_s=wait_s,
    )
    return service, queue


async def answer_times(
    service: MailerService, calls: int, timeout_s: float | None = None
) -> list[tuple[float, MsgReply]]:
    start = trio.current_time()
    answers: list[tuple[float, MsgReply]] = []

    async def one(n: int) -> None:
        reply = await service.SendPass(
            MsgRequest(to="user@example.com", code=f"{n:06d}"), Request(timeout_s)
        )
        answers.append((trio.current_time() - start, reply))

    async with trio.open_nursery() as nursery:
        for n in range(calls):
            nursery.start_soon(one, n)
    return sorted(answers, key=lambda answer: answer[0])


async def test_a_flood_on_a_full_queue_is_refused_at_the_paced_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """20 calls at once at 10 refusals/s: all "queue full", answered 0.1 s apart (2 s in all)."""
    service, _queue = full_service(per_s=10.0)
    answers = await answer_times(service, 20)
    assert all(not reply.sent and reply.reason == QUEUE_FULL_REASON for _, reply in answers)
    times = [at for at, _ in answers]
    assert times[0] == 0.0
    assert all(b - a >= 0.1 - 1e-9 for a, b in itertools.pairwise(times))
    assert 1.9 - 1e-9 <= times[-1] <= 2.0
    assert service.refused_queue_full == 20


async def test_a_paced_call_is_answered_by_its_wait_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At 1 refusal/s with a 0.5 s bound, the calls after the first are answered at 0.5 s."""
    service, _queue = full_service(per_s=1.0, wait_s=0.5)
    times = [at for at, _ in await answer_times(service, 5)]
    assert times == [0.0, 0.5, 0.5, 0.5, 0.5]


async def test_a_paced_call_is_refused_before_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 0.3 s grpc-timeout behind a long line: "queue full" just before the deadline, not
    DEADLINE_EXCEEDED."""
    service, _queue = full_service(per_s=1.0)
    answers = await answer_times(service, 3, timeout_s=0.3)
    assert all(not reply.sent and reply.reason == QUEUE_FULL_REASON for _, reply in answers)
    assert [at for at, _ in answers] == [0.0, 0.3 - DEADLINE_MARGIN_S, 0.3 - DEADLINE_MARGIN_S]


async def test_a_paced_call_takes_room_that_appears_while_it_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The sender takes the queued mail at 0.25 s: the call first in line is accepted at once,
    not at its turn; the others are refused at their turns."""
    service, queue = full_service(per_s=10.0)

    async def sender() -> None:
        await trio.sleep(0.25)
        delivery = await queue.next_due()
        assert delivery is not None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        answers = await answer_times(service, 5)
    accepted = [(at, reply) for at, reply in answers if reply.sent]
    assert len(accepted) == 1
    assert accepted[0][0] == pytest.approx(0.25)
    assert [at for at, reply in answers if not reply.sent] == pytest.approx([0.0, 0.1, 0.2, 0.4])


async def test_without_pacing_a_full_queue_refuses_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service, _queue = full_service(per_s=0.0)
    answers = await answer_times(service, 10)
    assert [at for at, _ in answers] == [0.0] * 10
    assert not any(reply.sent for _, reply in answers)
