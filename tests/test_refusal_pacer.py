"""The pure pacer of queue-full refusals (core.load_shedding): turns come at most ``per_s`` a
second in order of arrival, a turn past its bound is answered at the bound and takes no turn.

Pure: no trio, no service (so tools/mutate.py can run it under --noconftest)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mailer.core.load_shedding import RefusalPacer


def test_turns_come_one_interval_apart_in_order_of_arrival() -> None:
    pacer = RefusalPacer(per_s=10.0)
    assert [pacer.turn_s(0.0, 5.0) for _ in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_a_turn_later_than_the_bound_is_answered_at_the_bound_and_takes_no_turn() -> None:
    pacer = RefusalPacer(per_s=1.0)
    assert pacer.turn_s(0.0, 0.5) == 0.0  # takes the turn at 0
    assert pacer.turn_s(0.0, 0.5) == 0.5  # the next turn (1.0) is too late: at its bound
    assert pacer.turn_s(0.0, 3.0) == 1.0  # so 1.0 is still free


def test_turns_do_not_pile_up_while_nobody_is_refused() -> None:
    pacer = RefusalPacer(per_s=10.0)
    assert pacer.turn_s(0.0, 1.0) == 0.0
    assert pacer.turn_s(7.0, 8.0) == 7.0  # long after: at once


def test_no_pacing_when_off_or_when_the_bound_has_passed() -> None:
    assert RefusalPacer(per_s=0.0).turn_s(3.0, 10.0) == 3.0
    pacer = RefusalPacer(per_s=1.0)
    assert pacer.turn_s(0.0, 10.0) == 0.0
    assert pacer.turn_s(2.0, 1.0) == 2.0  # a deadline already behind: at once


@given(
    per_s=st.floats(0.5, 1000.0),
    arrivals=st.lists(
        st.tuples(st.floats(0.0, 100.0), st.floats(-1.0, 10.0)), min_size=1, max_size=50
    ),
)
def test_turns_are_never_early_late_or_closer_than_the_interval(
    per_s: float, arrivals: list[tuple[float, float]]
) -> None:
    """Whatever the arrivals, each answer is between its arrival and its bound, and the turns
    taken (answers before the bound) are at least 1/per_s apart."""
    pacer = RefusalPacer(per_s=per_s)
    now, taken = 0.0, []
    for gap, wait in sorted(arrivals):
        now = max(now, gap)
        latest = now + wait
        turn = pacer.turn_s(now, latest)
        assert now <= turn <= max(now, latest)
        if turn < latest:
            taken.append(turn)
    assert all(b - a >= 1.0 / per_s * (1 - 1e-9) for a, b in itertools.pairwise(taken))


def test_a_bound_at_the_arrival_or_at_the_turn() -> None:
    """A bound equal to the arrival answers at once and takes no turn; a turn exactly at its
    bound is taken."""
    pacer = RefusalPacer(per_s=1.0)
    assert pacer.turn_s(0.0, 0.0) == 0.0  # no turn taken
    assert pacer.turn_s(0.0, 5.0) == 0.0  # so 0.0 is still free
    assert pacer.turn_s(0.0, 1.0) == 1.0  # the next turn, exactly at the bound: taken
    assert pacer.turn_s(0.0, 5.0) == 2.0


def test_the_defaults_are_the_documented_ones() -> None:
    """README settings table: MAILER_REFUSALS_PER_S 100, MAILER_REFUSAL_WAIT_S 1 s; a paced
    answer leaves 50 ms before the call's deadline."""
    from trio_mailer.core import load_shedding

    assert RefusalPacer().per_s == load_shedding.REFUSALS_PER_S == 100.0
    assert load_shedding.REFUSAL_WAIT_S == 1.0
    assert load_shedding.DEADLINE_MARGIN_S == 0.05
