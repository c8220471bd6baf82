"""A grpcio load generator for ``/trio_mailer.v1.Mailer/SendPass``, run as its own process.

It is a separate process so that the load it makes costs the server's CPU, not the benchmark's,
and so that a server and its load never share a GIL. It uses grpcio (C core), as the service's
real callers would, and the asyncio API, so one process keeps many calls in flight cheaply.

Worker mode (``--worker``, how ``run.py`` uses it): prints ``{"ready": true}``, then takes one JSON
job per stdin line and answers ``{"event": "started"}`` once its channels are connected and the
calls are going, then ``{"event": "result", ...}``. It ends at end of stdin. One-shot mode:
``--job '{"target": "127.0.0.1:20100", "concurrency": 16}'`` runs one job and prints its result.

A job (every key but ``target`` optional; see ``Job``) is one of:

- a **window** (default): ``concurrency`` closed-loop callers for ``warmup_s + window_s +
  tail_s``; only calls that end inside the window count, and ``server_pid``'s CPU time is read
  at the window's edges. With ``min_calls`` the window lasts until at least that many calls
  ended in it: a server starved of CPU that answers 64 calls in flight all together, once a
  second, would otherwise show a short window with no call in it at all;
- a **count**: callers until ``count`` calls were accepted (a refused call is tried again);
- a **rate**: open loop, one call every ``1/rate`` seconds for ``window_s``, at most
  ``concurrency`` in flight (a call that finds no room is skipped and counted).

Every job is bounded by ``max_duration_s``, and every call by ``call_timeout_s``. Times are
``time.monotonic()`` (CLOCK_MONOTONIC, the same clock the sink stamps receipts with).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

METHOD = "/trio_mailer.v1.Mailer/SendPass"
RECIPIENT = "user@example.com"
ERROR_PAUSE_S = 0.01  # after a failed call, so a dead server does not become a hot loop
_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Job:
    target: str  # host:port
    concurrency: int = 1
    channels: int = 1  # connections; the callers share them round-robin
    warmup_s: float = 0.0
    window_s: float = 1.0  # the measured window; for rate: how long calls are started
    tail_s: float = 0.0  # keep the load on after the window (the parent may be measuring)
    count: int | None = None
    rate: float | None = None  # calls per second
    backoff_s: float = 0.0  # pause after a refused call
    record: bool = False  # return (Message-ID, start time) of every accepted call
    server_pid: int | None = None
    min_calls: int = 0  # window: it lasts until at least this many calls ended in it
    call_timeout_s: float = 5.0
    max_duration_s: float = 300.0
    idempotency_keys: bool = False  # a fresh idempotency_key on every call
    distinct_recipients: bool = False  # a new address on every call (for the recipient limit)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"job: unknown keys {sorted(unknown)}")
        job = cls(**data)
        if job.concurrency < 1 or job.channels < 1:
            raise ValueError("job: concurrency and channels must be at least 1")
        if job.count is not None and job.rate is not None:
            raise ValueError("job: give count or rate, not both")
        return job


@dataclass(frozen=True)
class Call:
    start: float
    end: float
    outcome: str  # "accepted", "refused", or the gRPC status name
    message_id: str


@dataclass
class _Run:
    """The state one job's callers share."""

    job: Job
    stop_at: float
    calls: list[Call] = field(default_factory=list)
    tickets: int = 0  # count mode: calls still to be accepted
    sequence: int = 0
    salt: str = field(default_factory=lambda: os.urandom(4).hex())  # keys unique across jobs
    # min_calls: set while the window waits for its calls; set when they have ended
    enough: asyncio.Event | None = None
    window_start: float = 0.0

    def ended(self, call: Call) -> None:
        self.calls.append(call)
        if self.enough is not None:
            counted = sum(1 for c in self.calls if c.end >= self.window_start)
            if counted >= self.job.min_calls:
                self.enough.set()


def _cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class _CpuWindow:
    """CPU time of the server and of this process between two instants."""

    def __init__(self, server_pid: int | None) -> None:
        self._pid = server_pid
        self._start: tuple[float, float] | None = None
        self._end: tuple[float, float] | None = None

    def _now(self) -> tuple[float, float]:
        return (_cpu_s(self._pid) if self._pid else 0.0, _own_cpu_s())

    def open(self) -> None:
        self._start = self._now()

    def close(self) -> None:
        if self._end is None:
            self._end = self._now()

    def used(self) -> dict[str, float | None]:
        if self._start is None or self._end is None:
            return {"server_cpu_s": None, "client_cpu_s": None}
        return {
            "server_cpu_s": self._end[0] - self._start[0] if self._pid else None,
            "client_cpu_s": self._end[1] - self._start[1],
        }


async def _one_call(run: _Run, call: grpc.aio.UnaryUnaryMultiCallable) -> Call:
    run.sequence += 1
    n = run.sequence
    request = MsgRequest(
        to=f"user{n}-{run.salt}@example.com" if run.job.distinct_recipients else RECIPIENT,
        code=f"{n % 1_000_000:06d}",
        idempotency_key=f"bench-{run.salt}-{n}" if run.job.idempotency_keys else "",
    )
    start = time.monotonic()
    try:
        reply: MsgReply = await call(request, timeout=run.job.call_timeout_s)
    except grpc.aio.AioRpcError as exc:
        result = Call(start, time.monotonic(), exc.code().name, "")
    else:
        outcome = "accepted" if reply.sent else "refused"
        result = Call(start, time.monotonic(), outcome, reply.message_id)
    run.ended(result)
    return result


async def _closed_loop_caller(run: _Run, call: grpc.aio.UnaryUnaryMultiCallable) -> None:
    counting = run.job.count is not None
    while time.monotonic() < run.stop_at:
        if counting:
            if run.tickets <= 0:
                return
            run.tickets -= 1
        result = await _one_call(run, call)
        if result.outcome == "accepted":
            continue
        if counting:
            run.tickets += 1  # not accepted: it must be asked again
        if result.outcome == "refused":
            if run.job.backoff_s:
                await asyncio.sleep(run.job.backoff_s)
        else:
            await asyncio.sleep(ERROR_PAUSE_S)


async def _open_loop(run: _Run, calls: list[grpc.aio.UnaryUnaryMultiCallable]) -> dict[str, Any]:
    job = run.job
    assert job.rate is not None
    interval_s = 1.0 / job.rate
    in_flight: set[asyncio.Task[Call]] = set()
    skipped = 0
    worst_lag_s = 0.0
    start = time.monotonic()
    for i in range(int(job.rate * job.window_s)):
        delay_s = start + i * interval_s - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        worst_lag_s = max(worst_lag_s, -delay_s)
        if len(in_flight) >= job.concurrency:
            skipped += 1
            continue
        task = asyncio.create_task(_one_call(run, calls[i % len(calls)]))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    return {"skipped": skipped, "worst_lag_s": worst_lag_s}


async def run_job(job: Job, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run ``job``; ``emit`` gets the "started" event. Returns the result event."""
    own_pool = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
    channels = [
        grpc.aio.insecure_channel(job.target, options=own_pool) for _ in range(job.channels)
    ]
    try:
        calls = [
            channel.unary_unary(
                METHOD,
                request_serializer=MsgRequest.SerializeToString,
                response_deserializer=MsgReply.FromString,
            )
            for channel in channels
        ]
        async with asyncio.timeout(job.call_timeout_s):
            await asyncio.gather(*(channel.channel_ready() for channel in channels))
        emit({"event": "started"})
        async with asyncio.timeout(job.max_duration_s):
            return await _load(job, calls)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


async def _load(job: Job, calls: list[grpc.aio.UnaryUnaryMultiCallable]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    windowed = job.count is None and job.rate is None
    window_start = start + job.warmup_s if windowed else start
    window_end = window_start + job.window_s
    run = _Run(job, stop_at=window_end + job.tail_s if windowed else start + job.max_duration_s)
    run.tickets = job.count or 0
    cpu = _CpuWindow(job.server_pid)
    extra: dict[str, Any] = {}
    closing: asyncio.Task[float] | None = None
    if windowed:
        # The loop's clock is time.monotonic(): the callbacks fire at the window's edges.
        loop.call_at(window_start, cpu.open)
        if job.min_calls:
            run.stop_at = math.inf  # until the window has its calls
            closing = asyncio.create_task(_close_window(run, cpu, window_start, window_end))
        else:
            loop.call_at(window_end, cpu.close)
    else:
        cpu.open()
    if job.rate is not None:
        extra = await _open_loop(run, calls)
    else:
        callers = [_closed_loop_caller(run, calls[i % len(calls)]) for i in range(job.concurrency)]
        await asyncio.gather(*callers)
    if closing is not None:
        window_end = await closing
    if not windowed:
        cpu.close()
        window_end = time.monotonic()
    return _result(run, window_start, window_end, cpu, extra)


async def _close_window(run: _Run, cpu: _CpuWindow, start: float, earliest_end: float) -> float:
    """End the window at ``earliest_end`` or, if fewer than ``min_calls`` calls ended in it by
    then, as soon as they have; the callers stop ``tail_s`` later. Returns the window's end."""
    await asyncio.sleep(max(0.0, earliest_end - time.monotonic()))
    if sum(1 for c in run.calls if c.end >= start) < run.job.min_calls:
        run.window_start, run.enough = start, asyncio.Event()
        await run.enough.wait()
    end = time.monotonic()
    cpu.close()
    run.stop_at = end + run.job.tail_s
    return end


def _result(
    run: _Run, window_start: float, window_end: float, cpu: _CpuWindow, extra: dict[str, Any]
) -> dict[str, Any]:
    counted = [c for c in run.calls if window_start <= c.end <= window_end]
    errors: dict[str, int] = {}
    for c in counted:
        if c.outcome not in ("accepted", "refused"):
            errors[c.outcome] = errors.get(c.outcome, 0) + 1
    result: dict[str, Any] = {
        "event": "result",
        "window_s": window_end - window_start,
        "calls": len(counted),
        "accepted": sum(c.outcome == "accepted" for c in counted),
        "refused": sum(c.outcome == "refused" for c in counted),
        "errors": errors,
        "latencies_ms": [
            round((c.end - c.start) * 1000, 3)
            for c in counted
            if c.outcome in ("accepted", "refused")
        ],
        "calls_total": len(run.calls),
        "accepted_total": sum(c.outcome == "accepted" for c in run.calls),
        **cpu.used(),
        **extra,
    }
    if run.job.record:
        result["accepts"] = [[c.message_id, c.start] for c in run.calls if c.outcome == "accepted"]
    return result


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _worker() -> None:
    loop = asyncio.get_running_loop()
    _emit({"ready": True})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        try:
            job = Job.from_json(json.loads(line))
            result = await run_job(job, _emit)
        except (ValueError, TypeError, TimeoutError, grpc.RpcError, OSError) as exc:
            _emit({"error": f"{type(exc).__name__}: {exc}"})
            continue
        _emit(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="grpcio load for trio-mailer's SendPass.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--worker", action="store_true", help="take JSON jobs on stdin")
    mode.add_argument("--job", help="run this one JSON job and print its result")
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(_worker())
        return 0
    try:
        result = asyncio.run(run_job(Job.from_json(json.loads(args.job)), _emit))
    except (ValueError, TypeError, TimeoutError, grpc.RpcError, OSError) as exc:
        print(f"loadgen: {type(exc).__name__}: {str(exc) or 'timed out'}", file=sys.stderr)
        return 1
    latencies = sorted(result.pop("latencies_ms"))
    result.pop("accepts", None)
    if latencies:
        result["p50_ms"] = latencies[len(latencies) // 2]
        result["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
