"""The docs run: every Python block of README.md and client/README.md, against a ``dev`` service.

A block is run as a script (``python block.py``), or, when it defines ``test_*`` functions, as
a test module under pytest with pytest-trio's ``trio_mode`` (as the README tells its readers to
configure it). Blocks address the service at ``127.0.0.1:20100``, ``trio-mailer dev``'s
default; the test points them at the port its own ``dev`` got. A block that is a fragment on
purpose stands after a ``<!-- fragment: why -->`` line and is skipped by name, with the reason.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from trio_mailer.core.config import CLIENT_VARIABLES, SETTINGS
from trio_mailer.core.load_shedding import REFUSAL_WAIT_S, REFUSALS_PER_S

from .helpers import LISTENING, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "client/README.md")
DEV_ADDRESS = "127.0.0.1:20100"  # trio-mailer dev's default, as the blocks write it
BLOCK = re.compile(r"(?:<!-- fragment: (?P<why>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
# Variables the tests and CI read; not the service's, and never its documentation's business
# beyond the development notes.
TEST_VARIABLES = frozenset({"MAILER_TEST_POSTGRES_URL"})
MISSPELT_ON_PURPOSE = frozenset({"MAILER_FORM"})  # the README's example of the start-up warning


@attrs.frozen
class Block:
    name: str  # "README.md:229", the fence's line
    code: str
    fragment: str | None  # why it does not run on its own, if it is a fragment on purpose


def python_blocks() -> list[Block]:
    blocks = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            blocks.append(Block(f"{doc}:{line}", match["code"], match["why"]))
    return blocks


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def dev_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``trio-mailer dev`` on free ports, in a directory of its own; its gRPC address."""
    cwd = tmp_path_factory.mktemp("dev")
    log = (cwd / "dev.log").open("w+b")
    env = subprocess_env(MAILER_SERVE_PORT="0", MAILER_METRICS_PORT="0", MAILER_RECIPIENT_LIMIT="0")
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_mailer", "dev", "--outbox", "outbox", "--inbox-port", "off"],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while (match := LISTENING.search((cwd / "dev.log").read_bytes())) is None:
            assert process.poll() is None, (cwd / "dev.log").read_text()
            assert time.monotonic() < deadline, (cwd / "dev.log").read_text()
            time.sleep(0.05)
        yield f"127.0.0.1:{int(match.group(1))}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_the_block_runs(block: Block, dev_address: str, tmp_path: Path) -> None:
    """The block, as pasted, exits 0 against the dev service (a fragment is skipped)."""
    if block.fragment is not None:
        pytest.skip(f"{block.name} is a fragment on purpose: {block.fragment}")
    code = block.code.replace(DEV_ADDRESS, dev_address)
    if re.search(r"^(async )?def test_", code, re.M):
        path = tmp_path / "test_block.py"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["-o", "trio_mode=true", "--rootdir", str(tmp_path), str(path)]
    else:
        path = tmp_path / "block.py"
        command = [sys.executable, str(path)]
    path.write_text(code, encoding="utf-8")
    result = subprocess.run(
        command, cwd=tmp_path, env=subprocess_env(), capture_output=True, timeout=120, check=False
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"{block.name}:\n{code}\n---\n{output}"


def test_each_document_has_python_blocks_and_every_fragment_says_why() -> None:
    """The extraction finds the blocks (a changed fence would silently run nothing)."""
    assert {block.name.split(":")[0] for block in BLOCKS} == set(DOCS)
    assert all(block.fragment is None or block.fragment.strip() for block in BLOCKS)


def test_every_mailer_variable_the_docs_name_exists() -> None:
    """Each ``MAILER_*`` name in the READMEs and the client package's docstrings is a setting,
    the client's ``MAILER_TOKEN``, or a test variable (the client once named a
    ``MAILER_TOKEN_FILE`` that never existed)."""
    known = {setting.env for setting in SETTINGS} | set(CLIENT_VARIABLES)
    known |= TEST_VARIABLES | MISSPELT_ON_PURPOSE
    texts = [ROOT / doc for doc in DOCS] + sorted((ROOT / "client/trio_mailer_client").glob("*.py"))
    named = {
        (path.name, name)
        for path in texts
        for name in re.findall(r"MAILER_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8"))
    }
    assert sorted(pair for pair in named if pair[1] not in known) == []


def test_the_readme_says_how_long_a_queue_full_call_waits() -> None:
    """Queue-full refusals are paced (core/load_shedding.py): the README says a call waits its
    turn, up to MAILER_REFUSAL_WAIT_S, and nowhere that it is refused at once."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "never waits" not in readme
    for line in readme.splitlines():
        if "queue full" in line or "queue fills" in line:
            assert "at once" not in line.replace("(0: refuse at once)", ""), line
    [row] = [line for line in readme.splitlines() if line.startswith("| queue full |")]
    assert "MAILER_REFUSALS_PER_S" in row and "MAILER_REFUSAL_WAIT_S" in row, row
    assert f"{REFUSALS_PER_S:g}/s" in row and f"{REFUSAL_WAIT_S:g} s" in row, row


def test_the_readme_says_autojump_clock_needs_pytest_trio() -> None:
    """The FakeMailer example uses ``autojump_clock``: the README says where it comes from."""
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        if "autojump_clock" in text:
            assert re.search(r"autojump_clock.{0,200}pytest-trio", text, re.S), doc
