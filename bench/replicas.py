"""Replicas: the SQLite outbox against PostgreSQL with one and three replicas.

Needs a PostgreSQL server: run under ``.ci/postgres`` (``PG_FSYNC=on`` for honest commits):

    PG_FSYNC=on .ci/postgres .venv/bin/python bench/run.py --only replicas

Each measurement gets fresh services (and a fresh database), so each one's stop line reports
the database round trips of that measurement alone. Two phases, interleaved per repetition:

- **accepted**: SendPass calls/s at ``LEVEL`` in flight, to a relay on a closed port (nothing is
  delivered: the outbox's commit path alone), SQLite file against PostgreSQL with one replica;
  the target: PostgreSQL >= 0.5 x SQLite;
- **delivered**: a burst of ``profile.e2e_burst_mails`` at ``LEVEL`` in flight, split evenly over
  the replicas, to the instant sink: mails/s from the first call to the sink's receipt of the last
  one, and the database round trips per delivered mail (insert, claim or status changes, finish;
  the target: at most 3), with 1 and 3 PostgreSQL replicas against SQLite.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs

from .common import BenchError, Profile, TlsFiles, child_env
from .ingress import RESULT_TIMEOUT_S, _closed_port
from .procs import LoadgenWorker, ServerProcess, SinkProcess, mailer_service, service_env
from .stats import Section, Target

LEVEL = 64  # calls in flight
QUEUE_SIZE = 20_000
URL_VARIABLE = "MAILER_TEST_POSTGRES_URL"
DELIVERY_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 180.0
_ROUND_TRIPS = re.compile(rb"(\d+) database round trips")


@attrs.frozen
class Sample:
    setup: str  # "sqlite", "postgres-1", "postgres-3"
    per_s: float
    round_trips_per_mail: float


@contextmanager
def _database() -> Iterator[str]:
    import psycopg

    url = os.environ.get(URL_VARIABLE, "")
    if not url:
        raise BenchError(f"replicas: {URL_VARIABLE} is not set: run under .ci/postgres")
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = url.partition("?")
    try:
        yield f"{base.rpartition('/')[0]}/{name}" + (f"?{query}" if query else "")
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def _services(
    setup: str, relay_port: int, tls: TlsFiles, log_dir: Path, tag: str
) -> Iterator[list[ServerProcess]]:
    count = 3 if setup == "postgres-3" else 1
    with ExitStack() as stack:
        outbox = (
            str(log_dir / f"replicas-{tag}.sqlite3")
            if setup == "sqlite"
            else stack.enter_context(_database())
        )
        env = service_env(
            relay_port,
            tls,
            MAILER_OUTBOX=outbox,
            MAILER_QUEUE_SIZE=str(QUEUE_SIZE),
            MAILER_RETRY_BASE_S="3600",
            MAILER_RETRY_MAX_S="3600",
            MAILER_SHUTDOWN_GRACE_S="5",
        )
        services = [
            stack.enter_context(mailer_service(f"replicas-{tag}-{n}", env, log_dir))
            for n in range(count)
        ]
        for service in services:
            _ = service.port  # all up before the load starts
        yield services


def _round_trips(services: list[ServerProcess]) -> int:
    total = 0
    for service in services:
        service.stop()
        match = _ROUND_TRIPS.search(service.log_path.read_bytes())
        total += int(match.group(1)) if match else 0
    return total


def _accepted(setup: str, rep: int, profile: Profile, tls: TlsFiles, log_dir: Path) -> Sample:
    with (
        _services(setup, _closed_port(), tls, log_dir, f"accept-{setup}-{rep}") as services,
        LoadgenWorker(f"replicas-accept-{setup}-{rep}", child_env(), log_dir) as load,
    ):
        job = {
            "target": f"127.0.0.1:{services[0].port}",
            "concurrency": LEVEL,
            "warmup_s": profile.ingress_warmup_s,
            "window_s": profile.ingress_window_s,
            "server_pid": services[0].pid,
            "distinct_recipients": True,
        }
        timeout = profile.ingress_warmup_s + profile.ingress_window_s + RESULT_TIMEOUT_S
        result: dict[str, Any] = load.run(job, timeout)
        for service in services:
            service.check_alive()
        accepted = result["accepted"]
        if not accepted:
            raise BenchError(f"replicas: {setup} accepted nothing: {result}")
        trips = _round_trips(services)
        return Sample(
            setup, accepted / result["window_s"], trips / max(1, result["accepted_total"])
        )


def _delivered(
    setup: str, rep: int, profile: Profile, tls: TlsFiles, sink: SinkProcess, log_dir: Path
) -> Sample:
    mails = profile.e2e_burst_mails
    with ExitStack() as stack:
        services = stack.enter_context(
            _services(setup, sink.port, tls, log_dir, f"deliver-{setup}-{rep}")
        )
        loads = [
            stack.enter_context(
                LoadgenWorker(f"replicas-deliver-{setup}-{rep}-{n}", child_env(), log_dir)
            )
            for n in range(len(services))
        ]
        sink.receipts()
        before = sink.stats(reset_window=True)
        results: list[dict[str, Any]] = [{} for _ in services]

        def run(n: int) -> None:
            job = {
                "target": f"127.0.0.1:{services[n].port}",
                "record": True,
                "concurrency": LEVEL // len(services),
                "count": mails // len(services),
            }
            results[n] = loads[n].run(job, JOB_TIMEOUT_S)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(services))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        accepts = [(mid, t) for result in results for mid, t in result.get("accepts", [])]
        if len(accepts) < mails - len(services):
            raise BenchError(f"replicas: {setup}: only {len(accepts)} of {mails} accepted")
        sink.wait_for_mails(before.mails + len(accepts), DELIVERY_TIMEOUT_S)
        receipts = sink.receipts()
        missing = [mid for mid, _ in accepts if mid not in receipts]
        if missing:
            raise BenchError(f"replicas: {setup}: {len(missing)} mails never reached the sink")
        first = min(t for _, t in accepts)
        last = max(receipts[mid] for mid, _ in accepts)
        trips = _round_trips(services)
        return Sample(setup, len(accepts) / (last - first), trips / len(accepts))


def run_section(profile: Profile, tls: TlsFiles, sink: SinkProcess, log_dir: Path) -> Section:
    accept_setups = ("sqlite", "postgres-1")
    deliver_setups = ("sqlite", "postgres-1", "postgres-3")
    accepted: dict[str, list[Sample]] = {s: [] for s in accept_setups}
    delivered: dict[str, list[Sample]] = {s: [] for s in deliver_setups}
    for rep in range(profile.repeat):
        for setup in accept_setups[rep % 2 :] + accept_setups[: rep % 2]:
            accepted[setup].append(_accepted(setup, rep, profile, tls, log_dir))
        for setup in deliver_setups[rep % 3 :] + deliver_setups[: rep % 3]:
            delivered[setup].append(_delivered(setup, rep, profile, tls, sink, log_dir))
    section = Section(
        "replicas",
        f"SQLite outbox against PostgreSQL with 1 and 3 replicas, {LEVEL} calls in flight "
        f"({profile.repeat} interleaved repetitions)",
    )
    for setup, runs in accepted.items():
        section.add(f"{setup}: accepted (closed relay)", "calls/s", [s.per_s for s in runs])
        if setup != "sqlite":
            section.add(
                f"{setup}: database round trips, accept only",
                "per mail",
                [s.round_trips_per_mail for s in runs],
            )
    for setup, runs in delivered.items():
        section.add(
            f"{setup}: delivered ({profile.e2e_burst_mails}-mail burst)",
            "mails/s",
            [s.per_s for s in runs],
        )
        if setup != "sqlite":
            section.add(
                f"{setup}: database round trips",
                "per delivered mail",
                [s.round_trips_per_mail for s in runs],
            )
    section.ratio(
        "accepted calls/s PostgreSQL 1 replica / SQLite",
        [s.per_s for s in accepted["postgres-1"]],
        [s.per_s for s in accepted["sqlite"]],
        Target(">=", 0.5),
    )
    section.ratio(
        "delivered mails/s PostgreSQL 3 replicas / 1 replica",
        [s.per_s for s in delivered["postgres-3"]],
        [s.per_s for s in delivered["postgres-1"]],
        None,
    )
    section.raw = {
        "accepted": {k: [attrs.asdict(s) for s in v] for k, v in accepted.items()},
        "delivered": {k: [attrs.asdict(s) for s in v] for k, v in delivered.items()},
    }
    return section
