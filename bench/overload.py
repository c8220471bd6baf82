"""Overload: does a flood of gRPC calls slow down the delivery of the mail already accepted?

The real service (``python -m trio_mailer serve``) relays to the sink, with a queue of
``QUEUE_SIZE``. Two phases, interleaved and in rotating order, on the same service:

- **light**: a feeder (2 callers, pausing ``FEEDER_BACKOFF_S`` after a "queue full") keeps the
  queue from running dry, so the senders always have work;
- **saturated**: the same feeder plus a flood (``FLOOD_CONCURRENCY`` callers over
  ``FLOOD_CHANNELS`` connections, no pause), most of whose calls are answered "queue full".

Delivered mails per second are read from the sink's counter over the same window in both. The
ratio saturated/light says how much of the delivery rate survives the flood; the issue asks for
at least 0.8. Both load generators are processes of their own.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs

from .common import BenchError, Profile, TlsFiles, child_env
from .procs import LoadgenWorker, ServerProcess, SinkProcess, mailer_service, service_env
from .stats import DASH, Section, Target, percentile

QUEUE_SIZE = 100
FEEDER_CONCURRENCY = 2
FEEDER_BACKOFF_S = 0.002
FLOOD_CONCURRENCY = 64
FLOOD_CHANNELS = 4
TAIL_S = 0.5  # the load generators keep going this long past the window: covers start skew
RESULT_TIMEOUT_S = 30.0  # beyond the job's own length


@attrs.frozen
class OverloadSample:
    phase: str
    delivered_per_s: float
    service_cpu_share: float  # CPU seconds per second of the service process
    feeder_accepted_per_s: float
    feeder_refused_per_s: float
    flood_calls_per_s: float
    flood_refused_per_s: float
    flood_errors: dict[str, int]
    flood_p99_ms: float | None


def _job(service: ServerProcess, profile: Profile, **extra: object) -> dict[str, object]:
    return {
        "target": f"127.0.0.1:{service.port}",
        "warmup_s": profile.overload_warmup_s,
        "window_s": profile.overload_window_s,
        "tail_s": TAIL_S,
        **extra,
    }


def _phase(
    phase: str,
    profile: Profile,
    service: ServerProcess,
    sink: SinkProcess,
    feeder: LoadgenWorker,
    flood: LoadgenWorker,
) -> OverloadSample:
    saturated = phase == "saturated"
    workers = [feeder, flood] if saturated else [feeder]
    feeder.start_job(
        _job(service, profile, concurrency=FEEDER_CONCURRENCY, backoff_s=FEEDER_BACKOFF_S)
    )
    if saturated:
        flood.start_job(
            _job(service, profile, concurrency=FLOOD_CONCURRENCY, channels=FLOOD_CHANNELS)
        )
    for worker in workers:
        worker.wait_started()
    time.sleep(profile.overload_warmup_s)
    before, cpu_before, start = sink.stats(), service.cpu_seconds(), time.monotonic()
    time.sleep(profile.overload_window_s)
    after, cpu_after, end = sink.stats(), service.cpu_seconds(), time.monotonic()
    job_s = profile.overload_warmup_s + profile.overload_window_s + TAIL_S
    results = [worker.wait_result(job_s + RESULT_TIMEOUT_S) for worker in workers]
    service.check_alive()
    elapsed = end - start
    feeding: dict[str, Any] = results[0]
    flooding: dict[str, Any] = results[1] if saturated else {}
    if feeding["accepted"] == 0 and after.mails == before.mails:
        raise BenchError(f"overload ({phase}): nothing was accepted or delivered")
    flood_window = flooding.get("window_s") or 1.0
    latencies = flooding.get("latencies_ms") or []
    return OverloadSample(
        phase=phase,
        delivered_per_s=(after.mails - before.mails) / elapsed,
        service_cpu_share=(cpu_after - cpu_before) / elapsed,
        feeder_accepted_per_s=feeding["accepted"] / feeding["window_s"],
        feeder_refused_per_s=feeding["refused"] / feeding["window_s"],
        flood_calls_per_s=flooding.get("calls", 0) / flood_window,
        flood_refused_per_s=flooding.get("refused", 0) / flood_window,
        flood_errors=flooding.get("errors", {}),
        flood_p99_ms=percentile(latencies, 99) if latencies else None,
    )


def run_section(profile: Profile, tls: TlsFiles, sink: SinkProcess, log_dir: Path) -> Section:
    phases = ["light", "saturated"]
    samples: dict[str, list[OverloadSample]] = {phase: [] for phase in phases}
    with ExitStack() as stack:
        service = stack.enter_context(
            mailer_service(
                "overload-service",
                service_env(sink.port, tls, MAILER_QUEUE_SIZE=str(QUEUE_SIZE)),
                log_dir,
            )
        )
        feeder = stack.enter_context(LoadgenWorker("overload-feeder", child_env(), log_dir))
        flood = stack.enter_context(LoadgenWorker("overload-flood", child_env(), log_dir))
        for rep in range(profile.repeat):
            for phase in phases[rep % 2 :] + phases[: rep % 2]:
                samples[phase].append(_phase(phase, profile, service, sink, feeder, flood))

    section = Section(
        "overload",
        f"delivered mails/s with and without a flood on the gRPC port (queue {QUEUE_SIZE}, "
        f"{profile.overload_window_s:g} s windows, {profile.repeat} interleaved repetitions)",
    )
    light, saturated = samples["light"], samples["saturated"]
    section.add("delivered, light feeder only", "mails/s", [s.delivered_per_s for s in light])
    section.add("delivered, under the flood", "mails/s", [s.delivered_per_s for s in saturated])
    section.add("flood calls answered", "calls/s", [s.flood_calls_per_s for s in saturated])
    section.add("flood refused (queue full)", "calls/s", [s.flood_refused_per_s for s in saturated])
    p99s = [s.flood_p99_ms for s in saturated if s.flood_p99_ms is not None]
    if p99s:
        section.add("flood call latency p99", "ms", p99s)
    section.add("service CPU, light", "cores", [s.service_cpu_share for s in light])
    section.add("service CPU, under the flood", "cores", [s.service_cpu_share for s in saturated])
    section.ratio(
        "overload delivered under flood/light",
        [s.delivered_per_s for s in saturated],
        [s.delivered_per_s for s in light],
        Target(">=", 0.8),
    )
    refused_light = [s.feeder_refused_per_s for s in light]
    section.notes.append(
        "the feeder was refused (queue full) "
        f"{min(refused_light):.0f}{DASH}{max(refused_light):.0f} times/s in the light phase: "
        "above 0 means the queue was kept full, so the light figure is the senders' pace"
    )
    errors: dict[str, int] = {}
    for sample in saturated:
        for code, count in sample.flood_errors.items():
            errors[code] = errors.get(code, 0) + count
    if errors:
        section.notes.append(f"flood calls that failed (gRPC status: count): {errors}")
    section.raw = {phase: [attrs.asdict(s) for s in samples[phase]] for phase in phases}
    return section
