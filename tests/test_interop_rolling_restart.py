"""Issue 22's rolling restart: three replicas on one PostgreSQL outbox behind stock grpcio's
``round_robin``, eight callers sending all the while, a relay taking 50 ms a mail.

Each replica in turn gets SIGTERM, drains (health NOT_SERVING, listener closed, GOAWAY, its calls
finished, its queue delivered), exits 0 within ``MAILER_SHUTDOWN_GRACE_S`` and starts again on
the same port; the next one is restarted only once the balancer sends it calls again. No call
fails, and every accepted mail reaches the relay exactly once.

What counts as failed: any call that does not end with status OK (UNAVAILABLE of any kind,
DEADLINE_EXCEEDED, ...), and any ``sent=false`` other than "queue full". "queue full" is the
README's answer to a full queue (status OK, ``retry_after_ms`` set): the caller is told to come
back later, nothing broke; it is counted and shown, not failed. The rate limits and the
suppression list are off (``relay_env``) and every recipient is new, so no other refusal is
expected.

Needs a PostgreSQL server: ``.ci/postgres .venv/bin/python -m pytest
tests/test_interop_rolling_restart.py`` (skips without one locally, fails under ``CI=true``).
"""

from __future__ import annotations

import collections
import re
import signal
import ssl
import threading
import time
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
import grpc
import trio

from .fakes.fault_relay import Fault, FaultRelay
from .helpers import LISTENING, Service, message_ids, relay_env, start_service, subprocess_env
from .interop.support import Answer, StockChannel, answer
from .postgres_helpers import fresh_database

REPLICAS = 3
CALLERS = 8
GRACE_S = 5
EXIT_SLACK_S = 1.0  # the interpreter's own exit after the drain
CALL_TIMEOUT_S = 10
START_S = 20  # an interpreter starting on a busy machine: "listening on"
SETTLE_S = 1.0  # traffic before the first restart and after the last
BACK_IN_ROTATION_S = 10  # grpcio's reconnect backoff (1 s, x1.6, jittered) after the restart
DELIVERY_S = 20
TOTAL_S = 90
# 50 ms a mail; four sessions a replica deliver about 80 mails/s each, so the queue of 50 is
# delivered within a second of the drain.
SLOW_RELAY = Fault("DOT", delay_s=0.05, times=-1)
ENV = {
    "MAILER_QUEUE_SIZE": "50",
    "MAILER_SMTP_SESSIONS": "4",
    "MAILER_SHUTDOWN_GRACE_S": str(GRACE_S),
    "MAILER_METRICS_PORT": "0",
    "MAILER_DB_POOL_SIZE": "4",
}
METRICS = re.compile(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics")
ANSWERED = ("sent", "queue full")  # the per-call answers that are not failures


@attrs.define
class Run:
    """One process of a replica: when it was signalled, when and how it exited (every time
    here is ``time.monotonic()``, as the callers' threads record it: trio's clock has an
    offset of its own)."""

    service: Service
    port: int
    metrics_port: int
    started_at: float
    listening_at: float
    signalled_at: float | None = None
    exited_at: float | None = None
    status: int | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    async def collect(self) -> None:
        """Read stderr (so that it never blocks on a full pipe) until the process exits."""
        self.status = await self.service.finish()
        self.exited_at = time.monotonic()
        self.done.set()

    async def stop(self) -> None:
        self.signalled_at = time.monotonic()
        self.service.process.send_signal(signal.SIGTERM)
        with trio.fail_after(GRACE_S + 10):
            await self.done.wait()

    def exit_s(self) -> float:
        assert self.exited_at is not None and self.signalled_at is not None
        return self.exited_at - self.signalled_at


@attrs.frozen
class Call:
    """One SendPass as a caller saw it."""

    started: float
    ended: float
    result: Answer

    def outcome(self) -> str:
        if self.result.code != "OK":
            return f"{self.result.code}: {self.result.details}"
        return "sent" if self.result.reply.sent else str(self.result.reply.reason)


@attrs.define
class Restart:
    """A replica's restart: the signal, the exit, "listening on", and the first
    SendPass the balancer sent it again."""

    replica: int
    in_flight: int  # SendPass calls the replica was serving just before the signal
    signalled_at: float
    exited_at: float
    listening_at: float
    in_rotation_at: float

    def timings(self) -> dict[str, float]:
        return {
            "in_flight_at_sigterm": self.in_flight,
            "exit_s": round(self.exited_at - self.signalled_at, 2),
            "restart_s": round(self.listening_at - self.exited_at, 2),
            "back_in_rotation_s": round(self.in_rotation_at - self.listening_at, 2),
        }


def _send_pass_calls(metrics_port: int) -> tuple[int, int]:
    """SendPass calls the replica has started and answered, from its own metrics."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()

    def total(name: str) -> int:
        return sum(
            int(float(line.rpartition(" ")[2]))
            for line in lines
            if line.startswith(f"{name}{{") and 'grpc_method="SendPass"' in line
        )

    return total("grpc_server_started_total"), total("grpc_server_handled_total")


async def _in_rotation(run: Run) -> float:
    """Wait until the balancer has sent ``run`` a SendPass; when that was seen."""
    with trio.fail_after(BACK_IN_ROTATION_S):
        while True:  # its metrics are the only place that says (polled)
            _, handled = await trio.to_thread.run_sync(_send_pass_calls, run.metrics_port)
            if handled > 0:
                return time.monotonic()
            await trio.sleep(0.05)


def _caller(stock: StockChannel, n: int, stop: threading.Event, calls: list[Call]) -> None:
    """SendPass after SendPass, each to a new recipient, until ``stop``."""
    k = 0
    while not stop.is_set():
        started = time.monotonic()
        result = answer(stock.send_pass(f"caller{n}-{k}@example.com", f"{k:06d}", CALL_TIMEOUT_S))
        calls.append(Call(started, time.monotonic(), result))
        k += 1


@attrs.define
class Cluster:
    """The replicas, each a list of its processes (the last one running)."""

    env: dict[str, str]
    tmp_path: Path
    stack: AsyncExitStack
    nursery: trio.Nursery
    runs: list[list[Run]] = attrs.Factory(lambda: [[] for _ in range(REPLICAS)])

    async def start(self, replica: int, port: int = 0) -> Run:
        """Start ``replica`` on ``port`` (0: any); returns once it logged "listening on"."""
        cwd = self.tmp_path / f"replica{replica}"
        cwd.mkdir(exist_ok=True)
        env = subprocess_env(**{**self.env, "MAILER_SERVE_PORT": str(port)})
        started_at = time.monotonic()
        service = await self.stack.enter_async_context(start_service(["serve"], env, cwd))
        with trio.fail_after(START_S):
            bound = int((await service.read_until(LISTENING)).group(1))
        listening_at = time.monotonic()
        metrics = METRICS.search(service.stderr)  # logged before "listening on"
        assert metrics is not None, service.text
        assert port in (0, bound), (port, bound)
        run = Run(service, bound, int(metrics.group(1)), started_at, listening_at)
        self.nursery.start_soon(run.collect)
        self.runs[replica].append(run)
        return run

    def current(self, replica: int) -> Run:
        return self.runs[replica][-1]

    def logs(self) -> str:
        return "\n".join(
            f"---- replica {n} run {m} (exit {run.status}) ----\n{run.service.text[-3000:]}"
            for n, runs in enumerate(self.runs)
            for m, run in enumerate(runs)
        )


async def test_rolling_restart_of_three_replicas_behind_round_robin_fails_no_call(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """8 callers on one round_robin channel over 3 replicas while each replica is restarted in
    turn: every call answered (sent, or "queue full"), every accepted mail delivered once,
    every replica exits 0 within the grace period."""
    relay = FaultRelay(ssl_context=relay_tls)
    relay.add_fault(SLOW_RELAY)
    calls: list[Call] = []
    restarts: list[Restart] = []
    with fresh_database() as url, trio.fail_after(TOTAL_S):
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            env = relay_env(relay_port, ca_file, MAILER_OUTBOX=url, **ENV)
            cluster = Cluster(env, tmp_path, stack, nursery)
            try:
                async with trio.open_nursery() as starting:  # they meet on the empty database
                    for n in range(REPLICAS):
                        starting.start_soon(cluster.start, n)
                ports = [cluster.current(n).port for n in range(REPLICAS)]
                states = await _restart_under_load(cluster, ports, calls, restarts)
                accepted = [c.result.reply.message_id for c in calls if c.outcome() == "sent"]
                with trio.move_on_after(DELIVERY_S):
                    while not set(accepted) <= set(message_ids(relay)):
                        await relay.wait_for_mails(relay.statistics().mails_received + 1)
                async with trio.open_nursery() as stopping:
                    for n in range(REPLICAS):
                        stopping.start_soon(cluster.current(n).stop)
            except BaseException:
                print(cluster.logs())
                raise
            nursery.cancel_scope.cancel()

    outcomes = collections.Counter(c.outcome() for c in calls)
    copies = collections.Counter(message_ids(relay))
    runs = [run for replica in cluster.runs for run in replica]
    print(
        f"calls: {len(calls)}; outcomes: {dict(outcomes)}; delivered: {len(copies)}; "
        f"restarts: {[r.timings() for r in restarts]}; the channel's states: {states}"
    )
    observed: dict[str, Any] = {
        "failed": {k: n for k, n in outcomes.items() if k not in ANSWERED},
        "failed_calls": _failed_calls(calls, restarts),
        "undelivered": len(set(accepted) - set(copies)),
        "delivered_not_accepted": len(set(copies) - set(accepted)),
        "delivered_twice": sum(1 for n in copies.values() if n > 1),
        "exit_statuses": [run.status for run in runs],
        "exits_past_grace": [
            round(run.exit_s(), 2) for run in runs if run.exit_s() > GRACE_S + EXIT_SLACK_S
        ],
        "restarted": len(restarts),
    }
    assert observed == {
        "failed": {},
        "failed_calls": [],
        "undelivered": 0,
        "delivered_not_accepted": 0,
        "delivered_twice": 0,
        "exit_statuses": [0] * (2 * REPLICAS),
        "exits_past_grace": [],
        "restarted": REPLICAS,
    }, cluster.logs()
    assert outcomes["sent"] >= 100, outcomes  # the traffic was real


async def _restart_under_load(
    cluster: Cluster, ports: list[int], calls: list[Call], restarts: list[Restart]
) -> list[str]:
    """The callers on a round_robin channel, and each replica restarted in turn under them;
    the channel's connectivity states after the warm-up (READY as long as one replica is)."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    options = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 0),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_http_proxy", 0),  # loopback only, whatever the environment says
    ]
    stop = threading.Event()
    with grpc.insecure_channel(target, options=options) as channel:
        stock = StockChannel(channel)
        await trio.to_thread.run_sync(stock.warm_up)
        async with trio.open_nursery() as callers:
            for n in range(CALLERS):
                callers.start_soon(trio.to_thread.run_sync, _caller, stock, n, stop, calls)
            try:
                for n in range(REPLICAS):  # every replica in the balancer's rotation
                    await _in_rotation(cluster.current(n))
                await trio.sleep(SETTLE_S)
                for n in range(REPLICAS):
                    old = cluster.current(n)
                    started, handled = await trio.to_thread.run_sync(
                        _send_pass_calls, old.metrics_port
                    )
                    await old.stop()
                    new = await cluster.start(n, ports[n])  # the same port, free again
                    in_rotation_at = await _in_rotation(new)
                    assert old.signalled_at is not None and old.exited_at is not None
                    restarts.append(
                        Restart(
                            n,
                            started - handled,
                            old.signalled_at,
                            old.exited_at,
                            new.listening_at,
                            in_rotation_at,
                        )
                    )
                await trio.sleep(SETTLE_S)
            finally:
                stop.set()  # the callers end within a call's timeout
        channel.unsubscribe(stock._on_state)
        return list(stock.states)


def _failed_calls(calls: list[Call], restarts: list[Restart]) -> list[str]:
    """The first failed calls, each placed against the restarts: which replica's restart was
    under way (from its signal to its first call from the balancer) and when, in seconds from
    that signal."""
    described = []
    for call in sorted(calls, key=lambda c: c.started):
        if call.outcome() in ANSWERED:
            continue
        during = [r for r in restarts if r.signalled_at - 1 <= call.ended <= r.in_rotation_at]
        where = (
            f"replica {during[0].replica}'s restart, started "
            f"{call.started - during[0].signalled_at:+.3f}s, ended "
            f"{call.ended - during[0].signalled_at:+.3f}s from its SIGTERM"
            if during
            else "outside any restart"
        )
        described.append(f"{call.outcome()} ({where})")
    return described[:20]
