"""A skipped test says why: the reason of a ``pytest.skip`` raised inside an async test (the
PostgreSQL tests without a server) reaches the summary, not ``_pytest/python.py: Skipped``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .helpers import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_postgresql_skips_show_their_reason() -> None:
    """Without MAILER_TEST_POSTGRES_URL (and outside CI) tests/test_replicas.py skips, and each
    skip line of the summary names the reason and the line that raised it."""
    env = subprocess_env()  # no MAILER_* variables: no PostgreSQL server
    env.pop("CI", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_replicas.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output
    skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert skips, output
    for line in skips:
        assert "_pytest" not in line, line
        assert "no PostgreSQL server: run under .ci/postgres" in line, line
        assert "tests/postgres_helpers.py:" in line, line
