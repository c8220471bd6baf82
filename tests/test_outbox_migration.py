"""An outbox file written by an earlier version still opens: it is upgraded in place and keeps its
mail. Schema 1 (no admission tables) takes keys from then on; schema 2 (no stored trace context)
stores each new mail's traceparent, its old mail reading back with ""."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import attrs
import trio

from trio_mailer.core.mail_lifecycle import MailState
from trio_mailer.store import admission_tables
from trio_mailer.store.admission_tables import Acceptance, IdempotencyHit
from trio_mailer.store.outbox import APPLICATION_ID, SCHEMA_VERSION, SqliteOutbox

from .helpers import queued

# Schema 1 exactly as trio-mailer wrote it before the admission tables (frozen here on purpose).
_V1_SCHEMA = (
    """
    CREATE TABLE mail (
        message_id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL,
        envelope_from TEXT NOT NULL,
        envelope_to TEXT NOT NULL,
        data BLOB NOT NULL,
        accepted_at_unix REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'retry_wait', 'delivered',
            'failed', 'expired')),
        attempts INTEGER NOT NULL CHECK (attempts >= 0),
        last_reply_code INTEGER,
        last_reply_text TEXT NOT NULL,
        last_attempt_at_unix REAL,
        finished_at_unix REAL,
        possible_duplicate INTEGER NOT NULL CHECK (possible_duplicate IN (0, 1)),
        CHECK ((finished_at_unix IS NOT NULL) = (state IN ('delivered', 'failed', 'expired')))
    )
    """,
    "CREATE INDEX mail_unfinished ON mail (accepted_at_unix) WHERE finished_at_unix IS NULL",
    "CREATE INDEX mail_finished ON mail (finished_at_unix) WHERE finished_at_unix IS NOT NULL",
)


def write_v1_outbox(path: Path) -> None:
    record = queued(1)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in _V1_SCHEMA:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO mail VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, NULL, '', NULL, NULL, 0)",
            (
                record.message_id,
                record.kind,
                record.envelope_from,
                record.envelope_to,
                record.data,
                record.accepted_at_unix,
            ),
        )
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
        conn.execute("COMMIT")


def tables(path: Path) -> tuple[int, set[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
    return version, names


async def test_a_schema_1_file_is_upgraded_and_keeps_its_mail(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    write_v1_outbox(path)
    old = queued(1)
    with trio.fail_after(20):
        outbox = await SqliteOutbox.open(path)
        try:
            (resumed,) = await outbox.unfinished()
            new = queued(2)
            acceptance = Acceptance(
                new.message_id, "anonymous", "b@x.example", new.accepted_at_unix, "key", "fp", 60.0
            )
            await outbox.add(new, acceptance)
            try:
                await outbox.add(queued(3), acceptance)
            except IdempotencyHit as hit:
                assert hit.entry.message_id == new.message_id
            else:
                raise AssertionError("a used key was stored twice")
        finally:
            await outbox.aclose()
        version, names = tables(path)
        reopened = await SqliteOutbox.open(path)  # and the upgraded file opens as it is
        try:
            assert len(await reopened.unfinished()) == 2
        finally:
            await reopened.aclose()
    assert resumed == old and resumed.state is MailState.QUEUED
    assert version == SCHEMA_VERSION == 3
    assert {"mail", "idempotency_key", "accept_log", "suppressed"} <= names


def write_v2_outbox(path: Path) -> None:
    """A schema-2 file: schema 1 plus the admission tables, as that version upgraded it."""
    write_v1_outbox(path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        admission_tables.migrate_to_2(conn)
        conn.execute("PRAGMA user_version = 2")
        conn.execute("COMMIT")


async def test_a_schema_2_file_is_upgraded_to_store_the_trace_context(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    write_v2_outbox(path)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    new = attrs.evolve(queued(2), traceparent=traceparent)
    with trio.fail_after(20):
        outbox = await SqliteOutbox.open(path)
        try:
            await outbox.add(new)
        finally:
            await outbox.aclose()
        version, _ = tables(path)
        reopened = await SqliteOutbox.open(path)
        try:
            resumed = await reopened.unfinished()
        finally:
            await reopened.aclose()
    assert version == SCHEMA_VERSION
    assert resumed == [queued(1), new]
    assert [r.traceparent for r in resumed] == ["", traceparent]
