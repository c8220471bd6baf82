"""Every use of psycopg's private parts, in one place (the canary and a stalled network's
test: tests/test_replica_faults.py).

A stalled network to the database must not hang a call. The server's ``statement_timeout``
bounds a slow statement, and the kernel's ``tcp_user_timeout`` and keepalives a dead peer; but
neither notices a path that still acknowledges every packet and answers nothing (a frozen proxy,
a pooler or a load balancer that hangs): psycopg would wait for the answer forever, in a worker
thread that trio cannot cancel, holding a pooled connection.

``bounded_connection_class`` returns a ``psycopg.Connection`` whose every wait for the server
(the ``Connection.wait`` that ``execute``, ``commit`` and the pool's checks all go through) ends
after ``answer_timeout_s``: the connection is closed (the pool replaces it) and ``NoAnswer``
raised. A wait given its own timeout (``notifies(timeout=...)``) keeps it. psycopg's
``Connection.wait`` takes a ``timeout`` and raises its internal ``errors._WaitTimeout`` when it
runs out; when an upgrade moves either, the canary test fails naming it: adapt this module
(nothing else uses psycopg's private names).

Imported only with ``MAILER_OUTBOX=postgresql://``: psycopg needs libpq.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.abc import PQGen

RV = TypeVar("RV")

# The private names used here, for the canary: (object, attribute, what it is).
PRIVATE_NAMES = (
    (errors, "_WaitTimeout", "what Connection.wait raises when its timeout runs out"),
    (psycopg.Connection, "wait", "the wait for the server that every operation goes through"),
)


class NoAnswer(psycopg.OperationalError):
    """The server did not answer within the bound: the network (or something on it) stalls."""


@functools.cache
def bounded_connection_class(answer_timeout_s: float) -> type[psycopg.Connection[Any]]:
    """A ``psycopg.Connection`` class whose waits for the server end after ``answer_timeout_s``."""

    class BoundedConnection(psycopg.Connection[Any]):
        def wait(
            self, gen: PQGen[RV], interval: float | None = None, timeout: float | None = None
        ) -> RV:
            pace = {} if interval is None else {"interval": interval}
            if timeout is not None:
                return super().wait(gen, timeout=timeout, **pace)
            try:
                return super().wait(gen, timeout=answer_timeout_s, **pace)
            except errors._WaitTimeout:
                # Mid-statement: the connection cannot be used again. Closing it only writes
                # to the local socket buffer, so it cannot hang on the stalled path.
                self.close()
                raise NoAnswer(
                    f"no answer from the database within {answer_timeout_s:g}s (the network "
                    "stalls); the connection is dropped"
                ) from None

    return BoundedConnection


def wait_takes_a_timeout() -> bool:
    """For the canary: ``Connection.wait`` still has the ``timeout`` parameter used here."""
    return "timeout" in inspect.signature(psycopg.Connection.wait).parameters
