"""Where an error becomes a gRPC status: the one place that reads an error's ``grpc_status``.

The core names statuses with ``core.errors.GrpcStatus``; purerpc has its own enum with the same
numbers (a test pins that). Handlers raise what these functions return.
"""

from __future__ import annotations

import purerpc

from trio_mailer.core.errors import GrpcStatus, MailerError, OutboxError

__all__ = ["rpc_error", "status_error"]


def status_error(status: GrpcStatus, message: str) -> purerpc.RpcFailedError:
    """The exception that makes purerpc answer `status` with `message`."""
    return purerpc.RpcFailedError(purerpc.Status(purerpc.StatusCode(status.value), message))


def rpc_error(
    error: MailerError | OutboxError, message: str | None = None
) -> purerpc.RpcFailedError:
    """The answer for `error`: its own status, with its public message.

    Args:
        error: a core error; its class says the status.
        message: what the client is told instead; required in effect for an ``OutboxError``,
            whose text names the file (without it the client hears "internal error").
    """
    if message is None:
        message = error.public_message if isinstance(error, MailerError) else "internal error"
    return status_error(error.grpc_status, message)
