"""Queue-full refusals are paced (core.load_shedding), so a flood of retrying callers leaves the
loop to delivery; a paced call never waits past its bound or its deadline, and takes room that
appears while it waits. The pure pacer alone: tests/test_refusal_pacer.py."""

from __future__ import annotations

import datetime
import itertools

import pytest
import trio
import trio.testing

from trio_mailer.core.load_shedding import DEADLINE_MARGIN_S, RefusalPacer
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.grpc.mailer_service import MailerService
from trio_mailer.service.accept_mail import QUEUE_FULL_REASON
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

from .helpers import mail, mailer_service

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
    service = mailer_service(queue, pacer=RefusalPacer(per_s=per_s), refusal_wait_s=wait_s)
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
    assert service.accept.refused_queue_full == 20


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
