"""The wheel carries the templates, so ``pip install .`` works from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .helpers import build_client_wheel, build_wheel

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_package_templates_and_generated_code(tmp_path: Path) -> None:
    """Building the wheel puts templates/ at trio_mailer/templates/ beside the code."""
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "trio_mailer/templates/mail/password.msg",
        "trio_mailer/templates/mail/retrieve.msg",
        "trio_mailer/v1/mailer_pb2.py",
        "trio_mailer/v1/mailer_grpc.py",
        "trio_mailer/cli.py",
    } <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "trio-mailer = trio_mailer.cli:main_entry" in (
        zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_installed_wheel_finds_its_templates_from_any_directory(tmp_path: Path) -> None:
    """Installed from the wheel (not the source tree), the default templates load."""
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    wheel = build_wheel(wheels)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "from trio_mailer.core.config import shipped_templates_dir as d;"
        "from trio_mailer.core.rendering import MailTemplates as T;"
        "T.load(d()); print(d())"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == str(target / "trio_mailer" / "templates")


def test_both_wheels_ship_mailer_proto_and_the_client_needs_only_three_packages(
    tmp_path: Path,
) -> None:
    """mailer.proto is in both wheels; the client requires trio, grpcio and protobuf only."""
    server = zipfile.ZipFile(build_wheel(tmp_path))
    client = zipfile.ZipFile(build_client_wheel(tmp_path))
    assert (
        server.read("trio_mailer/v1/mailer.proto")
        == (ROOT / "protos/trio_mailer/v1/mailer.proto").read_bytes()
    )
    assert (
        client.read("trio_mailer_client/_generated/mailer.proto")
        == (ROOT / "protos/trio_mailer/v1/mailer.proto").read_bytes()
    )
    assert "trio_mailer_client/py.typed" in client.namelist()
    metadata = next(n for n in client.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(":", 1)[1].strip().split(">")[0].split("<")[0]
        for line in client.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert sorted(requires) == ["grpcio", "protobuf", "trio"]
