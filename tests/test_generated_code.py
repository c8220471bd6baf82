"""The committed generated packages match what protos/generate.py makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
GENERATED_PACKAGES = [
    "trio_mailer/v1",
    "trio_mailer/grpc_std",
    "client/trio_mailer_client/_generated",
]


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
    # Every file below the generated packages must be generated.
    packages = set(map(PurePosixPath, GENERATED_PACKAGES))
    assert {next(p for p in packages if p in path.parents) for path in written} == packages
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


def test_stock_health_and_reflection_modules_load_beside_ours_in_one_process() -> None:
    """grpcio-health-checking's and grpcio-reflection's modules import beside ours, and the
    messages are wire-compatible both ways."""
    from grpc_health.v1 import health_pb2 as stock_health
    from grpc_reflection.v1alpha import reflection_pb2 as stock_v1alpha

    from trio_mailer.grpc_std.health.v1 import health_pb2
    from trio_mailer.grpc_std.reflection.v1alpha import reflection_pb2 as v1alpha

    ours = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    theirs = stock_health.HealthCheckResponse.FromString(ours.SerializeToString())
    assert theirs.status == stock_health.HealthCheckResponse.SERVING
    request = stock_v1alpha.ServerReflectionRequest(list_services="")
    assert v1alpha.ServerReflectionRequest.FromString(request.SerializeToString()).HasField(
        "list_services"
    )


def test_client_and_server_messages_load_in_one_process() -> None:
    """The client package's copy of mailer.proto registers the same bytes as the server's."""
    from trio_mailer.v1 import mailer_pb2
    from trio_mailer_client._generated import mailer_pb2 as client_pb2

    assert client_pb2.DESCRIPTOR.serialized_pb == mailer_pb2.DESCRIPTOR.serialized_pb
    assert (ROOT / "client/trio_mailer_client/_generated/mailer.proto").read_bytes() == (
        ROOT / "protos/trio_mailer/v1/mailer.proto"
    ).read_bytes()
