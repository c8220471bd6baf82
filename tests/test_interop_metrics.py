"""Issue 22's exact status accounting: the metrics say the code that went on the wire.

A client's RST_STREAM(CANCEL) of its own WatchStatus is CANCELLED; a watch whose grpc-timeout
ran out on the server is DEADLINE_EXCEEDED, on the wire and in the metrics; neither is
``outcome="internal"``, which counts INTERNAL only. A frame-level client makes the calls, so
that no client-side timer races the server's deadline.
"""

from __future__ import annotations

from collections import Counter

import trio

from trio_mailer.v1.mailer_pb2 import StatusRequest

from .helpers import Harness
from .interop.support import KEEP_WAITING, MAILER, handled, sample, unfinished_mail
from .raw_h2 import RawClient, grpc_headers, grpc_message, rst

WATCHES = 20
DEADLINE_EXCEEDED = 4
CODES = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL")


def _outcomes(h: Harness) -> dict[str, float]:
    return {
        outcome: sample(h, "trio_mailer_requests_total", method="WatchStatus", outcome=outcome)
        for outcome in ("ok", "cancelled", "deadline_exceeded", "internal")
    }


async def test_cancelled_and_timed_out_watches_are_counted_by_the_code_on_the_wire(
    start_harness,
) -> None:
    """20 watches cancelled by the client after their first status, 20 ended by their 200 ms
    grpc-timeout: handled CANCELLED 20 and DEADLINE_EXCEEDED 20; outcome internal stays 0."""
    with trio.fail_after(30):
        async with start_harness(env=KEEP_WAITING) as h:
            request = grpc_message(
                StatusRequest(message_id=await unfinished_mail(h)).SerializeToString()
            )
            watch = f"{MAILER}/WatchStatus"
            client = await RawClient.connect(h.grpc_port)
            try:
                timed = [
                    await client.call(request, grpc_headers(watch, grpc_timeout="200m"))
                    for _ in range(WATCHES)
                ]
                cancelled = [
                    await client.call(request, grpc_headers(watch)) for _ in range(WATCHES)
                ]
                await client.read_until(
                    lambda c: all(s in c.streams and c.streams[s].data for s in cancelled)
                )
                await client.send(b"".join(rst(s) for s in cancelled))
                on_the_wire = Counter([(await client.wait_status(s)).grpc_status for s in timed])
                for _ in range(100):  # the server counts a cancel when it notices it (5 s)
                    if sum(handled(h, "WatchStatus", code) for code in CODES) >= 2 * WATCHES:
                        break
                    await trio.sleep(0.05)
                observed = {
                    "on_the_wire": on_the_wire,
                    "handled": {code: handled(h, "WatchStatus", code) for code in CODES},
                    "outcomes": _outcomes(h),
                    "goaway": client.goaway,
                }
            finally:
                await client.aclose()
    assert observed == {
        "on_the_wire": {DEADLINE_EXCEEDED: WATCHES},
        "handled": {
            "OK": 0,
            "CANCELLED": WATCHES,
            "DEADLINE_EXCEEDED": WATCHES,
            "UNAVAILABLE": 0,
            "INTERNAL": 0,
        },
        "outcomes": {
            "ok": 0,
            "cancelled": WATCHES,
            "deadline_exceeded": WATCHES,
            "internal": 0,
        },
        "goaway": None,
    }
