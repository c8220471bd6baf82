"""The values the client returns and the error it raises: plain frozen dataclasses, no grpc."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class MailKind(enum.Enum):
    """Which mail: ``SendPass`` ("password") or ``SendRetrieve`` ("retrieve")."""

    PASSWORD = "password"
    RETRIEVE = "retrieve"


class MailState(enum.Enum):
    """Where a mail stands (the service's ``MailStatus.State``)."""

    QUEUED = "QUEUED"
    SENDING = "SENDING"
    RETRY_WAIT = "RETRY_WAIT"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"

    @property
    def terminal(self) -> bool:
        """No further change will come."""
        return self in {MailState.DELIVERED, MailState.FAILED, MailState.EXPIRED}


@dataclass(frozen=True, slots=True)
class Accepted:
    """The service stored the mail and will deliver it (or report it failed)."""

    message_id: str
    idempotency_key: str
    sent: bool = True


@dataclass(frozen=True, slots=True)
class Refused:
    """The service did not take the mail, for now: try again after ``retry_after`` seconds
    (None: the service gave no advice). ``reason`` is the service's, e.g. ``"queue full"``,
    ``"recipient rate limited"``, ``"caller rate limited"``, ``"suppressed"``."""

    reason: str
    retry_after: float | None
    idempotency_key: str
    sent: bool = False


SendResult = Accepted | Refused


@dataclass(frozen=True, slots=True)
class MailStatus:
    """One mail's status, as ``GetStatus``/``WatchStatus`` report it (timestamps in UTC)."""

    message_id: str
    state: MailState
    attempts: int
    last_reply_code: int
    last_reply_text: str
    accepted_at: datetime | None
    last_attempt_at: datetime | None
    finished_at: datetime | None
    possible_duplicate: bool


class MailerError(Exception):
    """A call ended with a gRPC status other than OK.

    Attributes:
        code: the status name, as ``grpc.StatusCode`` names it (``"INVALID_ARGUMENT"``...).
        details: the service's message, e.g. ``"to: expected one address, got a list of 2"``.
        attempts: how many attempts the call made (retries of UNAVAILABLE/DEADLINE_EXCEEDED).
    """

    def __init__(self, code: str, details: str, *, attempts: int = 1) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.attempts = attempts
