"""Golden values: what the outbox stores for a mail's state and kind, pinned so that an old
outbox file stays readable. A failure here means a stored value changed: keep the old one (or
write a migration in store/outbox.py and bump its SCHEMA_VERSION), never just update the list."""

from __future__ import annotations

import pytest

from trio_mailer.core.mail_lifecycle import TERMINAL_STATES, TRANSITIONS, MailState
from trio_mailer.core.rendering import MailKind

# Exactly what the `state` column holds, per state, since schema version 1.
STORED_STATES = {
    "QUEUED": "queued",
    "SENDING": "sending",
    "RETRY_WAIT": "retry_wait",
    "DELIVERED": "delivered",
    "FAILED": "failed",
    "EXPIRED": "expired",
}
STORED_TERMINAL = {"delivered", "failed", "expired"}
# What the `kind` column holds for the two mails with their own gRPC methods.
STORED_KINDS = {"PASSWORD": "password", "RETRIEVE": "retrieve"}


def test_every_state_stores_exactly_its_golden_value() -> None:
    """No state was renamed, added or dropped, and each stores the same string as before."""
    assert {state.name: state.value for state in MailState} == STORED_STATES
    assert all(type(state.value) is str for state in MailState)


@pytest.mark.parametrize(("name", "stored"), sorted(STORED_STATES.items()))
def test_a_stored_value_reads_back_as_its_state(name: str, stored: str) -> None:
    """An old file's `state` column (a plain string) reads back as the same state."""
    assert MailState(stored) is MailState[name]


def test_the_terminal_states_are_the_stored_ones() -> None:
    """The schema's CHECK on finished_at_unix is built from these: they must not move."""
    assert {state.value for state in TERMINAL_STATES} == STORED_TERMINAL
    assert {state.value for state in MailState if state.terminal} == STORED_TERMINAL
    assert {state.value for state, nexts in TRANSITIONS.items() if not nexts} == STORED_TERMINAL


def test_an_unknown_stored_state_is_refused_not_guessed() -> None:
    """A value no state stores (say a typo'd or future one) does not silently map to one."""
    for stored in ("QUEUED", "Queued", "retry-wait", "sent", ""):
        with pytest.raises(ValueError):
            MailState(stored)


def test_the_kinds_store_their_template_names() -> None:
    """Rows written before templates were open-ended hold "password" or "retrieve"."""
    assert {kind.name: kind.value for kind in MailKind} == STORED_KINDS
    assert [str(kind) for kind in MailKind] == ["password", "retrieve"]
