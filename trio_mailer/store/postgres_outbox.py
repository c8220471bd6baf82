"""The shared outbox: PostgreSQL, for several trio-mailer replicas on one database.

Theory of operation
-------------------
``PostgresOutbox`` implements the ``Store`` protocol (``store.py``) on a psycopg 3
``ConnectionPool``. psycopg's async API is asyncio-only, so every call runs the sync API in a
worker thread (``trio.to_thread.run_sync``) under a ``CapacityLimiter`` as large as the pool.

**Group commit** (``group_commit.py``). As in the SQLite outbox, concurrent ``add`` and
``record`` calls share one commit: the first caller leads, lets the runnable callers join, and
sends every pending change in *one* call of the ``trio_mailer_apply`` function
(``postgres_schema``): one round trip per batch. The outcomes are per change (a conflict, an
idempotency hit, a rate limit or suppression that another replica's accepts tripped, a stale
record); a failed call fails the whole batch.

**Ownership and leases.** Every unfinished row names its ``owner`` (this replica's id) and a
``lease_until``: a mail this replica accepted, or claimed, is held in its memory queue and
nobody else touches it. ``run`` renews the leases of every row it owns every third of
``lease_s``; a replica that dies stops renewing, and after ``lease_s`` its rows are *claimable*:
``claim`` takes them with ``SELECT ... FOR UPDATE SKIP LOCKED`` (two replicas never take the same
row) and the app queues them like mail recovered at start-up (a row left in ``sending`` is
delivered flagged as a possible duplicate: the dead attempt may have passed the final ".").
A replica never claims its own rows: they are in its memory already (a lapsed lease of its own
is renewed, not claimed twice). A replica that stops cleanly releases its rows and NOTIFYs
``trio_mailer_work``: the others claim at once instead of after the lease.

**A lost lease.** A status change is stored only while the row's owner is still this replica
(``trio_mailer_apply``'s UPDATE is conditional on it). A replica cut off from the database for
longer than its lease may find, when it is back, that another replica claimed its mail: the
change is refused as *lost* (an ``OutboxConflict``) and this replica forgets the row. The sender
stores ``SENDING`` before the relay hears DATA and does not send when that fails, so the mail
goes out from the replica that holds it, never from both unflagged.

**Status everywhere.** Each stored change NOTIFYs ``trio_mailer_status`` with its message id;
``run`` LISTENs on a connection of its own and calls its ``on_change`` (the status board's wake-up),
so a ``WatchStatus`` on any replica follows a mail that another replica sends.

**Faults.** Any database error becomes an ``OutboxError`` (UNAVAILABLE for a call) and marks
the store unreachable (health NOT_SERVING) until an operation succeeds again; the pool replaces
broken connections by itself, so a restarted database is used again without a restart here. An
``add`` whose batch failed in flight may have committed: its rows are *withdrawn* (deleted if
still untouched) with the next successful batch, as for a cancelled add in SQLite. ``run``
probes the database every ``PROBE_INTERVAL_S``, so health follows it even while no mail moves.

**Timeouts** (all from ``MAILER_DB_TIMEOUT_S``, ``statement_timeout_s`` here): the server cancels
a statement that runs longer; a connect, and the wait for a pooled connection, give up after it;
the kernel gives up on unacknowledged data (``tcp_user_timeout``) and on a silent peer
(keepalives); and psycopg's wait for any answer ends ``ANSWER_GRACE_S`` after it, dropping the
connection (``psycopg_internals``): a network that stalls without closing (a frozen proxy) fails
the call with UNAVAILABLE instead of hanging a worker thread.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from trio_mailer.core.config import DatabaseUrl
from trio_mailer.core.errors import OutboxConflict, OutboxCorrupt, OutboxError
from trio_mailer.core.mail_lifecycle import MailRecord, MailState, StatusChange, check_change
from trio_mailer.store import postgres_schema as schema
from trio_mailer.store.admission_tables import (
    Acceptance,
    AcceptedAt,
    IdempotencyHit,
    KeyEntry,
    StoreRefusal,
    Suppression,
)
from trio_mailer.store.group_commit import GroupCommit, Outcomes
from trio_mailer.store.store import OutboxStatistics

log = logging.getLogger(__name__)

R = TypeVar("R")

URL_SCHEMES = ("postgresql://", "postgres://")
CLAIM_BATCH = 16  # rows one claim takes at most
LISTEN_POLL_S = 1.0  # how long the listener thread waits for a NOTIFY before looking again
RECONNECT_DELAY_S = 1.0  # between attempts of the listener to reconnect
PROBE_INTERVAL_S = 2.0  # between the health probes of the database (SELECT 1)
# How much longer than the statement timeout psycopg waits for an answer before calling the
# network stalled: a slow statement is the server's to cancel (a clean error, the connection kept).
ANSWER_GRACE_S = 1.0

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
    "traceparent",  # since schema version 3
)
LEASE_LOST = "another replica holds the mail now (this replica's lease on it lapsed)"

_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM mail"
_SUPPRESSED_COLUMNS = "address, since_unix, until_unix, reply_code, reply_text, message_id"

_CLAIM = f"""
UPDATE mail SET owner = %(me)s,
                lease_until = extract(epoch FROM clock_timestamp()) + %(lease_s)s
WHERE message_id IN (
    SELECT message_id FROM mail
    WHERE finished_at_unix IS NULL
      AND (owner IS NULL OR lease_until < extract(epoch FROM clock_timestamp()))
      AND owner IS DISTINCT FROM %(me)s
    ORDER BY accepted_at_unix, message_id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING {", ".join(_COLUMNS)}
"""
_RENEW = """
UPDATE mail SET lease_until = extract(epoch FROM clock_timestamp()) + %(lease_s)s
WHERE owner = %(me)s AND finished_at_unix IS NULL
"""
_RELEASE = """
UPDATE mail SET owner = NULL, lease_until = NULL
WHERE owner = %(me)s AND finished_at_unix IS NULL
"""


def is_postgres_url(text: str) -> bool:
    return text.startswith(URL_SCHEMES)


def mask_url(url: str) -> str:
    """``url`` with its password (in the authority, or a ``password=`` parameter) as ``***``."""
    return DatabaseUrl(url).masked()


@attrs.frozen
class _Add:
    record: MailRecord
    acceptance: Acceptance | None


@attrs.frozen
class _Withdraw:
    message_id: str


_Change = _Add | StatusChange | _Withdraw


def _row_to_record(row: tuple[Any, ...]) -> MailRecord:
    fields = dict(zip(_COLUMNS, row, strict=True))
    try:
        fields["state"] = MailState(fields["state"])
        fields["data"] = bytes(fields["data"])
        return MailRecord(**fields)
    except (TypeError, ValueError) as exc:
        raise OutboxCorrupt(f"row {fields['message_id']!r} is not a valid record: {exc}") from exc


def _mail_json(record: MailRecord) -> dict[str, Any]:
    return {
        "message_id": record.message_id,
        "kind": record.kind,
        "envelope_from": record.envelope_from,
        "envelope_to": record.envelope_to,
        "data": base64.b64encode(record.data).decode("ascii"),
        "accepted_at_unix": record.accepted_at_unix,
        "state": record.state.value,
        "attempts": record.attempts,
        "last_reply_code": record.last_reply_code,
        "last_reply_text": record.last_reply_text,
        "last_attempt_at_unix": record.last_attempt_at_unix,
        "finished_at_unix": record.finished_at_unix,
        "possible_duplicate": record.possible_duplicate,
        "traceparent": record.traceparent,
    }


def _acceptance_json(acceptance: Acceptance) -> dict[str, Any]:
    return {
        "message_id": acceptance.message_id,
        "caller": acceptance.caller,
        "recipient": acceptance.recipient,
        "accepted_at_unix": acceptance.accepted_at_unix,
        "key": acceptance.key,
        "fingerprint": acceptance.fingerprint,
        "key_window_s": acceptance.key_window_s,
        "log_for_limits": acceptance.log_for_limits,
        "recipient_limit": acceptance.recipient_limit,
        "caller_limit": acceptance.caller_limit,
        "check_suppressed": acceptance.check_suppressed,
    }


def _outcome(result: dict[str, Any]) -> OutboxError | None:
    """One change's outcome from ``trio_mailer_apply``."""
    if result.get("ok"):
        return None
    if "hit" in result:
        hit = result["hit"]
        return IdempotencyHit(
            KeyEntry(
                hit["caller"],
                hit["key"],
                hit["fingerprint"],
                hit["message_id"],
                float(hit["created_at_unix"]),
            )
        )
    if "limited" in result:
        return StoreRefusal(str(result["limited"]), max(0.0, float(result["retry_after_s"])))
    if result.get("suppressed"):
        return StoreRefusal("suppressed", 0.0)
    if result.get("lost"):
        return OutboxConflict(LEASE_LOST)
    return OutboxConflict(str(result.get("conflict", "stale")))


@attrs.define(eq=False)
class PostgresOutbox:
    """The shared outbox (see the module docstring). Open it with ``open``."""

    url: str = attrs.field(repr=mask_url)
    lease_s: float
    statement_timeout_s: float
    pool_size: int
    owner: str
    _pool: Any = attrs.field(repr=False)  # psycopg_pool.ConnectionPool
    _limiter: trio.CapacityLimiter
    _work: trio.Event = attrs.field(factory=trio.Event)
    _reachable: bool = True
    _held: dict[str, MailRecord] = attrs.field(factory=dict)  # unfinished rows this one wrote
    _closed: bool = False
    _round_trips: int = 0
    _group: GroupCommit[_Change] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._group = GroupCommit(self._write, self._requeue_after_failure, self._withdrawal)

    @property
    def shared(self) -> bool:
        """Always: replicas share the database."""
        return True

    def describe(self) -> str:
        return f"{mask_url(self.url)} (shared; this replica is {self.owner})"

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        lease_s: float = 30.0,
        pool_size: int = 10,
        statement_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
    ) -> PostgresOutbox:
        """Connect, create or migrate the schema, and return the outbox.

        Raises:
            OutboxCorrupt: the database's schema is newer than this trio-mailer knows.
            OutboxError: the database cannot be reached.
        """
        import psycopg_pool  # only with MAILER_OUTBOX=postgresql://

        from trio_mailer.store.psycopg_internals import bounded_connection_class

        kwargs = _connect_kwargs(statement_timeout_s, connect_timeout_s)
        pool = psycopg_pool.ConnectionPool(
            url,
            connection_class=bounded_connection_class(statement_timeout_s + ANSWER_GRACE_S),
            min_size=1,
            max_size=pool_size,
            kwargs=kwargs,
            open=False,
            name="trio-mailer",
            timeout=connect_timeout_s,
            # Give up a background reconnection soon: the next call starts a fresh one, so
            # a database back after a long outage is used at once, not after a long backoff.
            reconnect_timeout=max(2.0, 2 * connect_timeout_s),
        )
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        outbox = cls(
            url,
            lease_s,
            statement_timeout_s,
            pool_size,
            owner,
            pool,
            trio.CapacityLimiter(pool_size),
        )

        def start() -> None:
            try:
                pool.open(wait=True, timeout=connect_timeout_s)
            except Exception as exc:
                pool.close()
                raise OutboxError(f"{mask_url(url)}: cannot connect: {exc}") from None
            try:
                with pool.connection() as conn:
                    _migrate(conn, mask_url(url))
            except BaseException:
                pool.close()
                raise

        try:
            await trio.to_thread.run_sync(start)
        except OutboxError:
            raise
        except Exception as exc:
            raise OutboxError(f"{mask_url(url)}: {_describe(exc)}") from None
        return outbox

    # ---- group commit ----

    async def add(self, record: MailRecord, acceptance: Acceptance | None = None) -> None:
        """Store a newly accepted mail (owned by this replica); committed when this returns.

        Raises:
            IdempotencyHit: the key is live (stored by any replica); nothing was stored.
            StoreRefusal: a limit or the suppression list, as every replica counts them.
            OutboxConflict: the message id is taken.
            OutboxError: the database failed; nothing the caller can rely on was stored.
        """
        await self._submit(_Add(record, acceptance))

    async def record(self, change: StatusChange) -> None:
        """Store a status change of a mail this replica holds (its lease is renewed)."""
        await self._submit(change)

    async def _submit(self, change: _Change) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        await self._group.submit(change)

    async def _write(self, changes: list[_Change], began: Callable[[], None]) -> Outcomes:
        def write(conn: Any) -> Outcomes:
            began()
            return self._write_batch(conn, changes)

        return await self._run(write)

    @staticmethod
    def _requeue_after_failure(changes: list[_Change]) -> list[_Change]:
        # It may have committed before the connection failed: withdraw the adds (only untouched
        # rows go), and keep the withdrawals, for the next batch.
        return [
            _Withdraw(change.record.message_id) if isinstance(change, _Add) else change
            for change in changes
            if isinstance(change, _Add | _Withdraw)
        ]

    @staticmethod
    def _withdrawal(change: _Change) -> _Change | None:
        if not isinstance(change, _Add):
            return None
        log.warning(
            "add of %s was cancelled during its commit; withdrawing it",
            change.record.message_id,
            extra={"message_id": change.record.message_id},
        )
        return _Withdraw(change.record.message_id)

    def _write_batch(self, conn: Any, changes: list[_Change]) -> list[OutboxError | None]:
        """In a worker: every change in one ``trio_mailer_apply`` call (a stale record is read
        again and retried once, in a second call)."""
        held = dict(self._held)
        outcomes: list[OutboxError | None] = [None] * len(changes)
        todo = list(range(len(changes)))
        for attempt in range(2):
            unknown = [
                c.message_id
                for i in todo
                if isinstance(c := changes[i], StatusChange) and c.message_id not in held
            ]
            if unknown:
                for record in self._select(conn, "WHERE message_id = ANY(%s)", (unknown,)):
                    held[record.message_id] = record
            payload: list[dict[str, Any]] = []
            sent: list[int] = []
            new_records: dict[int, MailRecord] = {}
            for i in todo:
                change = changes[i]
                if isinstance(change, _Add):
                    payload.append(
                        {
                            "op": "add",
                            "mail": _mail_json(change.record),
                            "acceptance": None
                            if change.acceptance is None
                            else _acceptance_json(change.acceptance),
                        }
                    )
                elif isinstance(change, _Withdraw):
                    payload.append({"op": "withdraw", "message_id": change.message_id})
                else:
                    current = held.get(change.message_id)
                    if current is None:
                        outcomes[i] = OutboxConflict(f"{change.message_id} is not in the outbox")
                        continue
                    try:
                        applied = check_change(current, change)
                    except OutboxConflict as exc:
                        outcomes[i] = exc
                        continue
                    if applied.problem is not None:
                        log.error(
                            "outbox: %s", applied.problem, extra={"message_id": current.message_id}
                        )
                    new_records[i] = applied.record
                    payload.append(
                        {
                            "op": "record",
                            "mail": _mail_json(applied.record),
                            "expect_state": current.state.value,
                            "expect_attempts": current.attempts,
                        }
                    )
                sent.append(i)
            todo = []
            if not payload:
                break
            self._round_trips += 1
            row = conn.execute(
                "SELECT trio_mailer_apply(%s::jsonb, %s, %s)",
                (json.dumps(payload), self.owner, self.lease_s),
            ).fetchone()
            results = row[0]
            stale: list[int] = []
            for i, result in zip(sent, results, strict=True):
                change = changes[i]
                if result.get("stale") and attempt == 0:
                    assert isinstance(change, StatusChange)
                    held.pop(change.message_id, None)  # read it again
                    stale.append(i)
                    continue
                outcomes[i] = _outcome(result)
                if isinstance(change, _Add) and "conflict" in result:
                    outcomes[i] = OutboxConflict(
                        f"{change.record.message_id} is already in the outbox"
                    )
                if outcomes[i] is not None:
                    if isinstance(change, StatusChange):
                        held.pop(change.message_id, None)
                    continue
                if isinstance(change, _Add) and not change.record.state.terminal:
                    held[change.record.message_id] = change.record
                elif isinstance(change, StatusChange):
                    new = new_records[i]
                    if new.state.terminal:
                        held.pop(new.message_id, None)
                    else:
                        held[new.message_id] = new
            todo = stale
            if not todo:
                break
        for i in todo:  # still stale: another replica holds it, or it finished
            outcomes[i] = OutboxConflict(
                f"{changes[i].message_id} is held by another replica"  # type: ignore[union-attr]
            )
        self._held = held
        return outcomes

    # ---- claiming ----

    async def claim(self, limit: int = CLAIM_BATCH) -> list[MailRecord]:
        """Take up to ``limit`` unfinished mails that no live replica holds (their owner
        released them, or let the lease lapse), oldest first; this replica holds them now."""

        def claim(conn: Any) -> list[MailRecord]:
            self._round_trips += 1
            rows = conn.execute(
                _CLAIM, {"me": self.owner, "lease_s": self.lease_s, "limit": limit}
            ).fetchall()
            records = [_row_to_record(row) for row in rows]
            for record in records:
                self._held[record.message_id] = record
            return records

        return await self._run(claim)

    async def wait_for_work(self) -> None:
        """Until another replica releases mail (NOTIFY), or half a lease passed (a dead
        replica's lease may have lapsed meanwhile)."""
        with trio.move_on_after(self.lease_s / 2):
            await self._work.wait()
        self._work = trio.Event()

    def reachable(self) -> bool:
        """False while the last database operation failed (health says NOT_SERVING)."""
        return self._reachable

    async def run(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Renew this replica's leases and follow the NOTIFYs: ``on_change(message_id)`` for
        each status change any replica stores (until cancelled)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._renew_leases)
            nursery.start_soon(self._listen, on_change)
            nursery.start_soon(self._probe)
            task_status.started()

    async def _probe(self) -> None:
        """Keep ``reachable`` true to the database while nothing else runs (a failed call sets
        it false; this one, succeeding again, sets it back)."""
        while True:
            await trio.sleep(PROBE_INTERVAL_S)
            try:
                await self._run(lambda conn: conn.execute("SELECT 1").fetchone())
            except OutboxError as exc:
                log.warning("database probe failed: %s", exc)

    async def _renew_leases(self) -> None:
        while True:
            await trio.sleep(self.lease_s / 3)
            try:
                await self._run(self._renew)
            except OutboxError as exc:
                log.error("cannot renew the leases: %s", exc)

    def _renew(self, conn: Any) -> None:
        self._round_trips += 1
        conn.execute(_RENEW, {"me": self.owner, "lease_s": self.lease_s})

    async def _listen(self, on_change: Callable[[str], None]) -> None:
        import psycopg

        from trio_mailer.store.psycopg_internals import bounded_connection_class

        conn: Any = None
        limiter = trio.CapacityLimiter(1)
        kwargs = _connect_kwargs(self.statement_timeout_s, self.statement_timeout_s)
        connection_class = bounded_connection_class(self.statement_timeout_s + ANSWER_GRACE_S)

        def connect() -> Any:
            c = connection_class.connect(self.url, **kwargs)
            c.execute(f"LISTEN {schema.STATUS_CHANNEL}")
            c.execute(f"LISTEN {schema.WORK_CHANNEL}")
            return c

        def wait(c: Any) -> list[tuple[str, str]]:
            got = [(n.channel, n.payload) for n in c.notifies(timeout=LISTEN_POLL_S)]
            return got

        try:
            while True:
                try:
                    if conn is None:
                        conn = await trio.to_thread.run_sync(connect, limiter=limiter)
                        self._reachable = True
                        self._work.set()  # look for what was released meanwhile
                    notes = await trio.to_thread.run_sync(wait, conn, limiter=limiter)
                except psycopg.Error as exc:
                    self._reachable = False
                    log.error("outbox listener: %s", _describe(exc))
                    if conn is not None:
                        await trio.to_thread.run_sync(conn.close, limiter=limiter)
                        conn = None
                    await trio.sleep(RECONNECT_DELAY_S)
                    continue
                for channel, payload in notes:
                    if channel == schema.WORK_CHANNEL:
                        self._work.set()
                    else:
                        on_change(payload)
        finally:
            if conn is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(conn.close, limiter=limiter)

    # ---- reads and upkeep ----

    def _select(self, conn: Any, where: str, params: Any) -> list[MailRecord]:
        self._round_trips += 1
        rows = conn.execute(f"{_SELECT} {where}", params).fetchall()
        return [_row_to_record(row) for row in rows]

    async def unfinished(
        self, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[MailRecord]:
        """Every replica's unfinished mails, oldest first (a page after ``after``)."""
        accepted, message_id = after if after is not None else (-math.inf, "")
        return await self._run(
            lambda conn: self._select(
                conn,
                "WHERE finished_at_unix IS NULL AND (accepted_at_unix, message_id) > (%s, %s) "
                "ORDER BY accepted_at_unix, message_id LIMIT %s",
                (accepted, message_id, limit),
            )
        )

    async def get(self, message_id: str) -> MailRecord | None:
        records = await self._run(
            lambda conn: self._select(conn, "WHERE message_id = %s", (message_id,))
        )
        return records[0] if records else None

    async def prune(self, finished_before_unix: float) -> int:
        return await self._execute(
            "DELETE FROM mail WHERE finished_at_unix IS NOT NULL AND finished_at_unix < %s",
            (finished_before_unix,),
        )

    async def find_key(self, caller: str, key: str, since_unix: float) -> KeyEntry | None:
        def find(conn: Any) -> KeyEntry | None:
            self._round_trips += 1
            row = conn.execute(
                "SELECT fingerprint, message_id, created_at_unix FROM idempotency_key "
                "WHERE caller = %s AND key = %s AND created_at_unix > %s",
                (caller, key, since_unix),
            ).fetchone()
            return None if row is None else KeyEntry(caller, key, row[0], row[1], row[2])

        return await self._run(find)

    async def accepted_since(self, since_unix: float) -> list[AcceptedAt]:
        def read(conn: Any) -> list[AcceptedAt]:
            self._round_trips += 1
            rows = conn.execute(
                "SELECT recipient, caller, accepted_at_unix FROM accept_log "
                "WHERE accepted_at_unix > %s ORDER BY accepted_at_unix",
                (since_unix,),
            ).fetchall()
            return [AcceptedAt(*row) for row in rows]

        return await self._run(read)

    async def list_suppressed(self, now_unix: float) -> list[Suppression]:
        def read(conn: Any) -> list[Suppression]:
            self._round_trips += 1
            rows = conn.execute(
                f"SELECT {_SUPPRESSED_COLUMNS} FROM suppressed WHERE until_unix > %s "
                "ORDER BY address",
                (now_unix,),
            ).fetchall()
            return [Suppression(*row) for row in rows]

        return await self._run(read)

    async def suppress(self, entry: Suppression) -> None:
        await self._execute(
            f"INSERT INTO suppressed ({_SUPPRESSED_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (address) DO UPDATE SET since_unix = EXCLUDED.since_unix, "
            "until_unix = EXCLUDED.until_unix, reply_code = EXCLUDED.reply_code, "
            "reply_text = EXCLUDED.reply_text, message_id = EXCLUDED.message_id",
            attrs.astuple(entry),
        )

    async def unsuppress(self, address: str) -> bool:
        return await self._execute("DELETE FROM suppressed WHERE address = %s", (address,)) > 0

    async def prune_admission(
        self, *, keys_before: float, log_before: float, now_unix: float
    ) -> int:
        def prune(conn: Any) -> int:
            self._round_trips += 1
            with conn.transaction():
                removed = conn.execute(
                    "DELETE FROM idempotency_key WHERE created_at_unix <= %s", (keys_before,)
                ).rowcount
                removed += conn.execute(
                    "DELETE FROM accept_log WHERE accepted_at_unix <= %s", (log_before,)
                ).rowcount
                removed += conn.execute(
                    "DELETE FROM suppressed WHERE until_unix <= %s", (now_unix,)
                ).rowcount
            return int(removed)

        return await self._run(prune)

    async def _execute(self, sql: str, params: Any) -> int:
        def run(conn: Any) -> int:
            self._round_trips += 1
            return int(conn.execute(sql, params).rowcount)

        return await self._run(run)

    async def _run(self, fn: Callable[[Any], R]) -> R:
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        import psycopg

        from trio_mailer.store.psycopg_internals import NoAnswer

        def call() -> R:
            try:
                with self._pool.connection() as conn:
                    return fn(conn)
            except (psycopg.Error, _pool_errors()) as exc:
                self._reachable = False
                if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, NoAnswer):
                    # A restarted server leaves every idle connection broken: replace them now,
                    # not one failed call at a time. Not on a stall: each check would wait out
                    # the timeout in turn (the stalled connections fail on their next use).
                    self._pool.check()
                raise OutboxError(f"{mask_url(self.url)}: {_describe(exc)}") from None

        result = await trio.to_thread.run_sync(call, limiter=self._limiter)
        self._reachable = True
        return result

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            commits=self._group.commits,
            rows_committed=self._group.rows_committed,
            failed_commits=self._group.failed_commits,
            pending=self._group.pending,
            largest_batch=self._group.largest_batch,
            round_trips=self._round_trips,
        )

    async def aclose(self) -> None:
        """Store what is pending, release this replica's unfinished mails to the others
        (NOTIFY), and close the pool; closing happens even when cancelled."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._group.flush()

            def release(conn: Any) -> None:
                with conn.transaction():
                    released = conn.execute(_RELEASE, {"me": self.owner}).rowcount
                    if released:
                        conn.execute("SELECT pg_notify(%s, '')", (schema.WORK_CHANNEL,))
                if released:
                    log.info("released %d unfinished mail(s) to the other replicas", released)

            with trio.move_on_after(self.statement_timeout_s):
                await self._run(release)
        except OutboxError as exc:
            log.error("cannot release this replica's mail (its leases lapse): %s", exc)
        finally:
            self._closed = True
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._pool.close)


def _connect_kwargs(statement_timeout_s: float, connect_timeout_s: float) -> dict[str, Any]:
    statement_ms = max(1, int(statement_timeout_s * 1000))
    return {
        "autocommit": True,
        "connect_timeout": max(1, math.ceil(connect_timeout_s)),
        "options": f"-c statement_timeout={statement_ms} -c idle_in_transaction_session_timeout="
        f"{statement_ms * 2}",
        # A stalled network: the kernel gives up on unacknowledged data after this long.
        "tcp_user_timeout": statement_ms + 1000,
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(connect_timeout_s)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "application_name": "trio-mailer",
    }


def _migrate(conn: Any, where: str) -> None:
    """Create the schema or apply the missing migrations, one replica at a time."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema.SCHEMA_LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS trio_mailer_schema (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM trio_mailer_schema").fetchone()
        version = int(row[0] or 0)
        if version > schema.SCHEMA_VERSION:
            raise OutboxCorrupt(
                f"{where}: schema version {version} is newer than this trio-mailer knows "
                f"({schema.SCHEMA_VERSION}): run the newer trio-mailer"
            )
        for number in range(version, schema.SCHEMA_VERSION):
            conn.execute(schema.MIGRATIONS[number])
            conn.execute("INSERT INTO trio_mailer_schema (version) VALUES (%s)", (number + 1,))
            log.info("outbox %s: schema version %d", where, number + 1)


def _pool_errors() -> type[Exception]:
    import psycopg_pool

    return psycopg_pool.PoolTimeout


def _describe(exc: BaseException) -> str:
    # psycopg's messages name the server and the problem, never the password.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
