"""The benchmark (bench/run.py) runs to the end in its quick form and reports every section.

It asserts no speed: only that each section measured something, so the benchmark cannot rot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "egress",
    "overload",
    "ingress",
    "e2e",
    "attacks",
    "admission",
    "memory",
    "compose",
    "cpu",
)
TIMEOUT_S = 360  # a loaded 2-core machine; quick takes well under a minute when idle
# Counts that are rightly zero: under the flood, paced calls mostly take the places the senders
# free (MAILER_REFUSALS_PER_S), so few or none hear "queue full".
MAY_BE_ZERO = {("overload", "flood refused (queue full)")}


def test_quick_benchmark_reports_every_section_with_positive_figures(tmp_path: Path) -> None:
    """`bench/run.py --quick --json` exits 0; every row and ratio of every section is positive
    (or, for a count in MAY_BE_ZERO, not negative)."""
    report_path = tmp_path / "bench.json"
    # Its own process group: on a timeout the servers it started go down with it.
    bench = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(report_path)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(bench.pid, signal.SIGKILL)
        stdout, stderr = bench.communicate()
        pytest.fail(f"bench/run.py --quick took over {TIMEOUT_S}s:\n{stdout}{stderr}")
    assert bench.returncode == 0, stdout + stderr
    report = json.loads(report_path.read_text())
    assert set(report["sections"]) == set(SECTIONS)  # "cpu" combines egress, ingress and e2e
    for name, section in report["sections"].items():
        assert section["rows"], f"{name}: no rows"
        assert section["ratios"], f"{name}: no ratios"
        for item in section["rows"] + section["ratios"]:
            assert item["samples"], f"{name}: {item.get('what') or item['name']}: no samples"
            if (name, item.get("what")) in MAY_BE_ZERO:
                assert all(v >= 0 for v in item["samples"]), f"{name}: {item}"
            else:
                assert all(v > 0 for v in item["samples"]), f"{name}: {item}"
    assert report["targets"], "no target was judged"
    assert all(isinstance(target["met"], bool) for target in report["targets"])
    assert "== targets" in stdout
