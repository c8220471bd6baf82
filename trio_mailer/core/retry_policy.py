"""When to try a mail again, when to give up, and how long to wait for the relay.

Pure: every function takes the current time and a random number in [0, 1] as arguments, so the
policy is tested without I/O, clocks or luck.

Theory of operation
-------------------
A mail is retried until its time to live (``ttl_s`` after it was accepted) would pass: that is
the promise (a password code an hour late is worse than a clear failure). ``max_attempts`` is
only an upper bound, by default far above what the time to live allows, so the TTL decides.

After a failed attempt (``after_failure``):

- ``PERMANENT`` (a 5xx reply): give up at once.
- ``TRANSIENT`` (a 4xx reply about this mail, e.g. 450/451/452, greylisting): wait with capped
  exponential backoff and "equal jitter", uniform in ``[step/2, step]`` with
  ``step = min(max_s, base_s * 2**(attempts-1))``, so that many mails deferred together do not
  come back together, and no draw makes a tight loop (with full jitter a run of small draws
  used up the attempts in seconds). With the defaults (1 s, 60 s cap, 600 s TTL) that is at
  most about 26 attempts. Other mails go meanwhile.
- ``SESSION_LOST`` (the connection broke, timed out or said 421 before the relay's answer to the
  final "."), and ``OUTCOME_UNKNOWN`` (it broke after the final "." was sent, so the relay may
  have the mail): try again at once on a new session. The pacing comes from the reconnect
  backoff, which grows while sessions keep failing.
- Either way: give up when the attempts are used up, or when the next attempt would start after
  the time to live.

The reconnect backoff (``ReconnectBackoff``) paces relay-wide trouble (cannot connect, TLS
failure, 421, timeouts, AUTH 454): zero after a success, then doubling with "equal jitter"
(between half and all of the step, so it never collapses to a tight loop), capped. A
configuration error (bad credentials, an untrusted certificate) will not fix itself by retrying
quickly, so it waits the full cap at once.
"""

from __future__ import annotations

import enum

import attrs

from trio_mailer.core.config import default

# Every "its time to live passed" reason starts so; metrics count those as "expired".
TTL_REASON_PREFIX = "time to live"


class AttemptResult(enum.Enum):
    """How one attempt to send a mail ended, as far as the retry policy cares."""

    DELIVERED = "delivered"
    PERMANENT = "permanent"  # 5xx
    TRANSIENT = "transient"  # 4xx about this mail
    SESSION_LOST = "session lost"  # before the final ".": the relay did not take it
    OUTCOME_UNKNOWN = "outcome unknown"  # after the final ".": it may have


@attrs.frozen
class RetryAt:
    """Try again when the clock reads ``at_s``."""

    at_s: float


@attrs.frozen
class GiveUp:
    """Report the mail as failed for ``reason``."""

    reason: str


@attrs.frozen
class RetryPolicy:
    base_s: float = default("retry_base_s")
    max_s: float = default("retry_max_s")
    max_attempts: int = default("max_attempts")
    ttl_s: float = default("message_ttl_s")

    def backoff_s(self, attempts: int, rand: float) -> float:
        """Equal-jitter delay after ``attempts`` transient failures; ``rand`` in [0, 1]."""
        exponent = min(max(attempts - 1, 0), 64)  # 2.0 ** 2000 overflows a float
        step = min(self.max_s, self.base_s * 2.0**exponent)
        return step / 2 + rand * step / 2

    def deadline_s(self, accepted_at_s: float) -> float:
        """The time after which the mail is not worth sending any more."""
        return accepted_at_s + self.ttl_s

    def after_failure(
        self,
        result: AttemptResult,
        *,
        attempts: int,
        accepted_at_s: float,
        now_s: float,
        rand: float,
    ) -> RetryAt | GiveUp:
        """Decide what follows a failed attempt (``attempts`` counts it)."""
        if result is AttemptResult.PERMANENT:
            return GiveUp("permanent failure")
        if attempts >= self.max_attempts:
            return GiveUp(f"gave up after {attempts} attempts")
        delay = self.backoff_s(attempts, rand) if result is AttemptResult.TRANSIENT else 0.0
        if now_s + delay >= self.deadline_s(accepted_at_s):
            return GiveUp(
                f"{TTL_REASON_PREFIX} ({self.ttl_s:g}s) would pass before the next attempt"
            )
        return RetryAt(now_s + delay)


@attrs.frozen
class ReconnectBackoff:
    """Delay before reconnecting after ``n`` consecutive session failures."""

    base_s: float = default("retry_base_s")
    cap_s: float = default("retry_max_s")

    def delay_s(
        self, consecutive_failures: int, rand: float, *, config_error: bool = False
    ) -> float:
        """Seconds to wait before the next connect; ``rand`` in [0, 1]."""
        if consecutive_failures <= 0:
            return 0.0
        if config_error:
            return self.cap_s
        exponent = min(consecutive_failures - 1, 64)
        step = min(self.cap_s, self.base_s * 2.0**exponent)
        return step / 2 + rand * step / 2
