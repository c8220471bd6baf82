"""A fresh PostgreSQL database per test, on the server `.ci/postgres` starts; a proxy to it
that can stall.

``MAILER_TEST_POSTGRES_URL`` names a database on that server (any will do: each test gets one
of its own, dropped afterwards). Unset, the PostgreSQL tests skip locally, and FAIL in CI
(``CI=true``): a missing server there is a broken CI, never a silent skip. Locally:

    .ci/postgres .venv/bin/python -m pytest tests/test_outbox.py
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import attrs
import pytest
import trio

URL_VARIABLE = "MAILER_TEST_POSTGRES_URL"


def server_url() -> str:
    """The test server's URL, or skip (fail in CI) when there is none."""
    url = os.environ.get(URL_VARIABLE, "")
    if url:
        return url
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{URL_VARIABLE} is not set in CI: .ci/run must start a PostgreSQL server")
    pytest.skip(f"no PostgreSQL server: run under .ci/postgres (sets {URL_VARIABLE})")


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the test server (its URL); dropped at exit."""
    import psycopg

    url = server_url()
    name = f"mailer_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def via_port(url: str, port: int) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port`` (the database and the
    rest kept)."""
    scheme, _, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    user, at, _ = authority.rpartition("@")
    return f"{scheme}://{user}{at}127.0.0.1:{port}{slash}{tail}"


def server_port(url: str) -> int:
    """The port of the test server's ``url`` (a TCP one, as ``.ci/postgres`` exports)."""
    authority = url.partition("://")[2].partition("/")[0]
    return int(authority.rpartition("@")[2].rpartition(":")[2])


@attrs.define
class StallingProxy:
    """A loopback TCP proxy to the PostgreSQL server that can be frozen.

    Frozen, it forwards nothing either way and closes nothing: connections stay open, new ones
    are accepted and then left waiting, bytes already sent are acknowledged by the kernel and
    held. That is a network path that stalls (a hung pooler, load balancer or NAT), which
    neither the server's statement timeout nor the kernel's TCP timeouts can see.
    """

    upstream_port: int
    _flowing: trio.Event = attrs.Factory(trio.Event)
    accepted: int = 0

    def __attrs_post_init__(self) -> None:
        self._flowing.set()

    def freeze(self) -> None:
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port (reported through ``task_status``) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self._forward, listeners))
            task_status.started(port)

    async def _forward(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client:
            await self._flowing.wait()
            try:
                server = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            except OSError:
                return  # the server is down: the client sees the connection close
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await self._flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()  # one side closed: close the other
