"""Issue 22 with Node's @grpc/grpc-js: client cancels and short deadlines are ordinary traffic.

tests/interop/grpc_js_client.js makes the calls on one channel (one connection) and reports
every call's status and the channel's connectivity after its warm-up; its transport trace
(GRPC_TRACE=transport) names every GOAWAY and connection close.
"""

from __future__ import annotations

import trio

from .helpers import send_pass
from .interop.support import KEEP_WAITING, run_grpc_js, transport_events, unfinished_mail

DEADLINE_SECONDS = 5
IN_FLIGHT = 50


async def test_cancelled_watches_are_ordinary_traffic(start_harness) -> None:
    """300 WatchStatus cancelled within about 1 s, then 250 cancels a second for 5 s, each
    after its first status: no GOAWAY, and 20 unrelated calls on the channel then succeed."""
    with trio.fail_after(90):
        async with start_harness(env=KEEP_WAITING) as h:
            message_id = await unfinished_mail(h)
            result, trace = await run_grpc_js("cancels", h.grpc_port, message_id, timeout_s=60)
    observed = {
        "watches": result["watches"],
        "unexpected": result["unexpected"],
        "after": result["after"],
        "after_unexpected": result["after_unexpected"],
        "states": result["states"],
        "connection_events": transport_events(trace),
    }
    assert observed == {
        "watches": {"WatchStatus": {"CANCELLED": 300 + 1250}},
        "unexpected": [],
        "after": {"GetStatus": {"OK": 10}, "SendPass": {"OK": 10}},
        "after_unexpected": [],
        "states": [],
        "connection_events": [],
    }


async def test_calls_with_1_to_4_ms_deadlines_end_ok_or_deadline_exceeded(start_harness) -> None:
    """50 calls in flight for 5 s, each with a 1-4 ms deadline (SendPass and GetStatus in
    turn): each ends OK or DEADLINE_EXCEEDED, and the connection is never closed."""
    with trio.fail_after(60):
        async with start_harness() as h:
            message_id = await send_pass(h)
            result, trace = await run_grpc_js(
                "deadlines", h.grpc_port, message_id, DEADLINE_SECONDS, IN_FLIGHT, timeout_s=40
            )
    codes = {code for by_code in result["calls"].values() for code in by_code}
    observed = {
        "other_codes": codes - {"OK", "DEADLINE_EXCEEDED"},
        "unexpected": result["unexpected"],
        "states": result["states"],
        "connection_events": transport_events(trace),
    }
    assert observed == {
        "other_codes": set(),
        "unexpected": [],
        "states": [],
        "connection_events": [],
    }
    assert result["sent"] >= IN_FLIGHT * 10, result  # a real load, not a few stalled calls
