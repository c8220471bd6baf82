"""Regenerate ``trio_mailer/v1`` from ``protos/``: ``python protos/generate.py``.

The output is committed and never edited by hand; ``tests/test_generated_code.py`` runs this
script into a temporary folder and fails when the committed files differ. It needs the test
extras (``grpcio-tools`` at the pinned version, and purerpc's ``protoc-gen-purerpc`` plugin).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
PROTO_FILES = ["trio_mailer/v1/mailer.proto"]
INIT_TEXT = '"""Generated from protos/trio_mailer/v1 by protos/generate.py. Do not edit."""\n'


def _purerpc_plugin() -> str:
    beside_python = Path(sys.executable).parent / "protoc-gen-purerpc"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("protoc-gen-purerpc")
    if found is None:
        raise SystemExit("protoc-gen-purerpc not found: pip install -e '.[test]' first")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under ``out_dir``; return the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTOS}",
        f"--plugin=protoc-gen-purerpc={_purerpc_plugin()}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--purerpc_out={out_dir}",
        *(str(PROTOS / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out_dir / "trio_mailer" / "v1"
    (package / "__init__.py").write_text(INIT_TEXT)
    return sorted(package.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
