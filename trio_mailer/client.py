"""``trio-mailer send``/``status``: call a running service and print its reply.

The timeouts and retry rules are the client package's (``core/call_policy.py`` is a copy of
``trio_mailer_client/_policy.py``): one idempotency key per send, reused by its retries;
UNAVAILABLE and DEADLINE_EXCEEDED retried with capped jittered backoff within the overall
timeout. The CLI stays on purerpc so that the service's install does not need grpcio.
"""

from __future__ import annotations

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
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration

from trio_mailer.core.call_policy import DEFAULT_TIMEOUT_S, new_idempotency_key, retry_delay_s
from trio_mailer.core.errors import exception_leaves
from trio_mailer.core.rendering import MailKind
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


@asynccontextmanager
async def open_channel(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[purerpc.client._Channel]:
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
        channel = purerpc.client._Channel(host, port)
        channel._grpc_socket = await stack.enter_async_context(
            GRPCProtoSocket(GRPCConfiguration(client_side=True), stream)
        )
        yield channel


def client_ssl_context(
    ca_file: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS to the service: verify it (system store, or ``ca_file``), offer HTTP/2 by ALPN,
    and present a client certificate when the service requires one.

    Raises:
        ssl.SSLError, OSError: a file cannot be loaded.
    """
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


async def send(
    host: str,
    port: int,
    kind: MailKind,
    to: str,
    code: str,
    *,
    locale: str = "",
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    idempotency_key: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> MsgReply:
    """Ask the service at ``host:port`` for a ``kind`` mail, retrying within ``timeout_s``.

    Raises:
        SendFailed: with the gRPC status name and its message.
    """
    request = MsgRequest(
        to=to, code=code, locale=locale, idempotency_key=idempotency_key or new_idempotency_key()
    )

    async def call(stub: MailerStub, metadata: Metadata) -> MsgReply:
        method = stub.SendPass if kind is MailKind.PASSWORD else stub.SendRetrieve
        reply: MsgReply = await method(request, metadata=metadata)
        return reply

    return await with_retries(
        lambda: _call(host, port, call, token=token, ssl_context=ssl_context), timeout_s
    )


async def send_template(
    host: str,
    port: int,
    template: str,
    to: str,
    variables: Mapping[str, str],
    *,
    locale: str = "",
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    idempotency_key: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> MsgReply:
    """Ask the service at ``host:port`` for a mail from ``template`` (the ``Send`` call),
    retrying within ``timeout_s`` with one idempotency key, as ``send`` does.

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

    async def call(stub: MailerStub, metadata: Metadata) -> MsgReply:
        reply: MsgReply = await stub.Send(request, metadata=metadata)
        return reply

    return await with_retries(
        lambda: _call(host, port, call, token=token, ssl_context=ssl_context), timeout_s
    )


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    timeout_s: float,
    *,
    jitter: Callable[[], float] = random.random,
) -> T:
    """``attempt()`` until it returns, by the client package's rules, within ``timeout_s``.

    Raises:
        SendFailed: a final status, or the last retryable one when the time ran out.
    """
    deadline = trio.current_time() + timeout_s
    retry = 0
    while True:
        try:
            with trio.fail_after(max(0.0, deadline - trio.current_time())):
                return await attempt()
        except trio.TooSlowError:
            error = SendFailed("DEADLINE_EXCEEDED", f"no answer within {timeout_s:g} s")
        except SendFailed as exc:
            error = exc
        delay = retry_delay_s(error.status, retry, deadline - trio.current_time(), jitter)
        if delay is None:
            raise error
        await trio.sleep(delay)
        retry += 1


async def status(
    host: str,
    port: int,
    message_id: str,
    on_status: Callable[[MailStatus], None],
    *,
    watch: bool = False,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    idempotency_key: str = "",
) -> None:
    """Report the status of ``message_id`` to ``on_status``; with ``watch``, every change until
    the final state. ``GetStatus`` is retried within ``timeout_s`` (a watch has no timeout).

    Raises:
        SendFailed: with the gRPC status name and its message.
    """

    async def call(stub: MailerStub, metadata: Metadata) -> None:
        request = StatusRequest(message_id=message_id, idempotency_key=idempotency_key)
        if not watch:
            on_status(await stub.GetStatus(request, metadata=metadata))
            return
        async with aclosing(stub.WatchStatus(request, metadata=metadata)) as changes:
            async for change in changes:
                on_status(change)

    if watch:
        await _call(host, port, call, token=token, ssl_context=ssl_context)
    else:
        await with_retries(
            lambda: _call(host, port, call, token=token, ssl_context=ssl_context), timeout_s
        )


async def list_suppressed(
    host: str,
    port: int,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> list[SuppressedAddress]:
    """The running service's suppression list.

    Raises:
        SendFailed: with the gRPC status name and its message.
    """

    async def call(admin: MailerAdminStub, metadata: Metadata) -> list[SuppressedAddress]:
        reply = await admin.ListSuppressed(ListSuppressedRequest(), metadata=metadata)
        return list(reply.addresses)

    return await _call(
        host, port, call, token=token, ssl_context=ssl_context, make_stub=MailerAdminStub
    )


async def remove_suppressed(
    host: str,
    port: int,
    address: str,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """Take ``address`` off the running service's suppression list; False if it was not on it.

    Raises:
        SendFailed: with the gRPC status name and its message.
    """

    async def call(admin: MailerAdminStub, metadata: Metadata) -> bool:
        reply = await admin.RemoveSuppressed(
            RemoveSuppressedRequest(address=address), metadata=metadata
        )
        return bool(reply.removed)

    return await _call(
        host, port, call, token=token, ssl_context=ssl_context, make_stub=MailerAdminStub
    )


Metadata = list[tuple[str, str]] | None


async def _call(
    host: str,
    port: int,
    call: Callable[[Any, Metadata], Awaitable[T]],
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    make_stub: Callable[[Any], Any] = MailerStub,
) -> T:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    # purerpc's client runs the call in a task group, so errors arrive inside exception groups.
    try:
        async with open_channel(host, port, ssl_context) as channel:
            return await call(make_stub(channel), metadata)
    except* purerpc.RpcFailedError as group:
        rpc_status = exception_leaves(group)[0].status
        raise SendFailed(rpc_status.status_code.name, rpc_status.status_message) from None
    except* OSError as group:
        error = exception_leaves(group)[0]
        detail = f"cannot reach {host}:{port}: {error.strerror or error}"
        raise SendFailed("UNAVAILABLE", detail) from None


async def check_health(
    host: str,
    port: int,
    service: str = "",
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> str:
    """The serving status the gRPC health service reports for ``service`` ("" for the whole
    server): "SERVING", "NOT_SERVING", ... Retried within ``timeout_s`` like the other calls.

    Raises:
        SendFailed: with the gRPC status name and its message (NOT_FOUND: unknown service).
    """
    from trio_mailer.grpc_std.health.v1.health_grpc import HealthStub
    from trio_mailer.grpc_std.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    async def call(stub: HealthStub, metadata: Metadata) -> str:
        reply = await stub.Check(HealthCheckRequest(service=service), metadata=metadata)
        return str(HealthCheckResponse.ServingStatus.Name(reply.status))

    return await with_retries(
        lambda: _call(host, port, call, token=token, ssl_context=ssl_context, make_stub=HealthStub),
        timeout_s,
    )
