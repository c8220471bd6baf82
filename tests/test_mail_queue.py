"""The outbound queue: admission, the retry heap, and the bound on mail held in memory."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_mailer.core.errors import ShuttingDown
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rendering import MailKind
from trio_mailer.delivery.mail_queue import MailQueue, QueueStatistics


def mail(n: int) -> OutgoingMail:
    return OutgoingMail(f"<{n}@x.example>", MailKind.PASSWORD, "a@x.example", "b@x.example", b"")


def ids(deliveries: list) -> list[str]:  # type: ignore[type-arg]
    return [d.message_id for d in deliveries]


async def test_full_queue_refuses_at_once_and_closed_queue_says_shutting_down() -> None:
    """put_nowait raises WouldBlock when full and ShuttingDown after close."""
    queue = MailQueue.open(capacity=2, retry_capacity=5)
    queue.put_nowait(mail(1))
    queue.put_nowait(mail(2))
    with pytest.raises(trio.WouldBlock):
        queue.put_nowait(mail(3))
    queue.close()
    with pytest.raises(ShuttingDown):
        queue.put_nowait(mail(4))
    assert queue.statistics() == QueueStatistics(
        queued=2, retry_waiting=0, in_flight=0, capacity=2, retry_capacity=5, closed=True
    )


async def test_due_retry_comes_before_new_mail(autojump_clock: trio.testing.MockClock) -> None:
    """A retry whose time has come is handed out before mail that is still queued."""
    queue = MailQueue.open(capacity=5, retry_capacity=5)
    queue.put_nowait(mail(1))
    queue.put_nowait(mail(2))
    first = await queue.next_due()
    assert first is not None
    queue.retry_at(first, trio.current_time() + 10)
    second = await queue.next_due()
    assert second is not None and second.message_id == "<2@x.example>"
    queue.finish(second)
    start = trio.current_time()
    again = await queue.next_due()  # nothing queued: waits for the retry to fall due
    assert again is first
    assert trio.current_time() - start == pytest.approx(10)


async def test_new_mail_is_not_held_up_by_a_waiting_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While a retry waits, mail that arrives is handed out at once."""
    queue = MailQueue.open(capacity=5, retry_capacity=5)
    queue.put_nowait(mail(1))
    first = await queue.next_due()
    assert first is not None
    queue.retry_at(first, trio.current_time() + 60)
    async with trio.open_nursery() as nursery:

        async def arrive_later() -> None:
            await trio.sleep(5)
            queue.put_nowait(mail(2))

        nursery.start_soon(arrive_later)
        start = trio.current_time()
        got = await queue.next_due()
    assert got is not None and got.message_id == "<2@x.example>"
    assert trio.current_time() - start == pytest.approx(5)


async def test_full_retry_heap_stops_taking_new_mail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Retries plus in-flight mail never exceed retry_capacity: new mail waits in the channel."""
    queue = MailQueue.open(capacity=5, retry_capacity=2)
    for n in range(4):
        queue.put_nowait(mail(n))
    a = await queue.next_due()
    b = await queue.next_due()
    assert a is not None and b is not None
    queue.retry_at(a, trio.current_time() + 30)
    queue.retry_at(b, trio.current_time() + 40)
    start = trio.current_time()
    got = await queue.next_due()  # the heap is full: the next mail is the retry of a
    assert got is a and trio.current_time() - start == pytest.approx(30)
    assert queue.statistics().queued == 2
    queue.finish(got)
    got = await queue.next_due()  # room again: new mail before b's retry
    assert got is not None and got.message_id == "<2@x.example>"


async def test_end_of_work_only_when_nothing_is_queued_waiting_or_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After close, next_due returns None only once every mail has finished."""
    queue = MailQueue.open(capacity=2, retry_capacity=2)
    queue.put_nowait(mail(1))
    queue.close()
    delivery = await queue.next_due()
    assert delivery is not None
    async with trio.open_nursery() as nursery:

        async def fail_then_finish() -> None:
            await trio.sleep(1)
            queue.retry_at(delivery, trio.current_time() + 3)

        nursery.start_soon(fail_then_finish)
        again = await queue.next_due()  # in flight elsewhere: must not report the end
    assert again is delivery
    queue.finish(again)
    assert await queue.next_due() is None


async def test_leftovers_are_the_retries_and_the_queued() -> None:
    """take_leftovers empties the heap and the channel, retries first."""
    queue = MailQueue.open(capacity=3, retry_capacity=3)
    queue.put_nowait(mail(1))
    queue.put_nowait(mail(2))
    first = await queue.next_due()
    assert first is not None
    queue.retry_at(first, trio.current_time() + 100)
    queue.close()
    assert ids(queue.take_leftovers()) == ["<1@x.example>", "<2@x.example>"]
    assert queue.statistics().queued == 0 and queue.statistics().retry_waiting == 0


async def test_start_up_recovery_does_not_take_a_place_a_call_reserved() -> None:
    """Issue 10 item 6: a call holding a reservation still finds its place; recovery waits."""
    from trio_mailer.delivery.mail_queue import Delivery

    queue = MailQueue.open(capacity=1, retry_capacity=5)
    queue.reserve_nowait()
    recovered = trio.Event()

    async def recover() -> None:
        await queue.put_recovered(Delivery(mail(9), accepted_at_s=0))
        recovered.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(recover)
            await trio.testing.wait_all_tasks_blocked()
            assert not recovered.is_set()
            queue.put_reserved(mail(1), accepted_at_s=0)  # raised WouldBlock before the fix
            first = await queue.next_due()
            assert first is not None and first.message_id == "<1@x.example>"
            await recovered.wait()
            second = await queue.next_due()
            assert second is not None and second.message_id == "<9@x.example>"


async def test_a_mail_stored_while_shutdown_begins_is_still_queued() -> None:
    """Issue 10 item 6: close() during a call's commit: its reserved place is filled, and the
    mail is handed out in the drain (it was answered UNAVAILABLE before)."""
    queue = MailQueue.open(capacity=2, retry_capacity=5)
    queue.reserve_nowait()
    queue.close()
    with pytest.raises(ShuttingDown):
        queue.reserve_nowait()  # nothing new
    queue.put_reserved(mail(1), accepted_at_s=0)
    with trio.fail_after(5):
        delivery = await queue.next_due()
        assert delivery is not None and delivery.message_id == "<1@x.example>"
        queue.finish(delivery)
        assert await queue.next_due() is None
