"""Every log call that names a mail does so with its Message-ID, a string, and the JSON format
writes each such line (``MAILER_LOG_FORMAT=json``) instead of losing it to a formatter error.

The bug this pins (issue 23): the PostgreSQL outbox logged ``extra={"message_id": <MailRecord>}``
for a refused status change, and the JSON formatter raised: the ERROR line meant to flag a
sender bug was lost. Three checks: every call site in ``trio_mailer`` that passes ``extra=``
passes a Message-ID (the source, read once); the stores' and the board's call sites run under
the JSON formatter and write the id; a formatter given anything else still writes the line.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

import trio_mailer
from trio_mailer.core.mail_lifecycle import MailState, StatusChange
from trio_mailer.logs import JsonFormatter
from trio_mailer.store.outbox import Outbox
from trio_mailer.store.status_board import StatusBoard

from .helpers import T0, queued
from .store_helpers import STORE_KINDS, opened_store

PACKAGE = Path(trio_mailer.__file__).parent
GENERATED = ("v1", "grpc_std")
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
TIMEOUT_S = 10


def extra_call_sites() -> Iterator[tuple[str, ast.Call]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in GENERATED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and any(k.arg == "extra" for k in node.keywords)
            ):
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node


def names_a_message_id(value: ast.expr) -> bool:
    """``message_id``, or ``<anything>.message_id``: the id itself, not the mail."""
    if isinstance(value, ast.Name):
        return value.id == "message_id"
    return isinstance(value, ast.Attribute) and value.attr == "message_id"


def test_every_logged_extra_is_a_message_id() -> None:
    """Each ``log.*(..., extra={...})`` in the package: a dict of "message_id" only, whose value
    is a Message-ID (what ``JsonFormatter`` writes), never the record or mail it belongs to."""
    sites = list(extra_call_sites())
    assert len(sites) >= 10  # the scan finds the call sites (the sender's, the stores', app's)
    problems = []
    for where, call in sites:
        [extra] = [k.value for k in call.keywords if k.arg == "extra"]
        if not isinstance(extra, ast.Dict) or [
            k.value if isinstance(k, ast.Constant) else None for k in extra.keys
        ] != ["message_id"]:
            problems.append(f"{where}: extra is not {{'message_id': ...}}")
        elif not names_a_message_id(extra.values[0]):
            problems.append(f"{where}: message_id is {ast.unparse(extra.values[0])}")
    assert problems == []


class JsonLines(logging.Handler):
    """Formats every record as ``MAILER_LOG_FORMAT=json`` would, and fails on any error."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # what emit raised: the test fails instead of a line printed to stderr


@contextlib.contextmanager
def json_logging() -> Iterator[JsonLines]:
    handler = JsonLines()
    logger = logging.getLogger("trio_mailer")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    async with opened_store(request.param, tmp_path) as box:
        yield box


def attempts_going_down(message_id: str) -> list[StatusChange]:
    """Two changes, the second refused by the lifecycle table: logged at ERROR with the id."""
    return [
        StatusChange(message_id, MailState.SENDING, 2, None, "", T0 + 1),
        StatusChange(message_id, MailState.RETRY_WAIT, 1, 451, "4.0.0 later", T0 + 2),
    ]


async def test_a_store_logs_a_refused_change_with_its_message_id_in_json(store: Outbox) -> None:
    record = queued(1)
    with trio.fail_after(TIMEOUT_S), json_logging() as handler:
        await store.add(record)
        for change in attempts_going_down(record.message_id):
            await store.record(change)
    [error] = [line for line in handler.lines if line["level"] == "ERROR"]
    assert error["message_id"] == record.message_id == "<1@x.example>"


def test_the_board_logs_a_refused_change_with_its_message_id_in_json() -> None:
    board = StatusBoard()
    record = queued(2)
    board.track(record)
    with json_logging() as handler:
        for change in attempts_going_down(record.message_id):
            board.change(change)
    [error] = [line for line in handler.lines if line["level"] == "ERROR"]
    assert error["message_id"] == record.message_id


def test_a_message_id_that_is_not_a_string_is_named_by_its_type_not_lost() -> None:
    """A caller's bug still gets its line; the value (a whole mail, say) is never written."""
    record = logging.LogRecord("trio_mailer.x", logging.ERROR, __file__, 1, "oops %s", (1,), None)
    record.message_id = queued(3)
    line = json.loads(JsonFormatter().format(record))
    assert line["message_id"] == "<MailRecord>"
    assert line["message"] == "oops 1"
    assert "code 000003" not in json.dumps(line)
