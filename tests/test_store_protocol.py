"""One ``Store`` protocol, filled by every store: what differs between them is a member each
answers, so the composition root never asks which store it holds, and ``store/`` has no import
cycle."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

import trio_mailer
from trio_mailer.core.mail_lifecycle import MailState, StatusChange
from trio_mailer.store.outbox import MemoryOutbox, Outbox, SqliteOutbox
from trio_mailer.store.postgres_outbox import PostgresOutbox

from .helpers import T0, queued
from .store_helpers import STORE_KINDS, opened_store

PACKAGE = Path(trio_mailer.__file__).parent
TIMEOUT_S = 10
QUIET_S = 0.2  # long enough for a wait that should not end to show it does not


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    async with opened_store(request.param, tmp_path) as box:
        yield box


async def test_every_store_answers_every_member(store: Outbox) -> None:
    """Shared or not, where it is (no password), reachable, a background task that starts,
    and a claim (nothing to hand out on a new store)."""
    with trio.fail_after(TIMEOUT_S):
        assert store.shared is isinstance(store, PostgresOutbox)
        assert store.describe() and "password" not in store.describe()
        assert store.reachable()
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run, lambda message_id: None)
            assert await store.claim() == []
            nursery.cancel_scope.cancel()


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_every_store_keeps_the_accepting_calls_trace_context(store: Outbox) -> None:
    """The traceparent stored at acceptance reads back, after status changes too; a mail
    accepted without one reads back with ""."""
    traced = attrs.evolve(queued(1), traceparent=TRACEPARENT)
    plain = queued(2)
    with trio.fail_after(TIMEOUT_S):
        await store.add(traced)
        await store.add(plain)
        change = StatusChange(traced.message_id, MailState.SENDING, 1, None, "", T0 + 3)
        await store.record(change)
        await store.record(attrs.evolve(change, state=MailState.RETRY_WAIT, last_reply_code=451))
        got = await store.get(traced.message_id)
        unfinished = await store.unfinished()
    assert got is not None and got.traceparent == TRACEPARENT and got.attempts == 1
    assert [r.traceparent for r in unfinished] == [TRACEPARENT, ""]


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_a_single_process_store_hands_out_what_was_left_once_each(
    kind: str, tmp_path: Path
) -> None:
    """A pass: the mail unfinished when it began, oldest first, a page at a time, each once;
    not finished mail, nor the mail added during the pass. Then ``wait_for_work`` waits for
    good; a pass after the last one ended (the service restarted on the same store) begins
    again from the oldest."""
    left = [queued(n) for n in (3, 1, 4, 2, 5)]
    done = queued(6)
    path = tmp_path / "outbox.sqlite3"
    with trio.fail_after(TIMEOUT_S):
        box: Outbox = await SqliteOutbox.open(path) if kind == "sqlite" else MemoryOutbox()
        for record in [*left, done]:
            await box.add(record)
        await box.record(StatusChange(done.message_id, MailState.SENDING, 1, None, "", T0 + 7))
        await box.record(StatusChange(done.message_id, MailState.DELIVERED, 1, 250, "ok", T0 + 8))
        if kind == "sqlite":
            await box.aclose()
            box = await SqliteOutbox.open(path)
        try:
            page = await box.claim(2)
            await box.add(queued(0))  # added during the pass: the oldest, and not claimed
            claimed = page + await box.claim(2) + await box.claim(2)
            assert [r.message_id for r in claimed] == [queued(n).message_id for n in range(1, 6)]
            assert await box.claim(2) == []
            with trio.move_on_after(QUIET_S) as quiet:
                await box.wait_for_work()
            assert quiet.cancelled_caught
            again = await box.claim(10)
            assert [r.message_id for r in again] == [queued(n).message_id for n in range(6)]
        finally:
            await box.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await box.claim()


def test_the_composition_root_never_names_a_store() -> None:
    """app.py holds an ``Outbox`` and asks it; it never asks which one (isinstance)."""
    names = {
        node.id if isinstance(node, ast.Name) else node.attr
        for node in ast.walk(ast.parse((PACKAGE / "app.py").read_text()))
        if isinstance(node, ast.Name | ast.Attribute)
    }
    assert names & {"PostgresOutbox", "SqliteOutbox", "MemoryOutbox"} == set()


def test_the_store_modules_import_each_other_without_a_cycle() -> None:
    """outbox.py opens every store; the PostgreSQL outbox needs only the protocol's module."""
    modules = {path.stem: path for path in (PACKAGE / "store").glob("*.py")}
    imports: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "trio_mailer.store":
                    found |= {alias.name for alias in node.names}
                elif node.module.startswith("trio_mailer.store."):
                    found.add(node.module.rsplit(".", 1)[1])
        imports[name] = found & modules.keys()

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for step in imports[start] - seen:
            if step == target or reaches(step, target, seen | {step}):
                return True
        return False

    assert [name for name in imports if reaches(name, name, set())] == []
    assert "outbox" not in imports["postgres_outbox"]
