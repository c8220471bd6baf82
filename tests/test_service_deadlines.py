"""The Mailer handlers honour grpc-timeout, count cancelled calls, and WatchStatus never hangs."""

from __future__ import annotations

import datetime

import purerpc
import pytest
import trio
import trio.testing

from trio_mailer.core.mail_lifecycle import MailRecord, MailState, StatusChange
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.metrics import Metrics
from trio_mailer.store.admission_tables import Acceptance
from trio_mailer.store.outbox import MemoryOutbox
from trio_mailer.store.status_board import StatusBoard
from trio_mailer.v1.mailer_pb2 import MailStatus, MsgRequest, StatusRequest

from .helpers import mail, mailer_service


class SlowOutbox(MemoryOutbox):
    """An outbox whose commit takes ``delay_s`` (a slow disk)."""

    delay_s = 1.0

    async def add(self, record: MailRecord, acceptance: Acceptance | None = None) -> None:
        await trio.sleep(self.delay_s)
        await super().add(record, acceptance)


class Call:
    """What purerpc hands a handler as ``request``: the parsed headers."""

    def __init__(self, timeout: datetime.timedelta | None) -> None:
        self.timeout = timeout
        self.custom_metadata: list[tuple[str, str]] = []


def requests(metrics: Metrics, outcome: str) -> float:
    return metrics.requests.labels("SendPass", outcome)._value.get()  # type: ignore[no-any-return]


async def test_a_call_past_its_deadline_stores_nothing_and_says_deadline_exceeded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 item 8: a 2 ms deadline and a 1 s commit: DEADLINE_EXCEEDED, nothing stored or
    queued, counted as deadline_exceeded."""
    metrics = Metrics()
    outbox = SlowOutbox()
    queue = MailQueue.open(capacity=5, retry_capacity=5)
    service = mailer_service(queue, metrics=metrics, outbox=outbox)
    with pytest.raises(purerpc.RpcFailedError) as caught:
        await service.SendPass(
            MsgRequest(to="user@example.com", code="123456"),
            Call(datetime.timedelta(milliseconds=2)),
        )
    assert caught.value.status.status_code == purerpc.StatusCode.DEADLINE_EXCEEDED
    assert await outbox.unfinished() == []
    assert queue.statistics().queued == 0 and not queue.full()
    assert requests(metrics, "deadline_exceeded") == 1


async def test_a_call_within_its_deadline_is_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    service = mailer_service(MailQueue.open(5, 5), metrics=metrics, outbox=SlowOutbox())
    reply = await service.SendPass(
        MsgRequest(to="user@example.com", code="123456"), Call(datetime.timedelta(seconds=5))
    )
    assert reply.sent
    assert requests(metrics, "accepted") == 1


async def test_a_cancelled_call_is_counted_as_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 item 8: the client hung up mid-commit: `cancelled`, not `internal`."""
    metrics = Metrics()
    outbox = SlowOutbox()
    service = mailer_service(MailQueue.open(5, 5), metrics=metrics, outbox=outbox)
    with trio.move_on_after(0.5):
        await service.SendPass(MsgRequest(to="user@example.com", code="123456"), Call(None))
    assert requests(metrics, "cancelled") == 1
    assert requests(metrics, "internal") == 0
    assert await outbox.unfinished() == []


def change(state: MailState, attempts: int) -> StatusChange:
    return StatusChange(mail(1).message_id, state, attempts, None, "", 1000.0)


async def test_watch_status_sees_a_change_made_while_it_was_suspended_at_yield() -> None:
    """Issue 10 item 5: changes that land between two reads of the stream are not lost, and a
    final state already moved to the outbox still ends the stream."""
    board = StatusBoard()
    outbox = MemoryOutbox()
    service = mailer_service(MailQueue.open(5, 5), outbox=outbox, board=board)
    record = MailRecord.accepted(mail(1), accepted_at_unix=1000.0)
    await outbox.add(record)
    board.track(record)
    stream = service.WatchStatus(StatusRequest(message_id=mail(1).message_id))
    with trio.fail_after(5):
        first = await stream.__anext__()
        assert first.state == MailStatus.QUEUED
        board.change(change(MailState.SENDING, 1))  # while the stream sits at ``yield``
        second = await stream.__anext__()
        assert second.state == MailStatus.SENDING
        delivered = change(MailState.DELIVERED, 1)
        board.change(delivered)
        await outbox.record(change(MailState.SENDING, 1))
        await outbox.record(delivered)
        board.forget(mail(1).message_id)  # the outbox answers from now on
        third = await stream.__anext__()
        assert third.state == MailStatus.DELIVERED
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
