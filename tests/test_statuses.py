"""Errors become gRPC statuses in one place (grpc/statuses.py), from one vocabulary."""

from __future__ import annotations

import purerpc
import pytest

from trio_mailer.core.errors import (
    GrpcStatus,
    InvalidRequest,
    MailNotFound,
    MessageBuildError,
    OutboxConflict,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    ShuttingDown,
)
from trio_mailer.grpc.statuses import rpc_error, status_error


@pytest.mark.parametrize("status", list(GrpcStatus))
def test_core_statuses_are_purerpc_statuses(status: GrpcStatus) -> None:
    """Each GrpcStatus has purerpc's number and name (so the conversion cannot mislabel)."""
    assert purerpc.StatusCode(status.value).name == status.name


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (InvalidRequest("to", "expected one address, got 2"), "INVALID_ARGUMENT", None),
        (MailNotFound(), "NOT_FOUND", None),
        (ShuttingDown(), "UNAVAILABLE", None),
        (MessageBuildError("header injection in Subject"), "INTERNAL", "internal error"),
        (OutboxError("cannot read", path=None), "UNAVAILABLE", "internal error"),
        (OutboxFull("disk full"), "UNAVAILABLE", "internal error"),
        (OutboxCorrupt("not SQLite"), "INTERNAL", "internal error"),
        (OutboxConflict("duplicate add"), "INTERNAL", "internal error"),
    ],
)
def test_rpc_error_reads_the_error_class(
    error: Exception, status: str, message: str | None
) -> None:
    """The status comes from the class; a MailerError shows its message, an outbox error none."""
    raised = rpc_error(error)  # type: ignore[arg-type]
    assert raised.status.status_code is purerpc.StatusCode[status]
    expected = message if message is not None else error.message  # type: ignore[attr-defined]
    assert raised.status.status_message == expected
    assert "outbox" not in raised.status.status_message


def test_rpc_error_takes_a_context_message() -> None:
    """An outbox error's client message is the handler's, never the file's name."""
    error = OutboxFull("disk full", path=None)
    raised = rpc_error(error, "cannot store the mail right now; try again later")
    assert raised.status.status_code is purerpc.StatusCode.UNAVAILABLE
    assert raised.status.status_message == "cannot store the mail right now; try again later"


def test_status_error() -> None:
    raised = status_error(GrpcStatus.INTERNAL, "internal error")
    assert (raised.status.status_code, raised.status.status_message) == (
        purerpc.StatusCode.INTERNAL,
        "internal error",
    )
