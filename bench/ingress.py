"""Ingress: accepted calls/s, latency and server CPU per call, ours against a grpcio server.

One grpcio load generator process calls ``SendPass`` at each concurrency level, in turn on our
service and on ``grpcio_server.py`` (grpc.aio, the same handler work), in an order that rotates
from one repetition to the next. The load generator reads the server's CPU time from
/proc/<pid>/stat at the edges of its measuring window, so the CPU per accepted call covers the
server process only (every thread), not the load.

Our service must not spend CPU on delivery here: its relay is a closed port, so its sender
fails to connect once and then waits out a one-hour reconnect backoff while the queue
(``QUEUE_SIZE``) fills. It is restarted once it holds ``RESTART_AFTER`` mails, so a big heap
(and Python's garbage collector walking it) never weighs on a later measurement. The grpcio
server drains its queue with a consumer that drops each mail.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs

from .common import MAIL_FROM, SERVICE_NAME, BenchError, Profile, TlsFiles, child_env
from .procs import LoadgenWorker, ServerProcess, grpcio_server, mailer_service, service_env
from .stats import DASH, Section, Target, percentile

QUEUE_SIZE = 100_000
RESTART_AFTER = 20_000  # mails held by our service before it is restarted
RESULT_TIMEOUT_S = 30.0  # beyond the job's own length
# The targets: server CPU per call, ours/grpcio.
ACCEPTED_CPU_TARGET = 1.0
REFUSED_CPU_TARGET = 1.5


@attrs.frozen
class IngressSample:
    server: str
    concurrency: int
    answer: str  # "accepted" or "refused": the calls the figures below are about
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_call: float
    client_cpu_ms_per_call: float
    other_per_s: float  # calls answered the other way (0 when all goes as planned)
    errors: dict[str, int]
    accepted_total: int  # inside the window and out (warm-up, tail)


def _closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ours(name: str, queue_size: int, tls: TlsFiles, log_dir: Path) -> ServerProcess:
    env = service_env(
        _closed_port(),
        tls,
        MAILER_QUEUE_SIZE=str(queue_size),
        # Refusals at once, as grpcio's: the refused rows measure the stack's cost per call, not
        # the pacing that keeps a flood from starving delivery (bench/overload.py measures that).
        MAILER_REFUSALS_PER_S="0",
        MAILER_RETRY_BASE_S="3600",
        MAILER_RETRY_MAX_S="3600",
        MAILER_SHUTDOWN_GRACE_S="0",
    )
    return mailer_service(name, env, log_dir)


def _grpcio(name: str, queue_size: int, *, drain: bool, log_dir: Path) -> ServerProcess:
    env = child_env(
        MAILER_FROM=MAIL_FROM,
        MAILER_SERVICENAME=SERVICE_NAME,
        MAILER_QUEUE_SIZE=str(queue_size),
        BENCH_DRAIN="1" if drain else "0",
    )
    return grpcio_server(name, env, log_dir)


def _measure(
    server: str,
    process: ServerProcess,
    level: int,
    answer: str,
    profile: Profile,
    load: LoadgenWorker,
) -> IngressSample:
    job = {
        "target": f"127.0.0.1:{process.port}",
        "concurrency": level,
        "warmup_s": profile.ingress_warmup_s,
        "window_s": profile.ingress_window_s,
        "server_pid": process.pid,
        # At least one call per caller in the window: 64 calls in flight are answered nearly
        # together (each handler's work runs in the same pass of the scheduler), so a server
        # short of CPU may answer none within a short window (it stalled the quick run once).
        "min_calls": level,
    }
    timeout = profile.ingress_warmup_s + profile.ingress_window_s + RESULT_TIMEOUT_S
    result: dict[str, Any] = load.run(job, timeout)
    process.check_alive()
    window_s = result["window_s"]
    counted = result[answer]
    latencies = result["latencies_ms"]
    if not counted or not latencies:
        raise BenchError(f"ingress: {server} {answer} nothing at concurrency {level}: {result}")
    other = result["refused" if answer == "accepted" else "accepted"]
    return IngressSample(
        server=server,
        concurrency=level,
        answer=answer,
        calls_per_s=counted / window_s,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        server_cpu_ms_per_call=result["server_cpu_s"] * 1000 / counted,
        client_cpu_ms_per_call=result["client_cpu_s"] * 1000 / counted,
        other_per_s=other / window_s,
        errors=result["errors"],
        accepted_total=result["accepted_total"],
    )


def run_section(profile: Profile, tls: TlsFiles, log_dir: Path) -> Section:
    levels = profile.ingress_levels
    full_level = max(levels)
    samples: dict[tuple[str, int], list[IngressSample]] = {
        (server, level): [] for server in ("ours", "grpcio") for level in levels
    }
    samples["ours_full", full_level] = []
    samples["grpcio_full", full_level] = []
    with ExitStack() as stack:
        load = stack.enter_context(LoadgenWorker("ingress-load", child_env(), log_dir))
        # They start side by side: each waits for its port on first use.
        processes = {
            "grpcio": stack.enter_context(
                _grpcio("ingress-grpcio", QUEUE_SIZE, drain=True, log_dir=log_dir)
            ),
            # Queues of one that nobody takes from: every call after the first is refused.
            "ours_full": stack.enter_context(_ours("ingress-ours-full", 1, tls, log_dir)),
            "grpcio_full": stack.enter_context(
                _grpcio("ingress-grpcio-full", 1, drain=False, log_dir=log_dir)
            ),
        }
        held = 0
        for rep in range(profile.repeat):
            if "ours" not in processes or held >= RESTART_AFTER:
                if "ours" in processes:
                    processes["ours"].stop()
                ours = _ours("ingress-ours", QUEUE_SIZE, tls, log_dir)
                processes["ours"], held = stack.enter_context(ours), 0
            pairs = [("ours", "grpcio"), ("ours_full", "grpcio_full")]
            for pair in pairs:
                for server in pair[rep % 2 :] + pair[: rep % 2]:
                    full = server.endswith("_full")
                    for level in (full_level,) if full else levels:
                        answer = "refused" if full else "accepted"
                        sample = _measure(server, processes[server], level, answer, profile, load)
                        samples[server, level].append(sample)
                        if server == "ours":
                            held += sample.accepted_total

    section = Section(
        "ingress",
        f"SendPass calls accepted by ours and by a grpcio server ({profile.ingress_window_s:g} s "
        f"windows, {profile.repeat} interleaved repetitions)",
    )
    for server, level in samples:
        runs = samples[server, level]
        full = server.endswith("_full")
        name = f"{server.removesuffix('_full')}, {level} in flight"
        what = "refused (queue full)" if full else "accepted"
        section.add(f"{name}: {what}", "calls/s", [s.calls_per_s for s in runs])
        section.add(f"{name}: {what}, latency p50", "ms", [s.p50_ms for s in runs])
        section.add(f"{name}: {what}, latency p99", "ms", [s.p99_ms for s in runs])
        section.add(
            f"{name}: {what}, server CPU", "ms/call", [s.server_cpu_ms_per_call for s in runs]
        )
    for level in levels:
        ours_runs, base_runs = samples["ours", level], samples["grpcio", level]
        section.ratio(
            f"ingress server CPU per accepted call ours/grpcio, {level} in flight",
            [s.server_cpu_ms_per_call for s in ours_runs],
            [s.server_cpu_ms_per_call for s in base_runs],
            Target("<=", ACCEPTED_CPU_TARGET),
        )
        section.ratio(
            f"ingress accepted calls/s ours/grpcio, {level} in flight",
            [s.calls_per_s for s in ours_runs],
            [s.calls_per_s for s in base_runs],
        )
    section.ratio(
        f"ingress server CPU per refused call ours/grpcio, {full_level} in flight",
        [s.server_cpu_ms_per_call for s in samples["ours_full", full_level]],
        [s.server_cpu_ms_per_call for s in samples["grpcio_full", full_level]],
        Target("<=", REFUSED_CPU_TARGET),
    )
    other = sum(s.other_per_s for runs in samples.values() for s in runs)
    errors: dict[str, int] = {}
    for runs in samples.values():
        for s in runs:
            for code, count in s.errors.items():
                errors[code] = errors.get(code, 0) + count
    if other or errors:
        section.notes.append(
            f"calls answered otherwise than planned: {other:.0f}/s in all; errors {errors}"
        )
    section.notes.append(
        "refused calls skip the message building (both servers check for room first): their "
        "CPU is the gRPC stack's own cost per call"
    )
    client = [s.client_cpu_ms_per_call for runs in samples.values() for s in runs]
    section.notes.append(
        f"the load generator spent {min(client):.3f}{DASH}{max(client):.3f} ms CPU per call"
    )
    section.raw = {
        f"{server}@{level}": [attrs.asdict(s) for s in runs]
        for (server, level), runs in samples.items()
    }
    return section
