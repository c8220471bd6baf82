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

import contextvars
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import purerpc
import trio
from anyio.streams.tls import TLSAttribute, TLSListener
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

from trio_mailer.core.caller_auth import certificate_identity
from trio_mailer.logs import printable

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


# The client certificate's identity (``cert:CN=...``) for the calls of a connection, or None:
# set around each connection's handler, read by the Mailer's handlers through the caller identity.
PEER_IDENTITY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trio_mailer_peer_identity", default=None
)


def _peer_identity(stream: anyio.abc.SocketStream) -> str | None:
    certificate = stream.extra(TLSAttribute.peer_certificate, None)
    if not certificate:
        return None
    subject = certificate.get("subject", ())
    # ssl's typeshed entry is loose: "subject" is a tuple of RDNs, each a tuple of pairs.
    return certificate_identity(subject) if isinstance(subject, tuple) else None  # type: ignore[arg-type]


class BindError(Exception):
    """The listener could not bind (port taken, address not local, ...)."""


# Decides whether a call to ``service``/``method`` with these request headers may proceed.
Authorizer = Callable[[str, str, Sequence[tuple[str, str]]], bool]


def _allow_all(service: str, method: str, metadata: Sequence[tuple[str, str]]) -> bool:
    return True


class _CallScopes:
    """One cancel scope per call of a connection; a client's RST_STREAM cancels its call.

    purerpc 0.8.0 drops h2's ``StreamReset`` event: a client that cancels a call (or whose
    deadline passes) goes unnoticed, and a handler that is waiting (a health Watch between two
    changes, a reflection stream waiting for its next request) would wait forever. This hooks
    the connection's ``_stream_reset`` to cancel that call's scope.

    purerpc also keeps a stream's state until both ends have closed it, which a reset stream
    never does. That state is dropped once the call is over, but only at the next reset: the
    hook runs inside ``receive_data``, when every event of the earlier batches has been
    delivered, so purerpc will not look those streams up again (h2 answers any later frame on a
    reset stream by itself).
    """

    def __init__(self, grpc_socket: GRPCProtoSocket) -> None:
        self._grpc_socket = grpc_socket
        self._scopes: dict[int, trio.CancelScope] = {}
        self._last_opened = 0
        self._reset_before_start: set[int] = set()
        self._reset_running: set[int] = set()
        self._forget: list[int] = []  # reset, and their call is over
        grpc_socket._grpc_connection._stream_reset = self._on_stream_reset

    def open(self, stream_id: int) -> trio.CancelScope:
        """The scope for a new call (already cancelled if the client reset it first)."""
        scope = self._scopes[stream_id] = trio.CancelScope()
        self._last_opened = stream_id
        if stream_id in self._reset_before_start:
            self._reset_before_start.discard(stream_id)
            self._reset_running.add(stream_id)
            scope.cancel()
        return scope

    def close(self, stream_id: int) -> None:
        """The call is over."""
        del self._scopes[stream_id]
        if stream_id in self._reset_running:
            self._reset_running.discard(stream_id)
            self._forget.append(stream_id)

    def _on_stream_reset(self, event: Any) -> list[Any]:
        for stream_id in self._forget:
            self._grpc_socket._streams.pop(stream_id, None)
            self._grpc_socket._grpc_connection.message_read_buffers.pop(stream_id, None)
        self._forget.clear()
        stream_id = event.stream_id
        scope = self._scopes.get(stream_id)
        if scope is not None:
            self._reset_running.add(stream_id)
            scope.cancel()
        elif stream_id > self._last_opened:  # its RequestReceived is in this same batch
            self._reset_before_start.add(stream_id)
        else:  # the call is already over
            self._forget.append(stream_id)
        return []


class _ConnectionHandler:
    """Serves the gRPC calls of one client connection."""

    def __init__(self, services: dict[str, purerpc.Service], authorizer: Authorizer) -> None:
        self._services = services
        self._authorizer = authorizer
        self._config = GRPCConfiguration(client_side=False, max_message_length=MAX_MESSAGE_BYTES)

    async def __call__(self, stream: anyio.abc.SocketStream) -> None:
        PEER_IDENTITY.set(_peer_identity(stream))  # this connection's task (and its calls) only
        try:
            # purerpc never closes the connection's socket: the ``async with stream`` does.
            async with stream, GRPCProtoSocket(self._config, stream) as grpc_socket:
                calls = _CallScopes(grpc_socket)
                async with anyio.create_task_group() as task_group:
                    async for call in grpc_socket.listen():
                        # The scope exists before the task runs: a reset that arrives first
                        # still cancels the call.
                        task_group.start_soon(
                            self._serve_call, call, calls, calls.open(call.stream_id)
                        )
                    # The client closed the connection: no call can be answered any more, and
                    # a handler waiting for something to send (a health Watch) would wait on.
                    task_group.cancel_scope.cancel()
        except* MessageTooLargeError:
            # purerpc fails the whole connection, not just the call: the client sees
            # UNAVAILABLE ("Stream removed"). Its other connections, and other clients, go on.
            log.warning(
                "closed a gRPC connection: a request was larger than %d bytes", MAX_MESSAGE_BYTES
            )
        except* Exception as group:  # a broken or misbehaving client ends only its own connection
            log.debug("gRPC connection ended: %r", group)

    async def _serve_call(
        self, stream: GRPCProtoStream, calls: _CallScopes, scope: trio.CancelScope
    ) -> None:
        try:
            with scope:
                await self._serve_call_in_scope(stream)
        finally:
            calls.close(stream.stream_id)

    async def _serve_call_in_scope(self, stream: GRPCProtoStream) -> None:
        # A call reset before it got here ends quietly (start_response would fail on it).
        await trio.lowlevel.checkpoint()
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
            if not self._authorizer(event.service_name, event.method_name, event.custom_metadata):
                # Checked before the request message is even read: nothing is queued.
                await stream.close(
                    purerpc.Status(
                        purerpc.StatusCode.UNAUTHENTICATED,
                        "missing or invalid credentials: send authorization: Bearer <token>",
                    )
                )
                return
            stream.expect_message_type(method.signature.request_type)

            def handler(message: Any) -> Any:
                # Not ``async``: a streaming method returns an async iterator, which purerpc's
                # wrappers iterate; a unary one returns a coroutine, which they await.
                return method.method_fn(message, request=event)

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


TLS_HANDSHAKE_TIMEOUT_S = 10.0


class _TLSListener(TLSListener):
    """anyio's TLS listener, but a failed handshake (a plaintext client, an unknown or expired
    client certificate) is one INFO line, not an ERROR with a traceback."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: anyio.abc.AnyByteStream) -> None:
        await anyio.aclose_forcefully(stream)
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            raise exc
        log.info("refused a gRPC connection: TLS handshake failed: %s", printable(str(exc)))


def make_server_ssl_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS for the gRPC port: HTTP/2 by ALPN (grpcio clients insist), client certificates
    required and verified when ``client_ca`` is given.

    Raises:
        ssl.SSLError, OSError: a file cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
    return context


async def open_grpc_listener(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Bind exactly ``host:port`` (no ``SO_REUSEPORT``: a taken port is an error).

    Raises:
        BindError: the address could not be bound, e.g. because the port is taken.
    """
    try:
        listener = await anyio.create_tcp_listener(
            local_host=host, local_port=port, reuse_port=False
        )
    except OSError as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    if ssl_context is None:
        return listener
    return _TLSListener(  # type: ignore[return-value]
        listener,
        ssl_context,
        standard_compatible=False,
        handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,
    )


def bound_port(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> int:
    # A TLS listener does not pass the socket's attributes through: ask the one inside.
    inner = listener.listener if isinstance(listener, TLSListener) else listener
    return int(inner.extra(anyio.abc.SocketAttribute.local_port))


async def serve_grpc(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    services: Iterable[purerpc.Service],
    *,
    authorizer: Authorizer = _allow_all,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``listener`` until cancelled; closes the listener.

    ``authorizer`` is asked before every call; a refused call gets UNAUTHENTICATED.
    """
    handler = _ConnectionHandler({service.name: service for service in services}, authorizer)
    async with listener:
        task_status.started()
        await listener.serve(handler)
