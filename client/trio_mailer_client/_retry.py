"""One logical call: attempts, each bounded by what is left of the overall timeout."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from trio_mailer_client._policy import MIN_ATTEMPT_S, retry_delay_s
from trio_mailer_client._types import MailerError

T = TypeVar("T")


async def with_retries(
    attempt: Callable[[float], Awaitable[T]],
    timeout_s: float,
    *,
    jitter: Callable[[], float] = random.random,
) -> T:
    """Run ``attempt(remaining_s)`` until it returns, retrying the errors the policy retries.

    ``attempt`` raises ``MailerError`` (with ``attempts`` ignored). The pauses are ``trio.sleep``
    on the current clock, so a ``MockClock`` drives them in tests.

    Raises:
        MailerError: a final status, or the last retryable one when the time ran out.
    """
    deadline = trio.current_time() + timeout_s
    retry = 0
    while True:
        remaining = deadline - trio.current_time()
        try:
            if remaining < MIN_ATTEMPT_S:
                raise MailerError("DEADLINE_EXCEEDED", f"no answer within {timeout_s:g} s")
            return await attempt(remaining)
        except MailerError as exc:
            delay = retry_delay_s(exc.code, retry, deadline - trio.current_time(), jitter)
            if delay is None:
                raise MailerError(exc.code, exc.details, attempts=retry + 1) from None
        await trio.sleep(delay)
        retry += 1
