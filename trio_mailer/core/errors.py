"""Every error class a gRPC client can hear about, each with the gRPC status it maps to.

Pure: nothing here loads trio, smtplib, sqlite3 or purerpc. One vocabulary of statuses
(``GrpcStatus``, numbered as in the gRPC spec) is used in the core; the gRPC layer turns an
error into a real status in one place, ``trio_mailer.grpc.statuses.rpc_error``, which reads
``grpc_status``. Anything that is not one of these errors becomes
INTERNAL with a generic message, and its detail goes only to the log.
"""

from __future__ import annotations

import enum
from pathlib import PurePath
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class GrpcStatus(enum.Enum):
    """The gRPC status codes this service answers with (names and numbers as in the gRPC spec)."""

    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14


class MailerError(Exception):
    """Base class: an error whose ``message`` is safe to show to the gRPC client."""

    grpc_status: GrpcStatus = GrpcStatus.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def public_message(self) -> str:
        """What the gRPC client is told."""
        return self.message


class InvalidRequest(MailerError):
    """A request field is malformed: "to: expected one address, got 2"."""

    grpc_status = GrpcStatus.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class MailNotFound(MailerError):
    """A status query for a mail this service does not know (or no longer keeps)."""

    grpc_status = GrpcStatus.NOT_FOUND

    def __init__(self) -> None:
        super().__init__(
            "message_id: no such mail here (never accepted, or older than the retention)"
        )


class ShuttingDown(MailerError):
    """The service is draining and takes no new mail."""

    grpc_status = GrpcStatus.UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("server is shutting down; try another instance or retry later")


class DeadlineExceeded(MailerError):
    """The call's deadline passed before its mail was stored: nothing was stored."""

    grpc_status = GrpcStatus.DEADLINE_EXCEEDED


class InternalError(MailerError):
    """Something unexpected (a bug): the detail is logged, the caller hears "internal error"."""

    def __init__(self) -> None:
        super().__init__("internal error")


class MessageBuildError(MailerError):
    """A rendered message failed its own safety check; the detail is logged, not shown."""

    grpc_status = GrpcStatus.INTERNAL

    def __init__(self, detail: str) -> None:
        super().__init__("internal error")
        self.detail = detail


class OutboxError(Exception):
    """The outbox cannot do what was asked; ``problem`` says why.

    Not a ``MailerError``: its text names the file, which a gRPC client must not see, so the
    handler says what the client is told. An ``add`` that raises any ``OutboxError`` accepted
    nothing the caller can rely on.
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


class BindError(Exception):
    """A listening port cannot be bound (taken, or the address is not local); the message names
    the address (the gRPC port, /metrics, the dev inbox)."""


def exception_leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The exceptions in ``group`` and its nested groups, in order (Trio nurseries nest them)."""
    return [
        leaf
        for exc in group.exceptions
        for leaf in (exception_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]
