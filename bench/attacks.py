"""Attacks: each flood of issue 11 runs for a few seconds while a probe calls every 100 ms.

Our service runs in a process of its own (``python -m trio_mailer serve``, relay a closed port:
no delivery work). An attacker child (this file, run as ``bench/attacks.py --attack NAME``)
floods it over raw HTTP/2 for ``attack_s``; meanwhile a probe thread here makes one grpcio
``Health/Check`` every ``PROBE_INTERVAL_S`` on a connection of its own (2 s deadline), and a
sampler reads the service's RSS from /proc every ``RSS_INTERVAL_S``. Before the attacks the
same probe runs unattacked, for the baseline p99.

For each attack: probe success (%), probe p99 / unattacked p99, and RSS before, peak and
after (``settle_s`` after the attacker stopped). Targets (issue 11): success >= 99 %, p99 <= 3x,
peak RSS <= before + 100 MB, after <= before + 20 MB; the two RSS targets are printed as
ratios that must be >= 1: (before + 100 MB) / peak and (before + 20 MB) / after.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs

from bench.common import PYTHON, BenchError, Profile, TlsFiles, child_env
from bench.procs import ServerProcess, mailer_service, service_env
from bench.stats import Section, Target, percentile

PROBE_INTERVAL_S = 0.1
PROBE_DEADLINE_S = 2.0
RSS_INTERVAL_S = 0.05
MB = 1024 * 1024
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
ATTACKS = (
    "ping",
    "settings",
    "window-update",
    "rapid-reset",
    "empty-data",
    "continuation",
    "big-frame",
    "deflate-bomb",
    "many-streams",
    "oversized",
    "malformed",
    "no-read",
    "idle-connections",
)


# ---- the probe and the RSS sampler (in the benchmark process) ----


@attrs.define
class Probe:
    """Calls Health/Check every PROBE_INTERVAL_S on one grpcio channel until stopped."""

    port: int
    latencies_s: list[float] = attrs.Factory(list)
    failures: int = 0
    errors: dict[str, int] = attrs.Factory(dict)  # failed calls by status
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PROBE_DEADLINE_S + 5)

    def _run(self) -> None:
        import grpc

        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=options) as channel:
            check = channel.unary_unary(HEALTH_CHECK)
            next_at = time.monotonic()
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    check(b"", timeout=PROBE_DEADLINE_S)
                    self.latencies_s.append(time.monotonic() - started)
                except grpc.RpcError as exc:
                    self.failures += 1
                    code = str(exc.code().name) if hasattr(exc, "code") else "?"
                    self.errors[code] = self.errors.get(code, 0) + 1
                next_at += PROBE_INTERVAL_S
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    @property
    def success_percent(self) -> float:
        total = len(self.latencies_s) + self.failures
        return 100.0 * len(self.latencies_s) / total if total else 0.0

    @property
    def p99_s(self) -> float:
        return percentile(self.latencies_s, 99) if self.latencies_s else PROBE_DEADLINE_S


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


@attrs.define
class RssSampler:
    pid: int
    peak: int = 0
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak = rss_bytes(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, BenchError):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ---- the section ----


@attrs.frozen
class AttackResult:
    name: str
    success_percent: float
    p99_s: float
    rss_before: int
    rss_peak: int
    rss_after: int
    attacker: dict[str, object]


def _probe_for(port: int, seconds: float) -> Probe:
    probe = Probe(port)
    probe.start()
    time.sleep(seconds)
    probe.stop()
    return probe


def _run_attack(
    service: ServerProcess, name: str, seconds: float, settle_s: float, log_dir: Path
) -> AttackResult:
    before = rss_bytes(service.pid)
    sampler = RssSampler(service.pid)
    sampler.start()
    probe = Probe(service.port)
    log = (log_dir / f"attack-{name}.log").open("wb")
    attacker = subprocess.Popen(
        [
            PYTHON,
            __file__,
            "--attack",
            name,
            "--port",
            str(service.port),
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        env=child_env(),
    )
    time.sleep(0.1)  # the attack is under way when the probe starts
    probe.start()
    try:
        out, _ = attacker.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        attacker.kill()
        attacker.communicate()
        raise BenchError(f"attacker {name} did not stop") from None
    finally:
        probe.stop()
        log.close()
    service.check_alive()
    time.sleep(settle_s)
    sampler.stop()
    after = rss_bytes(service.pid)
    service.check_alive()
    report = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
    report["probe_errors"] = probe.errors
    return AttackResult(
        name, probe.success_percent, probe.p99_s, before, sampler.peak, after, report
    )


def run_section(profile: Profile, tls: TlsFiles, log_dir: Path) -> Section:
    section = Section("attacks", "floods against the gRPC port while a probe calls every 100 ms")
    closed_port = _closed_port()
    env = service_env(closed_port, tls, MAILER_RETRY_MAX_S="3600")
    with mailer_service("attacks-service", env, log_dir) as service:
        _ = service.port
        _probe_for(service.port, 0.5)  # warm up
        baseline = _probe_for(service.port, profile.attack_baseline_s)
        section.add("unattacked probe p99", "ms", [baseline.p99_s * 1000])
        results = []
        for name in ATTACKS:
            result = _run_attack(service, name, profile.attack_s, profile.attack_settle_s, log_dir)
            results.append(result)
            section.add(f"{name}: probe success", "%", [max(result.success_percent, 1e-3)])
            section.add(f"{name}: probe p99", "ms", [result.p99_s * 1000])
            section.add(f"{name}: RSS before", "MB", [result.rss_before / MB])
            section.add(f"{name}: RSS peak", "MB", [result.rss_peak / MB])
            section.add(f"{name}: RSS after", "MB", [result.rss_after / MB])
            section.ratio(
                f"{name}: probe success / 100 %",
                [max(result.success_percent, 1e-3) / 100],
                [1.0],
                Target(">=", 0.99),
            )
            section.ratio(
                f"{name}: probe p99 / unattacked p99",
                [result.p99_s],
                [baseline.p99_s],
                Target("<=", 3.0),
            )
            section.ratio(
                f"{name}: (RSS before + 100 MB) / RSS peak",
                [result.rss_before + 100 * MB],
                [result.rss_peak],
                Target(">=", 1.0),
            )
            section.ratio(
                f"{name}: (RSS before + 20 MB) / RSS after",
                [result.rss_before + 20 * MB],
                [result.rss_after],
                Target(">=", 1.0),
            )
            section.notes.append(f"{name}: attacker {json.dumps(result.attacker)}")
        section.raw["attacks"] = [attrs.asdict(r) for r in results]
        section.raw["baseline_latencies_s"] = baseline.latencies_s
    return section


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- the attacker (a child process) ----

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


SETTINGS = _frame(0x4, 0, 0)
SETTINGS_ACK = _frame(0x4, 0x1, 0)
PING = _frame(0x6, 0, 0, b"12345678")


def _message(payload: bytes, *, compressed: bool = False, declared: int | None = None) -> bytes:
    return (
        struct.pack(">BL", int(compressed), len(payload) if declared is None else declared)
        + payload
    )


@attrs.define
class Attacker:
    """One connection after another, each flooded until the server closes it."""

    port: int
    connections: int = 0
    goaways: dict[int, int] = attrs.Factory(dict)
    bytes_sent: int = 0
    sock: socket.socket | None = None
    _next_stream: int = 1
    _encoder: object = None

    def connect(self, *, rcvbuf: int | None = None) -> socket.socket:
        import hpack

        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(PREFACE + SETTINGS + SETTINGS_ACK)
        self.connections += 1
        self._next_stream = 1
        self._encoder = hpack.Encoder()
        self.sock = sock
        return sock

    def headers(
        self,
        path: str,
        *,
        end_stream: bool,
        extra: list[tuple[str, str]] | None = None,
        base: list[tuple[str, str]] | None = None,
        end_headers: bool = True,
    ) -> tuple[int, bytes]:
        stream_id = self._next_stream
        self._next_stream += 2
        head = (
            base
            if base is not None
            else [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "127.0.0.1"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        block = self._encoder.encode(head + (extra or []))  # type: ignore[attr-defined]
        flags = (0x4 if end_headers else 0) | (0x1 if end_stream else 0)
        return stream_id, _frame(0x1, flags, stream_id, block)

    def send(self, data: bytes) -> bool:
        """Send, and drain what the server sent; False once the server closed the connection."""
        assert self.sock is not None
        try:
            self.sock.sendall(data)
            self.bytes_sent += len(data)
            return self.drain()
        except OSError:
            return False

    def drain(self, wait_s: float = 0.0) -> bool:
        assert self.sock is not None
        self.sock.settimeout(wait_s if wait_s else 0.0)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return False
                self._scan_goaway(chunk)
                if wait_s:
                    return True
        except (BlockingIOError, TimeoutError):
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(None)

    def _scan_goaway(self, chunk: bytes) -> None:
        # Good enough for counting: a GOAWAY frame header followed by its error code.
        at = chunk.find(b"\x07\x00\x00\x00\x00\x00")
        if at >= 3 and len(chunk) >= at + 6 + 8:
            code = struct.unpack(">L", chunk[at + 10 : at + 14])[0]
            self.goaways[code] = self.goaways.get(code, 0) + 1

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _headers_only(a: Attacker, path: str = HEALTH_CHECK, **kw: object) -> bytes:
    return a.headers(path, end_stream=False, **kw)[1]  # type: ignore[arg-type]


def _burst(a: Attacker, name: str) -> bytes:
    if name == "ping":
        return PING * 100
    if name == "settings":
        return SETTINGS * 100
    if name == "window-update":
        return _frame(0x8, 0, 0, struct.pack(">L", 1)) * 100
    if name == "rapid-reset":
        out = b""
        for _ in range(100):
            stream_id, frame = a.headers(HEALTH_WATCH, end_stream=False)
            out += frame + _frame(0x3, 0, stream_id, struct.pack(">L", 8))
        return out
    if name == "empty-data":
        stream_id, frame = a.headers(HEALTH_CHECK, end_stream=False)
        return frame + _frame(0x0, 0, stream_id) * 100
    if name == "continuation":
        stream_id, frame = a.headers(HEALTH_CHECK, end_stream=False, end_headers=False)
        return frame + _frame(0x9, 0, stream_id, bytes(16384)) * 64
    if name == "big-frame":
        return struct.pack(">BHBBL", 0xFF, 0xFFFF, 0x0, 0, 1)  # a 16 MiB DATA frame header
    if name == "deflate-bomb":
        bomb = _message(zlib.compress(bytes(1_000_000), 9), compressed=True)
        out = b""
        for _ in range(100):
            stream_id, frame = a.headers(
                HEALTH_CHECK, end_stream=False, extra=[("grpc-encoding", "deflate")]
            )
            out += frame + _frame(0x0, 0x1, stream_id, bomb)
        return out
    if name == "many-streams":
        out = b""
        for _ in range(1000):
            stream_id, frame = a.headers(HEALTH_WATCH, end_stream=False)
            out += frame + _frame(0x0, 0x1, stream_id, _message(b""))
        return out
    if name == "oversized":
        out = b""
        for _ in range(100):
            stream_id, frame = a.headers(HEALTH_CHECK, end_stream=False)
            out += frame + _frame(0x0, 0, stream_id, _message(bytes(4096), declared=1 << 20))
        return out
    if name == "malformed":
        good = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", HEALTH_CHECK),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        bad_heads = [
            [*good[:4], ("content-type", "text/plain"), ("te", "trailers")],
            good[:5],
            [*good, ("grpc-timeout", "xx")],
            [*good, ("X-Upper", "1")],
            [*good, ("authorization", "Bearer ")],
            [(":method", "GET"), *good[1:]],
            [*good, ("grpc-encoding", "snappy")],
        ]
        out = b""
        for _ in range(15):
            for head in bad_heads:
                _, frame = a.headers(HEALTH_CHECK, end_stream=True, base=head)
                out += frame
        return out
    raise ValueError(name)


def attack(name: str, port: int, seconds: float) -> dict[str, object]:
    a = Attacker(port)
    deadline = time.monotonic() + seconds
    if name == "idle-connections":
        held: list[socket.socket] = []
        while len(held) < 400 and time.monotonic() < deadline:
            held.append(a.connect())
        time.sleep(max(0.0, deadline - time.monotonic()))
        for sock in held:
            sock.close()
        return {"connections": a.connections}
    if name == "no-read":
        # A client that reads nothing: calls and PINGs under the rate limit, on tiny buffers.
        sockets: list[socket.socket] = []
        while time.monotonic() < deadline:
            if len(sockets) < 20:
                sockets.append(a.connect(rcvbuf=4096))
            for sock in sockets:
                try:
                    sock.setblocking(False)
                    sock.send(PING * 5)
                except OSError:
                    pass
            time.sleep(0.1)
        for sock in sockets:
            sock.close()
        return {"connections": a.connections}
    while time.monotonic() < deadline:
        a.connect()
        while time.monotonic() < deadline:
            if not a.send(_burst(a, name)):
                break
            if name in ("many-streams", "continuation", "big-frame"):
                a.drain(0.05)
        a.drain(0.05)
        a.close()
    return {
        "connections": a.connections,
        "MB_sent": round(a.bytes_sent / MB, 1),
        "goaways": {str(k): v for k, v in a.goaways.items()},
    }


def _attacker_main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    print(json.dumps(attack(args.attack, args.port, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_attacker_main())
