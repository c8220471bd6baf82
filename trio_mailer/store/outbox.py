"""The outbox: every accepted mail and its status, durable in SQLite (or held in memory).

Theory of operation
-------------------
``SqliteOutbox`` keeps one ``sqlite3`` connection in WAL mode with ``synchronous=FULL``, so a
commit is on disk (fsync'd) when it returns. All its work runs in worker threads through
``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)`` of its own, so the connection is never
used by two threads at once (hence ``check_same_thread=False``). The connection holds the file in
SQLite's exclusive locking mode: a second process (another trio-mailer on the same file) is
refused at ``open`` instead of resuming the same mail twice.

**Group commit** (``store/group_commit.py``, shared with the PostgreSQL outbox). An fsync costs far
more than the rows it carries, so ``add`` and ``record`` share commits. Each call appends its change
to a pending list. If no commit is running, the caller becomes the leader: it lets the scheduler run
(so callers already runnable add theirs too), takes *every* pending change, writes them in one
transaction in the worker thread and commits once. Callers arriving while a commit runs wait for it
to end (one ``trio.Event`` per commit, so they all wake together); then those whose change was in it
collect their outcome, and the first one still pending leads the next commit, carrying everything
that arrived meanwhile. With a single caller it costs one commit per change, as without batching.

**Outcomes.** A change that breaks the rules (a duplicate ``add``, a change to an unknown or
finished mail) fails alone with ``OutboxConflict`` and the rest of the batch commits. A storage
failure (disk full, the size cap, read-only, I/O error) rolls the whole transaction back, so the
connection stays usable, and every caller in that batch gets its own ``OutboxFull`` or
``OutboxError``: none of their changes was stored.

**Cancellation.** A commit that has started in the worker thread is never abandoned: its leader
waits for the thread (milliseconds on a healthy disk; as long as the disk hangs otherwise). For a
cancelled ``add``:

- its change was not yet in a batch: it is removed; nothing is stored;
- it led a batch still waiting for the worker thread: the batch goes back to the pending list
  without its change, for the next leader; nothing of it is stored;
- its change was in a batch that another caller leads, or that reached the worker: the row may
  be durable although the caller saw ``Cancelled``. The handler treats the mail as not accepted,
  so the outbox queues a *withdrawal* that deletes the row (only while it is untouched: queued,
  no attempt) with the next commit, or at ``aclose``. Until then a crash leaves the row, and it
  is delivered after the restart; a withdrawal whose commit fails is kept for the next one.

A cancelled ``record`` may or may not be stored; either is consistent, because only the sender
reports changes and it is being stopped.

``MemoryOutbox`` has the same interface and rules without persistence (``MAILER_OUTBOX=memory``);
each call is its own "commit", and nothing survives the process.

Both implement the ``Store`` protocol (``store.py``), as the PostgreSQL outbox does
(``postgres_outbox.py``); ``open_outbox`` opens the one the configuration names.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import attrs
import trio

from trio_mailer.core.config import DatabaseUrl, default
from trio_mailer.core.errors import OutboxConflict, OutboxCorrupt, OutboxError, OutboxFull
from trio_mailer.core.mail_lifecycle import (
    TERMINAL_STATES,
    MailRecord,
    MailState,
    StatusChange,
    check_change,
    default_outbox_path,
)
from trio_mailer.store import admission_tables as admission
from trio_mailer.store.admission_tables import (
    Acceptance,
    AcceptedAt,
    KeyEntry,
    MemoryAdmission,
    Suppression,
)
from trio_mailer.store.group_commit import GroupCommit, Outcomes
from trio_mailer.store.postgres_outbox import PostgresOutbox
from trio_mailer.store.store import OutboxStatistics, Store

__all__ = [
    "MailRecord",
    "MailState",
    "MemoryOutbox",
    "Outbox",
    "OutboxConflict",
    "OutboxCorrupt",
    "OutboxError",
    "OutboxFull",
    "OutboxStatistics",
    "SqliteOutbox",
    "StatusChange",
    "Store",
    "default_outbox_path",
    "open_outbox",
]

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")

SCHEMA_VERSION = 3  # PRAGMA user_version of the files this code writes
# Versions it opens, upgraded in place at open: 1 (before the admission tables), 2 (before the
# mail's stored trace context).
READABLE_VERSIONS = (1, 2, 3)
APPLICATION_ID = 0x544D4F42  # PRAGMA application_id ("TMOB"): marks a trio-mailer outbox file
BUSY_TIMEOUT_S = 1.0  # how long opening waits for another connection's lock on the file
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file

_COLUMNS = (
    "message_id",
    "kind",
    "envelope_from",
    "envelope_to",
    "data",
    "accepted_at_unix",
    "state",
    "attempts",
    "last_reply_code",
    "last_reply_text",
    "last_attempt_at_unix",
    "finished_at_unix",
    "possible_duplicate",
    "traceparent",  # since version 3
)
_TERMINAL_SQL = ", ".join(f"'{state.value}'" for state in MailState if state in TERMINAL_STATES)
_STATES_SQL = ", ".join(f"'{state.value}'" for state in MailState)

# The CHECKs repeat MailRecord's invariants, so a row read back is always a valid record.
_SCHEMA = (
    f"""
    CREATE TABLE mail (
        message_id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL,
        envelope_from TEXT NOT NULL,
        envelope_to TEXT NOT NULL,
        data BLOB NOT NULL,
        accepted_at_unix REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
        attempts INTEGER NOT NULL CHECK (attempts >= 0),
        last_reply_code INTEGER,
        last_reply_text TEXT NOT NULL,
        last_attempt_at_unix REAL,
        finished_at_unix REAL,
        possible_duplicate INTEGER NOT NULL CHECK (possible_duplicate IN (0, 1)),
        traceparent TEXT NOT NULL DEFAULT '',
        CHECK ((finished_at_unix IS NOT NULL) = (state IN ({_TERMINAL_SQL})))
    )
    """,
    # unfinished(): the rows to resume, oldest first.
    "CREATE INDEX mail_unfinished ON mail (accepted_at_unix) WHERE finished_at_unix IS NULL",
    # prune(): the finished rows by age.
    "CREATE INDEX mail_finished ON mail (finished_at_unix) WHERE finished_at_unix IS NOT NULL",
)
# Version 3: the accepting call's trace context ("" for the mail stored before).
_MIGRATE_TO_3 = "ALTER TABLE mail ADD COLUMN traceparent TEXT NOT NULL DEFAULT ''"
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM mail"
_INSERT = f"INSERT INTO mail ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_UPDATE = (
    "UPDATE mail SET state = ?, attempts = ?, last_reply_code = ?, last_reply_text = ?, "
    "last_attempt_at_unix = ?, finished_at_unix = ?, possible_duplicate = ? WHERE message_id = ?"
)
_WITHDRAW = "DELETE FROM mail WHERE message_id = ? AND state = ? AND attempts = 0"


# The name the service's modules import the protocol by.
Outbox = Store


@attrs.frozen
class _Withdraw:
    """Delete a row whose ``add`` was cancelled, if nothing has happened to it since."""

    message_id: str


@attrs.frozen
class _Accept:
    """Add a mail with what admission stores beside it (its key, its rate-limit row)."""

    record: MailRecord
    acceptance: Acceptance


_Change = MailRecord | _Accept | StatusChange | _Withdraw


def _added(change: _Change) -> MailRecord | None:
    """The mail a change adds, if it is an add."""
    if isinstance(change, _Accept):
        return change.record
    return change if isinstance(change, MailRecord) else None


# ---- blocking helpers: run in the worker thread only ----


def _storage_error(exc: sqlite3.Error, path: Path) -> OutboxError:
    """The ``OutboxError`` for an ``sqlite3`` error (whose text never holds row values)."""
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = f"{exc} ({name})"
    if primary == sqlite3.SQLITE_FULL:
        return OutboxFull(f"no space left: {detail}", path=path)
    if primary == sqlite3.SQLITE_READONLY:
        return OutboxFull(f"cannot write: {detail}", path=path)
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return OutboxCorrupt(f"not a usable SQLite database: {detail}", path=path)
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return OutboxError(f"in use by another process: {detail}", path=path)
    if primary == sqlite3.SQLITE_CANTOPEN:
        return OutboxError(
            f"cannot open it, or create its -wal file in {path.parent}: {detail}", path=path
        )
    return OutboxError(detail, path=path)


def _row_to_record(row: tuple[object, ...], path: Path) -> MailRecord:
    fields = dict(zip(_COLUMNS, row, strict=True))
    try:
        fields["state"] = MailState(fields["state"])
        fields["possible_duplicate"] = bool(fields["possible_duplicate"])
        return MailRecord(**fields)  # type: ignore[arg-type]  # types checked by the schema
    except (TypeError, ValueError) as exc:
        raise OutboxCorrupt(
            f"row {fields['message_id']!r} is not a valid record: {exc}", path=path
        ) from exc


def _record_to_row(record: MailRecord) -> tuple[object, ...]:
    return (
        record.message_id,
        record.kind,
        record.envelope_from,
        record.envelope_to,
        record.data,
        record.accepted_at_unix,
        record.state.value,
        record.attempts,
        record.last_reply_code,
        record.last_reply_text,
        record.last_attempt_at_unix,
        record.finished_at_unix,
        int(record.possible_duplicate),
        record.traceparent,
    )


def _select_one(conn: sqlite3.Connection, message_id: str, path: Path) -> MailRecord | None:
    row = conn.execute(f"{_SELECT} WHERE message_id = ?", (message_id,)).fetchone()
    return None if row is None else _row_to_record(row, path)


def _apply(conn: sqlite3.Connection, change: _Change, path: Path) -> None:
    """Write one change inside the open transaction.

    Raises:
        OutboxConflict: the change breaks the rules; nothing of it was written.
        sqlite3.Error: a storage failure (the caller rolls the transaction back).
    """
    if isinstance(change, _Accept):
        # The key is checked first: a live one means nothing of this change is written.
        admission.check_acceptance(conn, change.acceptance)
        _apply(conn, change.record, path)
        admission.write_acceptance(conn, change.acceptance)
    elif isinstance(change, MailRecord):
        try:
            conn.execute(_INSERT, _record_to_row(change))
        except sqlite3.IntegrityError:
            # Only this statement is undone; the transaction goes on.
            raise OutboxConflict(f"{change.message_id} is already in the outbox") from None
    elif isinstance(change, StatusChange):
        current = _select_one(conn, change.message_id, path)
        if current is None:
            raise OutboxConflict(f"{change.message_id} is not in the outbox")
        new = _checked(current, change)
        conn.execute(
            _UPDATE,
            (
                new.state.value,
                new.attempts,
                new.last_reply_code,
                new.last_reply_text,
                new.last_attempt_at_unix,
                new.finished_at_unix,
                int(new.possible_duplicate),
                new.message_id,
            ),
        )
    elif conn.execute(_WITHDRAW, (change.message_id, MailState.QUEUED.value)).rowcount:
        admission.withdraw_acceptance(conn, change.message_id)


def _checked(current: MailRecord, change: StatusChange) -> MailRecord:
    # A change the lifecycle table refuses is a sender bug: logged, and the row is kept in the
    # defined state ``check_change`` chose, never left to take the service down.
    applied = check_change(current, change)
    if applied.problem is not None:
        log.error("outbox: %s", applied.problem, extra={"message_id": change.message_id})
    return applied.record


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR).
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("outbox rollback failed: %s", exc)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path) -> None:
    """Create an empty outbox at ``path`` atomically: a crash leaves no half-made file there.

    The schema is written to a temporary file beside it, which is then linked into place; if
    another process created ``path`` meanwhile, its file wins (and is checked like any other).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise OutboxError(
            f"cannot create the directory {path.parent}: {exc.filename} is not a directory",
            path=path,
        ) from exc
    except OSError as exc:
        raise OutboxError(
            f"cannot create the directory {path.parent}: {exc.strerror or exc}", path=path
        ) from exc
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.new")
    try:
        with contextlib.closing(sqlite3.connect(temporary, isolation_level=None)) as conn:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            admission.migrate_to_2(conn)
            # PRAGMA values cannot be bound as parameters; these are our own integers.
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            conn.execute("COMMIT")
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError:
            os.rename(temporary, path)  # a file system without hard links
        _fsync_directory(path.parent)
    except sqlite3.Error as exc:
        raise _storage_error(exc, path) from exc
    except OSError as exc:
        raise OutboxError(f"cannot create: {exc.strerror or exc}", path=path) from exc
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _check(path: Path) -> None:
    """Check an existing file without changing it: read-only, no write of any kind.

    Raises:
        OutboxCorrupt: not SQLite, not an outbox, another schema version, or damaged.
        OutboxError: the file cannot be read, or another process holds it.
    """
    try:
        with path.open("rb") as file:
            header = file.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise OutboxError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    if header != SQLITE_MAGIC:
        raise OutboxCorrupt(
            "not an SQLite database (empty)" if not header else "not an SQLite database",
            path=path,
        )
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise _storage_error(exc, path) from exc
    with contextlib.closing(conn):
        try:
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if application_id != APPLICATION_ID:
                raise OutboxCorrupt(
                    f"not a trio-mailer outbox: application_id is {application_id:#x}, "
                    f"expected {APPLICATION_ID:#x}",
                    path=path,
                )
            if version not in READABLE_VERSIONS:
                raise OutboxCorrupt(
                    f"unknown schema version {version} (this trio-mailer reads versions "
                    f"{', '.join(map(str, READABLE_VERSIONS))})",
                    path=path,
                )
            columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(mail)"))
            expected = _COLUMNS if version >= 3 else _COLUMNS[:-1]  # before traceparent
            if columns != expected:
                raise OutboxCorrupt(
                    f"table mail: expected the columns {list(expected)}, got {list(columns)}",
                    path=path,
                )
            if version >= 2 and (problem := admission.check_columns(conn)) is not None:
                raise OutboxCorrupt(problem, path=path)
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        except sqlite3.Error as exc:
            raise _storage_error(exc, path) from exc
    if problems != ["ok"]:
        lines = [
            line
            for problem in problems[:3]
            for line in str(problem).splitlines()
            if line and not line.startswith("***")  # "*** in database main ***"
        ]
        raise OutboxCorrupt(f"failed its integrity check: {'; '.join(lines)}", path=path)


def _open_read_write(path: Path, max_size_bytes: int | None) -> sqlite3.Connection:
    # SQLite would quietly open a write-protected file read-only and fail later, obscurely.
    try:
        with path.open("r+b"):
            pass
    except OSError as exc:
        raise OutboxFull(f"cannot write: {exc.strerror or exc}", path=path) from exc
    try:
        conn = sqlite3.connect(
            f"{path.as_uri()}?mode=rw",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,  # autocommit: we BEGIN and COMMIT ourselves
            check_same_thread=False,  # the CapacityLimiter(1) serialises its use
        )
    except sqlite3.Error as exc:
        raise _storage_error(exc, path) from exc
    try:
        # Before WAL is entered: no shared-memory index, and the lock is held until close.
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise OutboxError(f"cannot use write-ahead logging (journal_mode is {mode})", path=path)
        conn.execute("PRAGMA synchronous = FULL")
        if max_size_bytes is not None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            # SQLite never sets it below the current size.
            conn.execute(f"PRAGMA max_page_count = {max(1, max_size_bytes // page_size):d}")
        # Take the write lock now: a second process fails here, not at its first mail.
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            # A file an earlier version wrote: upgraded in this one transaction.
            if version < 2:
                admission.migrate_to_2(conn)  # the admission tables
            conn.execute(_MIGRATE_TO_3)  # the mail's trace context
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            log.info("outbox %s: upgraded to schema version %d", path, SCHEMA_VERSION)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        conn.close()
        raise _storage_error(exc, path) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _open_blocking(path: Path, max_size_bytes: int | None) -> tuple[Path, sqlite3.Connection]:
    path = path.absolute()  # as_uri() needs it
    if not os.path.lexists(path):
        _create(path)
    _check(path)
    return path, _open_read_write(path, max_size_bytes)


def _in_transaction(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection, T], R], *args: T
) -> R:
    try:
        conn.execute("BEGIN IMMEDIATE")
        result = fn(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return result


# ---- the outboxes ----

CLAIM_BATCH = 256  # mails one claim of a single-process outbox hands out at most
CLAIM_RETRY_S = 5.0  # after a claim failed, until the next one


@attrs.define
class _Claims:
    """What a single-process outbox hands out through ``claim``: one *pass* over the mail that
    was unfinished when the pass began, oldest first, a page of ``unfinished`` at a time, each
    mail once; the pass ends when ``claim`` answers nothing, and the next claim begins another.
    The service makes one pass, at start-up: it gets what a previous run left unfinished.

    The mail added during a pass its adder holds already: ``added`` names it in ``held`` (in the
    commit, before any later read) and the pages skip it.
    """

    passing: bool = False
    after: tuple[float, str] | None = None  # the last mail the pass read
    held: set[str] = attrs.field(factory=set)
    read_all: bool = False  # the pass read the last page: its next claim answers nothing

    def added(self, message_id: str) -> None:
        if self.passing:
            self.held.add(message_id)

    async def claim(
        self, unfinished: Callable[..., Awaitable[list[MailRecord]]], limit: int
    ) -> list[MailRecord]:
        if not self.passing:
            self.passing, self.after, self.read_all = True, None, False
        claimed: list[MailRecord] = []
        while not self.read_all and len(claimed) < limit:
            asked = limit - len(claimed)
            page = await unfinished(after=self.after, limit=asked)
            if page:
                self.after = (page[-1].accepted_at_unix, page[-1].message_id)
            claimed += [record for record in page if record.message_id not in self.held]
            self.read_all = len(page) < asked
        if not claimed:
            await unfinished(limit=0)  # nothing, but a closed outbox raises as for every call
            self.passing = False
            self.held.clear()
        return claimed

    async def wait_for_work(self) -> None:
        if self.passing:
            await trio.sleep(CLAIM_RETRY_S)  # a claim failed during the pass: go on with it
        else:
            await trio.sleep_forever()  # nobody else adds mail


class _Unfinished(Protocol):
    _claims: _Claims

    async def unfinished(
        self, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[MailRecord]: ...


class _OneProcess:
    """The members of ``Store`` about other processes, for an outbox that only this process
    writes: it is not shared, hands out what a previous run left (``_Claims``), has no background
    work and no connection to lose (each call's failure is that call's answer)."""

    @property
    def shared(self) -> bool:
        return False

    async def claim(self: _Unfinished, limit: int = CLAIM_BATCH) -> list[MailRecord]:
        """Up to ``limit`` of the mail unfinished when the pass began (``_Claims``)."""
        return await self._claims.claim(self.unfinished, limit)

    async def wait_for_work(self: _Unfinished) -> None:
        """Forever once a pass of ``claim`` ended (nobody else adds mail)."""
        await self._claims.wait_for_work()

    async def run(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()

    def reachable(self) -> bool:
        return True


@attrs.define(eq=False)
class SqliteOutbox(_OneProcess):
    """The durable outbox: one SQLite file, written through one worker thread at a time."""

    path: Path
    _conn: sqlite3.Connection | None = attrs.field(repr=False)
    _limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1))
    _closed: bool = False
    _group: GroupCommit[_Change] = attrs.field(init=False, repr=False)
    _claims: _Claims = attrs.field(init=False, repr=False, factory=_Claims)

    def __attrs_post_init__(self) -> None:
        self._group = GroupCommit(
            self._write, self._requeue_after_failure, self._withdrawal, path=self.path
        )

    def describe(self) -> str:
        return str(self.path)

    @classmethod
    async def open(cls, path: Path, *, max_size_bytes: int | None = None) -> SqliteOutbox:
        """Open the outbox at ``path``, creating it (and its directories) if missing.

        An existing file is first checked through a read-only connection (header, application
        id, schema version, columns, ``PRAGMA quick_check``) and left untouched if it fails.

        Args:
            max_size_bytes: a cap on the database file (``PRAGMA max_page_count``; the WAL
                beside it is not counted); an ``add`` that would pass it raises ``OutboxFull``.

        Raises:
            OutboxCorrupt: the file is not a usable outbox; start-up must stop.
            OutboxFull: the file is read-only, or the disk is full.
            OutboxError: the file or its directory cannot be read or created, or another
                process holds it.
        """
        limiter = trio.CapacityLimiter(1)
        path, conn = await trio.to_thread.run_sync(
            _open_blocking, path, max_size_bytes, limiter=limiter
        )
        return cls(path, conn, limiter)

    # ---- writes: group commit ----

    async def add(self, record: MailRecord, acceptance: Acceptance | None = None) -> None:
        """Store a newly accepted mail; it is on disk when this returns.

        With ``acceptance``, its idempotency key and rate-limit row go in the same commit.
        If the call is cancelled, the mail counts as not accepted (see the module docstring).

        Raises:
            IdempotencyHit: ``acceptance`` has a key already used within its window; nothing
                was stored.
            OutboxFull: no space (or the size cap), or the file became read-only.
            OutboxConflict: a mail with this Message-ID is already stored.
            OutboxError: another storage failure.
            trio.ClosedResourceError: the outbox was closed.
        """
        await self._submit(record if acceptance is None else _Accept(record, acceptance))

    async def record(self, change: StatusChange) -> None:
        """Store a status change reported by the sender; on disk when this returns.

        Raises:
            OutboxConflict: the mail is unknown or already finished, or the attempts went down.
            OutboxFull, OutboxError, trio.ClosedResourceError: as for ``add``.
        """
        await self._submit(change)

    async def _submit(self, change: _Change) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        await self._group.submit(change)

    async def _write(self, changes: list[_Change], began: Callable[[], None]) -> Outcomes:
        if self._conn is None:  # aclose() was cancelled before it could commit these
            raise OutboxError(
                "the outbox was closed before this change was committed", path=self.path
            )

        def write() -> Outcomes:
            began()
            return self._write_batch(changes)

        return await trio.to_thread.run_sync(write, limiter=self._limiter)

    @staticmethod
    def _requeue_after_failure(changes: list[_Change]) -> list[_Change]:
        # Nothing was stored; a withdrawal has no caller to tell: keep it for the next commit.
        return [change for change in changes if isinstance(change, _Withdraw)]

    def _withdrawal(self, change: _Change) -> _Change | None:
        added = _added(change)
        if added is None or self._closed:
            return None
        log.warning(
            "add of %s was cancelled during its commit; withdrawing it",
            added.message_id,
            extra={"message_id": added.message_id},
        )
        return _Withdraw(added.message_id)

    def _write_batch(self, changes: list[_Change]) -> list[OutboxError | None]:
        """In the worker: write ``changes`` in one transaction and commit it.

        Returns:
            Each change's outcome: None, or the ``OutboxConflict`` that kept it out.

        Raises:
            OutboxError: the transaction failed and was rolled back; nothing was stored.
        """
        conn = self._connection()
        outcomes: list[OutboxError | None] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for change in changes:
                try:
                    _apply(conn, change, self.path)
                except OutboxConflict as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(None)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise _storage_error(exc, self.path) from exc
        except BaseException:
            _rollback(conn)
            raise
        for change, outcome in zip(changes, outcomes, strict=True):
            if outcome is None and (added := _added(change)) is not None:
                self._claims.added(added.message_id)  # before any read that would see it
        return outcomes

    # ---- reads and upkeep ----

    async def unfinished(
        self, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[MailRecord]:
        """The mails not yet delivered, failed or expired, oldest accepted first (ties by id).

        A page at a time: ``limit`` of them, after the (accepted_at_unix, message_id) ``after``;
        the page stays correct while earlier mails finish meanwhile.
        """
        accepted, message_id = after if after is not None else (-math.inf, "")

        def read(conn: sqlite3.Connection) -> list[MailRecord]:
            rows = conn.execute(
                f"{_SELECT} WHERE finished_at_unix IS NULL"
                " AND (accepted_at_unix > ? OR (accepted_at_unix = ? AND message_id > ?))"
                " ORDER BY accepted_at_unix, message_id LIMIT ?",
                (accepted, accepted, message_id, -1 if limit is None else limit),
            ).fetchall()
            return [_row_to_record(row, self.path) for row in rows]

        return await self._run(read)

    async def get(self, message_id: str) -> MailRecord | None:
        """The stored record of ``message_id``, or None."""
        return await self._run(lambda conn: _select_one(conn, message_id, self.path))

    async def prune(self, finished_before_unix: float) -> int:
        """Delete the mails that finished before ``finished_before_unix``; returns how many.

        The file does not shrink, but the freed pages are reused: pruning keeps it bounded.
        """

        def delete(conn: sqlite3.Connection) -> int:
            try:
                conn.execute("BEGIN IMMEDIATE")
                cursor = conn.execute(
                    "DELETE FROM mail WHERE finished_at_unix IS NOT NULL AND finished_at_unix < ?",
                    (finished_before_unix,),
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return cursor.rowcount

        return await self._run(delete)

    # ---- admission: keys, the rate-limit log, the suppression list ----

    async def find_key(self, caller: str, key: str, since_unix: float) -> KeyEntry | None:
        """The stored key of ``caller`` created after ``since_unix``, or None."""
        return await self._run(lambda conn: admission.find_key(conn, caller, key, since_unix))

    async def accepted_since(self, since_unix: float) -> list[AcceptedAt]:
        """The rate-limit log after ``since_unix``, oldest first (read at start-up)."""
        return await self._run(lambda conn: admission.accepted_since(conn, since_unix))

    async def list_suppressed(self, now_unix: float) -> list[Suppression]:
        return await self._run(lambda conn: admission.list_suppressed(conn, now_unix))

    async def suppress(self, entry: Suppression) -> None:
        """Put (or renew) an address on the suppression list; on disk when this returns."""
        await self._run(lambda conn: _in_transaction(conn, admission.write_suppression, entry))

    async def unsuppress(self, address: str) -> bool:
        """Take an address off the list; False when it was not on it."""
        return await self._run(
            lambda conn: _in_transaction(conn, admission.delete_suppression, address)
        )

    async def prune_admission(
        self, *, keys_before: float, log_before: float, now_unix: float
    ) -> int:
        """Delete keys, rate-limit rows and suppressions that are past; returns how many."""

        def prune(conn: sqlite3.Connection, now: float) -> int:
            return admission.prune_admission(
                conn, keys_before=keys_before, log_before=log_before, now_unix=now
            )

        return await self._run(lambda conn: _in_transaction(conn, prune, now_unix))

    async def _run(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")

        def call() -> R:
            try:
                return fn(self._connection())
            except sqlite3.Error as exc:
                raise _storage_error(exc, self.path) from exc

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise trio.ClosedResourceError("the outbox is closed")
        return self._conn

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            commits=self._group.commits,
            rows_committed=self._group.rows_committed,
            failed_commits=self._group.failed_commits,
            pending=self._group.pending,
            largest_batch=self._group.largest_batch,
        )

    async def aclose(self) -> None:
        """Commit what is still pending (a withdrawal, say), then close the file.

        Closing happens even when the call is cancelled; the pending changes are then lost
        (their callers get an ``OutboxError``).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            await self._group.flush()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close_connection, limiter=self._limiter)

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # the last connection checkpoints the WAL into the file
            except sqlite3.Error as exc:
                raise _storage_error(exc, self.path) from exc


@attrs.define(eq=False)
class MemoryOutbox(_OneProcess):
    """The outbox without persistence: the same rules, nothing survives the process.

    Every call checkpoints first and then takes effect at once (``add`` never waits), so a
    cancelled call changed nothing.
    """

    _records: dict[str, MailRecord] = attrs.field(factory=dict)
    _closed: bool = False
    _commits: int = 0
    _admission: MemoryAdmission = attrs.field(factory=MemoryAdmission)
    _claims: _Claims = attrs.field(init=False, repr=False, factory=_Claims)

    def describe(self) -> str:
        return "memory (lost when the process stops)"

    async def add(self, record: MailRecord, acceptance: Acceptance | None = None) -> None:
        await self._checkpoint()
        if acceptance is not None:
            self._admission.check(acceptance)
        if record.message_id in self._records:
            raise OutboxConflict(f"{record.message_id} is already in the outbox")
        self._records[record.message_id] = record
        if acceptance is not None:
            self._admission.write(acceptance)
        self._claims.added(record.message_id)
        self._commits += 1

    async def find_key(self, caller: str, key: str, since_unix: float) -> KeyEntry | None:
        await self._checkpoint()
        return self._admission.find_key(caller, key, since_unix)

    async def accepted_since(self, since_unix: float) -> list[AcceptedAt]:
        await self._checkpoint()
        return self._admission.accepted_since(since_unix)

    async def list_suppressed(self, now_unix: float) -> list[Suppression]:
        await self._checkpoint()
        return self._admission.list_suppressed(now_unix)

    async def suppress(self, entry: Suppression) -> None:
        await self._checkpoint()
        self._admission.suppressed[entry.address] = entry

    async def unsuppress(self, address: str) -> bool:
        await self._checkpoint()
        return self._admission.suppressed.pop(address, None) is not None

    async def prune_admission(
        self, *, keys_before: float, log_before: float, now_unix: float
    ) -> int:
        await self._checkpoint()
        return self._admission.prune(
            keys_before=keys_before, log_before=log_before, now_unix=now_unix
        )

    async def record(self, change: StatusChange) -> None:
        await self._checkpoint()
        current = self._records.get(change.message_id)
        if current is None:
            raise OutboxConflict(f"{change.message_id} is not in the outbox")
        self._records[change.message_id] = _checked(current, change)
        self._commits += 1

    async def unfinished(
        self, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[MailRecord]:
        await self._checkpoint()
        start = after if after is not None else (-math.inf, "")
        pending = sorted(
            (
                r
                for r in self._records.values()
                if not r.state.terminal and (r.accepted_at_unix, r.message_id) > start
            ),
            key=lambda r: (r.accepted_at_unix, r.message_id),
        )
        return pending if limit is None else pending[:limit]

    async def get(self, message_id: str) -> MailRecord | None:
        await self._checkpoint()
        return self._records.get(message_id)

    async def prune(self, finished_before_unix: float) -> int:
        await self._checkpoint()
        old = [
            message_id
            for message_id, r in self._records.items()
            if r.finished_at_unix is not None and r.finished_at_unix < finished_before_unix
        ]
        for message_id in old:
            del self._records[message_id]
        return len(old)

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            commits=self._commits,
            rows_committed=self._commits,
            failed_commits=0,
            pending=0,
            largest_batch=min(self._commits, 1),
        )

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()

    async def _checkpoint(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")


@contextlib.asynccontextmanager
async def open_outbox(
    path: Path | DatabaseUrl | None,
    *,
    max_size_bytes: int | None = None,
    use: Outbox | None = None,
    lease_s: float = default("lease_s"),
    pool_size: int = default("db_pool_size"),
    timeout_s: float = default("db_timeout_s"),
) -> AsyncIterator[Outbox]:
    """``async with open_outbox(config.outbox_path) as outbox:`` the outbox, closed on the way out.

    Args:
        path: the SQLite file (checked: a damaged file stops start-up); a ``DatabaseUrl``: the
            PostgreSQL outbox shared by replicas (``postgres_outbox``); None: in memory.
        max_size_bytes: a cap on the file's size (``SqliteOutbox.open``).
        use: an outbox already made (tests): used, and closed, instead of opening one.
        lease_s, pool_size, timeout_s: the PostgreSQL outbox's lease, pool and timeouts.

    Raises:
        OutboxError: the file or database is not a usable outbox, or cannot be opened.
    """
    outbox: Outbox
    if use is not None:
        outbox = use
    elif path is None:
        outbox = MemoryOutbox()
    elif isinstance(path, DatabaseUrl):
        outbox = await PostgresOutbox.open(
            path.url,
            lease_s=lease_s,
            pool_size=pool_size,
            statement_timeout_s=timeout_s,
            connect_timeout_s=timeout_s,
        )
    else:
        outbox = await SqliteOutbox.open(path, max_size_bytes=max_size_bytes)
    try:
        yield outbox
    finally:
        # Closing commits what is pending: it must run even when the caller is cancelled.
        with trio.CancelScope(shield=True):
            await outbox.aclose()
