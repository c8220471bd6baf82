"""Peers: trio-mailer against the same job built on stock stacks, measured side by side.

The stacks (``STACKS``): trio-mailer's service, the Python peer (``aio_server.py``: grpc.aio +
aiosmtplib) and the Node peer (``node/peer.js``: grpc-js + nodemailer + better-sqlite3). All
three run the same job with the same ``MAILER_*`` settings: a SQLite outbox file committed with
``synchronous=FULL`` before ``sent=true`` (trio-mailer's ``MAILER_OUTBOX`` is a file here, not
the memory outbox the other sections use), one SMTP session with verified implicit TLS and AUTH
to the same pipelining sink, a bounded queue.

Each repetition, every measurement in an order that rotates between repetitions:

- **burst** (``e2e._deliver``): 8 callers submit ``e2e_burst_mails`` mails; mails/s from the first
  call to the sink's receipt of the last mail, and the server's CPU per delivered mail (its
  process, every thread, from /proc);
- **paced** (``e2e._deliver``): an open-loop load at ``e2e_paced_fraction`` of the slowest
  stack's burst rate of the same repetition, the same rate for all three, for
  ``PACED_WINDOWS`` x ``e2e_paced_s`` (twice e2e's, so that a p99 rests on a few hundred mails):
  p50 and p99 from the start of the call to the sink's receipt of the whole message;
- **refused** (``ingress._measure``): a second server of each stack, with a queue of one and a
  relay port that refuses connections (an hour's backoff), so every call is answered
  "queue full" before anything is built: server CPU per refused call at 64 calls in flight.
  trio-mailer runs with ``MAILER_REFUSALS_PER_S=0`` (its refusal pacer off: every refusal at
  once, as the peers answer).

Before the repetitions each delivering server gets an unmeasured burst (``WARMUP_MAILS``): the
peers' JIT, imports and first session, and trio-mailer's, are not what is compared.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import attrs

from bench.common import Profile, TlsFiles, child_env
from bench.e2e import BURST_CONCURRENCY, PACED_MAX_IN_FLIGHT, QUEUE_SIZE, E2eSample, _deliver
from bench.ingress import IngressSample, _closed_port, _measure
from bench.procs import LoadgenWorker, ServerProcess, SinkProcess, mailer_service, service_env
from bench.stats import DASH, Section, Target

from . import launch

STACKS = ("trio-mailer", "python", "node")
LABELS = {
    "trio-mailer": "trio-mailer",
    "python": "grpc.aio+aiosmtplib",
    "node": "grpc-js+nodemailer",
}
STARTERS: dict[str, Callable[[str, dict[str, str], Path], ServerProcess]] = {
    "trio-mailer": mailer_service,
    "python": launch.python_peer,
    "node": launch.node_peer,
}
PEERS = ("node", "python")
WARMUP_MAILS = 100
PACED_WINDOWS = 2  # the paced phase lasts this many times e2e_paced_s
REFUSED_CONCURRENCY = 64
# The targets, trio-mailer/peer. Mails/s and CPU per mail against Node only.
TARGETS = {
    ("mails/s", "node"): Target(">=", 1.0),
    ("CPU per delivered mail", "node"): Target("<=", 1.0),
    ("CPU per refused call", "node"): Target("<=", 1.5),
    ("paced latency p99", "node"): Target("<=", 1.0),
    ("paced latency p99", "python"): Target("<=", 1.0),
}


def delivering_env(stack: str, sink: SinkProcess, tls: TlsFiles, log_dir: Path) -> dict[str, str]:
    """A server that delivers to ``sink``: its own outbox file, one session, a big queue."""
    return service_env(
        sink.port,
        tls,
        MAILER_OUTBOX=str(log_dir / f"peers-{stack}-delivering.sqlite3"),
        MAILER_QUEUE_SIZE=str(QUEUE_SIZE),
        MAILER_SMTP_SESSIONS="1",
    )


def refusing_env(stack: str, tls: TlsFiles, log_dir: Path) -> dict[str, str]:
    """A server whose queue of one stays full: its relay refuses connections, for an hour."""
    return service_env(
        _closed_port(),
        tls,
        MAILER_OUTBOX=str(log_dir / f"peers-{stack}-refusing.sqlite3"),
        MAILER_QUEUE_SIZE="1",
        MAILER_REFUSALS_PER_S="0",  # trio-mailer's refusal pacer off; the peers have none
        MAILER_RETRY_BASE_S="3600",
        MAILER_RETRY_MAX_S="3600",
        MAILER_SHUTDOWN_GRACE_S="0",
    )


def _rotated(rep: int) -> tuple[str, ...]:
    shift = rep % len(STACKS)
    return STACKS[shift:] + STACKS[:shift]


def run_section(profile: Profile, tls: TlsFiles, sink: SinkProcess, log_dir: Path) -> Section:
    launch.ensure_node_modules()
    burst: dict[str, list[E2eSample]] = {stack: [] for stack in STACKS}
    paced: dict[str, list[E2eSample]] = {stack: [] for stack in STACKS}
    refused: dict[str, list[IngressSample]] = {stack: [] for stack in STACKS}
    rates: list[float] = []
    with ExitStack() as stack:
        # They start side by side: each waits for its port on first use.
        delivering = {
            s: stack.enter_context(
                STARTERS[s](f"peers-{s}-delivering", delivering_env(s, sink, tls, log_dir), log_dir)
            )
            for s in STACKS
        }
        refusing = {
            s: stack.enter_context(
                STARTERS[s](f"peers-{s}-refusing", refusing_env(s, tls, log_dir), log_dir)
            )
            for s in STACKS
        }
        load = stack.enter_context(LoadgenWorker("peers-load", child_env(), log_dir))
        burst_job: dict[str, object] = {"concurrency": BURST_CONCURRENCY}
        for s in STACKS:
            warmup = {**burst_job, "count": WARMUP_MAILS}
            _deliver("warm-up", 1, warmup, delivering[s], sink, load)
        for rep in range(profile.repeat):
            order = _rotated(rep)
            for s in order:
                job: dict[str, object] = {**burst_job, "count": profile.e2e_burst_mails}
                burst[s].append(_deliver("burst", 1, job, delivering[s], sink, load))
            rate = profile.e2e_paced_fraction * min(burst[s][-1].mails_per_s for s in STACKS)
            rates.append(rate)
            for s in order:
                job = {
                    "rate": rate,
                    "window_s": PACED_WINDOWS * profile.e2e_paced_s,
                    "concurrency": PACED_MAX_IN_FLIGHT,
                }
                paced[s].append(_deliver("paced", 1, job, delivering[s], sink, load, rate))
            for s in order:
                refused[s].append(
                    _measure(s, refusing[s], REFUSED_CONCURRENCY, "refused", profile, load)
                )
    return _report(profile, burst, paced, refused, rates)


def _report(
    profile: Profile,
    burst: dict[str, list[E2eSample]],
    paced: dict[str, list[E2eSample]],
    refused: dict[str, list[IngressSample]],
    rates: list[float],
) -> Section:
    section = Section(
        "peers",
        "trio-mailer against grpc.aio+aiosmtplib and grpc-js+nodemailer, SQLite outbox and one "
        f"TLS session each ({profile.repeat} interleaved repetitions)",
    )
    figures: dict[str, dict[str, list[float]]] = {}
    for s in STACKS:
        figures[s] = {
            "mails/s": [x.mails_per_s for x in burst[s]],
            "CPU per delivered mail": [x.service_cpu_ms_per_mail for x in burst[s]],
            "paced latency p50": [x.p50_ms for x in paced[s]],
            "paced latency p99": [x.p99_ms for x in paced[s]],
            "CPU per refused call": [x.server_cpu_ms_per_call for x in refused[s]],
        }
        label = LABELS[s]
        section.add(
            f"{label}: {profile.e2e_burst_mails}-mail burst", "mails/s", figures[s]["mails/s"]
        )
        section.add(f"{label}: server CPU", "ms/mail", figures[s]["CPU per delivered mail"])
        section.add(
            f"{label}: relay round trips", "per mail", [x.round_trips_per_mail for x in burst[s]]
        )
        section.add(f"{label}: paced latency p50", "ms", figures[s]["paced latency p50"])
        section.add(f"{label}: paced latency p99", "ms", figures[s]["paced latency p99"])
        section.add(
            f"{label}: refused (queue full), {REFUSED_CONCURRENCY} in flight",
            "calls/s",
            [x.calls_per_s for x in refused[s]],
        )
        section.add(f"{label}: refused, server CPU", "ms/call", figures[s]["CPU per refused call"])
    ours = figures["trio-mailer"]
    for measure in ours:
        for peer in PEERS:
            section.ratio(
                f"peers {measure} trio-mailer/{LABELS[peer]}",
                ours[measure],
                figures[peer][measure],
                TARGETS.get((measure, peer)),
            )
    section.notes.append(
        "paced rates: "
        + ", ".join(f"{r:.0f}" for r in rates)
        + f" mails/s ({profile.e2e_paced_fraction:g} x the slowest stack's burst rate of the "
        "same repetition, the same for all three)"
    )
    section.notes.append(
        "refused calls build and store nothing (each stack checks for room first); trio-mailer "
        "with MAILER_REFUSALS_PER_S=0, so its refusal pacer is off"
    )
    errors: dict[str, int] = {}
    for runs in refused.values():
        for sample in runs:
            for code, count in sample.errors.items():
                errors[code] = errors.get(code, 0) + count
    if errors:
        section.notes.append(f"refused windows: calls that failed instead: {errors}")
    client = [x.client_cpu_ms_per_call for runs in refused.values() for x in runs]
    section.notes.append(
        f"the load generator spent {min(client):.3f}{DASH}{max(client):.3f} ms CPU per refused call"
    )
    section.notes.append("built on " + ", ".join(f"{k} {v}" for k, v in launch.versions().items()))
    section.raw = {
        s: {
            "burst": [attrs.asdict(x) for x in burst[s]],
            "paced": [attrs.asdict(x) for x in paced[s]],
            "refused": [attrs.asdict(x) for x in refused[s]],
        }
        for s in STACKS
    }
    return section
