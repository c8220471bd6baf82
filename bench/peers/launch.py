"""Starting the peers: their processes, and the Node peer's packages (``npm ci`` when missing).

Each peer is a ``ServerProcess`` (``bench/procs.py``) like trio-mailer's service: configured by
the same ``MAILER_*`` variables, logging "listening on 127.0.0.1:PORT", stopped by SIGTERM, its
CPU read from /proc by its pid (``node`` is started directly, never through ``npm``, so the pid
is the server's own).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

from bench.common import BENCH_DIR, PYTHON, BenchError, child_env
from bench.procs import ServerProcess

PEERS_DIR = BENCH_DIR / "peers"
NODE_DIR = PEERS_DIR / "node"
NPM_CI_TIMEOUT_S = 900.0  # better-sqlite3 compiles SQLite: about 1.5 min on 2 idle cores
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "nodemailer", "better-sqlite3")
PYTHON_PACKAGES = ("grpcio", "aiosmtplib", "Jinja2")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"the Node peer needs {name} on the PATH")
    return path


def node_modules_ready() -> bool:
    """``node_modules`` was installed by ``npm ci`` from the current ``package-lock.json``."""
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    return installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime


def ensure_node_modules() -> None:
    """Run ``npm ci`` in ``bench/peers/node`` unless its packages are installed already.

    Raises:
        BenchError: node or npm is missing, or ``npm ci`` failed or took too long.
    """
    if node_modules_ready():
        return
    _tool("node")
    argv = [_tool("npm"), "ci", "--no-audit", "--no-fund"]
    try:
        done = subprocess.run(
            argv,
            cwd=NODE_DIR,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"npm ci in {NODE_DIR} took over {NPM_CI_TIMEOUT_S:g}s") from exc
    if done.returncode != 0:
        raise BenchError(
            f"npm ci in {NODE_DIR} failed with status {done.returncode}:\n{done.stderr[-3000:]}"
        )


def python_peer(name: str, env: dict[str, str], log_dir: Path) -> ServerProcess:
    """The grpc.aio + aiosmtplib peer (``aio_server.py``)."""
    argv = [PYTHON, str(PEERS_DIR / "aio_server.py")]
    return ServerProcess(name, argv, env, log_dir / f"{name}.log")


def node_peer(name: str, env: dict[str, str], log_dir: Path) -> ServerProcess:
    """The grpc-js + nodemailer peer (``node/peer.js``); call ``ensure_node_modules`` first."""
    argv = [_tool("node"), str(NODE_DIR / "peer.js")]
    return ServerProcess(name, argv, env, log_dir / f"{name}.log")


def versions() -> dict[str, str]:
    """The versions of what the peers are built on, for the report."""
    found: dict[str, str] = {}
    for package in PYTHON_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "missing"
    node = shutil.which("node")
    if node is not None:
        done = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
        found["node"] = done.stdout.strip()
    for package in NODE_PACKAGES:
        manifest = NODE_DIR / "node_modules" / package / "package.json"
        try:
            found[package] = str(json.loads(manifest.read_text())["version"])
        except (OSError, ValueError, KeyError):
            found[package] = "missing"
    return found
