"""Errors that carry the gRPC status they map to.

Pure: no trio, smtplib or purerpc here. The gRPC layer (``grpc_service.py``) turns
``grpc_status`` into a real status; anything that is not a ``MailerError`` becomes INTERNAL
with a generic message, and its detail goes only to the log.
"""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class GrpcStatus(enum.Enum):
    """The gRPC status codes this service answers with (names as in the gRPC spec)."""

    INVALID_ARGUMENT = 3
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


class InvalidRequest(MailerError):
    """A request field is malformed: "to: expected one address, got 2"."""

    grpc_status = GrpcStatus.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ShuttingDown(MailerError):
    """The service is draining and takes no new mail."""

    grpc_status = GrpcStatus.UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("server is shutting down; try another instance or retry later")


class MessageBuildError(MailerError):
    """A rendered message failed its own safety check; the detail is logged, not shown."""

    grpc_status = GrpcStatus.INTERNAL

    def __init__(self, detail: str) -> None:
        super().__init__("internal error")
        self.detail = detail


def exception_leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The exceptions in ``group`` and its nested groups, in order (Trio nurseries nest them)."""
    return [
        leaf
        for exc in group.exceptions
        for leaf in (exception_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]
