"""``trio-mailer send``, ``status`` and ``health``: call a running service and print its reply.

The retry rules are the client package's (``core/call_policy.py`` is a copy of
``trio_mailer_client/_policy.py``): one idempotency key per send, reused by its retries;
UNAVAILABLE and DEADLINE_EXCEEDED retried with capped jittered backoff within the overall
timeout. The CLI stays on purerpc so that the service's install does not need grpcio.

Every call is bounded: ``timeout_s`` for the whole call, retries included (for
``status --watch``, which is not retried: until the first status; the stream may then run until
the final state), and within it ``connect_timeout_s`` for each connection (TCP, TLS). Past
either, the call fails with ``SendFailed`` naming the phase, and the CLI exits non-zero: a port
that accepts and never speaks no longer hangs it.
"""

from __future__ import annotations

import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs
import purerpc
import trio

from trio_mailer import tls
from trio_mailer.core.call_policy import DEFAULT_TIMEOUT_S, new_idempotency_key, retry_delay_s
from trio_mailer.core.errors import exception_leaves
from trio_mailer.core.rendering import MailKind
from trio_mailer.grpc.internals import Channel, client_channel
from trio_mailer.v1.mailer_grpc import MailerAdminStub, MailerStub
from trio_mailer.v1.mailer_pb2 import (
    ListSuppressedRequest,
    MailStatus,
    MsgReply,
    MsgRequest,
    RemoveSuppressedRequest,
    SendRequest,
    StatusRequest,
    SuppressedAddress,
)


@attrs.frozen
class SendFailed(Exception):
    """The call failed with a gRPC status (or could not be made at all)."""

    status: str
    detail: str


T = TypeVar("T")

# The whole call, retries included (for a watch: until the first status); the client package's.
CALL_TIMEOUT_S = DEFAULT_TIMEOUT_S
# Each connection attempt (TCP connect and TLS handshake): short enough to leave a retry.
CONNECT_TIMEOUT_S = 3.0


@attrs.frozen
class Target:
    """Where and how a call reaches the service: its address, TLS, token and time bounds."""

    host: str
    port: int
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    timeout_s: float = CALL_TIMEOUT_S  # the whole call, retries included


@attrs.define
class _Budget:
    """One cancel scope for the whole call, its deadline moved as the call makes progress."""

    scope: trio.CancelScope
    call_deadline: float  # the end of the whole call (trio.current_time() clock)
    phase: str = "connect"

    def connected(self) -> None:
        self.phase = "call"
        self.scope.deadline = self.call_deadline

    def answered(self) -> None:
        """The first reply came: a watch may now wait as long as the mail takes."""
        self.phase = "stream"
        self.scope.deadline = math.inf


@asynccontextmanager
async def open_channel(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Channel]:
    """A purerpc channel that, unlike ``purerpc.insecure_channel``, closes its socket.

    With ``ssl_context`` the connection uses TLS (see ``client_ssl_context``).
    """
    async with AsyncExitStack() as stack:
        stream: anyio.abc.ByteStream
        if ssl_context is None:
            stream = await anyio.connect_tcp(host, port)
        else:
            stream = await anyio.connect_tcp(
                host, port, ssl_context=ssl_context, tls_standard_compatible=False
            )
        stack.push_async_callback(stream.aclose)
        yield await client_channel(stack, host, port, stream)


def client_ssl_context(
    ca_file: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS to the service: verify it (system store, or ``ca_file``), offer HTTP/2 by ALPN,
    and present a client certificate when the service requires one.

    Raises:
        ssl.SSLError, OSError: a file cannot be loaded.
    """
    return tls.client_context(ca_file, alpn=["h2"], cert=cert, key=key)


async def send(
    target: Target,
    kind: MailKind,
    to: str,
    code: str,
    *,
    locale: str = "",
    idempotency_key: str | None = None,
) -> MsgReply:
    """Ask the service at ``target`` for a ``kind`` mail, retrying within its ``timeout_s``.

    Raises:
        SendFailed: with the gRPC status name and its message (DEADLINE_EXCEEDED past a
            timeout).
    """
    request = MsgRequest(
        to=to, code=code, locale=locale, idempotency_key=idempotency_key or new_idempotency_key()
    )

    async def call(stub: MailerStub, metadata: Metadata, budget: _Budget) -> MsgReply:
        method = stub.SendPass if kind is MailKind.PASSWORD else stub.SendRetrieve
        reply: MsgReply = await method(request, metadata=metadata)
        return reply

    return await _retried(target, call)


async def send_template(
    target: Target,
    template: str,
    to: str,
    variables: Mapping[str, str],
    *,
    locale: str = "",
    idempotency_key: str = "",
) -> MsgReply:
    """Ask the service at ``target`` for a mail from ``template`` (the ``Send`` call),
    retrying within its ``timeout_s`` with one idempotency key, as ``send`` does.

    Raises:
        SendFailed: with the gRPC status name and its message.
    """
    request = SendRequest(
        to=to,
        template=template,
        vars=dict(variables),
        locale=locale,
        idempotency_key=idempotency_key or new_idempotency_key(),
    )

    async def call(stub: MailerStub, metadata: Metadata, _budget: _Budget) -> MsgReply:
        reply: MsgReply = await stub.Send(request, metadata=metadata)
        return reply

    return await _retried(target, call)


async def with_retries(
    attempt: Callable[[float], Awaitable[T]],
    timeout_s: float,
    *,
    jitter: Callable[[], float] = random.random,
) -> T:
    """``attempt(deadline)`` until it returns, by the client package's rules, within
    ``timeout_s``; each attempt is given the overall deadline (``trio.current_time()`` clock)
    and must end by it.

    Raises:
        SendFailed: a final status, or the last retryable one when the time ran out.
    """
    deadline = trio.current_time() + timeout_s
    retry = 0
    while True:
        try:
            return await attempt(deadline)
        except SendFailed as exc:
            error = exc
        delay = retry_delay_s(error.status, retry, deadline - trio.current_time(), jitter)
        if delay is None:
            raise error
        await trio.sleep(delay)
        retry += 1


async def status(
    target: Target,
    message_id: str,
    on_status: Callable[[MailStatus], None],
    *,
    watch: bool = False,
    idempotency_key: str = "",
) -> None:
    """Report the status of ``message_id`` to ``on_status``; with ``watch``, every change until
    the final state. ``GetStatus`` is retried within ``timeout_s`` (a watch: bounded until its
    first status, then none).

    Raises:
        SendFailed: with the gRPC status name and its message.
    """

    async def call(stub: MailerStub, metadata: Metadata, budget: _Budget) -> None:
        request = StatusRequest(message_id=message_id, idempotency_key=idempotency_key)
        if not watch:
            on_status(await stub.GetStatus(request, metadata=metadata))
            return
        async with aclosing(stub.WatchStatus(request, metadata=metadata)) as changes:
            async for change in changes:
                budget.answered()
                on_status(change)

    run = _call if watch else _retried  # a watch is bounded until its first status, not retried
    await run(target, call)


async def list_suppressed(target: Target) -> list[SuppressedAddress]:
    """The running service's suppression list.

    Raises:
        SendFailed: with the gRPC status name and its message.
    """

    async def call(
        admin: MailerAdminStub, metadata: Metadata, _budget: _Budget
    ) -> list[SuppressedAddress]:
        reply = await admin.ListSuppressed(ListSuppressedRequest(), metadata=metadata)
        return list(reply.addresses)

    return await _call(target, call, make_stub=MailerAdminStub)


async def remove_suppressed(target: Target, address: str) -> bool:
    """Take ``address`` off the running service's suppression list; False if it was not on it.

    Raises:
        SendFailed: with the gRPC status name and its message.
    """

    async def call(admin: MailerAdminStub, metadata: Metadata, _budget: _Budget) -> bool:
        reply = await admin.RemoveSuppressed(
            RemoveSuppressedRequest(address=address), metadata=metadata
        )
        return bool(reply.removed)

    return await _call(target, call, make_stub=MailerAdminStub)


Metadata = list[tuple[str, str]] | None


async def _call(
    target: Target,
    call: Callable[[Any, Metadata, _Budget], Awaitable[T]],
    *,
    deadline: float | None = None,
    make_stub: Callable[[Any], Any] = MailerStub,
) -> T:
    """One attempt: connect within ``connect_timeout_s``, then wait for the reply until
    ``deadline`` (the whole call's, retries included; default ``timeout_s`` from now)."""
    host, port, token = target.host, target.port, target.token
    connect_timeout_s, timeout_s = target.connect_timeout_s, target.timeout_s
    metadata = [("authorization", f"Bearer {token}")] if token else None
    now = trio.current_time()
    call_deadline = now + timeout_s if deadline is None else deadline
    connect_deadline = now + connect_timeout_s
    budget = _Budget(trio.CancelScope(deadline=min(connect_deadline, call_deadline)), call_deadline)
    # purerpc's client runs the call in a task group, so errors arrive inside exception groups.
    try:
        with budget.scope:
            async with open_channel(host, port, target.ssl_context) as channel:
                budget.connected()
                return await call(make_stub(channel), metadata, budget)
        if budget.phase == "connect" and connect_deadline <= call_deadline:
            detail = f"cannot reach {host}:{port}: no connection within {connect_timeout_s:g}s"
        elif budget.phase == "connect":
            detail = f"cannot reach {host}:{port}: no connection within {timeout_s:g}s"
        else:
            detail = f"no reply from {host}:{port} within {timeout_s:g}s"
        raise SendFailed("DEADLINE_EXCEEDED", detail)
    except* purerpc.RpcFailedError as group:
        rpc_status = exception_leaves(group)[0].status
        raise SendFailed(rpc_status.status_code.name, rpc_status.status_message) from None
    except* OSError as group:
        error = exception_leaves(group)[0]
        detail = f"cannot reach {host}:{port}: {error.strerror or error}"
        raise SendFailed("UNAVAILABLE", detail) from None


async def _retried(
    target: Target,
    call: Callable[[Any, Metadata, _Budget], Awaitable[T]],
    *,
    make_stub: Callable[[Any], Any] = MailerStub,
) -> T:
    """``_call`` retried by ``with_retries`` within ``timeout_s``, every attempt given the
    overall deadline."""
    return await with_retries(
        lambda deadline: _call(target, call, deadline=deadline, make_stub=make_stub),
        target.timeout_s,
    )


async def check_health(target: Target, service: str = "") -> str:
    """The serving status the gRPC health service reports for ``service`` ("" for the whole
    server): "SERVING", "NOT_SERVING", ... Retried within ``timeout_s`` like the other calls.

    Raises:
        SendFailed: with the gRPC status name and its message (NOT_FOUND: unknown service).
    """
    from trio_mailer.grpc_std.health.v1.health_grpc import HealthStub
    from trio_mailer.grpc_std.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    async def call(stub: HealthStub, metadata: Metadata, _budget: _Budget) -> str:
        reply = await stub.Check(HealthCheckRequest(service=service), metadata=metadata)
        return str(HealthCheckResponse.ServingStatus.Name(reply.status))

    return await _retried(target, call, make_stub=HealthStub)
