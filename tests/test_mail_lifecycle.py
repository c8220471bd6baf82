"""The mail lifecycle table (pure), the session policy and the grpc-timeout parser."""

from __future__ import annotations

import datetime
import math

import attrs
import pytest

from trio_mailer.core.grpc_deadline import BadTimeout, deadline_s, parse_grpc_timeout, timeout_s
from trio_mailer.core.mail_lifecycle import (
    TRANSITIONS,
    MailRecord,
    MailState,
    OutboxConflict,
    StatusChange,
    check_change,
)
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rendering import MailKind
from trio_mailer.core.retry_policy import AttemptResult, GiveUp, RetryAt, RetryPolicy
from trio_mailer.core.session_policy import (
    SessionAction,
    after_rejection,
    enhanced_status,
    should_probe,
    should_recycle,
)

# (A local builder, not tests/helpers.queued: this file stays pure, as tools/mutate.py runs it
# without conftest and the service.)
_MAIL = OutgoingMail(
    message_id="<1@x.example>",
    kind=MailKind.RETRIEVE,
    envelope_from="mailer@x.example",
    envelope_to="user1@y.example",
    data=b"Subject: code\r\n\r\ncode 000001\r\n",
)

S = MailState
ALLOWED = {
    (S.QUEUED, S.QUEUED),
    (S.QUEUED, S.SENDING),
    (S.QUEUED, S.FAILED),
    (S.QUEUED, S.EXPIRED),
    (S.SENDING, S.SENDING),
    (S.SENDING, S.QUEUED),
    (S.SENDING, S.RETRY_WAIT),
    (S.SENDING, S.DELIVERED),
    (S.SENDING, S.FAILED),
    (S.SENDING, S.EXPIRED),
    (S.RETRY_WAIT, S.RETRY_WAIT),
    (S.RETRY_WAIT, S.SENDING),
    (S.RETRY_WAIT, S.FAILED),
    (S.RETRY_WAIT, S.EXPIRED),
}


def in_state(state: MailState, attempts: int = 1):  # type: ignore[no-untyped-def]
    record = MailRecord.accepted(_MAIL, 1.0)
    if state is S.QUEUED:
        return record
    return attrs.evolve(
        record,
        state=state,
        attempts=attempts,
        finished_at_unix=5.0 if state.terminal else None,
    )


def change_to(state: MailState, attempts: int = 1) -> StatusChange:
    return StatusChange("<1@x.example>", state, attempts, None, "", 10.0)


def test_the_table_is_exactly_the_documented_one() -> None:
    """Every allowed move is listed; terminal states allow none."""
    table = {(source, target) for source, targets in TRANSITIONS.items() for target in targets}
    assert table == ALLOWED
    assert set(TRANSITIONS) == set(MailState)


@pytest.mark.parametrize("source", list(MailState))
@pytest.mark.parametrize("target", list(MailState))
def test_every_change_is_checked_against_the_table(source: MailState, target: MailState) -> None:
    """Allowed: applied, no problem. Refused: a problem naming the mail, and a defined state:
    an outcome is still recorded, a non-terminal move is ignored. Terminal: OutboxConflict."""
    record = in_state(source)
    attempts = 1 if source is S.QUEUED and target is S.SENDING else record.attempts
    if source.terminal:
        with pytest.raises(OutboxConflict):
            check_change(record, change_to(target, attempts))
        return
    applied = check_change(record, change_to(target, attempts))
    if (source, target) in ALLOWED:
        assert applied.problem is None
        assert applied.record.state is target
    else:
        assert applied.problem is not None and "<1@x.example>" in applied.problem
        assert f"{source.value} -> {target.value} is not allowed" in applied.problem
        assert applied.record.state is (target if target.terminal else source)
    assert (applied.record.finished_at_unix is not None) == applied.record.state.terminal


def test_an_outcome_with_fewer_attempts_is_recorded_with_the_higher_count() -> None:
    """Issue 10 item 1: the change that once took the service down now leaves EXPIRED, attempts
    kept, and a problem to log."""
    applied = check_change(in_state(S.SENDING, attempts=3), change_to(S.EXPIRED, 2))
    assert (applied.record.state, applied.record.attempts) == (S.EXPIRED, 3)
    assert applied.problem == (
        "<1@x.example>: refused status change (attempts: expected 3 or more, got 2); "
        "kept as expired with 3 attempt(s)"
    )


@pytest.mark.parametrize(
    ("command", "code", "text", "before", "result", "session"),
    [
        ("MAIL", 452, "4.5.3 Too many messages sent", 100, "session lost", "replace"),
        ("RCPT", 452, "4.5.3 Too many recipients", 0, "session lost", "replace"),
        ("MAIL", 451, "too many messages per session", 3, "session lost", "replace"),
        ("MAIL", 451, "too many messages per session", 0, "transient", "keep"),
        ("MAIL", 451, "too many messages per session", 1, "session lost", "replace"),
        ("MAIL", 452, "  4.5.3 Too many messages", 1, "session lost", "replace"),
        ("MAIL", 452, "4.3.1 out of storage", 5, "transient", "keep"),
        ("RCPT", 450, "4.2.0 greylisted", 5, "transient", "keep"),
        ("RCPT", 550, "5.1.1 no such user", 5, "permanent", "keep"),
        ("DOT", 554, "5.7.1 spam", 0, "permanent", "keep"),
        ("DATA", 250, "ok", 0, "session lost", "replace"),
    ],
)
def test_a_4xx_the_relay_ties_to_the_session_replaces_it(
    command: str, code: int, text: str, before: int, result: str, session: str
) -> None:
    decision = after_rejection(command, code, text, session_attempts_before=before)
    assert decision.result is AttemptResult(result)
    assert decision.session is SessionAction(session)


def test_the_enhanced_status_is_the_code_alone() -> None:
    assert enhanced_status("  4.5.3 Too many messages") == "4.5.3"
    assert enhanced_status("4.5.3") == "4.5.3"
    assert enhanced_status("too many 4.5.3") is None


def test_probe_and_recycle_decisions() -> None:
    assert should_probe(used=True, idle_s=1.0, noop_idle_s=1.0)
    assert not should_probe(used=True, idle_s=0.5, noop_idle_s=1.0)
    assert not should_probe(used=False, idle_s=100.0, noop_idle_s=1.0)
    assert should_recycle(attempts=100, age_s=1, max_messages=100, max_age_s=300)
    assert should_recycle(attempts=1, age_s=300, max_messages=100, max_age_s=300)
    assert not should_recycle(attempts=99, age_s=299, max_messages=100, max_age_s=300)


def test_the_default_policy_retries_a_4xx_until_the_ttl_decides() -> None:
    """Issue 10 item 4: with the defaults, 4xx retries outlast greylisting (300 s) and stop only
    at the time to live (600 s), whatever the jitter draws."""
    policy = RetryPolicy()
    for rand in (0.0, 0.5, 1.0):
        now, attempts = 0.0, 1
        while isinstance(
            decision := policy.after_failure(
                AttemptResult.TRANSIENT, attempts=attempts, accepted_at_s=0, now_s=now, rand=rand
            ),
            RetryAt,
        ):
            now, attempts = decision.at_s + 0.1, attempts + 1
        assert isinstance(decision, GiveUp)
        assert decision.reason.startswith("time to live"), (rand, attempts)
        assert now > 540


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1H", 3600), ("2M", 120), ("3S", 3), ("250m", 0.25), ("5u", 5e-6), ("7n", 7e-9),
     ("99999999S", 99999999)],
)  # fmt: skip
def test_grpc_timeout_values_parse(value: str, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "S", "1", "1s", "123456789S", "-1S", "1.5S", " 1S", "1SS"])
def test_malformed_grpc_timeouts_are_refused_with_the_value(value: str) -> None:
    with pytest.raises(BadTimeout, match="grpc-timeout: expected 1 to 8 digits"):
        parse_grpc_timeout(value)


def test_a_call_without_timeout_has_no_deadline() -> None:
    assert deadline_s(10.0, timeout_s(None)) == math.inf
    assert deadline_s(10.0, timeout_s(datetime.timedelta(milliseconds=2))) == pytest.approx(10.002)
