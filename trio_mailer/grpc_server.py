"""The gRPC listener: exactly ``host:port``, purerpc's protocol code, no stray tracebacks.

purerpc's ``Server.serve_async`` binds every interface with ``SO_REUSEPORT`` (a second server on
the same port starts silently, and a host cannot be chosen), and its connection handler catches
everything with bare ``except:`` clauses, which also swallows cancellation and logs "Got
exception in main dispatch loop" at every shutdown. This module keeps purerpc's HTTP/2 and gRPC
framing (``GRPCProtoSocket`` and the ``call_server_*`` wrappers; purerpc is pinned to 0.8.0 for
them) and replaces the two outer layers: an anyio listener bound to exactly the configured
address without ``SO_REUSEPORT``, and a connection handler that lets cancellation through and
logs other connection errors at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import anyio
import anyio.abc
import purerpc
import trio
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpclib.connection import GRPCConfiguration
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.exceptions import MessageTooLargeError, RpcFailedError
from purerpc.rpc import Cardinality
from purerpc.wrappers import (
    call_server_stream_stream,
    call_server_stream_unary,
    call_server_unary_stream,
    call_server_unary_unary,
)

log = logging.getLogger(__name__)

# The largest request message accepted: this API's requests are a few hundred bytes (to at most
# 254 characters, code at most 128), so anything bigger is a client bug or an attack.
MAX_MESSAGE_BYTES = 4 * 1024

_CALLERS = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: call_server_stream_unary,
    Cardinality.STREAM_STREAM: call_server_stream_stream,
}


class BindError(Exception):
    """The listener could not bind (port taken, address not local, ...)."""


class _ConnectionHandler:
    """Serves the gRPC calls of one client connection."""

    def __init__(self, services: dict[str, purerpc.Service]) -> None:
        self._services = services
        self._config = GRPCConfiguration(client_side=False, max_message_length=MAX_MESSAGE_BYTES)

    async def __call__(self, stream: anyio.abc.SocketStream) -> None:
        try:
            # purerpc never closes the connection's socket: the ``async with stream`` does.
            async with stream, GRPCProtoSocket(self._config, stream) as grpc_socket:
                async with anyio.create_task_group() as task_group:
                    async for call in grpc_socket.listen():
                        task_group.start_soon(self._serve_call, call)
        except* MessageTooLargeError:
            # purerpc fails the whole connection, not just the call: the client sees
            # UNAVAILABLE ("Stream removed"). Its other connections, and other clients, go on.
            log.warning(
                "closed a gRPC connection: a request was larger than %d bytes", MAX_MESSAGE_BYTES
            )
        except* Exception as group:  # a broken or misbehaving client ends only its own connection
            log.debug("gRPC connection ended: %r", group)

    async def _serve_call(self, stream: GRPCProtoStream) -> None:
        try:
            await stream.start_response()
            event = await stream.receive_event()
            if not isinstance(event, RequestReceived):
                await stream.close(purerpc.Status(purerpc.StatusCode.INTERNAL, "expected headers"))
                return
            service = self._services.get(event.service_name)
            method = service.methods.get(event.method_name) if service else None
            if method is None:
                await stream.close(
                    purerpc.Status(
                        purerpc.StatusCode.UNIMPLEMENTED,
                        f"method {event.service_name}/{event.method_name} is not implemented",
                    )
                )
                return
            stream.expect_message_type(method.signature.request_type)

            async def handler(message: Any) -> Any:
                return await method.method_fn(message, request=event)

            try:
                await _CALLERS[method.signature.cardinality](handler, stream)
            except RpcFailedError as error:
                await stream.close(error.status)
        except Exception as exc:
            # Handlers map their own errors; what arrives here is a protocol-level failure
            # (a malformed or oversized message, a reset stream). Never shown to the client.
            log.debug("gRPC call failed: %r", exc)
            try:
                await stream.close(purerpc.Status(purerpc.StatusCode.INTERNAL, "internal error"))
            except Exception as close_exc:
                log.debug("could not close the failed call: %r", close_exc)


async def open_grpc_listener(host: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Bind exactly ``host:port`` (no ``SO_REUSEPORT``: a taken port is an error).

    Raises:
        BindError: the address could not be bound, e.g. because the port is taken.
    """
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    except OSError as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def bound_port(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> int:
    return int(listener.extra(anyio.abc.SocketAttribute.local_port))


async def serve_grpc(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    services: Iterable[purerpc.Service],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``listener`` until cancelled; closes the listener."""
    handler = _ConnectionHandler({service.name: service for service in services})
    async with listener:
        task_status.started()
        await listener.serve(handler)
