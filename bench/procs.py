"""Handles on the benchmark's child processes: the sink, the load generators and the servers.

Everything under test or generating load runs in a process of its own, so nothing competes for
the benchmark's GIL and per-process CPU time can be read from /proc. Every wait here has a
timeout, and every child is ended by its own pid: SIGTERM (or closing its stdin), then SIGKILL.
"""

from __future__ import annotations

import functools
import json
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import attrs

from .common import (
    BENCH_DIR,
    MAIL_FROM,
    PYTHON,
    ROOT,
    SERVICE_NAME,
    BenchError,
    TlsFiles,
    child_env,
    cpu_seconds,
)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.02
_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


def log_tail(path: Path, max_bytes: int = 3000) -> str:
    """The end of a child's log, for error messages."""
    try:
        with path.open("rb") as log:
            log.seek(0, 2)
            size = log.tell()
            log.seek(max(0, size - max_bytes))
            return log.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def _end(proc: subprocess.Popen[Any], timeout_s: float) -> int:
    """Wait for ``proc``; SIGKILL it if it does not end in time. Returns its exit status."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout_s)


class JsonLinesChild:
    """A child that takes JSON requests on stdin and answers JSON lines on stdout.

    A reader thread queues its lines, so that every read can time out.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=ROOT,
        )
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, message: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise self._failure(f"cannot be written to ({exc})") from exc

    def receive(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line.

        Raises:
            BenchError: no line in time, the child ended, or it reported an error.
        """
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise self._failure(f"gave no answer within {timeout_s:g}s") from None
        if line is None:
            self._lines.put(None)  # stays ended for the next reader
            raise self._failure(f"ended (status {self.proc.wait(timeout=STOP_TIMEOUT_S)})")
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise self._failure(f"reported an error: {message['error']}")
        return message

    def _failure(self, what: str) -> BenchError:
        return BenchError(f"{self.name} {what}; its log ends with:\n{log_tail(self.log_path)}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> int:
        """Close its stdin (it ends by itself), then wait; SIGKILL past the timeout."""
        if self._log.closed:  # closed before
            return self.proc.wait()
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        status = _end(self.proc, STOP_TIMEOUT_S)
        self._reader.join(timeout=STOP_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return status


@attrs.frozen
class SinkStats:
    """The sink's counters (see ``sink.Counters``)."""

    mails: int
    round_trips: int
    connections: int
    active: int
    transactions: int  # connections between MAIL and the end of their data
    # Since the last window reset:
    max_active: int
    max_transactions: int
    busy_connections: int  # connections that carried a mail
    refused_connections: int
    protocol_errors: int
    receipts_dropped: int


class SinkProcess(JsonLinesChild):
    """``sink.py`` in its own process."""

    def __init__(
        self, tls: TlsFiles, *, pipelining: bool, log_dir: Path, reply_delay_ms: float = 0.0
    ) -> None:
        name = f"{'pipelining' if pipelining else 'lockstep'} sink"
        if reply_delay_ms:
            name += f" answering after {reply_delay_ms:g} ms"
        argv = [
            PYTHON,
            str(BENCH_DIR / "sink.py"),
            "--cert",
            str(tls.cert_file),
            "--key",
            str(tls.key_file),
        ]
        if pipelining:
            argv.append("--pipelining")
        argv += ["--reply-delay-ms", str(reply_delay_ms)]
        log_path = log_dir / f"sink-{int(pipelining)}-{reply_delay_ms:g}.log"
        super().__init__(name, argv, child_env(), log_path)
        self.pipelining = pipelining
        self.reply_delay_ms = reply_delay_ms
        self.port = int(self.receive(START_TIMEOUT_S)["port"])

    def stats(self, *, reset_window: bool = False) -> SinkStats:
        self.send({"op": "stats", "reset_window": reset_window})
        return SinkStats(**self.receive(STOP_TIMEOUT_S))

    def receipts(self) -> dict[str, float]:
        """Message-ID -> receipt time (``time.monotonic``) of the mails since the last call."""
        self.send({"op": "receipts"})
        return {mid: t for mid, t in self.receive(STOP_TIMEOUT_S)["receipts"]}

    def wait_for_mails(self, total: int, timeout_s: float) -> SinkStats:
        """Poll until the sink has received ``total`` mails since it started.

        Raises:
            BenchError: not within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            if stats.mails >= total:
                return stats
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"{self.name}: {total - stats.mails} mail(s) not delivered within "
                    f"{timeout_s:g}s ({stats.mails} of {total})"
                )
            time.sleep(POLL_INTERVAL_S)

    def close(self) -> int:
        if self._log.closed:
            return self.proc.wait()
        try:
            self.send({"op": "quit"})
        except BenchError:
            pass
        return super().close()


class LoadgenWorker(JsonLinesChild):
    """``loadgen.py --worker``: runs one load job at a time (see loadgen.py for the job keys)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        argv = [PYTHON, str(BENCH_DIR / "loadgen.py"), "--worker"]
        super().__init__(name, argv, env, log_dir / f"{name}.log")
        self.receive(START_TIMEOUT_S)  # {"ready": true} once grpcio is imported

    def start_job(self, job: dict[str, object]) -> None:
        self.send(job)

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the job's channel is connected and its calls are going."""
        event = self.receive(timeout_s)
        if event.get("event") != "started":
            raise BenchError(f"{self.name}: expected the job to start, got {event}")

    def wait_result(self, timeout_s: float) -> dict[str, Any]:
        event = self.receive(timeout_s)
        if event.get("event") != "result":
            raise BenchError(f"{self.name}: expected the job's result, got {event}")
        return event

    def run(self, job: dict[str, object], timeout_s: float) -> dict[str, Any]:
        self.start_job(job)
        self.wait_started()
        return self.wait_result(timeout_s)


class ServerProcess:
    """A gRPC server child that logs "listening on 127.0.0.1:PORT"; its output goes to a file.

    A file, not a pipe: a service that logs a line per call would block on a full pipe that
    nobody reads, and the benchmark would measure that.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @functools.cached_property
    def port(self) -> int:
        """The port it listens on; the first use waits until it says so (several servers
        started one after the other thus come up side by side).

        Raises:
            BenchError: it exited or said nothing within ``START_TIMEOUT_S``.
        """
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_path.read_bytes())
            if match:
                return int(match.group(1))
            self.check_alive()
            time.sleep(POLL_INTERVAL_S)
        self.stop()
        raise BenchError(
            f"{self.name} did not report its port within {START_TIMEOUT_S:g}s; "
            f"its log ends with:\n{log_tail(self.log_path)}"
        )

    def check_alive(self) -> None:
        """Raises BenchError when the server has exited."""
        status = self.proc.poll()
        if status is not None:
            raise BenchError(
                f"{self.name} exited with status {status}; "
                f"its log ends with:\n{log_tail(self.log_path)}"
            )

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> int:
        """SIGTERM (the service drains), then SIGKILL past the timeout. Returns the status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = _end(self.proc, STOP_TIMEOUT_S)
        if not self._log.closed:
            self._log.close()
        return status


def service_env(relay_port: int, tls: TlsFiles, **overrides: str) -> dict[str, str]:
    """``MAILER_*`` variables for a service on a free loopback port, relaying to ``relay_port``."""
    env = {
        "MAILER_REMOTE_HOST": f"127.0.0.1:{relay_port}",
        "MAILER_FROM": MAIL_FROM,
        "MAILER_SERVICENAME": SERVICE_NAME,
        "MAILER_SMTP_CA_FILE": str(tls.ca_file),
        "MAILER_USER": "bench",
        "MAILER_PASSWORD": "bench-password",
        "MAILER_SERVE_HOST": "127.0.0.1",
        "MAILER_SERVE_PORT": "0",
        "MAILER_SMTP_TIMEOUT_S": "10",
        "MAILER_SHUTDOWN_GRACE_S": "2",
        # In memory unless a measurement asks for the file (and its fsyncs) by name.
        "MAILER_OUTBOX": "memory",
        # Load goes to few addresses; bench/admission.py measures the limits on against off.
        "MAILER_RECIPIENT_LIMIT": "0",
    }
    return child_env(**{**env, **overrides})


def mailer_service(name: str, env: dict[str, str], log_dir: Path) -> ServerProcess:
    """``python -m trio_mailer serve`` with ``env`` (see ``service_env``)."""
    return ServerProcess(name, [PYTHON, "-m", "trio_mailer", "serve"], env, log_dir / f"{name}.log")


def grpcio_server(name: str, env: dict[str, str], log_dir: Path) -> ServerProcess:
    """The grpcio asyncio baseline server (``grpcio_server.py``)."""
    return ServerProcess(
        name, [PYTHON, str(BENCH_DIR / "grpcio_server.py")], env, log_dir / f"{name}.log"
    )
