"""The gRPC ``grpc-timeout`` request header: parsed, and turned into a deadline.

Pure. The header is "TimeoutValue TimeoutUnit": 1 to 8 ASCII digits, then one of ``H`` (hours),
``M`` (minutes), ``S`` (seconds), ``m`` (milliseconds), ``u`` (microseconds) or ``n``
(nanoseconds), per the gRPC over HTTP/2 spec. purerpc 0.8.0 parses it into
``RequestReceived.timeout`` (laxly: any integer) and does not enforce it; the handlers do, with
``deadline_s``.
"""

from __future__ import annotations

import datetime
import math
import re

_HEADER = re.compile(r"([0-9]{1,8})([HMSmun])")
_UNIT_S = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class BadTimeout(ValueError):
    """A ``grpc-timeout`` value that is not what the spec allows."""


def parse_grpc_timeout(value: str) -> float:
    """Seconds from a ``grpc-timeout`` header value ("250m" -> 0.25).

    Raises:
        BadTimeout: naming what was expected and what came.
    """
    match = _HEADER.fullmatch(value)
    if match is None:
        raise BadTimeout(
            f"grpc-timeout: expected 1 to 8 digits and a unit (H, M, S, m, u, n), got {value!r}"
        )
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def timeout_s(timeout: datetime.timedelta | None) -> float | None:
    """purerpc's parsed ``RequestReceived.timeout`` as seconds; None when the call has none."""
    if timeout is None:
        return None
    return max(0.0, timeout.total_seconds())


def deadline_s(received_at_s: float, timeout: float | None) -> float:
    """The clock reading by which the call must be answered (``math.inf``: no deadline)."""
    return math.inf if timeout is None else received_at_s + timeout
