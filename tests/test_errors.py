"""The core's error classes (core/errors.py): their fields, messages and statuses."""

from __future__ import annotations

from pathlib import PurePath

import pytest

from trio_mailer.core.errors import (
    DeadlineExceeded,
    GrpcStatus,
    InternalError,
    InvalidRequest,
    MailerError,
    MailNotFound,
    MessageBuildError,
    OutboxConflict,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    ShuttingDown,
    exception_leaves,
)


def test_grpc_status_numbers_are_the_specs() -> None:
    assert {s.name: s.value for s in GrpcStatus} == {
        "INVALID_ARGUMENT": 3,
        "DEADLINE_EXCEEDED": 4,
        "NOT_FOUND": 5,
        "FAILED_PRECONDITION": 9,
        "ABORTED": 10,
        "INTERNAL": 13,
        "UNAVAILABLE": 14,
    }


def test_invalid_request_names_the_field() -> None:
    error = InvalidRequest("to", "expected one address, got 2")
    assert (error.field, error.problem) == ("to", "expected one address, got 2")
    assert error.message == error.public_message == "to: expected one address, got 2"
    assert str(error) == "to: expected one address, got 2"
    assert error.grpc_status is GrpcStatus.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (
            ShuttingDown(),
            GrpcStatus.UNAVAILABLE,
            "server is shutting down; try another instance or retry later",
        ),
        (
            MailNotFound(),
            GrpcStatus.NOT_FOUND,
            "message_id: no such mail here (never accepted, or older than the retention)",
        ),
        (MessageBuildError("Subject has a newline"), GrpcStatus.INTERNAL, "internal error"),
        (MailerError("plain"), GrpcStatus.INTERNAL, "plain"),
        (
            DeadlineExceeded("deadline exceeded; nothing was stored"),
            GrpcStatus.DEADLINE_EXCEEDED,
            "deadline exceeded; nothing was stored",
        ),
        (InternalError(), GrpcStatus.INTERNAL, "internal error"),
    ],
)
def test_mailer_errors_carry_status_and_safe_message(
    error: MailerError, status: GrpcStatus, message: str
) -> None:
    assert error.grpc_status is status
    assert error.public_message == message
    assert str(error) == message


def test_a_message_build_error_keeps_its_detail_out_of_the_message() -> None:
    error = MessageBuildError("Subject has a newline")
    assert error.detail == "Subject has a newline"
    assert "newline" not in error.public_message


def test_outbox_errors_name_the_file_and_carry_a_status() -> None:
    path = PurePath("/var/lib/mailer/outbox.sqlite3")
    error = OutboxError("cannot read: Permission denied", path=path)
    assert str(error) == "outbox /var/lib/mailer/outbox.sqlite3: cannot read: Permission denied"
    assert (error.problem, error.path) == ("cannot read: Permission denied", path)
    assert str(OutboxError("closed")) == "outbox: closed"
    assert OutboxError("x").path is None
    assert not isinstance(error, MailerError)  # its text is not for clients
    assert OutboxError.grpc_status is GrpcStatus.UNAVAILABLE
    assert OutboxFull.grpc_status is GrpcStatus.UNAVAILABLE
    assert OutboxCorrupt.grpc_status is GrpcStatus.INTERNAL
    assert OutboxConflict.grpc_status is GrpcStatus.INTERNAL
    assert all(issubclass(c, OutboxError) for c in (OutboxFull, OutboxCorrupt, OutboxConflict))


def test_exception_leaves_flattens_nested_groups_in_order() -> None:
    a, b, c, d = ValueError("a"), KeyError("b"), OSError("c"), RuntimeError("d")
    group = ExceptionGroup("outer", [a, ExceptionGroup("inner", [b, ExceptionGroup("x", [c])]), d])
    assert exception_leaves(group) == [a, b, c, d]
    assert exception_leaves(ExceptionGroup("one", [a])) == [a]
