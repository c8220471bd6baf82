"""The outbox's admission tables: idempotency keys, the rate-limit log, the suppression list.

Kept beside ``outbox.py`` (which calls these inside its own transactions) so that the mail
table's code stays as it was. Three tables, added by schema version 2 (``migrate_to_2`` upgrades
a version-1 file in place, in one transaction):

- ``idempotency_key``: (caller, key) -> the payload's fingerprint and the mail it made. Written
  in the *same transaction* as the mail row (``write_acceptance``), so after any crash either
  both are on disk or neither: "stored, answer lost, caller retries" finds the key and answers
  with the first mail. A key older than its window is replaced by a new call with it.
- ``accept_log``: one row per accepted mail (normalised recipient, caller, time), also in the
  mail's transaction, so the rate limits' counts survive a restart at no extra fsync.
- ``suppressed``: addresses the relay called dead, until when, and the reply that said so.

**The rules an acceptance passes in the mail's commit** are decided in one place, ``refusal``
(pure; the rate limits' arithmetic is ``core.rate_limits``, as for the service's own windows):
the live key first (a hit stores nothing), then the suppression list, the recipient limit and
the caller limit when the acceptance names them (a store shared by replicas: each replica's
memory knows only its own accepts). ``MemoryAdmission`` and the SQLite outbox read what the rules
need (here, in the worker thread, plain ``sqlite3``) and ask ``refusal``. The PostgreSQL outbox
runs the same rules inside the database (``postgres_schema``: one round trip, under locks that
order the replicas); ``tests/test_admission_stores.py`` drives the same random requests through
every store and a model of these rules and requires the same answers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable

import attrs

from trio_mailer.core.errors import OutboxConflict
from trio_mailer.core.rate_limits import RateLimit, SlidingWindow

# Few B-trees per accepted mail, since each one it touches is another page in the commit's WAL
# write: the key (its primary key, and its age for pruning) and one accept_log row (its rowid
# and its time grow together, so both are appended at the end). Withdrawing a mail by its
# message_id scans instead; that happens only to an add that was cancelled mid-commit.
ADMISSION_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS idempotency_key (
        caller TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        message_id TEXT NOT NULL,
        created_at_unix REAL NOT NULL,
        PRIMARY KEY (caller, key)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS idempotency_key_age ON idempotency_key (created_at_unix)",
    """
    CREATE TABLE IF NOT EXISTS accept_log (
        message_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        caller TEXT NOT NULL,
        accepted_at_unix REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS accept_log_age ON accept_log (accepted_at_unix)",
    """
    CREATE TABLE IF NOT EXISTS suppressed (
        address TEXT PRIMARY KEY NOT NULL,
        since_unix REAL NOT NULL,
        until_unix REAL NOT NULL,
        reply_code INTEGER NOT NULL,
        reply_text TEXT NOT NULL,
        message_id TEXT NOT NULL
    )
    """,
)
ADMISSION_TABLES = {
    "idempotency_key": ("caller", "key", "fingerprint", "message_id", "created_at_unix"),
    "accept_log": ("message_id", "recipient", "caller", "accepted_at_unix"),
    "suppressed": (
        "address",
        "since_unix",
        "until_unix",
        "reply_code",
        "reply_text",
        "message_id",
    ),
}


@attrs.frozen
class KeyEntry:
    """A stored idempotency key: the mail its first call made."""

    caller: str
    key: str
    fingerprint: str
    message_id: str
    created_at_unix: float


@attrs.frozen
class Acceptance:
    """What is stored with a newly accepted mail, in its commit."""

    message_id: str
    caller: str
    recipient: str  # normalised
    accepted_at_unix: float
    key: str | None = None
    fingerprint: str = ""
    key_window_s: float = 0.0  # an older row with the same key is replaced
    log_for_limits: bool = True  # write the accept_log row (a rate limit is on)
    # For a store shared by replicas (PostgreSQL), which checks them against every replica's
    # accepts in the mail's commit: (count, period_s), and whether suppression is on.
    recipient_limit: tuple[int, float] | None = None
    caller_limit: tuple[int, float] | None = None
    check_suppressed: bool = False

    def key_entry(self) -> KeyEntry | None:
        if self.key is None:
            return None
        return KeyEntry(
            self.caller, self.key, self.fingerprint, self.message_id, self.accepted_at_unix
        )


@attrs.frozen
class Suppression:
    """An address on the suppression list."""

    address: str  # normalised
    since_unix: float
    until_unix: float
    reply_code: int
    reply_text: str
    message_id: str


@attrs.frozen
class AcceptedAt:
    """One accept_log row, for the rate limits at start-up."""

    recipient: str
    caller: str
    accepted_at_unix: float


class IdempotencyHit(OutboxConflict):
    """The key was already used (within its window): the mail was not stored; ``entry`` says
    which mail the first call made."""

    def __init__(self, entry: KeyEntry, *, path: object = None) -> None:
        super().__init__(f"idempotency key already used for {entry.message_id}")
        self.entry = entry


class StoreRefusal(OutboxConflict):
    """A shared store refused the mail: ``reason`` is "recipient", "caller" (over a rate limit,
    counted across replicas) or "suppressed"; nothing was stored."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(f"refused by the shared store: {reason}")
        self.reason = reason
        self.retry_after_s = retry_after_s


@attrs.frozen
class Held:
    """What a store holds that the rules of one acceptance look at."""

    key: KeyEntry | None = None  # the live entry of the acceptance's key
    suppressed: bool = False  # its recipient is on the list at its time
    recipient_times: tuple[float, ...] = ()  # the recipient's accepts within its limit's period
    caller_times: tuple[float, ...] = ()  # the caller's, within the caller limit's period


def key_since(acceptance: Acceptance) -> float:
    """A key created after this is live for ``acceptance``."""
    return acceptance.accepted_at_unix - acceptance.key_window_s


def period_start(acceptance: Acceptance, limit: tuple[int, float] | None) -> float | None:
    """An accept after this counts for ``limit`` (None: the limit is off)."""
    return None if limit is None else acceptance.accepted_at_unix - limit[1]


def refusal(acceptance: Acceptance, held: Held) -> OutboxConflict | None:
    """Why the store refuses to add ``acceptance``'s mail (None: it may), from what it holds.

    Returns:
        ``IdempotencyHit`` for a live key, else ``StoreRefusal``: "suppressed" (only when the
        acceptance says ``check_suppressed``), "recipient" or "caller" (over the limit the
        acceptance names, with the seconds until one more may go).
    """
    if held.key is not None:
        return IdempotencyHit(held.key)
    if acceptance.check_suppressed and held.suppressed:
        return StoreRefusal("suppressed", 0.0)
    limits = (
        ("recipient", acceptance.recipient_limit, held.recipient_times),
        ("caller", acceptance.caller_limit, held.caller_times),
    )
    for reason, limit, times in limits:
        if limit is not None:
            wait = _retry_after_s(RateLimit(*limit), times, acceptance.accepted_at_unix)
            if wait > 0:
                return StoreRefusal(reason, wait)
    return None


def _retry_after_s(limit: RateLimit, times: Iterable[float], now: float) -> float:
    window = SlidingWindow(limit)
    for at in times:
        window.reserve("", at)
    return window.retry_after_s("", now)


def migrate_to_2(conn: sqlite3.Connection) -> None:
    """Add the admission tables (inside the caller's transaction)."""
    for statement in ADMISSION_SCHEMA:
        conn.execute(statement)


def check_columns(conn: sqlite3.Connection) -> str | None:
    """A problem with the admission tables' columns, or None."""
    for table, expected in ADMISSION_TABLES.items():
        columns = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
        if columns != expected:
            return f"table {table}: expected the columns {list(expected)}, got {list(columns)}"
    return None


def _find_key(conn: sqlite3.Connection, caller: str, key: str) -> KeyEntry | None:
    row = conn.execute(
        "SELECT fingerprint, message_id, created_at_unix FROM idempotency_key "
        "WHERE caller = ? AND key = ?",
        (caller, key),
    ).fetchone()
    return None if row is None else KeyEntry(caller, key, row[0], row[1], row[2])


def find_key(conn: sqlite3.Connection, caller: str, key: str, since_unix: float) -> KeyEntry | None:
    """The live entry of (caller, key): created after ``since_unix``."""
    entry = _find_key(conn, caller, key)
    return entry if entry is not None and entry.created_at_unix > since_unix else None


def check_acceptance(conn: sqlite3.Connection, acceptance: Acceptance) -> None:
    """Before the mail row is written: the rules of ``refusal``, on what the tables hold.

    Raises:
        IdempotencyHit: the key was used within its window.
        StoreRefusal: the suppression list or a limit the acceptance names refuses it.
    """
    a = acceptance
    recipient_start = period_start(a, a.recipient_limit)
    caller_start = period_start(a, a.caller_limit)
    held = Held(
        key=None if a.key is None else find_key(conn, a.caller, a.key, key_since(a)),
        suppressed=a.check_suppressed
        and conn.execute(
            "SELECT 1 FROM suppressed WHERE address = ? AND until_unix > ?",
            (a.recipient, a.accepted_at_unix),
        ).fetchone()
        is not None,
        recipient_times=_times(conn, "recipient", a.recipient, recipient_start),
        caller_times=_times(conn, "caller", a.caller, caller_start),
    )
    problem = refusal(a, held)
    if problem is not None:
        raise problem


def _times(
    conn: sqlite3.Connection, column: str, subject: str, start: float | None
) -> tuple[float, ...]:
    if start is None:
        return ()
    rows = conn.execute(
        f"SELECT accepted_at_unix FROM accept_log WHERE {column} = ? AND accepted_at_unix > ?",
        (subject, start),
    )
    return tuple(row[0] for row in rows)


def write_acceptance(conn: sqlite3.Connection, acceptance: Acceptance) -> None:
    """After the mail row: its key and its accept_log row, in the same transaction."""
    if acceptance.key is not None:
        conn.execute(
            "INSERT OR REPLACE INTO idempotency_key "
            "(caller, key, fingerprint, message_id, created_at_unix) VALUES (?, ?, ?, ?, ?)",
            (
                acceptance.caller,
                acceptance.key,
                acceptance.fingerprint,
                acceptance.message_id,
                acceptance.accepted_at_unix,
            ),
        )
    if acceptance.log_for_limits:
        conn.execute(
            "INSERT INTO accept_log (message_id, recipient, caller, accepted_at_unix) "
            "VALUES (?, ?, ?, ?)",
            (
                acceptance.message_id,
                acceptance.recipient,
                acceptance.caller,
                acceptance.accepted_at_unix,
            ),
        )


def withdraw_acceptance(conn: sqlite3.Connection, message_id: str) -> None:
    """The mail was withdrawn (its add was cancelled): its key and log row go too."""
    conn.execute("DELETE FROM idempotency_key WHERE message_id = ?", (message_id,))
    conn.execute("DELETE FROM accept_log WHERE message_id = ?", (message_id,))


def accepted_since(conn: sqlite3.Connection, since_unix: float) -> list[AcceptedAt]:
    rows = conn.execute(
        "SELECT recipient, caller, accepted_at_unix FROM accept_log "
        "WHERE accepted_at_unix > ? ORDER BY accepted_at_unix",
        (since_unix,),
    ).fetchall()
    return [AcceptedAt(*row) for row in rows]


def list_suppressed(conn: sqlite3.Connection, now_unix: float) -> list[Suppression]:
    rows = conn.execute(
        f"SELECT {', '.join(ADMISSION_TABLES['suppressed'])} FROM suppressed "
        "WHERE until_unix > ? ORDER BY address",
        (now_unix,),
    ).fetchall()
    return [Suppression(*row) for row in rows]


def write_suppression(conn: sqlite3.Connection, entry: Suppression) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO suppressed ({', '.join(ADMISSION_TABLES['suppressed'])}) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        attrs.astuple(entry),
    )


def delete_suppression(conn: sqlite3.Connection, address: str) -> bool:
    return conn.execute("DELETE FROM suppressed WHERE address = ?", (address,)).rowcount > 0


def prune_admission(
    conn: sqlite3.Connection, *, keys_before: float, log_before: float, now_unix: float
) -> int:
    """Delete expired keys, log rows and suppressions (in the caller's transaction)."""
    removed = conn.execute(
        "DELETE FROM idempotency_key WHERE created_at_unix <= ?", (keys_before,)
    ).rowcount
    removed += conn.execute(
        "DELETE FROM accept_log WHERE accepted_at_unix <= ?", (log_before,)
    ).rowcount
    removed += conn.execute("DELETE FROM suppressed WHERE until_unix <= ?", (now_unix,)).rowcount
    return int(removed)


@attrs.define
class MemoryAdmission:
    """The same tables for ``MemoryOutbox`` (nothing survives the process)."""

    keys: dict[tuple[str, str], KeyEntry] = attrs.field(factory=dict)
    log: dict[str, AcceptedAt] = attrs.field(factory=dict)
    suppressed: dict[str, Suppression] = attrs.field(factory=dict)

    def check(self, acceptance: Acceptance) -> None:
        """As ``check_acceptance``, on these dicts."""
        a = acceptance
        entry = self.suppressed.get(a.recipient)
        recipient_start = period_start(a, a.recipient_limit)
        caller_start = period_start(a, a.caller_limit)
        held = Held(
            key=None if a.key is None else self.find_key(a.caller, a.key, key_since(a)),
            suppressed=entry is not None and entry.until_unix > a.accepted_at_unix,
            recipient_times=self._times(lambda row: row.recipient == a.recipient, recipient_start),
            caller_times=self._times(lambda row: row.caller == a.caller, caller_start),
        )
        problem = refusal(a, held)
        if problem is not None:
            raise problem

    def _times(
        self, subject: Callable[[AcceptedAt], bool], start: float | None
    ) -> tuple[float, ...]:
        if start is None:
            return ()
        rows = self.log.values()
        return tuple(r.accepted_at_unix for r in rows if subject(r) and r.accepted_at_unix > start)

    def find_key(self, caller: str, key: str, since_unix: float) -> KeyEntry | None:
        entry = self.keys.get((caller, key))
        return entry if entry is not None and entry.created_at_unix > since_unix else None

    def write(self, acceptance: Acceptance) -> None:
        entry = acceptance.key_entry()
        if entry is not None:
            self.keys[(entry.caller, entry.key)] = entry
        if acceptance.log_for_limits:
            self.log[acceptance.message_id] = AcceptedAt(
                acceptance.recipient, acceptance.caller, acceptance.accepted_at_unix
            )

    def accepted_since(self, since_unix: float) -> list[AcceptedAt]:
        return sorted(
            (row for row in self.log.values() if row.accepted_at_unix > since_unix),
            key=lambda row: row.accepted_at_unix,
        )

    def list_suppressed(self, now_unix: float) -> list[Suppression]:
        return sorted(
            (s for s in self.suppressed.values() if s.until_unix > now_unix),
            key=lambda s: s.address,
        )

    def prune(self, *, keys_before: float, log_before: float, now_unix: float) -> int:
        old_keys = [k for k, e in self.keys.items() if e.created_at_unix <= keys_before]
        old_log = [m for m, row in self.log.items() if row.accepted_at_unix <= log_before]
        old_sup = [a for a, s in self.suppressed.items() if s.until_unix <= now_unix]
        for k in old_keys:
            del self.keys[k]
        for m in old_log:
            del self.log[m]
        for a in old_sup:
            del self.suppressed[a]
        return len(old_keys) + len(old_log) + len(old_sup)
