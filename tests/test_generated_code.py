"""The committed generated packages match what protos/generate.py makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent


def _files_under(root: Path, packages: set[PurePosixPath]) -> set[PurePosixPath]:
    return {
        PurePosixPath(path.relative_to(root).as_posix())
        for package in packages
        for path in (root / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    """Regenerating into a temporary folder gives byte-identical files, and no others."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    written = {
        PurePosixPath(Path(line).relative_to(tmp_path).as_posix())
        for line in result.stdout.splitlines()
    }
    # The generated packages are trio_mailer/<name>: every file below them must be generated.
    packages = {PurePosixPath(*path.parts[:2]) for path in written}
    assert packages == {PurePosixPath("trio_mailer/v1"), PurePosixPath("trio_mailer/grpc_std")}
    assert _files_under(tmp_path, packages) == written
    assert _files_under(ROOT, packages) == written, "run python protos/generate.py"
    stale = sorted(
        str(name)
        for name in written
        if (tmp_path / name).read_bytes() != (ROOT / name).read_bytes()
    )
    assert stale == [], f"stale against protos/: {stale}; run python protos/generate.py"


def test_protobuf_runtime_satisfies_the_generated_code() -> None:
    """The installed protobuf runtime loads the generated module (gencode version check)."""
    from google.protobuf import __version__ as runtime

    from trio_mailer.v1 import mailer_pb2

    assert mailer_pb2.DESCRIPTOR.package == "trio_mailer.v1"
    assert tuple(int(x) for x in runtime.split(".")[:2]) >= (7, 35)


def test_standard_protocols_keep_their_official_packages_in_our_modules() -> None:
    """Clients need the official package names; the files live under trio_mailer/grpc_std."""
    from trio_mailer.grpc_std.health.v1 import health_pb2
    from trio_mailer.grpc_std.reflection.v1 import reflection_pb2 as v1
    from trio_mailer.grpc_std.reflection.v1alpha import reflection_pb2 as v1alpha

    assert [(m.DESCRIPTOR.name, m.DESCRIPTOR.package) for m in (health_pb2, v1alpha, v1)] == [
        ("trio_mailer/grpc_std/health/v1/health.proto", "grpc.health.v1"),
        ("trio_mailer/grpc_std/reflection/v1alpha/reflection.proto", "grpc.reflection.v1alpha"),
        ("trio_mailer/grpc_std/reflection/v1/reflection.proto", "grpc.reflection.v1"),
    ]
