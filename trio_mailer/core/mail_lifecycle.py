"""What the outbox stores about a mail, and the rules for changing it.

Pure: no trio, sqlite3, smtplib or purerpc here. ``store/outbox.py`` (SQLite, memory) and
``store/postgres_outbox.py`` store these values; every store and the status board apply a sender's
report through ``check_change``, so they cannot disagree.

Theory of operation
-------------------
A mail is added once, ``QUEUED``, with everything needed to send it again after a restart. The
sender then reports each ``StatusChange``; the outbox and the status board apply it through
``check_change``, so they cannot disagree. The allowed moves are one table, ``TRANSITIONS``::

    QUEUED      -> SENDING (an attempt starts), FAILED, EXPIRED,
                   QUEUED (a note: why it still waits, e.g. the relay is unavailable)
    SENDING     -> DELIVERED, FAILED, EXPIRED (the attempt's outcome),
                   RETRY_WAIT (it failed; another is due later),
                   QUEUED (given back before anything of the mail reached the relay),
                   SENDING (the next attempt, after a restart found the mail SENDING)
    RETRY_WAIT  -> SENDING, FAILED, EXPIRED, RETRY_WAIT (a note, as for QUEUED)
    DELIVERED, FAILED, EXPIRED: terminal, nothing follows

``SENDING`` is stored *before* the relay hears DATA: a row still ``SENDING`` at start-up means
the process died during an attempt, so the relay may have the mail and its next delivery is
flagged ``possible_duplicate``; its attempt is already counted.

A change carries the sender's whole view (attempts, last reply); only ``possible_duplicate`` is
sticky, because once the relay may have had the mail that stays true. Besides the table:
``attempts`` never goes down; the accepting call's ``traceparent`` is kept as it was;
``finished_at_unix`` is set exactly when the state is terminal
(``MailRecord`` checks this); ``last_attempt_at_unix`` moves to the change's time when the change
counts a new attempt.

A change the rules refuse is a bug in the sender, never the mail's fault, and must not take the
service down (it once did: an outage past the time to live made the sender report an outcome
with a lower attempt count, and the refusal escaped the nursery). ``check_change`` therefore
never raises for a mail that is not finished; it returns the record in a *defined* state and
says what was wrong (``Applied.problem``), which the shell logs at ERROR with the Message-ID:

- an outcome (a terminal state) is always recorded, so every mail ends exactly once; attempts
  and the duplicate flag never go down;
- a move the table does not allow to a non-terminal state is ignored: the record keeps its state,
  with the higher attempt count and the sticky duplicate flag.

A change to a finished mail is refused (``OutboxConflict``): its one outcome stands.

Timestamps are wall-clock unix seconds (``time.time()``), not the trio clock: they must mean the
same thing after a restart.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from pathlib import Path, PurePath

import attrs

from trio_mailer.core.errors import OutboxConflict

# The outbox errors live in errors.py with the others; these names stay importable from here.
from trio_mailer.core.errors import OutboxCorrupt as OutboxCorrupt
from trio_mailer.core.errors import OutboxError as OutboxError
from trio_mailer.core.errors import OutboxFull as OutboxFull
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rendering import TEMPLATE_NAME


class MailState(enum.Enum):
    """Where a mail stands; the value is what the outbox file stores."""

    QUEUED = "queued"  # accepted, no attempt running
    SENDING = "sending"  # an attempt is running
    RETRY_WAIT = "retry_wait"  # an attempt failed; another is due later
    DELIVERED = "delivered"  # terminal: the relay answered 2xx to the final "."
    FAILED = "failed"  # terminal: a permanent reply, or the attempts used up
    EXPIRED = "expired"  # terminal: its time to live passed

    @property
    def terminal(self) -> bool:
        # Identity, not ``in TERMINAL_STATES``: an Enum member's hash runs Python code, and
        # this is asked several times per mail.
        return self is MailState.DELIVERED or self is MailState.FAILED or self is MailState.EXPIRED


TERMINAL_STATES = frozenset({MailState.DELIVERED, MailState.FAILED, MailState.EXPIRED})

_OUTCOMES = frozenset({MailState.DELIVERED, MailState.FAILED, MailState.EXPIRED})
_DELIVERED = frozenset({MailState.DELIVERED})  # only an attempt (SENDING) can deliver

# The one table of allowed moves; see the theory of operation.
TRANSITIONS: Mapping[MailState, frozenset[MailState]] = {
    MailState.QUEUED: frozenset({MailState.QUEUED, MailState.SENDING} | _OUTCOMES - _DELIVERED),
    MailState.SENDING: frozenset(
        {MailState.SENDING, MailState.RETRY_WAIT, MailState.QUEUED} | _OUTCOMES
    ),
    MailState.RETRY_WAIT: frozenset(
        {MailState.RETRY_WAIT, MailState.SENDING} | _OUTCOMES - _DELIVERED
    ),
    MailState.DELIVERED: frozenset(),
    MailState.FAILED: frozenset(),
    MailState.EXPIRED: frozenset(),
}


def allowed(source: MailState, target: MailState) -> bool:
    """True when the table lets a mail in ``source`` move to ``target``."""
    return target in TRANSITIONS[source]


def _finite(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name}: expected a finite number of seconds, got {value!r}")


def _finite_or_none(
    _: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{attribute.name}: expected a finite number of seconds, got {value!r}")


def _not_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: expected 0 or more, got {value}")


def _mail_kind(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    # Any template name: files written before templates were open-ended hold "password" or
    # "retrieve", which still match. The stored ``data`` is the built message, so a mail is
    # resent as it was accepted even if the templates have changed since.
    if not isinstance(value, str) or not TEMPLATE_NAME.fullmatch(value):
        raise ValueError(f"{attribute.name}: expected a template name, got {value!r}")


@attrs.frozen
class MailRecord:
    """One stored mail: everything needed to resume its delivery and to answer a status query."""

    message_id: str  # with angle brackets, as in the Message-ID header
    kind: str = attrs.field(validator=_mail_kind)  # the template name: "password", "retrieve", ...
    envelope_from: str
    envelope_to: str
    data: bytes = attrs.field(repr=False)  # the serialized message; never logged
    accepted_at_unix: float = attrs.field(validator=_finite)
    state: MailState
    attempts: int = attrs.field(validator=_not_negative)
    last_reply_code: int | None
    last_reply_text: str
    last_attempt_at_unix: float | None = attrs.field(validator=_finite_or_none)
    finished_at_unix: float | None = attrs.field(validator=_finite_or_none)
    possible_duplicate: bool
    # The accepting call's span as a W3C traceparent ("": none), so that an attempt made later,
    # after a restart or by another replica, is traced under that call.
    traceparent: str = ""

    @finished_at_unix.validator
    def _check_finished(self, _: attrs.Attribute[float | None], value: float | None) -> None:
        if (value is not None) != self.state.terminal:
            raise ValueError(
                f"finished_at_unix: expected {'a time' if self.state.terminal else 'None'} "
                f"for state {self.state.value}, got {value!r}"
            )

    @classmethod
    def accepted(
        cls, mail: OutgoingMail, accepted_at_unix: float, traceparent: str = ""
    ) -> MailRecord:
        """The record of a mail just accepted: queued, no attempt yet (``traceparent``: the
        accepting call's span, "" for none)."""
        return cls(
            message_id=mail.message_id,
            kind=str(mail.kind),
            envelope_from=mail.envelope_from,
            envelope_to=mail.envelope_to,
            data=mail.data,
            accepted_at_unix=accepted_at_unix,
            state=MailState.QUEUED,
            attempts=0,
            last_reply_code=None,
            last_reply_text="",
            last_attempt_at_unix=None,
            finished_at_unix=None,
            possible_duplicate=False,
            traceparent=traceparent,
        )

    def to_mail(self) -> OutgoingMail:
        """The mail to hand to the sender again (after a restart)."""
        return OutgoingMail(
            message_id=self.message_id,
            kind=self.kind,
            envelope_from=self.envelope_from,
            envelope_to=self.envelope_to,
            data=self.data,
        )


@attrs.frozen
class StatusChange:
    """What the sender reports about one mail; applied in order per ``message_id``."""

    message_id: str
    state: MailState
    attempts: int = attrs.field(validator=_not_negative)  # attempts made so far, this one included
    last_reply_code: int | None
    last_reply_text: str
    at_unix: float = attrs.field(validator=_finite)
    possible_duplicate: bool = False


@attrs.frozen
class Applied:
    """The record after a change, and what was wrong with the change (None: nothing)."""

    record: MailRecord
    problem: str | None = None


def check_change(record: MailRecord, change: StatusChange) -> Applied:
    """``record`` after ``change``, in a defined state even when the change breaks the rules.

    Raises:
        OutboxConflict: ``record`` is already terminal (its one outcome stands).
        ValueError: ``change`` is about another mail (a bug in the caller).
    """
    if change.message_id != record.message_id:
        raise ValueError(f"message_id: expected {record.message_id!r}, got {change.message_id!r}")
    if record.state.terminal:
        raise OutboxConflict(
            f"{record.message_id} is already {record.state.value}; "
            f"it cannot become {change.state.value}"
        )
    problems = []
    state = change.state
    if not allowed(record.state, change.state):
        problems.append(f"{record.state.value} -> {change.state.value} is not allowed")
        if not change.state.terminal:
            state = record.state  # ignored; an outcome is always recorded
    attempts = change.attempts
    if change.attempts < record.attempts:
        problems.append(f"attempts: expected {record.attempts} or more, got {change.attempts}")
        attempts = record.attempts
    new = MailRecord(  # not attrs.evolve: the same fields and validators, at half the cost
        message_id=record.message_id,
        kind=record.kind,
        envelope_from=record.envelope_from,
        envelope_to=record.envelope_to,
        data=record.data,
        accepted_at_unix=record.accepted_at_unix,
        state=state,
        attempts=attempts,
        last_reply_code=change.last_reply_code,
        last_reply_text=change.last_reply_text,
        last_attempt_at_unix=(
            change.at_unix if attempts > record.attempts else record.last_attempt_at_unix
        ),
        finished_at_unix=change.at_unix if state.terminal else None,
        possible_duplicate=record.possible_duplicate or change.possible_duplicate,
        traceparent=record.traceparent,
    )
    if not problems:
        return Applied(new)
    return Applied(
        new,
        f"{record.message_id}: refused status change ({'; '.join(problems)}); "
        f"kept as {new.state.value} with {new.attempts} attempt(s)",
    )


def apply_change(record: MailRecord, change: StatusChange) -> MailRecord:
    """``record`` after ``change`` (see ``check_change``; its problem is dropped here).

    Raises:
        OutboxConflict: ``record`` is already terminal.
        ValueError: ``change`` is about another mail (a bug in the caller).
    """
    return check_change(record, change).record


OUTBOX_FILE = PurePath("trio-mailer", "outbox.sqlite3")


def default_outbox_path(env: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/trio-mailer/outbox.sqlite3``, else ``$HOME/.local/state/...``.

    As the XDG Base Directory spec says, an unset, empty or relative ``XDG_STATE_HOME`` is ignored.

    Raises:
        ValueError: neither ``XDG_STATE_HOME`` nor ``HOME`` is an absolute path.
    """
    state_home = env.get("XDG_STATE_HOME", "")
    if state_home and Path(state_home).is_absolute():
        return Path(state_home) / OUTBOX_FILE
    home = env.get("HOME", "")
    if home and Path(home).is_absolute():
        return Path(home) / ".local" / "state" / OUTBOX_FILE
    raise ValueError(
        f"XDG_STATE_HOME or HOME: expected an absolute path, got {state_home!r} and {home!r}"
    )
