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

Runs in the outbox's worker thread only (plain ``sqlite3``).
"""

from __future__ import annotations

import sqlite3

import attrs

from trio_mailer.core.errors import OutboxConflict

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
    """Before the mail row is written: refuse a key that is already live.

    Raises:
        IdempotencyHit: the key was used within its window.
    """
    if acceptance.key is None:
        return
    entry = find_key(
        conn,
        acceptance.caller,
        acceptance.key,
        acceptance.accepted_at_unix - acceptance.key_window_s,
    )
    if entry is not None:
        raise IdempotencyHit(entry)


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
        if acceptance.key is None:
            return
        entry = self.find_key(
            acceptance.caller,
            acceptance.key,
            acceptance.accepted_at_unix - acceptance.key_window_s,
        )
        if entry is not None:
            raise IdempotencyHit(entry)

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
