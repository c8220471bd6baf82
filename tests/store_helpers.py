"""Opening each kind of store for a test (memory, SQLite, PostgreSQL), closed on the way out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from trio_mailer.store.outbox import MemoryOutbox, Outbox, SqliteOutbox
from trio_mailer.store.postgres_outbox import PostgresOutbox

from .postgres_helpers import fresh_database

STORE_KINDS = ["sqlite", "memory", "postgres"]
TIMEOUT_S = 10


@contextlib.asynccontextmanager
async def opened_store(kind: str, directory: Path, url: str | None = None) -> AsyncIterator[Outbox]:
    """A store of ``kind``: SQLite in ``directory``; PostgreSQL on ``url``, or on a fresh
    database (skipped without a server, failed in CI)."""
    with contextlib.ExitStack() as stack:
        with trio.fail_after(TIMEOUT_S):
            box: Outbox
            if kind == "sqlite":
                box = await SqliteOutbox.open(directory / "outbox.sqlite3")
            elif kind == "postgres":
                box = await PostgresOutbox.open(url or stack.enter_context(fresh_database()))
            else:
                box = MemoryOutbox()
        try:
            yield box
        finally:
            with trio.fail_after(TIMEOUT_S):
                await box.aclose()
