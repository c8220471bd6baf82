"""The SMTP session's worker thread: calls run one at a time, in order, also after one was
abandoned by a cancelled caller; the thread ends after its last call."""

from __future__ import annotations

import threading

import pytest
import trio

from trio_mailer.delivery.smtp_session import SessionThread


async def test_calls_run_in_order_in_one_thread_and_return_or_raise() -> None:
    """Results and exceptions come back to the caller; every call ran in the same thread."""
    worker = SessionThread()
    threads: list[int] = []

    def call(value: int) -> int:
        threads.append(threading.get_ident())
        if value < 0:
            raise ValueError(value)
        return value * 2

    with trio.fail_after(10):
        assert [await worker.run(call, n) for n in range(5)] == [0, 2, 4, 6, 8]
        with pytest.raises(ValueError):
            await worker.run(call, -1)
        assert await worker.run(call, 7, last=True) == 14
        with pytest.raises(trio.ClosedResourceError):
            await worker.run(call, 1)
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    assert not worker.busy()


async def test_an_abandoned_call_finishes_before_the_next_one_starts() -> None:
    """A cancelled caller leaves its call running; the next call waits for it (the
    connection is never used by two threads at once), and nobody is woken twice."""
    worker = SessionThread()
    release = threading.Event()
    log: list[str] = []

    def slow() -> str:
        log.append("slow started")
        release.wait(10)
        log.append("slow done")
        return "slow"

    def quick() -> str:
        log.append("quick")
        return "quick"

    with trio.fail_after(10):
        with trio.move_on_after(0.05) as scope:
            await worker.run(slow)
        assert scope.cancelled_caught
        assert worker.busy()  # still running in its thread
        async with trio.open_nursery() as nursery:
            results: list[str] = []

            async def second() -> None:
                results.append(await worker.run(quick))

            nursery.start_soon(second)
            await trio.sleep(0.05)
            assert log == ["slow started"]  # the quick call waits behind the abandoned one
            release.set()
        assert results == ["quick"]
        assert log == ["slow started", "slow done", "quick"]
        assert not worker.busy()
        worker.stop()
