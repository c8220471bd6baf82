"""The mail lifecycle rules (core/mail_lifecycle.py): stored values, records, apply_change."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest

from trio_mailer.core.errors import OutboxConflict
from trio_mailer.core.mail_lifecycle import (
    MAIL_KINDS,
    TERMINAL_STATES,
    MailRecord,
    MailState,
    StatusChange,
    apply_change,
    default_outbox_path,
)
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rendering import MailKind

T0 = 1_790_000_000.0


def test_stored_state_values_are_pinned() -> None:
    """Golden: these strings are in every outbox file; changing one makes old files unreadable."""
    assert {state.name: state.value for state in MailState} == {
        "QUEUED": "queued",
        "SENDING": "sending",
        "RETRY_WAIT": "retry_wait",
        "DELIVERED": "delivered",
        "FAILED": "failed",
        "EXPIRED": "expired",
    }
    assert MailState("retry_wait") is MailState.RETRY_WAIT


def test_stored_kind_values_are_pinned() -> None:
    """Golden: the kind column holds these strings."""
    assert MAIL_KINDS == {"password", "retrieve"}


def test_terminal_states() -> None:
    assert TERMINAL_STATES == {MailState.DELIVERED, MailState.FAILED, MailState.EXPIRED}
    assert [s for s in MailState if s.terminal] == [
        MailState.DELIVERED,
        MailState.FAILED,
        MailState.EXPIRED,
    ]


def mail(n: int = 1) -> OutgoingMail:
    return OutgoingMail(
        message_id=f"<{n}@x.example>",
        kind=MailKind.PASSWORD,
        envelope_from="mailer@x.example",
        envelope_to="user@y.example",
        data=b"Subject: code\r\n\r\n123456\r\n",
    )


def queued() -> MailRecord:
    return MailRecord.accepted(mail(), T0)


def change(state: MailState, attempts: int, at: float, **kwargs: object) -> StatusChange:
    fields: dict[str, object] = {"last_reply_code": None, "last_reply_text": "", **kwargs}
    return StatusChange("<1@x.example>", state, attempts, at_unix=T0 + at, **fields)  # type: ignore[arg-type]


def test_accepted_is_queued_with_no_attempt() -> None:
    record = queued()
    assert record == MailRecord(
        message_id="<1@x.example>",
        kind="password",
        envelope_from="mailer@x.example",
        envelope_to="user@y.example",
        data=b"Subject: code\r\n\r\n123456\r\n",
        accepted_at_unix=T0,
        state=MailState.QUEUED,
        attempts=0,
        last_reply_code=None,
        last_reply_text="",
        last_attempt_at_unix=None,
        finished_at_unix=None,
        possible_duplicate=False,
    )
    assert record.to_mail() == mail()
    assert "Subject" not in repr(record)  # the message is never logged


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"kind": "newsletter"},
            "kind: expected one of ['password', 'retrieve'], got 'newsletter'",
        ),
        ({"attempts": -1}, "attempts: expected 0 or more, got -1"),
        ({"accepted_at_unix": math.nan}, "accepted_at_unix: expected a finite number of seconds"),
        ({"accepted_at_unix": math.inf}, "accepted_at_unix: expected a finite number of seconds"),
        (
            {"last_attempt_at_unix": math.inf},
            "last_attempt_at_unix: expected a finite number of seconds",
        ),
        (
            {"finished_at_unix": T0},
            "finished_at_unix: expected None for state queued, got 1790000000.0",
        ),
        (
            {"state": MailState.DELIVERED},
            "finished_at_unix: expected a time for state delivered, got None",
        ),
    ],
)
def test_a_record_that_breaks_the_rules_cannot_be_made(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        attrs.evolve(queued(), **changes)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)


def test_a_record_with_good_optional_times_is_fine() -> None:
    record = attrs.evolve(queued(), attempts=0, last_attempt_at_unix=T0 + 1)
    assert record.last_attempt_at_unix == T0 + 1
    done = attrs.evolve(queued(), state=MailState.FAILED, finished_at_unix=T0 + 2)
    assert done.finished_at_unix == T0 + 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attempts": -1}, "attempts: expected 0 or more, got -1"),
        ({"at_unix": math.nan}, "at_unix: expected a finite number of seconds"),
    ],
)
def test_a_bad_status_change_cannot_be_made(changes: dict[str, object], message: str) -> None:
    good = change(MailState.SENDING, 1, at=1)
    with pytest.raises(ValueError) as caught:
        attrs.evolve(good, **changes)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)
    assert good.possible_duplicate is False  # the default


def test_apply_change_follows_the_sender() -> None:
    """SENDING counts an attempt (its time), RETRY_WAIT keeps it, DELIVERED finishes."""
    sending = apply_change(queued(), change(MailState.SENDING, 1, at=1))
    assert (sending.state, sending.attempts, sending.last_attempt_at_unix) == (
        MailState.SENDING,
        1,
        T0 + 1,
    )
    assert sending.finished_at_unix is None
    waiting = apply_change(
        sending,
        change(MailState.RETRY_WAIT, 1, at=2, last_reply_code=451, last_reply_text="later"),
    )
    assert (waiting.last_reply_code, waiting.last_reply_text) == (451, "later")
    assert waiting.last_attempt_at_unix == T0 + 1  # no new attempt: the time stays
    assert waiting.finished_at_unix is None
    delivered = apply_change(waiting, change(MailState.DELIVERED, 2, at=3, last_reply_code=250))
    assert (delivered.attempts, delivered.last_attempt_at_unix) == (2, T0 + 3)
    assert delivered.finished_at_unix == T0 + 3
    assert delivered.last_reply_code == 250
    assert delivered.accepted_at_unix == T0  # untouched


def test_possible_duplicate_is_sticky() -> None:
    flagged = apply_change(queued(), change(MailState.SENDING, 1, at=1, possible_duplicate=True))
    assert flagged.possible_duplicate is True
    later = apply_change(flagged, change(MailState.RETRY_WAIT, 1, at=2))
    assert later.possible_duplicate is True
    plain = apply_change(queued(), change(MailState.SENDING, 1, at=1))
    assert plain.possible_duplicate is False


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES, key=lambda s: s.value))
def test_a_finished_mail_never_changes_again(state: MailState) -> None:
    done = apply_change(queued(), change(state, 1, at=1))
    with pytest.raises(OutboxConflict) as caught:
        apply_change(done, change(MailState.SENDING, 2, at=2))
    assert str(caught.value) == (
        f"outbox: <1@x.example> is already {state.value}; it cannot become sending"
    )


def test_attempts_never_go_down_but_may_stay() -> None:
    sending = apply_change(queued(), change(MailState.SENDING, 2, at=1))
    with pytest.raises(OutboxConflict) as caught:
        apply_change(sending, change(MailState.RETRY_WAIT, 1, at=2))
    assert str(caught.value) == "outbox: <1@x.example>: attempts: expected 2 or more, got 1"
    same = apply_change(sending, change(MailState.RETRY_WAIT, 2, at=2))
    assert same.attempts == 2


def test_a_change_for_another_mail_is_a_bug() -> None:
    other = attrs.evolve(change(MailState.SENDING, 1, at=1), message_id="<2@x.example>")
    with pytest.raises(ValueError) as caught:
        apply_change(queued(), other)
    assert str(caught.value) == "message_id: expected '<1@x.example>', got '<2@x.example>'"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"XDG_STATE_HOME": "/s", "HOME": "/h"}, "/s/trio-mailer/outbox.sqlite3"),
        ({"XDG_STATE_HOME": "", "HOME": "/h"}, "/h/.local/state/trio-mailer/outbox.sqlite3"),
        ({"XDG_STATE_HOME": "rel", "HOME": "/h"}, "/h/.local/state/trio-mailer/outbox.sqlite3"),
        ({"HOME": "/h"}, "/h/.local/state/trio-mailer/outbox.sqlite3"),
    ],
)
def test_default_outbox_path(env: dict[str, str], expected: str) -> None:
    assert default_outbox_path(env) == Path(expected)


@pytest.mark.parametrize("env", [{}, {"HOME": ""}, {"HOME": "h", "XDG_STATE_HOME": "s"}])
def test_default_outbox_path_needs_an_absolute_directory(env: dict[str, str]) -> None:
    with pytest.raises(ValueError) as caught:
        default_outbox_path(env)
    assert str(caught.value) == (
        "XDG_STATE_HOME or HOME: expected an absolute path, got "
        f"{env.get('XDG_STATE_HOME', '')!r} and {env.get('HOME', '')!r}"
    )
