"""Rate-limit arithmetic: "at most N accepted mails per subject in P seconds", and the pace.

Pure; times are plain floats (wall-clock unix seconds in the service, so that the counts carried
in the outbox mean the same after a restart).

Theory of operation
-------------------
``SlidingWindow`` keeps, per subject (a normalised recipient, or a caller identity), the times
of its accepted mails within the last ``period_s``: a sliding log, exact where a fixed window
would let 2N through around a boundary. ``retry_after_s`` answers "may one more go now?": 0.0
when fewer than N are within the period, else the time until the oldest of the last N leaves it.
A call that passes ``reserve``s its slot at once, so concurrent calls cannot all slip through
before any of them is stored; one that is then refused elsewhere (queue full, a failed commit)
``release``s it. ``prune`` forgets what has left the period, so memory follows the traffic of
the last ``period_s`` only, at most N times per subject.

``Pace`` estimates how soon the senders free a place in a full queue, from the times of the
last mails they finished.
"""

from __future__ import annotations

import collections
import math
import re

import attrs

_SPEC = re.compile(r"\s*(\d{1,9})\s*/\s*(\d+(?:\.\d+)?)\s*")
MAX_PERIOD_S = 30 * 86400.0


@attrs.frozen
class RateLimit:
    """At most ``count`` per ``period_s`` seconds."""

    count: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> RateLimit | None:
        """``"5/600"`` -> 5 per 600 s; ``"0"`` -> None (off).

        Raises:
            ValueError: saying what was expected.
        """
        if text.strip() == "0":
            return None
        match = _SPEC.fullmatch(text)
        expected = (
            f"expected COUNT/SECONDS such as 5/600 (COUNT at least 1, SECONDS more than 0 and "
            f"at most {MAX_PERIOD_S:g}), or 0 for off"
        )
        if match is None:
            raise ValueError(expected)
        count, period = int(match.group(1)), float(match.group(2))
        if count < 1 or not 0 < period <= MAX_PERIOD_S:
            raise ValueError(expected)
        return cls(count, period)

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s:g}"


@attrs.define
class SlidingWindow:
    """The accepted times per subject within the last ``limit.period_s`` (see module doc)."""

    limit: RateLimit
    _times: dict[str, collections.deque[float]] = attrs.field(factory=dict)

    def retry_after_s(self, subject: str, now: float) -> float:
        """0.0 when one more may go at ``now``; else the seconds until one may."""
        times = self._times.get(subject)
        if times is None:
            return 0.0
        start = now - self.limit.period_s
        while times and times[0] <= start:
            times.popleft()
        if len(times) < self.limit.count:
            return 0.0
        # The oldest of the last ``count`` must leave the window first.
        return max(0.0, times[-self.limit.count] + self.limit.period_s - now)

    def reserve(self, subject: str, at: float) -> None:
        times = self._times.setdefault(subject, collections.deque())
        if times and times[-1] > at:  # out of order (loaded from the store): keep it sorted
            times.append(at)
            ordered = sorted(times)
            times.clear()
            times.extend(ordered)
        else:
            times.append(at)

    def release(self, subject: str, at: float) -> None:
        """Undo a ``reserve`` of the mail at ``at`` (it was not accepted after all)."""
        times = self._times.get(subject)
        if times is None:
            return
        try:
            times.remove(at)
        except ValueError:
            return
        if not times:
            del self._times[subject]

    def prune(self, now: float) -> int:
        """Forget every subject with nothing left in the period; returns how many."""
        start = now - self.limit.period_s
        gone = [s for s, times in self._times.items() if not times or times[-1] <= start]
        for subject in gone:
            del self._times[subject]
        return len(gone)

    def __len__(self) -> int:
        return len(self._times)


def retry_after_ms(seconds: float) -> int:
    """Seconds to whole milliseconds, rounded up (never early), within a uint32."""
    return min(2**32 - 1, max(0, math.ceil(seconds * 1000.0)))


PACE_SAMPLES = 32
PACE_DEFAULT_S = 1.0  # when nothing finished lately: a guess, not a promise
PACE_MIN_S = 0.01
PACE_MAX_S = 60.0


@attrs.define
class Pace:
    """How soon the senders free a place in a full queue, from their recent finishes."""

    _finished: collections.deque[float] = attrs.field(
        factory=lambda: collections.deque(maxlen=PACE_SAMPLES)
    )

    def finished(self, at: float) -> None:
        self._finished.append(at)

    def next_place_s(self) -> float:
        """The expected wait for one place: the mean gap between the recent finishes (a
        default before there are two), within ``PACE_MIN_S`` and ``PACE_MAX_S``."""
        if len(self._finished) < 2:
            return PACE_DEFAULT_S
        gap = (self._finished[-1] - self._finished[0]) / (len(self._finished) - 1)
        return min(PACE_MAX_S, max(PACE_MIN_S, gap))
