"""The benchmark (bench/run.py) runs to the end in its quick form and reports every section.

It asserts no speed: only that each section measured something, so the benchmark cannot rot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("egress", "overload", "ingress", "e2e")


def test_quick_benchmark_reports_every_section_with_positive_figures(tmp_path: Path) -> None:
    """`bench/run.py --quick --json` exits 0; every row and ratio of every section is positive."""
    report_path = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(report_path)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert set(report["sections"]) == set(SECTIONS)
    for name, section in report["sections"].items():
        assert section["rows"], f"{name}: no rows"
        assert section["ratios"], f"{name}: no ratios"
        for item in section["rows"] + section["ratios"]:
            assert item["samples"], f"{name}: {item.get('what') or item['name']}: no samples"
            assert all(v > 0 for v in item["samples"]), f"{name}: {item}"
    assert report["targets"], "no target was judged"
    assert all(isinstance(target["met"], bool) for target in report["targets"])
    assert "== targets" in done.stdout
