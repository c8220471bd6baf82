"""Issue 22 with stock grpcio: a compliant client on one channel gets an answer on every call.

Each test runs the client in a worker thread against the in-process service, on a channel of
its own with retries off (a refused stream would otherwise be retried out of sight), and
records the channel's connectivity after a warm-up call: anything but READY is a closed
connection.
"""

from __future__ import annotations

from collections import Counter

import trio

from .fakes.fault_relay import Fault
from .interop.support import Answer, answer, stock_channel

CALL_TIMEOUT_S = 10
BURSTS = 6  # the refusal is a race (a stream counted past its END_STREAM): run it a few times
# A relay taking 20 ms a mail keeps the queue full: most calls wait their turn to be refused.
SLOW_RELAY = Fault("DOT", delay_s=0.02, times=-1)
ORDINARY_CODE = "123456"
OVERSIZED_CODE = "x" * 9000  # the message limit is 4 KiB


def _outcome(result: Answer) -> str:
    """``sent``, a refusal's reason, or the failed call's status and details."""
    if result.code != "OK":
        return f"{result.code}: {result.details}"
    return "sent" if result.reply.sent else str(result.reply.reason)


def _closes(states: list[str]) -> list[str]:
    return [state for state in states if state != "READY"]


def _bursts_in_flight(port: int, calls: int, rounds: int) -> tuple[Counter[str], list[str]]:
    """``rounds`` times, ``calls`` SendPass started at once and all awaited."""
    outcomes: Counter[str] = Counter()
    with stock_channel(port) as stock:
        stock.warm_up()
        for r in range(rounds):
            futures = [
                stock.send_pass(f"user{r}-{n}@example.com", ORDINARY_CODE, CALL_TIMEOUT_S)
                for n in range(calls)
            ]
            outcomes.update(_outcome(answer(future)) for future in futures)
        return outcomes, list(stock.states)


async def test_200_send_pass_in_flight_on_one_channel_each_get_their_own_answer(
    start_harness,
) -> None:
    """200 SendPass at once after a warm-up (6 rounds), queue 10 and a slow relay, so most are
    refused "queue full"; MAX_CONCURRENT_STREAMS is 100: every call is accepted or refused,
    no REFUSED_STREAM, no closed connection."""
    with trio.fail_after(60):
        async with start_harness(env={"MAILER_QUEUE_SIZE": "10"}) as h:
            h.relay.add_fault(SLOW_RELAY)
            outcomes, states = await trio.to_thread.run_sync(
                _bursts_in_flight, h.grpc_port, 200, BURSTS
            )
    answered = {"sent", "queue full"}
    observed = {
        "failed": {k: n for k, n in outcomes.items() if k not in answered},
        "answered": sum(n for k, n in outcomes.items() if k in answered),
        "closes": _closes(states),
    }
    assert observed == {"failed": {}, "answered": 200 * BURSTS, "closes": []}
    assert outcomes["sent"] >= 10, outcomes  # the queue took at least its size


def _oversized_beside_ordinary(port: int) -> tuple[list[str], list[str], list[str]]:
    """60 oversized SendPass and 20 ordinary ones, interleaved, all in flight on one channel."""
    with stock_channel(port) as stock:
        stock.warm_up()
        oversized, ordinary = [], []
        for n in range(20):
            for m in range(3):
                to = f"big{n}-{m}@example.com"
                oversized.append(stock.send_pass(to, OVERSIZED_CODE, CALL_TIMEOUT_S))
            ordinary.append(stock.send_pass(f"user{n}@example.com", ORDINARY_CODE, CALL_TIMEOUT_S))
        return (
            [_outcome(answer(future)) for future in oversized],
            [_outcome(answer(future)) for future in ordinary],
            list(stock.states),
        )


async def test_oversized_requests_fail_alone_beside_ordinary_calls(start_harness) -> None:
    """A burst of 60 requests over 4 KiB beside 20 ordinary calls: RESOURCE_EXHAUSTED on each
    oversized call, every ordinary call accepted, the connection kept."""
    with trio.fail_after(60):
        async with start_harness(env={"MAILER_QUEUE_SIZE": "100"}) as h:
            oversized, ordinary, states = await trio.to_thread.run_sync(
                _oversized_beside_ordinary, h.grpc_port
            )
    per_call = "RESOURCE_EXHAUSTED: request message larger than 4096 bytes"
    observed = {
        "oversized": Counter(per_call if o.startswith(per_call) else o for o in oversized),
        "ordinary": Counter(ordinary),
        "closes": _closes(states),
    }
    assert observed == {"oversized": {per_call: 60}, "ordinary": {"sent": 20}, "closes": []}
