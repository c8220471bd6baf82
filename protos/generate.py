"""Regenerate the generated packages from ``protos/``: ``python protos/generate.py``.

Three packages are generated here:

- ``trio_mailer/v1``: our API (messages and purerpc stubs), plus a copy of ``mailer.proto`` so
  that the wheel ships it for teams that generate their own stubs.
- ``trio_mailer/grpc_std``: our copies of the standard gRPC health and reflection protocols. They
  keep the official package names (``grpc.health.v1``, ...) because clients need them, so their
  symbols are the same as grpcio-health-checking's / grpcio-reflection's: each module registers
  its file in a descriptor pool of its own instead of protobuf's default pool, and the stock
  modules can be imported beside ours in one process.
- ``client/trio_mailer_client/_generated``: the messages the client package needs (no stubs:
  it calls grpcio by method path), and ``mailer.proto`` again for the client wheel. It registers
  the same file, with the same bytes, in the default pool as ``trio_mailer/v1`` does, which
  protobuf accepts, so the server and the client load in one process.
 The output is committed and never edited by hand; ``tests/test_generated_code.py``
runs this script into a temporary folder and fails when the committed files differ. It needs the
test extras (``grpcio-tools`` at the pinned version, and purerpc's ``protoc-gen-purerpc`` plugin).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path, PurePosixPath

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
PROTO_FILES = [
    "trio_mailer/v1/mailer.proto",
    "trio_mailer/grpc_std/health/v1/health.proto",
    "trio_mailer/grpc_std/reflection/v1alpha/reflection.proto",
    "trio_mailer/grpc_std/reflection/v1/reflection.proto",
]
# The top-level generated packages, relative to the output root: everything below them is
# written by this script (tests/test_generated_code.py compares them file by file).
GENERATED_PACKAGES = [
    "trio_mailer/v1",
    "trio_mailer/grpc_std",
    "client/trio_mailer_client/_generated",
]
MAILER_PROTO = "trio_mailer/v1/mailer.proto"
CLIENT_PACKAGE = "client/trio_mailer_client/_generated"
# The client carries only the messages, moved out of protoc's trio_mailer/v1 layout.
CLIENT_FILES = ["mailer_pb2.py", "mailer_pb2.pyi"]
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def _purerpc_plugin() -> str:
    beside_python = Path(sys.executable).parent / "protoc-gen-purerpc"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("protoc-gen-purerpc")
    if found is None:
        raise SystemExit("protoc-gen-purerpc not found: pip install -e '.[test]' first")
    return found


def _package_dirs() -> list[PurePosixPath]:
    """Every generated package folder, from each top-level package down to each proto's own."""
    dirs: set[PurePosixPath] = set()
    for name in PROTO_FILES:
        folder = PurePosixPath(name).parent
        for top in map(PurePosixPath, GENERATED_PACKAGES):
            if folder == top or top in folder.parents:
                dirs.update(p for p in [folder, *folder.parents] if p == top or top in p.parents)
    return sorted(dirs)


def _private_pools(folder: Path) -> None:
    """Make each standard-protocol module register its file in a pool of its own."""
    for module in sorted(folder.rglob("*_pb2.py")):
        text = module.read_text()
        if text.count(DEFAULT_POOL) != 1:
            raise SystemExit(f"{module}: expected one {DEFAULT_POOL!r}; protoc's output changed")
        module.write_text(text.replace(DEFAULT_POOL, PRIVATE_POOL))


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under ``out_dir``; return the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTOS}",
        # The well-known types (google/protobuf/timestamp.proto) ship with grpcio-tools.
        f"--proto_path={Path(protoc.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-purerpc={_purerpc_plugin()}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--purerpc_out={out_dir}",
        *(str(PROTOS / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    _private_pools(out_dir / "trio_mailer/grpc_std")
    shutil.copyfile(PROTOS / MAILER_PROTO, out_dir / MAILER_PROTO)
    client = out_dir / CLIENT_PACKAGE
    client.mkdir(parents=True, exist_ok=True)
    for name in CLIENT_FILES:
        shutil.copyfile(out_dir / "trio_mailer/v1" / name, client / name)
    shutil.copyfile(PROTOS / MAILER_PROTO, client / "mailer.proto")
    (client / "__init__.py").write_text(
        f'"""Generated from protos/{MAILER_PROTO} by protos/generate.py. Do not edit."""\n'
    )
    for folder in _package_dirs():
        (out_dir / folder / "__init__.py").write_text(
            f'"""Generated from protos/{folder} by protos/generate.py. Do not edit."""\n'
        )
    return sorted(
        path
        for top in GENERATED_PACKAGES
        for path in (out_dir / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
