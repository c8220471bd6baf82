"""The reconnect delay: zero after success, doubling, capped."""

from __future__ import annotations

import pytest

from trio_mailer.backoff import ReconnectBackoff


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (10_000, 30.0)],
)
def test_delay_doubles_up_to_the_cap(failures: int, delay: float) -> None:
    """Delay is base * 2**(n-1), capped, and 0 without failures."""
    assert ReconnectBackoff(base_s=0.5, cap_s=30.0).delay_s(failures) == delay
