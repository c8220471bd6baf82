"""The outbox: stored records, status changes, durability, group commit, and refusing bad files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from trio_mailer.core.errors import GrpcStatus
from trio_mailer.core.mail_lifecycle import OUTBOX_FILE, apply_change
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rendering import MailKind
from trio_mailer.store.outbox import (
    SCHEMA_VERSION,
    MailRecord,
    MailState,
    MemoryOutbox,
    Outbox,
    OutboxConflict,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    OutboxStatistics,
    SqliteOutbox,
    StatusChange,
    default_outbox_path,
    open_outbox,
)
from trio_mailer.store.postgres_outbox import PostgresOutbox

from .helpers import T0, queued
from .postgres_helpers import fresh_database
from .store_helpers import STORE_KINDS, opened_store

TIMEOUT_S = 10


def change(
    record: MailRecord,
    state: MailState,
    attempts: int,
    at: float,
    reply: tuple[int | None, str] = (None, ""),
    *,
    possible_duplicate: bool = False,
) -> StatusChange:
    return StatusChange(
        record.message_id, state, attempts, reply[0], reply[1], T0 + at, possible_duplicate
    )


@pytest.fixture(params=STORE_KINDS)
async def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    async with opened_store(request.param, tmp_path) as box:
        yield box


async def open_sqlite(path: Path, **kwargs: int) -> SqliteOutbox:
    with trio.fail_after(TIMEOUT_S):
        return await SqliteOutbox.open(path, **kwargs)


# ---- open_outbox ----


async def test_open_outbox_opens_the_file_and_closes_it_on_the_way_out(tmp_path: Path) -> None:
    """The file outbox; what was added is committed at exit, even when the body raises."""
    path = tmp_path / "outbox.sqlite3"
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(RuntimeError, match="body failed"):
            async with open_outbox(path) as box:
                assert isinstance(box, SqliteOutbox)
                await box.add(queued(1))
                raise RuntimeError("body failed")
        async with open_outbox(path) as box:
            assert await box.get(queued(1).message_id) == queued(1)


async def test_open_outbox_without_a_path_is_in_memory_and_uses_what_it_is_given() -> None:
    """None: a MemoryOutbox. ``use``: that outbox, closed at exit."""
    with trio.fail_after(TIMEOUT_S):
        async with open_outbox(None) as box:
            assert isinstance(box, MemoryOutbox)
        given = MemoryOutbox()
        async with open_outbox(None, use=given) as box:
            assert box is given
            await box.add(queued(1))
        with pytest.raises(trio.ClosedResourceError):
            await given.add(queued(2))  # closed


async def test_open_outbox_refuses_a_damaged_file(tmp_path: Path) -> None:
    """A file that is not an outbox stops at the door: OutboxCorrupt, nothing yielded."""
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"not a database at all" * 100)
    with trio.fail_after(TIMEOUT_S), pytest.raises(OutboxCorrupt):
        async with open_outbox(path):
            raise AssertionError("unreachable")


# ---- behaviour shared by both outboxes ----


async def test_add_then_get_returns_the_exact_record(outbox: Outbox) -> None:
    """get() returns what add() stored, field for field, and None for an unknown Message-ID."""
    with trio.fail_after(TIMEOUT_S):
        record = queued(1, data=b"\x00\xff binary \r\n" * 100)
        await outbox.add(record)
        assert await outbox.get(record.message_id) == record
        assert await outbox.get("<unknown@x.example>") is None


async def test_status_changes_apply_in_order(outbox: Outbox) -> None:
    """Attempts, the last reply and its time follow the changes; possible_duplicate sticks."""
    with trio.fail_after(TIMEOUT_S):
        record = queued(1)
        await outbox.add(record)
        await outbox.record(change(record, MailState.SENDING, 1, at=10))
        await outbox.record(
            change(record, MailState.RETRY_WAIT, 1, at=11, reply=(451, "try later"))
        )
        await outbox.record(change(record, MailState.SENDING, 2, at=20, reply=(451, "try later")))
        await outbox.record(
            change(
                record,
                MailState.RETRY_WAIT,
                2,
                at=21,
                reply=(None, "session lost at DOT"),
                possible_duplicate=True,
            )
        )
        assert await outbox.get(record.message_id) == attrs.evolve(
            record,
            state=MailState.RETRY_WAIT,
            attempts=2,
            last_reply_code=None,
            last_reply_text="session lost at DOT",
            last_attempt_at_unix=T0 + 20,
            possible_duplicate=True,
        )
        await outbox.record(change(record, MailState.DELIVERED, 3, at=30, reply=(250, "ok")))
        assert await outbox.get(record.message_id) == attrs.evolve(
            record,
            state=MailState.DELIVERED,
            attempts=3,
            last_reply_code=250,
            last_reply_text="ok",
            last_attempt_at_unix=T0 + 30,
            finished_at_unix=T0 + 30,
            possible_duplicate=True,
        )


async def test_unfinished_lists_non_terminal_mail_oldest_accepted_first(outbox: Outbox) -> None:
    """Terminal mail is left out; ties in acceptance time go by message id."""
    with trio.fail_after(TIMEOUT_S):
        records = [
            queued(1, accepted_at_unix=T0 + 30),
            queued(2, accepted_at_unix=T0 + 10),
            queued(3, accepted_at_unix=T0 + 20),
            queued(4, accepted_at_unix=T0 + 10),
            queued(5, accepted_at_unix=T0 + 5),
            queued(6, accepted_at_unix=T0 + 1),
            queued(7, accepted_at_unix=T0 + 2),
        ]
        for record in records:
            await outbox.add(record)
        await outbox.record(change(records[4], MailState.SENDING, 1, at=49))
        await outbox.record(change(records[4], MailState.DELIVERED, 1, at=50, reply=(250, "ok")))
        await outbox.record(change(records[5], MailState.FAILED, 1, at=50, reply=(550, "no")))
        await outbox.record(change(records[6], MailState.EXPIRED, 0, at=700))
        await outbox.record(change(records[2], MailState.SENDING, 1, at=50))
        await outbox.record(change(records[0], MailState.SENDING, 1, at=49))
        await outbox.record(change(records[0], MailState.RETRY_WAIT, 1, at=50, reply=(451, "")))
        unfinished = await outbox.unfinished()
        assert [r.message_id for r in unfinished] == [
            "<2@x.example>",
            "<4@x.example>",
            "<3@x.example>",
            "<1@x.example>",
        ]
        assert [r.state for r in unfinished] == [
            MailState.QUEUED,
            MailState.QUEUED,
            MailState.SENDING,
            MailState.RETRY_WAIT,
        ]


async def test_unfinished_comes_a_page_at_a_time(outbox: Outbox) -> None:
    """Pages of ``limit`` after a (time, id) key stay right while earlier mail finishes."""
    with trio.fail_after(TIMEOUT_S):
        records = [queued(n, accepted_at_unix=T0 + n // 2) for n in range(1, 8)]
        for record in records:
            await outbox.add(record)
        first = await outbox.unfinished(limit=3)
        assert [r.message_id for r in first] == ["<1@x.example>", "<2@x.example>", "<3@x.example>"]
        # A mail of the first page finishes before the next page is read: nothing is skipped.
        await outbox.record(change(records[0], MailState.DELIVERED, 1, at=50, reply=(250, "ok")))
        last = first[-1]
        second = await outbox.unfinished(after=(last.accepted_at_unix, last.message_id), limit=3)
        assert [r.message_id for r in second] == ["<4@x.example>", "<5@x.example>", "<6@x.example>"]
        last = second[-1]
        third = await outbox.unfinished(after=(last.accepted_at_unix, last.message_id), limit=3)
        assert [r.message_id for r in third] == ["<7@x.example>"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("duplicate", id="add-twice"),
        pytest.param("unknown", id="change-unknown-mail"),
        pytest.param("finished", id="change-finished-mail"),
    ],
)
async def test_a_change_that_breaks_the_rules_is_refused_and_stores_nothing(
    outbox: Outbox, bad: str
) -> None:
    """OutboxConflict, and the stored record stays as it was."""
    with trio.fail_after(TIMEOUT_S):
        record = queued(1)
        await outbox.add(record)
        await outbox.record(change(record, MailState.SENDING, 2, at=1))
        if bad == "finished":
            await outbox.record(change(record, MailState.FAILED, 2, at=2, reply=(550, "no")))
        before = await outbox.get(record.message_id)
        with pytest.raises(OutboxConflict) as caught:
            if bad == "duplicate":
                await outbox.add(attrs.evolve(record, envelope_to="other@y.example"))
            elif bad == "unknown":
                await outbox.record(change(queued(2), MailState.SENDING, 1, at=3))
            elif bad == "finished":
                await outbox.record(change(record, MailState.DELIVERED, 3, at=3))
        assert await outbox.get(record.message_id) == before
        assert caught.value.grpc_status is GrpcStatus.INTERNAL
        expected = {
            "duplicate": "<1@x.example> is already in the outbox",
            "unknown": "<2@x.example> is not in the outbox",
            "finished": "<1@x.example> is already failed; it cannot become delivered",
        }[bad]
        assert caught.value.problem == expected


@pytest.mark.parametrize(
    ("state", "attempts", "expected_state", "problem"),
    [
        (MailState.RETRY_WAIT, 1, MailState.RETRY_WAIT, "attempts: expected 2 or more, got 1"),
        (MailState.FAILED, 1, MailState.FAILED, "attempts: expected 2 or more, got 1"),
    ],
)
async def test_a_change_that_breaks_the_rules_is_logged_and_leaves_a_defined_state(
    outbox: Outbox,
    caplog: pytest.LogCaptureFixture,
    state: MailState,
    attempts: int,
    expected_state: MailState,
    problem: str,
) -> None:
    """Attempts going down (issue 10, item 1): no exception, ERROR with the id, attempts kept."""
    with trio.fail_after(TIMEOUT_S):
        record = queued(1)
        await outbox.add(record)
        await outbox.record(change(record, MailState.SENDING, 2, at=1))
        await outbox.record(change(record, state, attempts, at=3))
        stored = await outbox.get(record.message_id)
    assert stored is not None
    assert (stored.state, stored.attempts) == (expected_state, 2)
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "<1@x.example>" in error.getMessage() and problem in error.getMessage()


async def test_a_refused_change_does_not_fail_the_others_in_its_commit(outbox: Outbox) -> None:
    """Concurrent adds sharing a commit with a duplicate: only the duplicate fails."""
    with trio.fail_after(TIMEOUT_S):
        await outbox.add(queued(1))
        outcomes: dict[int, str] = {}

        async def add(n: int) -> None:
            try:
                await outbox.add(queued(n))
            except OutboxConflict:
                outcomes[n] = "conflict"
            else:
                outcomes[n] = "stored"

        async with trio.open_nursery() as nursery:
            for n in (2, 3, 1, 4, 5):
                nursery.start_soon(add, n)
        assert outcomes == {1: "conflict", 2: "stored", 3: "stored", 4: "stored", 5: "stored"}
        assert [r.message_id for r in await outbox.unfinished()] == [
            f"<{n}@x.example>" for n in (1, 2, 3, 4, 5)
        ]
        if isinstance(outbox, SqliteOutbox):
            assert outbox.statistics() == OutboxStatistics(
                commits=2, rows_committed=5, failed_commits=0, pending=0, largest_batch=5
            )


async def test_prune_removes_only_terminal_mail_finished_before_the_cutoff(outbox: Outbox) -> None:
    """Old delivered/failed/expired rows go; recent ones and unfinished ones stay."""
    with trio.fail_after(TIMEOUT_S):
        records = [queued(n, accepted_at_unix=T0) for n in range(1, 7)]
        for record in records:
            await outbox.add(record)
        await outbox.record(change(records[0], MailState.DELIVERED, 1, at=100, reply=(250, "")))
        await outbox.record(change(records[1], MailState.FAILED, 1, at=199, reply=(550, "")))
        await outbox.record(change(records[2], MailState.EXPIRED, 0, at=200))
        await outbox.record(change(records[3], MailState.DELIVERED, 1, at=300, reply=(250, "")))
        await outbox.record(change(records[4], MailState.RETRY_WAIT, 1, at=100, reply=(451, "")))
        assert await outbox.prune(T0 + 200) == 2
        kept = [await outbox.get(r.message_id) for r in records]
        assert [r.message_id for r in kept if r is not None] == [
            "<3@x.example>",
            "<4@x.example>",
            "<5@x.example>",
            "<6@x.example>",
        ]
        assert await outbox.prune(T0 + 200) == 0


async def test_a_cancelled_add_stores_nothing(outbox: Outbox) -> None:
    """An add() cancelled before it starts leaves no row."""
    with trio.fail_after(TIMEOUT_S):
        with trio.CancelScope() as scope:
            scope.cancel()
            await outbox.add(queued(1))
        assert scope.cancelled_caught
        assert await outbox.get("<1@x.example>") is None
        assert outbox.statistics().pending == 0


async def test_a_closed_outbox_refuses_calls(outbox: Outbox) -> None:
    """After aclose(), calls raise trio.ClosedResourceError; a second aclose() is harmless."""
    with trio.fail_after(TIMEOUT_S):
        await outbox.aclose()
        await outbox.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await outbox.add(queued(1))
        with pytest.raises(trio.ClosedResourceError):
            await outbox.get("<1@x.example>")


# ---- SqliteOutbox: durability ----


async def test_open_creates_the_directories_and_an_outbox_file(tmp_path: Path) -> None:
    """A missing file is created with its parent directories, and nothing else is left there."""
    path = tmp_path / "state" / "trio-mailer" / "outbox.sqlite3"
    box = await open_sqlite(path)
    with trio.fail_after(TIMEOUT_S):
        assert box.path == path
        assert await box.unfinished() == []
        await box.aclose()
    assert sorted(p.name for p in path.parent.iterdir() if p.name != "outbox.sqlite3-shm") == [
        "outbox.sqlite3"
    ]
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


async def test_records_survive_close_and_reopen(tmp_path: Path) -> None:
    """What was committed is there after the outbox is closed and opened again."""
    path = tmp_path / "outbox.sqlite3"
    first, second = queued(1), queued(2)
    box = await open_sqlite(path)
    with trio.fail_after(TIMEOUT_S):
        await box.add(first)
        await box.add(second)
        await box.record(change(first, MailState.RETRY_WAIT, 3, at=5, reply=(452, "full")))
        await box.aclose()
    box = await open_sqlite(path)
    with trio.fail_after(TIMEOUT_S):
        try:
            expected = apply_change(
                first, change(first, MailState.RETRY_WAIT, 3, at=5, reply=(452, "full"))
            )
            assert await box.unfinished() == [expected, second]
        finally:
            await box.aclose()


CRASHING_WRITER = """
import os, sys, trio
from pathlib import Path
from trio_mailer.core.mail_lifecycle import MailRecord, StatusChange, MailState
from trio_mailer.store.outbox import SqliteOutbox

async def main():
    box = await SqliteOutbox.open(Path(sys.argv[1]))
    record = MailRecord("<1@x.example>", "password", "a@x.example", "b@x.example", b"body",
                        1.0, MailState.QUEUED, 0, None, "", None, None, False)
    await box.add(record)
    await box.record(StatusChange("<1@x.example>", MailState.SENDING, 1, None, "", 2.0))
    os._exit(0)  # no aclose(): the process dies with the file open

trio.run(main)
"""


async def test_a_commit_survives_the_process_dying(tmp_path: Path) -> None:
    """add() and record() are on disk when they return: a process killed after them loses none."""
    path = tmp_path / "outbox.sqlite3"
    with trio.fail_after(TIMEOUT_S):
        await trio.run_process([sys.executable, "-c", CRASHING_WRITER, str(path)])
    assert (tmp_path / "outbox.sqlite3-wal").exists()  # not checkpointed: really a crash
    box = await open_sqlite(path)
    with trio.fail_after(TIMEOUT_S):
        try:
            [record] = await box.unfinished()
            assert (record.state, record.attempts, record.last_attempt_at_unix) == (
                MailState.SENDING,
                1,
                2.0,
            )
        finally:
            await box.aclose()


async def test_a_second_open_of_the_same_file_is_refused(tmp_path: Path) -> None:
    """Two services on one outbox would both resume its mail: the second one is refused."""
    path = tmp_path / "outbox.sqlite3"
    box = await open_sqlite(path)
    try:
        with pytest.raises(OutboxError, match="in use by another process"):
            await open_sqlite(path)
    finally:
        with trio.fail_after(TIMEOUT_S):
            await box.aclose()
    box = await open_sqlite(path)
    with trio.fail_after(TIMEOUT_S):
        await box.aclose()


# ---- SqliteOutbox: group commit ----


async def test_concurrent_adds_share_commits(tmp_path: Path) -> None:
    """50 concurrent add() calls take far fewer than 50 commits, and all 50 rows are stored."""
    box = await open_sqlite(tmp_path / "outbox.sqlite3")
    with trio.fail_after(TIMEOUT_S):
        try:
            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(box.add, queued(n))
            stats = box.statistics()
            print(f"50 concurrent adds: {stats}")
            assert stats.commits < 10
            assert stats.rows_committed == 50
            assert stats.pending == 0
            assert [r.message_id for r in await box.unfinished()] == [
                f"<{n}@x.example>" for n in range(50)
            ]
        finally:
            await box.aclose()


async def test_calls_arriving_during_a_commit_share_the_next_one(tmp_path: Path) -> None:
    """20 callers adding 10 mails each, one after another: each commit carries many of them."""
    box = await open_sqlite(tmp_path / "outbox.sqlite3")

    async def caller(k: int) -> None:
        for n in range(10):
            record = queued(100 * k + n)
            await box.add(record)
            await box.record(change(record, MailState.SENDING, 1, at=1))

    with trio.fail_after(TIMEOUT_S):
        try:
            async with trio.open_nursery() as nursery:
                for k in range(20):
                    nursery.start_soon(caller, k)
            stats = box.statistics()
            print(f"20 callers x (10 adds + 10 changes): {stats}")
            assert stats.rows_committed == 400
            assert stats.commits <= 400 // 10
            assert len(await box.unfinished()) == 200
        finally:
            await box.aclose()


async def test_a_full_disk_fails_every_caller_of_the_batch_and_the_next_commit_works(
    tmp_path: Path,
) -> None:
    """SQLITE_FULL (the size cap reached) raises OutboxFull to each caller; nothing is stored."""
    path = tmp_path / "outbox.sqlite3"
    box = await open_sqlite(path)
    with trio.fail_after(TIMEOUT_S):
        await box.aclose()
    box = await open_sqlite(path, max_size_bytes=1)  # no room to grow beyond the empty schema
    errors: dict[int, BaseException | None] = {}

    async def add(record: MailRecord, n: int) -> None:
        try:
            await box.add(record)
        except OutboxError as exc:
            errors[n] = exc
        else:
            errors[n] = None

    with trio.fail_after(TIMEOUT_S):
        try:
            async with trio.open_nursery() as nursery:
                for n in range(1, 5):
                    nursery.start_soon(add, queued(n), n)
                nursery.start_soon(add, queued(5, data=b"x" * 256 * 1024), 5)
            assert sorted(errors) == [1, 2, 3, 4, 5]
            assert all(isinstance(exc, OutboxFull) for exc in errors.values())
            assert len({id(exc) for exc in errors.values()}) == 5  # each caller its own
            exc = errors[5]
            assert isinstance(exc, OutboxFull)
            assert exc.grpc_status is GrpcStatus.UNAVAILABLE
            assert str(exc) == (
                f"outbox {path}: no space left: database or disk is full (SQLITE_FULL)"
            )
            assert box.statistics() == OutboxStatistics(
                commits=0, rows_committed=0, failed_commits=1, pending=0, largest_batch=0
            )
            assert await box.unfinished() == []
            small = queued(6)
            await box.add(small)
            assert await box.get(small.message_id) == small
        finally:
            await box.aclose()
    box = await open_sqlite(path)  # the file passed its checks again
    with trio.fail_after(TIMEOUT_S):
        assert await box.unfinished() == [small]
        await box.aclose()


# ---- the durable outboxes: cancellation (their shared group commit) ----

Durable = SqliteOutbox | PostgresOutbox


@pytest.fixture(params=["sqlite", "postgres"])
async def open_durable(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Awaitable[Durable]]]:
    """Opens the same durable outbox (file or database) each call; all closed at the end."""
    opened: list[Durable] = []
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database()) if request.param == "postgres" else ""

        async def open_again() -> Durable:
            with trio.fail_after(TIMEOUT_S):
                box: Durable
                if url:
                    box = await PostgresOutbox.open(url, pool_size=2)
                else:
                    box = await SqliteOutbox.open(tmp_path / "outbox.sqlite3")
            opened.append(box)
            return box

        try:
            yield open_again
        finally:
            with trio.fail_after(TIMEOUT_S):
                for box in opened:
                    await box.aclose()


async def hold_workers(
    box: Durable, release: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    """Keep every worker thread of the outbox busy (all its limiter's tokens borrowed) until
    ``release`` is set."""
    limiter = box._limiter
    borrowers = [object() for _ in range(int(limiter.total_tokens))]
    for borrower in borrowers:
        await limiter.acquire_on_behalf_of(borrower)
    try:
        task_status.started()
        await release.wait()
    finally:
        for borrower in borrowers:
            limiter.release_on_behalf_of(borrower)


async def cancel_once_batched(box: Durable, scope: trio.CancelScope, release: trio.Event) -> None:
    """Once every change is in the running commit (which waits for the worker), cancel
    ``scope``; then free the worker."""
    await trio.testing.wait_all_tasks_blocked()
    assert box.statistics().pending == 0  # all in the leader's batch
    scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    release.set()


async def test_an_add_cancelled_before_its_batch_is_taken_stores_nothing(
    open_durable: Callable[[], Awaitable[Durable]],
) -> None:
    """Cancelled while another caller's commit waits for the worker: the change is dropped."""
    box = await open_durable()
    release = trio.Event()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(hold_workers, box, release)
            nursery.start_soon(box.add, queued(1))  # leads a commit, waits for the worker
            await trio.testing.wait_all_tasks_blocked()
            scope = trio.CancelScope()

            async def cancelled_add() -> None:
                with scope:
                    await box.add(queued(2))

            nursery.start_soon(cancelled_add)
            await trio.testing.wait_all_tasks_blocked()
            assert box.statistics().pending == 1
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert box.statistics().pending == 0
            release.set()
        assert await box.get("<2@x.example>") is None
        assert await box.get("<1@x.example>") == queued(1)
        assert box.statistics().rows_committed == 1


async def test_a_cancelled_leader_hands_the_rest_of_its_batch_on(
    open_durable: Callable[[], Awaitable[Durable]],
) -> None:
    """The leader is cancelled while waiting for the worker: the others' changes still commit.

    (The PostgreSQL outbox used to spin here for ever: the others' changes stayed taken by the
    cancelled batch, so no later commit settled them.)"""
    box = await open_durable()
    release = trio.Event()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(hold_workers, box, release)
            nursery.start_soon(box.add, queued(2))
            nursery.start_soon(box.add, queued(3))
            with trio.CancelScope() as scope:
                nursery.start_soon(cancel_once_batched, box, scope, release)
                await box.add(queued(1))  # appended first: this task leads the commit
            assert scope.cancelled_caught
        assert await box.get("<1@x.example>") is None
        assert [r.message_id for r in await box.unfinished()] == [
            "<2@x.example>",
            "<3@x.example>",
        ]
        assert box.statistics().commits == 1


async def test_a_status_change_waiting_on_a_cancelled_leader_is_stored(
    open_durable: Callable[[], Awaitable[Durable]],
) -> None:
    """The sender's ``record`` (no deadline of its own) behind a leader cancelled while waiting
    for the worker: it is stored, and returns."""
    box = await open_durable()
    with trio.fail_after(TIMEOUT_S):
        await box.add(queued(1))
    release = trio.Event()
    sending = StatusChange("<1@x.example>", MailState.SENDING, 1, None, "", T0 + 1, False)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(hold_workers, box, release)
            nursery.start_soon(box.record, sending)
            with trio.CancelScope() as scope:
                nursery.start_soon(cancel_once_batched, box, scope, release)
                await box.add(queued(2))  # appended first: leads the commit `sending` joins
            assert scope.cancelled_caught
        stored = await box.get("<1@x.example>")
        assert stored is not None and stored.state is MailState.SENDING
        assert await box.get("<2@x.example>") is None


async def add_1_while_the_add_of_2_is_cancelled_mid_commit(box: Durable) -> None:
    """Adds mails 1 and 2 in one commit, whose leader is this task (1); the add of 2 is
    cancelled while that commit waits for the worker."""
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(hold_workers, box, release)
        scope = trio.CancelScope()

        async def cancelled_add() -> None:
            with scope:
                await box.add(queued(2))

        nursery.start_soon(cancelled_add)
        nursery.start_soon(cancel_once_batched, box, scope, release)
        await box.add(queued(1))  # appended first: this task leads the commit
    assert scope.cancelled_caught


async def test_an_add_cancelled_after_its_batch_was_taken_is_withdrawn(
    open_durable: Callable[[], Awaitable[Durable]],
) -> None:
    """Its row is committed with the batch, then deleted by the next commit."""
    box = await open_durable()
    with trio.fail_after(TIMEOUT_S):
        await add_1_while_the_add_of_2_is_cancelled_mid_commit(box)
        assert await box.get("<2@x.example>") == queued(2)  # committed with the batch
        assert box.statistics().pending == 1  # the withdrawal
        await box.add(queued(3))
        assert await box.get("<2@x.example>") is None
        assert [r.message_id for r in await box.unfinished()] == [
            "<1@x.example>",
            "<3@x.example>",
        ]


async def test_aclose_commits_a_pending_withdrawal(
    open_durable: Callable[[], Awaitable[Durable]],
) -> None:
    """A withdrawal still pending at close is committed by aclose()."""
    box = await open_durable()
    with trio.fail_after(TIMEOUT_S):
        await add_1_while_the_add_of_2_is_cancelled_mid_commit(box)
        assert box.statistics().pending == 1
        await box.aclose()
    box = await open_durable()
    with trio.fail_after(TIMEOUT_S):
        assert [r.message_id for r in await box.unfinished()] == ["<1@x.example>"]


# ---- SqliteOutbox: files it must refuse ----


def write_foreign_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE mail (id INTEGER PRIMARY KEY, body TEXT)")
    conn.close()


async def write_outbox(path: Path, *, rows: int = 0) -> None:
    box = await open_sqlite(path)
    with trio.fail_after(TIMEOUT_S):
        for n in range(rows):
            await box.add(queued(n, data=bytes(range(256)) * 8))
        await box.aclose()


def set_user_version(path: Path, version: int) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {version}")
    conn.close()


def damage_root_page(path: Path, name: str, *, offset: int, garbage: bytes) -> int:
    """Overwrite bytes of the root page of table or index ``name``; returns the page number."""
    with sqlite3.connect(path) as conn:
        page_size, root = conn.execute(
            "SELECT (SELECT page_size FROM pragma_page_size), rootpage FROM sqlite_schema"
            " WHERE name = ?",
            (name,),
        ).fetchone()
    conn.close()
    with path.open("r+b") as file:
        file.seek((root - 1) * page_size + offset)
        file.write(garbage)
    return int(root)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param("random", "not an SQLite database", id="random-bytes"),
        pytest.param("empty", r"not an SQLite database \(empty\)", id="empty-file"),
        pytest.param("sqlite-header", "not a usable SQLite database", id="sqlite-header-garbage"),
        pytest.param("foreign", "not a trio-mailer outbox", id="other-application"),
        pytest.param("version", "unknown schema version 99", id="newer-schema"),
        pytest.param(
            "damaged-table",
            r"not a usable SQLite database: database disk image is malformed \(SQLITE_CORRUPT\)",
            id="table-page-overwritten",
        ),
        pytest.param(
            "damaged-index",
            r"failed its integrity check: Page \d+: btreeInitPage\(\) returns error code 11$",
            id="index-page-header-damaged",
        ),
    ],
)
async def test_a_file_that_is_not_a_usable_outbox_is_refused_and_left_unchanged(
    tmp_path: Path, make: str, message: str
) -> None:
    """OutboxCorrupt with a message saying why; the file's bytes are exactly as before."""
    path = tmp_path / "outbox.sqlite3"
    if make == "random":
        path.write_bytes(os.urandom(8192))
    elif make == "empty":
        path.write_bytes(b"")
    elif make == "sqlite-header":
        path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    elif make == "foreign":
        write_foreign_sqlite(path)
    elif make == "version":
        await write_outbox(path)
        set_user_version(path, 99)
    elif make == "damaged-table":
        await write_outbox(path, rows=40)
        damage_root_page(path, "mail", offset=0, garbage=b"\xff" * 4096)
    else:
        await write_outbox(path, rows=40)
        damage_root_page(path, "mail_finished", offset=3, garbage=b"\x7f\x00")  # cell count
    before = path.read_bytes()
    with pytest.raises(OutboxCorrupt, match=message) as caught:
        await open_sqlite(path)
    assert path.read_bytes() == before
    assert str(caught.value).startswith(f"outbox {path}: ")
    assert caught.value.path == path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param("directory", "cannot read: Is a directory", id="path-is-a-directory"),
        pytest.param("parent-is-file", "state is not a directory", id="parent-is-a-file"),
        pytest.param(
            "ancestor-is-file",
            "cannot create the directory .*/state/trio-mailer: Not a directory",
            id="ancestor-is-a-file",
        ),
    ],
)
async def test_a_path_that_cannot_be_used_raises_outbox_error(
    tmp_path: Path, make: str, message: str
) -> None:
    """The message names the path and the reason."""
    if make == "directory":
        path = tmp_path / "outbox.sqlite3"
        path.mkdir()
    elif make == "parent-is-file":
        (tmp_path / "state").write_text("a file where a directory should be")
        path = tmp_path / "state" / "outbox.sqlite3"
    else:
        (tmp_path / "state").write_text("a file where a directory should be")
        path = tmp_path / "state" / "trio-mailer" / "outbox.sqlite3"
    with pytest.raises(OutboxError, match=message) as caught:
        await open_sqlite(path)
    assert not isinstance(caught.value, OutboxCorrupt)
    assert str(caught.value).startswith(f"outbox {path}: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_an_unreadable_file_raises_outbox_error(tmp_path: Path) -> None:
    """A file without read permission: OutboxError naming it, and the file is left alone."""
    path = tmp_path / "outbox.sqlite3"
    await write_outbox(path)
    path.chmod(0)
    try:
        with pytest.raises(OutboxError, match="cannot read: Permission denied"):
            await open_sqlite(path)
    finally:
        path.chmod(0o600)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes files whatever their mode")
async def test_a_write_protected_file_raises_outbox_full(tmp_path: Path) -> None:
    """A read-only outbox cannot accept mail: OutboxFull at open, and the file is left alone."""
    path = tmp_path / "outbox.sqlite3"
    await write_outbox(path)
    path.chmod(0o400)
    before = path.read_bytes()
    try:
        with pytest.raises(OutboxFull, match="cannot write: Permission denied"):
            await open_sqlite(path)
        assert path.read_bytes() == before
    finally:
        path.chmod(0o600)


# ---- the pure parts ----


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"XDG_STATE_HOME": "/var/state", "HOME": "/home/u"}, "/var/state/trio-mailer"),
        ({"XDG_STATE_HOME": "", "HOME": "/home/u"}, "/home/u/.local/state/trio-mailer"),
        ({"XDG_STATE_HOME": "relative", "HOME": "/home/u"}, "/home/u/.local/state/trio-mailer"),
        ({"HOME": "/home/u"}, "/home/u/.local/state/trio-mailer"),
    ],
)
def test_default_outbox_path_follows_xdg(env: dict[str, str], expected: str) -> None:
    """$XDG_STATE_HOME if absolute, else ~/.local/state."""
    assert default_outbox_path(env) == Path(expected) / "outbox.sqlite3"
    assert OUTBOX_FILE.name == "outbox.sqlite3"


def test_default_outbox_path_needs_an_absolute_home() -> None:
    """Neither variable usable: a ValueError naming both."""
    with pytest.raises(ValueError, match="XDG_STATE_HOME or HOME: expected an absolute path"):
        default_outbox_path({"HOME": "home"})


def test_a_change_for_another_mail_is_a_value_error() -> None:
    """apply_change refuses a change whose Message-ID differs."""
    with pytest.raises(ValueError, match="message_id"):
        apply_change(queued(1), change(queued(2), MailState.SENDING, 1, at=1))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "News Letter"}, "kind: expected a template name"),
        ({"attempts": -1}, "attempts: expected 0 or more, got -1"),
        ({"state": MailState.DELIVERED}, "finished_at_unix: expected a time"),
        ({"finished_at_unix": T0}, "finished_at_unix: expected None for state queued"),
        ({"accepted_at_unix": float("nan")}, "accepted_at_unix: expected a finite number"),
    ],
)
def test_an_inconsistent_record_cannot_be_built(fields: dict[str, object], message: str) -> None:
    """MailRecord checks the invariants the schema's CHECKs repeat."""
    with pytest.raises(ValueError, match=message):
        attrs.evolve(queued(1), **fields)


def test_a_record_turns_back_into_the_mail() -> None:
    """to_mail() gives the OutgoingMail that accepted() was built from."""
    record = queued(3)
    assert record.to_mail() == OutgoingMail(
        "<3@x.example>",
        MailKind.RETRIEVE,
        "mailer@x.example",
        "user3@y.example",
        b"Subject: code\r\n\r\ncode 000003\r\n",
    )
    assert "data" not in repr(record)


async def test_a_second_process_cannot_open_an_outbox_in_use(tmp_path: Path) -> None:
    """Two services on one outbox would both resume the same mail: the second is refused."""
    path = tmp_path / "outbox.sqlite3"
    with trio.fail_after(TIMEOUT_S):
        first = await SqliteOutbox.open(path)
        try:
            with pytest.raises(OutboxError) as info:
                await SqliteOutbox.open(path)
            assert "in use" in str(info.value)
        finally:
            await first.aclose()
        again = await SqliteOutbox.open(path)  # free once the first is closed
        await again.aclose()


async def test_a_mail_of_any_template_is_stored_and_resumed_as_built(tmp_path: Path) -> None:
    """The outbox stores the built message and the template's name: a Send mail (any
    template) and an old "password" row both come back unchanged after a reopen."""
    path = tmp_path / "outbox.sqlite3"
    welcome = attrs.evolve(queued(1), kind="welcome-2", data=b"Subject: hi\r\n\r\nbuilt\r\n")
    legacy = queued(2)
    assert legacy.kind == "password"
    with trio.fail_after(TIMEOUT_S):
        outbox = await SqliteOutbox.open(path)
        await outbox.add(welcome)
        await outbox.add(legacy)
        await outbox.aclose()
        outbox = await SqliteOutbox.open(path)
        try:
            resumed = await outbox.unfinished(after=None, limit=10)
        finally:
            await outbox.aclose()
    assert [record.to_mail() for record in resumed] == [welcome.to_mail(), legacy.to_mail()]
    assert resumed[0].to_mail().kind == "welcome-2"
