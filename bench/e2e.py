"""End to end: from the gRPC call to the relay, with one SMTP session and with four.

Services with ``MAILER_SMTP_SESSIONS=1`` and ``=4`` (otherwise on their defaults) run side by
side, in turn against two relays, both offering PIPELINING as most relays do:

- an **instant** one (the loopback sink, answering at once): here the service's own CPU is the
  limit, gRPC and message building included, and more sessions cannot help much;
- a **slow** one (the sink holding every reply batch back ``SLOW_RELAY_DELAY_MS``, like a relay
  across a network or one that syncs each mail to disk before its 250): here a session spends
  most of its time waiting, which is what a pool of sessions is for.

Each repetition, in an order that rotates:

- **burst**: the load generator submits a burst as fast as 8 callers can (the queue holds it
  all); throughput is the mails divided by the time from the first call to the sink's receipt
  of the last mail;
- **paced** (slow relay only): an open-loop load at ``e2e_paced_fraction`` of the one-session
  burst rate of the same repetition, for ``e2e_paced_s``: the latency of a mail, from the start
  of its call to the sink's receipt, with no backlog in front of it.

Each latency joins the load generator's call start with the sink's receipt by Message-ID; both
are ``time.monotonic()`` in different processes, which Linux's CLOCK_MONOTONIC makes comparable.
The sink also reports the most transactions it saw at once, so a pool that did not open shows.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs

from .common import BenchError, Profile, TlsFiles, child_env
from .procs import LoadgenWorker, ServerProcess, SinkProcess, mailer_service, service_env
from .stats import Section, Target, percentile

SESSIONS = (1, 4)
SLOW_RELAY_DELAY_MS = 10.0
QUEUE_SIZE = 20_000
BURST_CONCURRENCY = 8
PACED_MAX_IN_FLIGHT = 64
DELIVERY_TIMEOUT_S = 60.0  # for the last mail to reach the sink after its call
JOB_TIMEOUT_S = 180.0


@attrs.frozen
class E2eSample:
    sessions: int
    phase: str  # "burst" or "paced"
    mails: int
    mails_per_s: float
    p50_ms: float
    p99_ms: float
    relay: str  # "instant" or "slow"
    max_transactions: int  # the most mail transactions the sink saw at once
    connections_used: int  # connections that carried mail (session recycling adds some)
    round_trips_per_mail: float
    service_cpu_ms_per_mail: float
    paced_rate: float | None = None


def _deliver(
    phase: str,
    sessions: int,
    job: dict[str, object],
    service: ServerProcess,
    sink: SinkProcess,
    load: LoadgenWorker,
    paced_rate: float | None = None,
) -> E2eSample:
    sink.receipts()  # forget earlier receipts
    before = sink.stats(reset_window=True)
    cpu_before = service.cpu_seconds()
    result: dict[str, Any] = load.run(
        {"target": f"127.0.0.1:{service.port}", "record": True, **job}, JOB_TIMEOUT_S
    )
    accepts: list[tuple[str, float]] = [(mid, t) for mid, t in result["accepts"]]
    if not accepts:
        raise BenchError(f"e2e ({sessions} sessions, {phase}): no call was accepted: {result}")
    after = sink.wait_for_mails(before.mails + len(accepts), DELIVERY_TIMEOUT_S)
    cpu_after = service.cpu_seconds()
    service.check_alive()
    receipts = sink.receipts()
    missing = [mid for mid, _ in accepts if mid not in receipts]
    if missing:
        raise BenchError(
            f"e2e ({sessions} sessions, {phase}): {len(missing)} accepted mail(s) never reached "
            f"the sink, first {missing[0]}"
        )
    latencies = [(receipts[mid] - t) * 1000 for mid, t in accepts]
    first_call = min(t for _, t in accepts)
    last_receipt = max(receipts[mid] for mid, _ in accepts)
    return E2eSample(
        sessions=sessions,
        phase=phase,
        mails=len(accepts),
        mails_per_s=len(accepts) / (last_receipt - first_call),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        relay="slow" if sink.reply_delay_ms else "instant",
        max_transactions=after.max_transactions,
        connections_used=after.busy_connections,
        round_trips_per_mail=(after.round_trips - before.round_trips) / len(accepts),
        service_cpu_ms_per_mail=(cpu_after - cpu_before) * 1000 / len(accepts),
        paced_rate=paced_rate,
    )


@attrs.define
class _Samples:
    burst: dict[int, list[E2eSample]] = attrs.Factory(lambda: {n: [] for n in SESSIONS})
    paced: dict[int, list[E2eSample]] = attrs.Factory(lambda: {n: [] for n in SESSIONS})


def _against(
    sink: SinkProcess,
    burst_mails: int,
    paced_s: float | None,
    profile: Profile,
    tls: TlsFiles,
    log_dir: Path,
) -> _Samples:
    """The repetitions against one relay: bursts, then (with ``paced_s``) the paced phase."""
    samples = _Samples()
    relay = "slow" if sink.reply_delay_ms else "instant"
    with ExitStack() as stack:
        services = {
            n: stack.enter_context(
                mailer_service(
                    f"e2e-{relay}-{n}-sessions",
                    service_env(
                        sink.port,
                        tls,
                        MAILER_SMTP_SESSIONS=str(n),
                        MAILER_QUEUE_SIZE=str(QUEUE_SIZE),
                    ),
                    log_dir,
                )
            )
            for n in SESSIONS
        }
        load = stack.enter_context(LoadgenWorker(f"e2e-{relay}-load", child_env(), log_dir))
        for rep in range(profile.repeat):
            order = SESSIONS[rep % 2 :] + SESSIONS[: rep % 2]
            for n in order:
                job: dict[str, object] = {"concurrency": BURST_CONCURRENCY, "count": burst_mails}
                samples.burst[n].append(_deliver("burst", n, job, services[n], sink, load))
            if paced_s is None:
                continue
            rate = profile.e2e_paced_fraction * samples.burst[1][-1].mails_per_s
            for n in order:
                job = {"rate": rate, "window_s": paced_s, "concurrency": PACED_MAX_IN_FLIGHT}
                samples.paced[n].append(_deliver("paced", n, job, services[n], sink, load, rate))
    return samples


def run_section(
    profile: Profile, tls: TlsFiles, instant: SinkProcess, slow: SinkProcess, log_dir: Path
) -> Section:
    fast_runs = _against(instant, profile.e2e_burst_mails, None, profile, tls, log_dir)
    slow_runs = _against(
        slow, profile.e2e_slow_burst_mails, profile.e2e_paced_s, profile, tls, log_dir
    )
    section = Section(
        "e2e",
        f"from the gRPC call to the relay's 250, 1 and 4 SMTP sessions ({profile.repeat} "
        "interleaved repetitions)",
    )
    for relay, runs, mails in (
        ("instant relay", fast_runs, profile.e2e_burst_mails),
        (f"{SLOW_RELAY_DELAY_MS:g} ms relay", slow_runs, profile.e2e_slow_burst_mails),
    ):
        for n in SESSIONS:
            label = f"{relay}, {n} session{'s' if n > 1 else ''}"
            burst = runs.burst[n]
            section.add(f"{label}: {mails}-mail burst", "mails/s", [s.mails_per_s for s in burst])
            if runs.paced[n]:
                paced = runs.paced[n]
                section.add(f"{label}: paced latency p50", "ms", [s.p50_ms for s in paced])
                section.add(f"{label}: paced latency p99", "ms", [s.p99_ms for s in paced])
            section.add(
                f"{label}: most transactions at once",
                "sessions",
                [s.max_transactions for s in burst],
            )
            section.add(
                f"{label}: relay round trips", "per mail", [s.round_trips_per_mail for s in burst]
            )
            section.add(
                f"{label}: service CPU", "ms/mail", [s.service_cpu_ms_per_mail for s in burst]
            )
    # No target at the instant relay (retired by issue 16): there one process's CPU, not the
    # relay, sets the pace, and more sessions cannot add CPU. The 10 ms relay is where a pool
    # pays: sessions mostly wait, and four can carry close to four times as much.
    for relay, runs, target in (
        ("instant relay", fast_runs, None),
        (f"{SLOW_RELAY_DELAY_MS:g} ms relay", slow_runs, Target(">=", 3.6)),
    ):
        section.ratio(
            f"e2e burst throughput 4 sessions/1 session, {relay}",
            [s.mails_per_s for s in runs.burst[4]],
            [s.mails_per_s for s in runs.burst[1]],
            target,
        )
    rates = ", ".join(f"{s.paced_rate or 0.0:.0f}" for s in slow_runs.paced[1])
    section.notes.append(
        "latency ends when the sink has the whole message, before its 250 (which the 10 ms "
        "relay holds back): a lockstep mail costs one held-back reply before that, a pipelined "
        "one too"
    )
    section.notes.append(
        f"paced rates ({SLOW_RELAY_DELAY_MS:g} ms relay): {rates} mails/s, "
        f"{profile.e2e_paced_fraction:g} x the one-session burst rate of the same repetition"
    )
    section.raw = {
        relay: {
            "burst": {str(n): [attrs.asdict(s) for s in runs.burst[n]] for n in SESSIONS},
            "paced": {str(n): [attrs.asdict(s) for s in runs.paced[n]] for n in SESSIONS},
        }
        for relay, runs in (("instant", fast_runs), ("slow", slow_runs))
    }
    return section
