"""The health decision (core/health_decision.py): SERVING or not, from the senders' state."""

from __future__ import annotations

import pytest

from trio_mailer.core.health_decision import SenderStatistics, is_serving

DOWN_AFTER_S = 30.0
NOW_S = 1000.0


def sender(
    *, sessions_up: int = 0, down_since_s: float | None = None, config_error: bool = False
) -> SenderStatistics:
    return SenderStatistics(
        delivered=0,
        failed=0,
        retries=0,
        connects=0,
        sessions_up=sessions_up,
        in_flight=(),
        relay_down_since_s=down_since_s,
        config_error=config_error,
    )


def serving(*senders: SenderStatistics, draining: bool = False) -> bool:
    return is_serving(senders, draining=draining, now_s=NOW_S, down_after_s=DOWN_AFTER_S)


def test_a_new_idle_service_is_serving() -> None:
    """No session yet and nothing known to be wrong: SERVING."""
    assert serving(sender()) is True
    assert serving() is True  # no senders at all: nothing is wrong either


def test_sender_statistics_defaults_say_nothing_is_wrong() -> None:
    """Built without the optional fields: no outage, no config error."""
    plain = SenderStatistics(
        delivered=0, failed=0, retries=0, connects=0, sessions_up=0, in_flight=()
    )
    assert plain.relay_down_since_s is None
    assert plain.config_error is False
    assert serving(plain) is True


def test_draining_is_never_serving() -> None:
    assert serving(sender(sessions_up=1), draining=True) is False
    assert serving(sender(), draining=True) is False


def test_a_session_up_is_serving_even_with_trouble_elsewhere() -> None:
    """One sender with a session beats another's outage or config error."""
    broken = sender(down_since_s=0.0, config_error=True)
    assert serving(broken, sender(sessions_up=1)) is True
    assert serving(sender(sessions_up=2), broken) is True


def test_a_config_error_is_not_serving_at_once() -> None:
    """Refused credentials or certificate do not heal: NOT_SERVING without waiting."""
    assert serving(sender(config_error=True)) is False
    assert serving(sender(), sender(config_error=True)) is False


@pytest.mark.parametrize(
    ("down_for_s", "expected"),
    [
        (0.0, True),
        (DOWN_AFTER_S - 0.001, True),
        (DOWN_AFTER_S, False),  # the boundary: down for exactly down_after_s
        (DOWN_AFTER_S + 0.001, False),
        (10 * DOWN_AFTER_S, False),
        (-5.0, True),  # a start in the future (clock quirk): not down yet
    ],
)
def test_an_unreachable_relay_stops_serving_after_down_after_s(
    down_for_s: float, expected: bool
) -> None:
    assert serving(sender(down_since_s=NOW_S - down_for_s)) is expected


def test_one_sender_down_long_enough_is_enough() -> None:
    long_down = sender(down_since_s=NOW_S - 2 * DOWN_AFTER_S)
    assert serving(sender(), long_down) is False
    assert serving(long_down, sender(down_since_s=NOW_S)) is False


def test_down_since_zero_counts() -> None:
    """A trio clock that starts at 0: an outage that began at t=0 is still an outage."""
    assert (
        is_serving([sender(down_since_s=0.0)], draining=False, now_s=31.0, down_after_s=30.0)
        is False
    )
