"""Timeouts and retry rules for calls to trio-mailer, shared by the client package and the CLI.

Pure: no trio, no grpc. ``tests/test_client_package.py`` checks that this file and its copy,
``trio_mailer/core/call_policy.py``, are the same text: edit one, copy it to the other.

Theory of operation: one logical send gets one idempotency key, and every attempt of it carries
that key, so the service stores at most one mail however many attempts reach it. An attempt that
ends with UNAVAILABLE (the service was unreachable, restarting or draining) or DEADLINE_EXCEEDED
(the answer did not come back in time: the mail may or may not be stored) is tried again after a
capped, jittered backoff, as long as the overall timeout leaves room for another attempt. Every
other status is final: retrying INVALID_ARGUMENT or UNAUTHENTICATED cannot succeed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

DEFAULT_TIMEOUT_S = 5.0
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
BACKOFF_FIRST_S = 0.05
BACKOFF_CAP_S = 1.0
# An attempt with less time than this left would only time out: give up instead.
MIN_ATTEMPT_S = 0.05
MAX_IDEMPOTENCY_KEY_CHARS = 256


def backoff_s(retry: int, random: Callable[[], float]) -> float:
    """The pause before retry number ``retry`` (0 for the first): "equal jitter", half of the
    capped exponential step fixed and half random, so callers that failed together spread out.

    ``random`` returns a float in [0, 1).
    """
    step = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2.0 ** min(retry, 30))
    return step / 2 + step / 2 * random()


def retry_delay_s(
    code_name: str, retry: int, remaining_s: float, random: Callable[[], float]
) -> float | None:
    """How long to wait before trying again after an attempt ended with ``code_name`` (a gRPC
    status name), or None when the call must end now: the status is final, or the pause and
    another attempt would not fit in ``remaining_s``."""
    if code_name not in RETRYABLE_CODES:
        return None
    delay = backoff_s(retry, random)
    if remaining_s - delay < MIN_ATTEMPT_S:
        return None
    return delay


def new_idempotency_key() -> str:
    """A fresh key for one logical send: 128 random bits, URL-safe text."""
    return secrets.token_urlsafe(16)


def check_idempotency_key(key: str) -> str:
    """``key`` if the service would accept it.

    Raises:
        ValueError: empty, too long, or not printable ASCII.
    """
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(
        " " <= char <= "~" for char in key
    ):
        raise ValueError(
            f"idempotency_key: expected 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters"
        )
    return key


def normalise_message_id(text: str) -> str:
    """A Message-ID as the service stores it, with angle brackets; given with or without them.

    Raises:
        ValueError: empty, or brackets on one side only.
    """
    text = text.strip()
    if text.startswith("<") != text.endswith(">") or text in {"", "<>"}:
        raise ValueError(f"message_id: expected <local@domain> or local@domain, got {text!r}")
    return text if text.startswith("<") else f"<{text}>"
