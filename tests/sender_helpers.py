"""A sender for the tests that drive one directly, with every collaborator the app gives it."""

from __future__ import annotations

from typing import Any

from trio_mailer.delivery.sender import Sender
from trio_mailer.delivery.session_keeper import Connector
from trio_mailer.metrics import Metrics
from trio_mailer.store.outbox import MemoryOutbox
from trio_mailer.store.status_board import StatusBoard


def build_sender(connect: Connector, **parts: Any) -> Sender:
    """A ``Sender`` on ``connect``; the collaborators ``parts`` does not give are fresh: a status
    board (which stores nothing about a mail it does not track), a memory outbox, metrics, and
    an ``on_finished`` that ignores the outcome."""
    parts.setdefault("board", StatusBoard())
    parts.setdefault("outbox", MemoryOutbox())
    parts.setdefault("metrics", Metrics())
    parts.setdefault("on_finished", lambda finished: None)
    return Sender(connect=connect, **parts)
