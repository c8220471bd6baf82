"""What the outbox stores about a mail, and the rules for changing it.

Pure: no trio, sqlite3, smtplib or purerpc here. ``outbox.py`` stores these values (in SQLite or in
memory); both apply a sender's report through ``apply_change``, so they cannot disagree.

Theory of operation
-------------------
A mail is added once, normally ``QUEUED``, with everything needed to send it again after a
restart. The sender then reports each ``StatusChange``: ``SENDING`` when an attempt starts,
``RETRY_WAIT`` after a failed attempt that will be retried, and one terminal state: ``DELIVERED``,
``FAILED`` or ``EXPIRED``. A change carries the sender's whole current view (attempts, last reply);
only ``possible_duplicate`` is sticky, because once the relay may have had the mail that stays true.

The rules ``apply_change`` enforces:

- a terminal record never changes again (every mail has exactly one outcome);
- ``attempts`` never goes down;
- ``finished_at_unix`` is set exactly when the state is terminal (``MailRecord`` checks this);
- ``last_attempt_at_unix`` moves to the change's time when the change counts a new attempt.

A row left ``SENDING`` at start-up means the process died during an attempt: the relay may have the
mail, so whoever resumes it should treat it as a possible duplicate.

Timestamps are wall-clock unix seconds (``time.time()``), not the trio clock: they must mean the
same thing after a restart.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from pathlib import Path, PurePath

import attrs

from trio_mailer.core.errors import GrpcStatus
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
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({MailState.DELIVERED, MailState.FAILED, MailState.EXPIRED})


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

    @finished_at_unix.validator
    def _check_finished(self, _: attrs.Attribute[float | None], value: float | None) -> None:
        if (value is not None) != self.state.terminal:
            raise ValueError(
                f"finished_at_unix: expected {'a time' if self.state.terminal else 'None'} "
                f"for state {self.state.value}, got {value!r}"
            )

    @classmethod
    def accepted(cls, mail: OutgoingMail, accepted_at_unix: float) -> MailRecord:
        """The record of a mail just accepted: queued, no attempt yet."""
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


class OutboxError(Exception):
    """The outbox cannot do what was asked; ``problem`` says why.

    Not a ``MailerError``: the message names the file, which a gRPC client must not see. An
    ``add`` that raises any ``OutboxError`` accepted nothing the caller can rely on, so the handler
    answers ``grpc_status`` with a generic message and logs ``str(exc)``.
    """

    grpc_status: GrpcStatus = GrpcStatus.UNAVAILABLE

    def __init__(self, problem: str, *, path: PurePath | None = None) -> None:
        super().__init__(f"outbox {path}: {problem}" if path is not None else f"outbox: {problem}")
        self.problem = problem
        self.path = path


class OutboxCorrupt(OutboxError):
    """The file is not a usable outbox (not SQLite, damaged, another schema): start-up must stop.

    The file is left exactly as it was, for a person to look at.
    """

    grpc_status = GrpcStatus.INTERNAL


class OutboxFull(OutboxError):
    """The disk (or the outbox's size cap) is full, or the file is read-only: nothing was stored."""

    grpc_status = GrpcStatus.UNAVAILABLE


class OutboxConflict(OutboxError):
    """A change that breaks the rules: a duplicate ``add``, an unknown mail, a finished mail.

    Only the offending call fails; the others in the same commit are stored. It means a bug in
    the caller, hence INTERNAL.
    """

    grpc_status = GrpcStatus.INTERNAL


def apply_change(record: MailRecord, change: StatusChange) -> MailRecord:
    """``record`` after ``change``.

    Raises:
        OutboxConflict: ``record`` is already terminal, or ``change`` lowers the attempts.
        ValueError: ``change`` is about another mail (a bug in the caller).
    """
    if change.message_id != record.message_id:
        raise ValueError(f"message_id: expected {record.message_id!r}, got {change.message_id!r}")
    if record.state.terminal:
        raise OutboxConflict(
            f"{record.message_id} is already {record.state.value}; "
            f"it cannot become {change.state.value}"
        )
    if change.attempts < record.attempts:
        raise OutboxConflict(
            f"{record.message_id}: attempts: expected {record.attempts} or more, "
            f"got {change.attempts}"
        )
    return attrs.evolve(
        record,
        state=change.state,
        attempts=change.attempts,
        last_reply_code=change.last_reply_code,
        last_reply_text=change.last_reply_text,
        last_attempt_at_unix=(
            change.at_unix if change.attempts > record.attempts else record.last_attempt_at_unix
        ),
        finished_at_unix=change.at_unix if change.state.terminal else None,
        possible_duplicate=record.possible_duplicate or change.possible_duplicate,
    )


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
