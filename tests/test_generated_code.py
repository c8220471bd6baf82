"""The committed trio_mailer/v1 matches what protos/generate.py makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trio_mailer" / "v1"


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    """Regenerating into a temporary folder gives byte-identical files, and no others."""
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = tmp_path / "trio_mailer" / "v1"
    fresh_files = sorted(p.name for p in fresh.iterdir())
    committed = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert fresh_files == committed
    stale = [
        name for name in fresh_files if (fresh / name).read_bytes() != (PACKAGE / name).read_bytes()
    ]
    assert stale == [], f"stale against protos/: {stale}; run python protos/generate.py"


def test_protobuf_runtime_satisfies_the_generated_code() -> None:
    """The installed protobuf runtime loads the generated module (gencode version check)."""
    from google.protobuf import __version__ as runtime

    from trio_mailer.v1 import mailer_pb2

    assert mailer_pb2.DESCRIPTOR.package == "trio_mailer.v1"
    assert tuple(int(x) for x in runtime.split(".")[:2]) >= (7, 35)
