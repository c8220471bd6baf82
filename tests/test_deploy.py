"""deploy/: the systemd unit verifies, the container runs as non-root with a gRPC health check,
the Prometheus example is valid and scrapes the container's metrics port; LICENSE is MIT."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "trio-mailer.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` is clean, with ExecStart pointed at this environment's
    trio-mailer (verify checks that the program exists)."""
    program = Path(sys.executable).parent / "trio-mailer"
    assert program.exists()
    unit = tmp_path / "trio-mailer.service"
    unit.write_text(UNIT.read_text().replace("/opt/trio-mailer/bin/trio-mailer", str(program)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_the_unit_keeps_the_outbox_in_its_state_directory_as_a_dynamic_user() -> None:
    settings = unit_settings()
    assert settings["DynamicUser"] == ["yes"]
    [state] = settings["StateDirectory"]
    assert f"MAILER_OUTBOX=/var/lib/{state}/outbox.sqlite3" in settings["Environment"]
    assert settings["ExecStart"] == ["/opt/trio-mailer/bin/trio-mailer serve"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert hardening in settings
    assert settings["RestartPreventExitStatus"] == ["2"]  # bad configuration


def test_the_container_runs_as_non_root_with_a_grpc_health_check() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and all(not user.startswith(("0", "root")) for user in users)
    assert re.search(r'HEALTHCHECK .*\n.*CMD \["trio-mailer", "health"', text)
    assert "MAILER_OUTBOX=/var/lib/trio-mailer/outbox.sqlite3" in text


def test_the_prometheus_example_scrapes_the_metrics_port() -> None:
    config = (DEPLOY / "prometheus.yml").read_text()
    port = re.search(r"MAILER_METRICS_PORT=(\d+)", (DEPLOY / "Containerfile").read_text())
    assert port is not None and f':{port.group(1)}"' in config
    promtool = shutil.which("promtool")
    if promtool is not None:
        result = subprocess.run(
            [promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_license_is_mit_as_the_packages_say() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert (ROOT / "client/LICENSE").read_text() == text
    for pyproject in (ROOT / "pyproject.toml", ROOT / "client/pyproject.toml"):
        assert tomllib.loads(pyproject.read_text())["project"]["license"] == "MIT"


def test_readme_links_the_deployment_files() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("deploy/trio-mailer.service", "deploy/Containerfile", "deploy/prometheus.yml"):
        assert f"]({name})" in readme
    assert "](LICENSE)" in readme
