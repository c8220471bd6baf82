"""MailRecord and StatusChange (pure): what a stored mail may hold, what a change does to it,
and where the default outbox file lives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trio_mailer.core.mail_lifecycle import (
    MailRecord,
    MailState,
    StatusChange,
    apply_change,
    check_change,
    default_outbox_path,
)
from trio_mailer.core.message import OutgoingMail

# A local builder (this file stays pure: tools/mutate.py runs it without conftest).
MAIL = OutgoingMail(
    message_id="<7@x.example>",
    kind="password",
    envelope_from="mailer@x.example",
    envelope_to="user@y.example",
    data=b"Subject: code\r\n\r\ncode 000007\r\n",
)


def record(**changes: object) -> MailRecord:
    fields: dict[str, object] = {
        "message_id": MAIL.message_id,
        "kind": "password",
        "envelope_from": MAIL.envelope_from,
        "envelope_to": MAIL.envelope_to,
        "data": MAIL.data,
        "accepted_at_unix": 100.0,
        "state": MailState.QUEUED,
        "attempts": 0,
        "last_reply_code": None,
        "last_reply_text": "",
        "last_attempt_at_unix": None,
        "finished_at_unix": None,
        "possible_duplicate": False,
    }
    fields.update(changes)
    return MailRecord(**fields)  # type: ignore[arg-type]


def change(state: MailState, attempts: int, at: float = 200.0, **extra: object) -> StatusChange:
    return StatusChange(
        message_id=MAIL.message_id,
        state=state,
        attempts=attempts,
        last_reply_code=extra.pop("code", 250),  # type: ignore[arg-type]
        last_reply_text=extra.pop("text", "ok"),  # type: ignore[arg-type]
        at_unix=at,
        **extra,  # type: ignore[arg-type]
    )


def test_a_record_just_accepted_is_queued_with_nothing_tried() -> None:
    accepted = MailRecord.accepted(MAIL, 123.5)
    assert accepted == record(accepted_at_unix=123.5)
    assert accepted.to_mail() == MAIL
    assert "code 000007" not in repr(accepted)  # the message body is never in a repr (logs)


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_the_accepting_calls_trace_context_stays_with_the_record() -> None:
    """Stored at acceptance ("" without one), kept by every change, never part of the mail."""
    assert MailRecord.accepted(MAIL, 1.0).traceparent == ""
    traced = MailRecord.accepted(MAIL, 1.0, traceparent=TRACEPARENT)
    assert traced == record(accepted_at_unix=1.0, traceparent=TRACEPARENT)
    assert traced.to_mail() == MAIL
    sending = apply_change(traced, change(MailState.SENDING, 1))
    refused = check_change(sending, change(MailState.QUEUED, 0))  # attempts went down
    assert refused.problem is not None
    done = apply_change(refused.record, change(MailState.DELIVERED, 1))
    assert [r.traceparent for r in (sending, refused.record, done)] == [TRACEPARENT] * 3


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_times_must_be_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="accepted_at_unix: expected a finite number"):
        record(accepted_at_unix=bad)
    with pytest.raises(ValueError, match="last_attempt_at_unix: expected a finite number"):
        record(last_attempt_at_unix=bad)
    with pytest.raises(ValueError, match="at_unix: expected a finite number"):
        change(MailState.SENDING, 1, at=bad)


def test_attempts_are_zero_or_more() -> None:
    assert record(attempts=0).attempts == 0
    with pytest.raises(ValueError, match="attempts: expected 0 or more, got -1"):
        record(attempts=-1)
    with pytest.raises(ValueError, match="attempts: expected 0 or more, got -1"):
        change(MailState.SENDING, -1)


@pytest.mark.parametrize("kind", ["", "../x", "a b", 7])
def test_the_kind_must_be_a_template_name(kind: object) -> None:
    with pytest.raises(ValueError, match="kind: expected a template name"):
        record(kind=kind)


def test_finished_time_goes_with_a_terminal_state_only() -> None:
    assert record(state=MailState.DELIVERED, finished_at_unix=5.0).finished_at_unix == 5.0
    with pytest.raises(ValueError, match="finished_at_unix: expected a time"):
        record(state=MailState.DELIVERED, finished_at_unix=None)
    with pytest.raises(ValueError, match="finished_at_unix: expected None"):
        record(state=MailState.QUEUED, finished_at_unix=5.0)


def test_a_change_about_another_mail_is_a_bug() -> None:
    other = StatusChange(
        message_id="<8@x.example>",
        state=MailState.SENDING,
        attempts=1,
        last_reply_code=None,
        last_reply_text="",
        at_unix=1.0,
    )
    with pytest.raises(ValueError, match="message_id: expected"):
        check_change(record(), other)


def test_an_attempt_sets_the_attempt_time_and_a_note_keeps_it() -> None:
    sending = apply_change(record(), change(MailState.SENDING, 1, at=200.0))
    assert (sending.attempts, sending.last_attempt_at_unix) == (1, 200.0)
    # The same attempt count again (a reply noted on the attempt): the attempt's time stays.
    noted = apply_change(sending, change(MailState.RETRY_WAIT, 1, at=260.0, code=451))
    assert (noted.attempts, noted.last_attempt_at_unix) == (1, 200.0)
    assert (noted.last_reply_code, noted.last_reply_text) == (451, "ok")
    # A newer attempt moves it.
    again = apply_change(noted, change(MailState.SENDING, 2, at=300.0))
    assert again.last_attempt_at_unix == 300.0
    done = apply_change(again, change(MailState.DELIVERED, 2, at=301.0))
    assert (done.state, done.finished_at_unix, done.last_attempt_at_unix) == (
        MailState.DELIVERED,
        301.0,
        300.0,
    )


def test_possible_duplicate_once_set_stays_set() -> None:
    flagged = apply_change(record(), change(MailState.SENDING, 1, possible_duplicate=True))
    assert flagged.possible_duplicate
    later = apply_change(flagged, change(MailState.RETRY_WAIT, 1, possible_duplicate=False))
    assert later.possible_duplicate
    plain = apply_change(record(), change(MailState.SENDING, 1))
    assert not plain.possible_duplicate
    assert not StatusChange(MAIL.message_id, MailState.SENDING, 1, None, "", 1.0).possible_duplicate


def test_apply_change_returns_the_checked_record() -> None:
    applied = check_change(record(), change(MailState.SENDING, 1))
    assert applied.problem is None
    assert apply_change(record(), change(MailState.SENDING, 1)) == applied.record


def test_the_default_outbox_path_follows_xdg_then_home() -> None:
    expected = Path("/state/trio-mailer/outbox.sqlite3")
    assert default_outbox_path({"XDG_STATE_HOME": "/state", "HOME": "/home/u"}) == expected
    home_path = Path("/home/u/.local/state/trio-mailer/outbox.sqlite3")
    assert default_outbox_path({"HOME": "/home/u"}) == home_path
    # An empty or relative XDG_STATE_HOME is ignored (the XDG spec).
    assert default_outbox_path({"XDG_STATE_HOME": "", "HOME": "/home/u"}) == home_path
    assert default_outbox_path({"XDG_STATE_HOME": "rel", "HOME": "/home/u"}) == home_path


@pytest.mark.parametrize(
    "env", [{}, {"HOME": ""}, {"HOME": "rel"}, {"XDG_STATE_HOME": "rel", "HOME": "also-rel"}]
)
def test_no_absolute_home_is_an_error_naming_both_variables(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="XDG_STATE_HOME or HOME: expected an absolute path"):
        default_outbox_path(env)
