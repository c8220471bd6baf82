"""The outboxes' shared group commit, on a scripted in-memory writer: whatever the callers'
cancellations and the commits' failures, nobody hangs, and what stays stored is exactly what
the callers were told was stored.

The durable outboxes run the same cases for real in ``test_outbox.py`` (cancellation section).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_mailer.core.errors import OutboxError
from trio_mailer.store.admission_tables import IdempotencyHit, KeyEntry, StoreRefusal
from trio_mailer.store.group_commit import GroupCommit, Outcomes, copy_error

MAX_WRITES = 500  # far more than any scenario needs: more means commits that settle nothing


@attrs.frozen
class Add:
    n: int


@attrs.frozen
class Withdraw:
    n: int


Change = Add | Withdraw


@attrs.define
class Writer:
    """An in-memory store behind a scripted ``write``: each commit waits (cancellable, like
    waiting for a worker thread), then writes (not cancellable, like the thread), then stores
    its batch or fails as a whole, as the script says."""

    script: list[tuple[float, float, bool]]  # per commit: wait_s, write_s, fails
    stored: set[int] = attrs.Factory(set)
    batches: list[list[Change]] = attrs.Factory(list)
    writes: int = 0
    failures: int = 0

    async def write(self, changes: list[Change], began: Callable[[], None]) -> Outcomes:
        self.writes += 1
        assert self.writes <= MAX_WRITES, "commits that settle nothing: a livelock"
        wait_s, write_s, fails = self.script.pop(0) if self.script else (0.0, 0.0, False)
        await trio.sleep(wait_s)
        began()
        with trio.CancelScope(shield=True):
            await trio.sleep(write_s)
        if fails:
            self.failures += 1
            raise OutboxError("scripted failure")
        self.batches.append(list(changes))
        for change in changes:
            if isinstance(change, Add):
                self.stored.add(change.n)
            else:
                self.stored.discard(change.n)
        return [None] * len(changes)


def group_for(writer: Writer) -> GroupCommit[Change]:
    return GroupCommit(
        writer.write,
        lambda changes: [c for c in changes if isinstance(c, Withdraw)],
        lambda change: Withdraw(change.n) if isinstance(change, Add) else None,
    )


TIMES = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
CALLERS = st.lists(
    st.tuples(TIMES, st.none() | TIMES),  # (starts at, cancelled after)
    min_size=1,
    max_size=8,
)
SCRIPT = st.lists(st.tuples(TIMES, TIMES, st.booleans()), max_size=12)


@settings(max_examples=300, deadline=None)
@given(callers=CALLERS, script=SCRIPT)
def test_nobody_hangs_and_exactly_the_confirmed_adds_stay(
    callers: list[tuple[float, float | None]], script: list[tuple[float, float, bool]]
) -> None:
    writer = Writer(list(script))
    group = group_for(writer)
    outcome: dict[int, str] = {}

    async def caller(n: int, start_s: float, cancel_s: float | None) -> None:
        await trio.sleep(start_s)
        with trio.move_on_after(cancel_s if cancel_s is not None else float("inf")):
            try:
                await group.submit(Add(n))
            except OutboxError:
                outcome[n] = "failed"
                return
            outcome[n] = "stored"
            return
        outcome[n] = "cancelled"

    async def scenario() -> None:
        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                for n, (start_s, cancel_s) in enumerate(callers):
                    nursery.start_soon(caller, n, start_s, cancel_s)
            writer.script.clear()  # the closing flush commits
            await group.flush()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(outcome) == len(callers)
    assert group.pending == 0
    assert writer.stored == {n for n, seen in outcome.items() if seen == "stored"}
    assert group.rows_committed == sum(len(batch) for batch in writer.batches)
    assert group.commits == len(writer.batches)
    assert group.failed_commits == writer.failures


async def test_a_failure_after_the_write_began_settles_the_whole_batch() -> None:
    """Not an OutboxError, once the write began (a bug, a closed connection): every caller of
    the batch gets an OutboxError, and the leader re-raises what happened."""

    async def broken(changes: list[Change], began: Callable[[], None]) -> Outcomes:
        began()
        await trio.lowlevel.checkpoint()
        raise RuntimeError("a bug")

    group: GroupCommit[Change] = GroupCommit(broken, lambda changes: [], lambda change: None)
    follower: list[BaseException] = []

    async def follow() -> None:
        try:
            await group.submit(Add(2))
        except OutboxError as exc:
            follower.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            with pytest.raises(RuntimeError, match="a bug"):
                await group.submit(Add(1))  # appended first: leads
    assert [str(exc) for exc in follower] == ["outbox: commit failed (RuntimeError)"]
    assert group.pending == 0


async def test_a_failed_commit_keeps_its_withdrawals_once() -> None:
    """What ``requeue_after_failure`` names is queued once, however often it comes back."""
    calls: list[list[Change]] = []

    async def failing(changes: list[Change], began: Callable[[], None]) -> Outcomes:
        calls.append(list(changes))
        raise OutboxError("down")

    group: GroupCommit[Change] = GroupCommit(
        failing, lambda changes: [Withdraw(9), Withdraw(9)], lambda change: None
    )
    with pytest.raises(OutboxError, match="down"):
        await group.submit(Add(1))
    assert group.pending == 1 and group.failed_commits == 1
    with pytest.raises(OutboxError, match="down"):
        await group.submit(Add(2))
    assert calls == [[Add(1)], [Withdraw(9), Add(2)]]
    assert group.pending == 1


def test_each_caller_gets_its_own_copy_of_the_error() -> None:
    plain = OutboxError("disk full", path=PurePath("/var/x.sqlite3"))
    copied = copy_error(plain)
    assert copied is not plain
    assert (type(copied), str(copied), copied.path) == (OutboxError, str(plain), plain.path)
    refusal = StoreRefusal("recipient limit", 12.5)
    again = copy_error(refusal)
    assert isinstance(again, StoreRefusal) and again is not refusal
    assert (again.reason, again.retry_after_s) == ("recipient limit", 12.5)
    entry = KeyEntry("billing", "k-1", "f" * 64, "<1@x.example>", 1e9)
    hit = IdempotencyHit(entry)
    hit_again = copy_error(hit)
    assert isinstance(hit_again, IdempotencyHit) and hit_again is not hit
    assert hit_again.entry == entry and str(hit_again) == str(hit)
