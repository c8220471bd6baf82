"""A fresh PostgreSQL database per test, on the server `.ci/postgres` starts.

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

import pytest

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
