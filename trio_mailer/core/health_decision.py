"""Whether the service should call itself healthy: pure, from the senders' state.

SERVING when a session is up, or nothing is known to be wrong (a session is opened only when
mail comes, so an idle service has none). NOT_SERVING until one session to the relay has
succeeded since start-up (the start-up relay check: EHLO, TLS, AUTH, QUIT), from the first
moment of a drain, while
the relay refuses our credentials or certificate (that will not heal by itself), and once the
relay has been unreachable for ``down_after_s``: long enough that an orchestrator should route
callers elsewhere, short of flapping on one dropped connection.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs


@attrs.frozen
class SenderStatistics:
    delivered: int
    failed: int
    retries: int
    connects: int
    sessions_up: int
    in_flight: tuple[str, ...]  # the Message-IDs being sent
    relay_down_since_s: float | None = None  # trio clock: first failed connect of this outage
    config_error: bool = False  # the relay refuses our credentials or certificate


def is_serving(
    senders: Sequence[SenderStatistics],
    *,
    draining: bool,
    now_s: float,
    down_after_s: float,
    relay_verified: bool = True,
) -> bool:
    if draining or not relay_verified:
        return False
    if any(s.sessions_up for s in senders):
        return True
    if any(s.config_error for s in senders):
        return False
    return not any(
        s.relay_down_since_s is not None and now_s - s.relay_down_since_s >= down_after_s
        for s in senders
    )
