"""psycopg is the optional ``postgres`` extra: a ``postgresql://`` outbox without it is a clear
start-up error naming the extra, and the packaging says so.

Pure (no test helpers, no I/O library loaded here), so ``tools/mutate.py`` runs it for config."""

from __future__ import annotations

import importlib.abc
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from trio_mailer.core.config import ConfigError, DatabaseUrl, load_config

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-not-for-logs"
URL = f"postgresql://mailer:{PASSWORD}@127.0.0.1:1/mail"
NEEDS_EXTRA = (
    "MAILER_OUTBOX=postgresql://...: needs the PostgreSQL extra: "
    "pip install 'trio-mailer[postgres]'"
)
ENV = {
    "MAILER_REMOTE_HOST": "127.0.0.1:1",
    "MAILER_FROM": "noreply@example.com",
    "MAILER_OUTBOX": URL,
}

# Run first in the child interpreter: psycopg and psycopg_pool cannot be imported, exactly as
# when the extra is not installed (the import system's own finder refuses them).
BLOCK_THE_EXTRA = """
import sys

class NoPostgresExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("psycopg", "psycopg_pool"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPostgresExtra())
"""


def run_without_the_extra(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_THE_EXTRA + code],
        cwd=ROOT,
        env={**env, **ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("module", ["psycopg", "psycopg_pool"])
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_either_missing_module_is_the_missing_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, scheme: str
) -> None:
    """Without psycopg or without psycopg_pool (None in sys.modules: import refused), the
    config names the extra, with the scheme given and without the rest of the URL."""
    monkeypatch.setitem(sys.modules, module, None)
    env = {**ENV, "MAILER_OUTBOX": URL.replace("postgresql", scheme, 1), "HOME": "/home/mailer"}
    with pytest.raises(ConfigError) as refused:
        load_config(env)
    assert refused.value.problems == [NEEDS_EXTRA.replace("postgresql", scheme, 1)]


class RefuseTheExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in ("psycopg", "psycopg_pool"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_a_finder_that_refuses_the_extra_is_the_missing_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An import system that refuses psycopg (a finder raising ModuleNotFoundError, as in the
    child interpreters below) counts as the extra missing too."""
    for name in ("psycopg", "psycopg_pool"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [RefuseTheExtra(), *sys.meta_path])
    with pytest.raises(ConfigError) as refused:
        load_config({**ENV, "HOME": "/home/mailer"})
    assert refused.value.problems == [NEEDS_EXTRA]


def test_with_the_extra_a_postgresql_outbox_is_configured() -> None:
    """Installed (as in the test environment), the URL is the outbox."""
    assert load_config(ENV).outbox_url == DatabaseUrl(URL)


def test_psycopg_is_the_postgres_extra_and_the_tests_install_it() -> None:
    """pyproject: psycopg and psycopg-pool only in the `postgres` extra; `test` pulls it in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [dep for dep in project["dependencies"] if dep.startswith("psycopg")]
    extras = project["optional-dependencies"]
    assert sorted(dep.split(">")[0] for dep in extras["postgres"]) == ["psycopg", "psycopg-pool"]
    assert "trio-mailer[postgres]" in extras["test"]


def test_the_blocker_hides_psycopg() -> None:
    """The simulation holds: in the child, importing psycopg fails as a missing package does."""
    result = run_without_the_extra("import psycopg")
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'psycopg'" in result.stderr


def test_serve_without_the_extra_names_it_and_exits_2() -> None:
    """`trio-mailer serve` with a postgresql:// outbox and no psycopg: exit 2, one problem line
    naming the extra, no traceback, and the URL's password nowhere."""
    result = run_without_the_extra("from trio_mailer.cli import main; sys.exit(main(['serve']))")
    assert result.returncode == 2, result.stderr
    assert "trio-mailer: invalid configuration:" in result.stderr
    assert f"  - {NEEDS_EXTRA}\n" in result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
