"""Admission: accepted calls/s with idempotency keys and rate limits on, against off.

Services side by side: one with ``MAILER_RECIPIENT_LIMIT=0`` and no keys in the calls (off),
one with the default recipient limit (5/600), a caller limit that is on but never reached, and
a fresh ``idempotency_key`` on every call (on); each pair twice, with the durable file outbox
(as in production: the disk's fsync sets the pace, and the figures move with the machine's
other load) and with the in-memory outbox (CPU-bound: where the bookkeeping shows most). The
load generator sends every call to a new address, so neither limit refuses: what is measured
is the cost of the bookkeeping (the key and the rate-limit row in the mail's own commit, the
windows in memory), not of refusals. As in the ingress section the relay is a closed port, so
the services spend nothing on delivery; each is restarted once it holds ``RESTART_AFTER``
mails.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs

from .common import BenchError, Profile, TlsFiles, child_env
from .ingress import RESULT_TIMEOUT_S, _closed_port
from .procs import LoadgenWorker, ServerProcess, mailer_service, service_env
from .stats import Section, Target

QUEUE_SIZE = 100_000
RESTART_AFTER = 20_000
LEVEL = 16  # calls in flight
MODES = ("off", "on")
OUTBOXES = ("file", "memory")


@attrs.frozen
class AdmissionSample:
    mode: str
    calls_per_s: float
    server_cpu_ms_per_call: float
    refused_per_s: float
    errors: dict[str, int]
    accepted_total: int


def _service(
    mode: str, outbox: str, tls: TlsFiles, log_dir: Path, generation: int
) -> ServerProcess:
    limits = (
        {"MAILER_RECIPIENT_LIMIT": "5/600", "MAILER_CALLER_LIMIT": "1000000/1"}
        if mode == "on"
        else {"MAILER_RECIPIENT_LIMIT": "0", "MAILER_CALLER_LIMIT": "0"}
    )
    env = service_env(
        _closed_port(),
        tls,
        MAILER_QUEUE_SIZE=str(QUEUE_SIZE),
        MAILER_RETRY_BASE_S="3600",
        MAILER_RETRY_MAX_S="3600",
        MAILER_SHUTDOWN_GRACE_S="0",
        MAILER_OUTBOX=(
            str(log_dir / f"admission-{mode}-{generation}.sqlite3")
            if outbox == "file"
            else "memory"
        ),
        **limits,
    )
    return mailer_service(f"admission-{mode}-{outbox}-{generation}", env, log_dir)


def _measure(
    mode: str, process: ServerProcess, profile: Profile, load: LoadgenWorker
) -> AdmissionSample:
    job = {
        "target": f"127.0.0.1:{process.port}",
        "concurrency": LEVEL,
        "warmup_s": profile.ingress_warmup_s,
        "window_s": profile.ingress_window_s,
        "server_pid": process.pid,
        "distinct_recipients": True,
        "idempotency_keys": mode == "on",
    }
    timeout = profile.ingress_warmup_s + profile.ingress_window_s + RESULT_TIMEOUT_S
    result: dict[str, Any] = load.run(job, timeout)
    process.check_alive()
    accepted = result["accepted"]
    if not accepted:
        raise BenchError(f"admission: {mode} accepted nothing: {result}")
    window_s = result["window_s"]
    return AdmissionSample(
        mode=mode,
        calls_per_s=accepted / window_s,
        server_cpu_ms_per_call=result["server_cpu_s"] * 1000 / accepted,
        refused_per_s=result["refused"] / window_s,
        errors=result["errors"],
        accepted_total=result["accepted_total"],
    )


def run_section(profile: Profile, tls: TlsFiles, log_dir: Path) -> Section:
    pairs = [(mode, outbox) for outbox in OUTBOXES for mode in MODES]
    samples: dict[tuple[str, str], list[AdmissionSample]] = {pair: [] for pair in pairs}
    with ExitStack() as stack:
        load = stack.enter_context(LoadgenWorker("admission-load", child_env(), log_dir))
        processes: dict[tuple[str, str], ServerProcess] = {}
        held = dict.fromkeys(pairs, 0)
        generation = 0
        for rep in range(profile.repeat):
            for outbox in OUTBOXES:
                for mode in MODES[rep % 2 :] + MODES[: rep % 2]:
                    pair = (mode, outbox)
                    if pair not in processes or held[pair] >= RESTART_AFTER:
                        if pair in processes:
                            processes[pair].stop()
                        generation += 1
                        processes[pair] = stack.enter_context(
                            _service(mode, outbox, tls, log_dir, generation)
                        )
                        held[pair] = 0
                    sample = _measure(mode, processes[pair], profile, load)
                    samples[pair].append(sample)
                    held[pair] += sample.accepted_total
    section = Section(
        "admission",
        f"SendPass calls accepted with idempotency keys and rate limits on and off, {LEVEL} in "
        f"flight ({profile.ingress_window_s:g} s windows, {profile.repeat} interleaved "
        "repetitions)",
    )
    for mode, outbox in pairs:
        runs = samples[mode, outbox]
        what = f"{outbox} outbox, keys + limits {mode}"
        section.add(f"{what}: accepted", "calls/s", [s.calls_per_s for s in runs])
        section.add(f"{what}: server CPU", "ms/call", [s.server_cpu_ms_per_call for s in runs])
    for outbox in OUTBOXES:
        section.ratio(
            f"admission accepted calls/s keys+limits on/off, {outbox} outbox",
            [s.calls_per_s for s in samples["on", outbox]],
            [s.calls_per_s for s in samples["off", outbox]],
            Target(">=", 0.9),
        )
    refused = sum(s.refused_per_s for runs in samples.values() for s in runs)
    errors = [s.errors for runs in samples.values() for s in runs if s.errors]
    if refused or errors:
        section.notes.append(f"calls not accepted: {refused:.0f}/s refused; errors {errors}")
    section.raw = {
        f"{mode}-{outbox}": [attrs.asdict(s) for s in runs]
        for (mode, outbox), runs in samples.items()
    }
    return section
