"""The retry policy and the reconnect backoff: pure functions of attempts, time and chance."""

from __future__ import annotations

import pytest

from trio_mailer.core.retry_policy import (
    TTL_REASON_PREFIX,
    AttemptResult,
    GiveUp,
    ReconnectBackoff,
    RetryAt,
    RetryPolicy,
)

POLICY = RetryPolicy(base_s=1, max_s=60, max_attempts=8, ttl_s=600)


@pytest.mark.parametrize(
    ("attempts", "rand", "delay"),
    [
        (1, 1.0, 1.0),
        (2, 1.0, 2.0),
        (3, 0.5, 3.0),
        (6, 1.0, 32.0),
        (7, 1.0, 60.0),
        (50, 1.0, 60.0),
        (5000, 1.0, 60.0),
        (4, 0.0, 4.0),
        (50, 0.0, 30.0),
    ],
)
def test_backoff_is_equal_jitter_exponential_and_capped(
    attempts: int, rand: float, delay: float
) -> None:
    """step/2 + rand * step/2 with step = min(max, base * 2**(attempts-1)): never near zero."""
    assert POLICY.backoff_s(attempts, rand) == delay


def test_transient_failure_retries_after_the_backoff() -> None:
    """A 4xx on attempt 3 (rand=0.5) retries 3 s later."""
    decision = POLICY.after_failure(
        AttemptResult.TRANSIENT, attempts=3, accepted_at_s=0, now_s=100, rand=0.5
    )
    assert decision == RetryAt(103.0)


@pytest.mark.parametrize("result", [AttemptResult.SESSION_LOST, AttemptResult.OUTCOME_UNKNOWN])
def test_lost_session_retries_at_once(result: AttemptResult) -> None:
    """A broken session: the mail goes again now, on a new session."""
    assert POLICY.after_failure(result, attempts=1, accepted_at_s=0, now_s=5, rand=1) == RetryAt(5)


def test_permanent_failure_gives_up() -> None:
    """A 5xx is final."""
    decision = POLICY.after_failure(
        AttemptResult.PERMANENT, attempts=1, accepted_at_s=0, now_s=1, rand=1
    )
    assert decision == GiveUp("permanent failure")


@pytest.mark.parametrize("result", [AttemptResult.TRANSIENT, AttemptResult.SESSION_LOST])
def test_attempts_are_bounded(result: AttemptResult) -> None:
    """The 8th failed attempt is the last (when max_attempts is set that low)."""
    retry = POLICY.after_failure(result, attempts=7, accepted_at_s=0, now_s=1, rand=0)
    assert isinstance(retry, RetryAt)
    decision = POLICY.after_failure(result, attempts=8, accepted_at_s=0, now_s=1, rand=0)
    assert decision == GiveUp("gave up after 8 attempts")


def test_never_retries_after_the_time_to_live() -> None:
    """A retry that would begin at or after accepted + TTL becomes a failure now."""
    ok = POLICY.after_failure(
        AttemptResult.TRANSIENT, attempts=6, accepted_at_s=0, now_s=567, rand=1
    )
    assert ok == RetryAt(599.0)
    late = POLICY.after_failure(
        AttemptResult.TRANSIENT, attempts=6, accepted_at_s=0, now_s=568, rand=1
    )
    assert late == GiveUp("time to live (600s) would pass before the next attempt")
    assert POLICY.after_failure(
        AttemptResult.SESSION_LOST, attempts=1, accepted_at_s=0, now_s=600, rand=1
    ) == GiveUp("time to live (600s) would pass before the next attempt")


def test_deadline() -> None:
    """The deadline is acceptance plus the time to live."""
    assert POLICY.deadline_s(12.5) == 612.5


@pytest.mark.parametrize(
    ("failures", "rand", "delay"),
    [
        (0, 1.0, 0.0),
        (1, 1.0, 1.0),
        (1, 0.0, 0.5),
        (2, 1.0, 2.0),
        (3, 0.5, 3.0),
        (7, 1.0, 60.0),
        (7, 0.0, 30.0),
        (10_000, 1.0, 60.0),
    ],
)
def test_reconnect_backoff_has_equal_jitter_and_a_cap(
    failures: int, rand: float, delay: float
) -> None:
    """Zero after success; then between half and all of base * 2**(n-1), capped."""
    assert ReconnectBackoff(base_s=1, cap_s=60).delay_s(failures, rand) == delay


def test_configuration_error_waits_the_cap() -> None:
    """Bad credentials or certificates: straight to the cap, no jitter down."""
    backoff = ReconnectBackoff(base_s=1, cap_s=60)
    assert backoff.delay_s(1, 0.0, config_error=True) == 60.0
    assert backoff.delay_s(0, 0.0, config_error=True) == 0.0


def test_attempt_result_and_ttl_values_are_stable() -> None:
    """They appear in logs and metrics; the TTL prefix is how metrics count "expired"."""
    assert {r.name: r.value for r in AttemptResult} == {
        "DELIVERED": "delivered",
        "PERMANENT": "permanent",
        "TRANSIENT": "transient",
        "SESSION_LOST": "session lost",
        "OUTCOME_UNKNOWN": "outcome unknown",
    }
    assert TTL_REASON_PREFIX == "time to live"


def test_give_up_reasons_are_exact() -> None:
    after = {"accepted_at_s": 0.0, "now_s": 10.0, "rand": 1.0}
    assert POLICY.after_failure(AttemptResult.PERMANENT, attempts=1, **after) == GiveUp(
        "permanent failure"
    )
    assert POLICY.after_failure(AttemptResult.TRANSIENT, attempts=8, **after) == GiveUp(
        "gave up after 8 attempts"
    )
    late = POLICY.after_failure(
        AttemptResult.SESSION_LOST, attempts=1, accepted_at_s=0.0, now_s=600.0, rand=0.0
    )
    assert late == GiveUp("time to live (600s) would pass before the next attempt")


def test_the_attempt_before_the_last_is_retried() -> None:
    """max_attempts - 1 failed attempts: one more try (the boundary's other side)."""
    result = POLICY.after_failure(
        AttemptResult.SESSION_LOST, attempts=7, accepted_at_s=0.0, now_s=10.0, rand=0.0
    )
    assert result == RetryAt(10.0)


def test_a_retry_just_before_the_deadline_still_happens() -> None:
    result = POLICY.after_failure(
        AttemptResult.TRANSIENT, attempts=1, accepted_at_s=0.0, now_s=598.0, rand=1.0
    )
    assert result == RetryAt(599.0)  # 1 s backoff, ends 1 s before accepted + 600


def test_backoff_before_any_failure_is_the_base() -> None:
    """attempts=0 (or less) is treated as the first step, never a fraction of it."""
    assert POLICY.backoff_s(0, 1.0) == 1.0
    assert POLICY.backoff_s(-3, 1.0) == 1.0


def test_the_exponent_is_capped_at_64_not_earlier() -> None:
    """The cap only keeps 2**n a finite float: a tiny base shows it is exactly 64."""
    tiny = RetryPolicy(base_s=1e-30, max_s=86400, max_attempts=8, ttl_s=600)
    assert tiny.backoff_s(65, 1.0) == 1e-30 * 2.0**64
    assert tiny.backoff_s(10_000, 1.0) == 1e-30 * 2.0**64
    assert tiny.backoff_s(64, 1.0) == 1e-30 * 2.0**63
    backoff = ReconnectBackoff(base_s=1e-30, cap_s=86400)
    assert backoff.delay_s(65, 1.0) == 1e-30 * 2.0**64
    assert backoff.delay_s(10_000, 1.0) == 1e-30 * 2.0**64
    assert backoff.delay_s(64, 1.0) == 1e-30 * 2.0**63


def test_reconnect_backoff_is_zero_without_failures() -> None:
    backoff = ReconnectBackoff(base_s=1, cap_s=60)
    assert backoff.delay_s(0, 1.0) == 0.0
    assert backoff.delay_s(-1, 1.0) == 0.0
    assert backoff.delay_s(1, 0.0) == 0.5
    assert backoff.delay_s(1, 1.0) == 1.0


def test_policy_defaults_come_from_the_config_table() -> None:
    assert RetryPolicy() == RetryPolicy(base_s=1.0, max_s=60.0, max_attempts=1000, ttl_s=600.0)
    assert ReconnectBackoff() == ReconnectBackoff(base_s=1.0, cap_s=60.0)
