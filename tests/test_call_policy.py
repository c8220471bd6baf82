"""The client's call policy (pure): backoff, which statuses retry, key and Message-ID checks."""

from __future__ import annotations

import pytest

from trio_mailer.core.call_policy import (
    BACKOFF_CAP_S,
    BACKOFF_FIRST_S,
    DEFAULT_TIMEOUT_S,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MIN_ATTEMPT_S,
    backoff_s,
    check_idempotency_key,
    new_idempotency_key,
    normalise_message_id,
    retry_delay_s,
)
from trio_mailer.core.idempotency import validate_idempotency_key


def test_the_documented_defaults() -> None:
    """5 s per call; backoff from 50 ms, capped at 1 s; no attempt with under 50 ms left."""
    assert (DEFAULT_TIMEOUT_S, BACKOFF_FIRST_S, BACKOFF_CAP_S, MIN_ATTEMPT_S) == (
        5.0,
        0.05,
        1.0,
        0.05,
    )
    assert MAX_IDEMPOTENCY_KEY_CHARS == 256


@pytest.mark.parametrize(
    ("retry", "low", "high"),
    [
        (0, 0.025, 0.05),
        (1, 0.05, 0.1),
        (2, 0.1, 0.2),
        (3, 0.2, 0.4),
        (4, 0.4, 0.8),
        (5, 0.5, 1.0),  # 1.6 s capped at 1 s
        (30, 0.5, 1.0),
        (10_000, 0.5, 1.0),  # a huge retry number neither overflows nor passes the cap
    ],
)
def test_backoff_is_half_fixed_half_random_and_capped(retry: int, low: float, high: float) -> None:
    """Equal jitter: random() = 0 gives half the step, random() -> 1 gives the whole step."""
    assert backoff_s(retry, lambda: 0.0) == pytest.approx(low)
    assert backoff_s(retry, lambda: 0.5) == pytest.approx((low + high) / 2)
    assert backoff_s(retry, lambda: 1.0) == pytest.approx(high)


@pytest.mark.parametrize("code", ["UNAVAILABLE", "DEADLINE_EXCEEDED"])
def test_unavailable_and_deadline_exceeded_retry_after_the_backoff(code: str) -> None:
    assert retry_delay_s(code, 0, 5.0, lambda: 0.0) == pytest.approx(0.025)
    assert retry_delay_s(code, 2, 5.0, lambda: 1.0) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "code", ["OK", "INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "INTERNAL", ""]
)
def test_every_other_status_is_final(code: str) -> None:
    assert retry_delay_s(code, 0, 5.0, lambda: 0.0) is None


def test_no_retry_when_the_pause_and_an_attempt_do_not_fit() -> None:
    """Retry 1 with random() = 0 pauses 50 ms: it needs 50 + 50 ms left, no less."""
    assert retry_delay_s("UNAVAILABLE", 1, 0.1, lambda: 0.0) == 0.05
    assert retry_delay_s("UNAVAILABLE", 1, 0.0999, lambda: 0.0) is None
    assert retry_delay_s("UNAVAILABLE", 0, 0.0, lambda: 0.0) is None


def test_a_new_key_is_random_url_safe_and_accepted_by_the_service() -> None:
    keys = {new_idempotency_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert len(key) == 22  # 16 random bytes, base64url without padding
        assert check_idempotency_key(key) == key
        assert validate_idempotency_key(key) == key


@pytest.mark.parametrize("key", ["a", " ", "~", "x" * MAX_IDEMPOTENCY_KEY_CHARS, " !}~"])
def test_keys_the_service_takes_pass(key: str) -> None:
    assert check_idempotency_key(key) == key
    assert validate_idempotency_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "x" * (MAX_IDEMPOTENCY_KEY_CHARS + 1), "a\x1f", "\x7f", "clé", "a\nb"]
)
def test_keys_the_service_would_refuse_are_refused_here(key: str) -> None:
    with pytest.raises(ValueError) as info:
        check_idempotency_key(key)
    assert str(info.value) == "idempotency_key: expected 1 to 256 printable ASCII characters"


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("<a@b.example>", "<a@b.example>"),
        ("a@b.example", "<a@b.example>"),
        ("  a@b.example\n", "<a@b.example>"),
        (" <a@b.example> ", "<a@b.example>"),
        ("x", "<x>"),
    ],
)
def test_message_ids_are_stored_with_angle_brackets(text: str, stored: str) -> None:
    assert normalise_message_id(text) == stored


@pytest.mark.parametrize("text", ["", "  ", "<", ">", "<>", "<a@b.example", "a@b.example>"])
def test_empty_or_half_bracketed_message_ids_are_refused(text: str) -> None:
    with pytest.raises(ValueError) as info:
        normalise_message_id(text)
    assert str(info.value) == (
        f"message_id: expected <local@domain> or local@domain, got {text.strip()!r}"
    )
