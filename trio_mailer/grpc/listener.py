"""The gRPC listener: exactly ``host:port``, an accept loop that survives, bounded connections.

purerpc's ``Server.serve_async`` binds every interface with ``SO_REUSEPORT`` and catches
everything with bare ``except:``; anyio's ``Listener.serve`` ends on the first ``accept()``
error (EMFILE with ~1,000 idle clients took the whole service down). This module binds exactly
the configured address, runs its own accept loop, and hands each connection to
``http2_server.serve_connection`` (h2 driven by us under purerpc's service API):

- ``accept()`` failing with EMFILE, ENFILE, ENOBUFS or ENOMEM is logged once per episode and
  retried after ``ACCEPT_BACKOFF_S`` (as trio's ``serve_listeners`` does); other clients go on.
- Past ``max_connections`` (``MAILER_MAX_CONNECTIONS``) a new connection is closed at once,
  before any TLS handshake.
- TLS is wrapped per connection with ``TLS_HANDSHAKE_TIMEOUT_S``; a failed handshake is one
  INFO line. A client whose ClientHello offers ALPN without ``h2`` gets the
  ``no_application_protocol`` alert (``core/tls_hello.py``; OpenSSL through Python would carry on
  without a protocol).
- ``GrpcServer.drain(grace_s)`` stops gracefully, as grpc-go's ``GracefulStop``: the listening
  sockets close, every connection sends GOAWAY(2^31-1) and a PING, then GOAWAY with its last
  stream id; calls in flight finish, streaming responses end with UNAVAILABLE "server is
  shutting down"; what is still open when the grace ends is closed.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import purerpc
import trio

from trio_mailer import tls
from trio_mailer.core.caller_auth import certificate_identity
from trio_mailer.core.errors import BindError
from trio_mailer.core.http2_limits import MAX_MESSAGE_BYTES
from trio_mailer.core.tls_hello import (
    NO_APPLICATION_PROTOCOL_ALERT,
    record_bytes_needed,
    refuse_alpn,
)
from trio_mailer.grpc.http2_server import (
    Authorizer,
    CallObserver,
    Http2Connection,
    Limits,
    NoObserver,
)
from trio_mailer.grpc.protocol.connection import log_client_fault
from trio_mailer.logs import printable

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PEER_IDENTITY",
    "Authorizer",
    "BindError",
    "CallObserver",
    "GrpcListener",
    "GrpcServer",
    "Limits",
    "bound_port",
    "make_server_ssl_context",
    "open_grpc_listener",
    "serve_grpc",
]

log = logging.getLogger(__name__)

# The client certificate's identity (``cert:CN=...``) for the calls of a connection, or None:
# set in each connection's task, read by the Mailer's handlers through the caller identity.
PEER_IDENTITY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trio_mailer_peer_identity", default=None
)


def _peer_identity(stream: trio.SSLStream[Any]) -> str | None:
    certificate = stream.getpeercert()
    if not certificate:
        return None
    subject = certificate.get("subject", ())
    # ssl's typeshed entry is loose: "subject" is a tuple of RDNs, each a tuple of pairs.
    return certificate_identity(subject) if isinstance(subject, tuple) else None


TLS_HANDSHAKE_TIMEOUT_S = 10.0
# After accept() runs out of file descriptors or buffers: wait this long before the next try.
ACCEPT_BACKOFF_S = 0.1
# Connections served at once by default (MAILER_MAX_CONNECTIONS).
DEFAULT_MAX_CONNECTIONS = 500
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def _allow_all(service: str, method: str, metadata: object, peer: str) -> bool:
    return True


def _nobody_told(peer: str) -> None:
    """No one to tell of a client certificate refused in the handshake."""


# OpenSSL's reasons for a client certificate refused under mutual TLS (untrusted, expired, none).
_CLIENT_CERTIFICATE_REASONS = frozenset(
    ("CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
)


def _certificate_refused(exc: BaseException | None) -> bool:
    return isinstance(exc, ssl.SSLError) and exc.reason in _CLIENT_CERTIFICATE_REASONS


@attrs.frozen
class GrpcListener:
    """The bound sockets of the gRPC port, and the TLS context its connections get."""

    sockets: tuple[trio.SocketListener, ...]
    ssl_context: ssl.SSLContext | None = None

    async def aclose(self) -> None:
        for listener in self.sockets:
            await listener.aclose()


def make_server_ssl_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS for the gRPC port: HTTP/2 by ALPN (grpcio clients insist), client certificates
    required and verified when ``client_ca`` is given.

    Raises:
        ssl.SSLError, OSError: a file cannot be loaded.
    """
    return tls.server_context(cert, key, alpn=["h2"], client_ca=client_ca)


async def open_grpc_listener(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> GrpcListener:
    """Bind exactly ``host:port`` (no ``SO_REUSEPORT``: a taken port is an error).

    Raises:
        BindError: the address could not be bound, e.g. because the port is taken.
    """
    try:
        # trio sets SO_REUSEADDR (restart while old connections linger), never SO_REUSEPORT.
        sockets = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return GrpcListener(tuple(sockets), ssl_context)


def bound_port(listener: GrpcListener) -> int:
    return int(listener.sockets[0].socket.getsockname()[1])


class _Replayed(trio.abc.Stream):
    """A TCP stream whose first bytes were already read (the ClientHello): gives them again."""

    def __init__(self, tcp: trio.SocketStream, first: bytes) -> None:
        self._tcp = tcp
        self._first = first

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._tcp.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._tcp.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._first:
            data, self._first = self._first, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._tcp.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._tcp.aclose()


@attrs.define
class _Accepting:
    """The accept loops' shared state: the open connections."""

    services: dict[str, purerpc.Service]
    authorizer: Authorizer
    limits: Limits
    max_connections: int
    ssl_context: ssl.SSLContext | None
    observer: CallObserver
    on_bad_certificate: Callable[[str], None]  # (peer) a client certificate refused
    open_connections: int = 0
    refused: int = 0
    serving: set[Http2Connection] = attrs.Factory(set)
    draining: bool = False
    all_closed: trio.Event = attrs.Factory(trio.Event)

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        starved = False
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return  # closed by drain()
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    if not starved:
                        log.error(
                            "accept() failed: %s; new gRPC connections wait until "
                            "descriptors free up (retrying every %g s)",
                            exc.strerror or exc,
                            ACCEPT_BACKOFF_S,
                        )
                        starved = True
                    await trio.sleep(ACCEPT_BACKOFF_S)
                    continue
                log.debug("accept() failed: %r", exc)  # ECONNABORTED and the like
                await trio.lowlevel.checkpoint()
                continue
            if starved:
                log.warning("accept() works again")
                starved = False
            if self.open_connections >= self.max_connections:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning(
                        "refused a gRPC connection: %d open, the limit "
                        "(MAILER_MAX_CONNECTIONS) is %d (%d refused so far)",
                        self.open_connections,
                        self.max_connections,
                        self.refused,
                    )
                await trio.aclose_forcefully(stream)
                continue
            self.open_connections += 1
            nursery.start_soon(self._connection, stream)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            peer = _peer_name(tcp)
            stream: trio.abc.Stream = tcp
            if self.ssl_context is not None:
                secured = await self._handshake(tcp, peer)
                if secured is None:
                    return
                PEER_IDENTITY.set(_peer_identity(secured))  # this connection's task only
                stream = secured
            connection = Http2Connection(
                stream, self.services, self.authorizer, self.limits, peer, self.observer
            )
            self.serving.add(connection)
            if self.draining:
                connection.drain()
            try:
                await connection.serve()
            finally:
                self.serving.discard(connection)
        finally:
            self.open_connections -= 1
            if self.draining and not self.open_connections:
                self.all_closed.set()

    async def _handshake(self, tcp: trio.SocketStream, peer: str) -> trio.SSLStream[Any] | None:
        assert self.ssl_context is not None
        try:
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT_S):
                hello = await _client_hello(tcp)
                if refuse_alpn(hello, b"h2"):
                    await tcp.send_all(NO_APPLICATION_PROTOCOL_ALERT)
                    await trio.aclose_forcefully(tcp)
                    log_client_fault(
                        logging.INFO,
                        "tls-alpn",
                        trio.current_time(),
                        "refused a gRPC connection: its TLS ClientHello offers ALPN without "
                        "h2 (from %s)",
                        peer,
                    )
                    return None
                secured = trio.SSLStream(_Replayed(tcp, hello), self.ssl_context, server_side=True)
                await secured.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            await trio.aclose_forcefully(tcp)
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if _certificate_refused(cause):
                self.on_bad_certificate(peer)
            detail = "timed out" if isinstance(exc, trio.TooSlowError) else str(cause or exc)
            log_client_fault(
                logging.INFO,
                "tls-handshake",
                trio.current_time(),
                "refused a gRPC connection: TLS handshake failed: %s (from %s)",
                printable(detail or repr(exc)),
                peer,
            )
            return None
        return secured

    async def drain(self, grace_s: float, nursery: trio.Nursery) -> None:
        """Drain every connection (see the module's docstring); after ``grace_s``, close
        whatever is left by cancelling ``nursery``."""
        self.draining = True
        for connection in list(self.serving):
            connection.drain()
        with trio.move_on_after(grace_s):
            if self.open_connections:
                await self.all_closed.wait()
        nursery.cancel_scope.cancel()


async def _client_hello(tcp: trio.SocketStream) -> bytes:
    """The client's first TLS record (its ClientHello), or what came before the stream ended."""
    data = b""
    while len(data) < record_bytes_needed(data):
        chunk = await tcp.receive_some(record_bytes_needed(data) - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


@attrs.define
class GrpcServer:
    """A running gRPC server: ``drain(grace_s)`` stops it gracefully (the module's docstring)."""

    _listener: GrpcListener
    _accepting: _Accepting
    _listeners_scope: trio.CancelScope
    _connections: trio.Nursery

    async def drain(self, grace_s: float) -> None:
        # Closed before the first GOAWAY goes out: a client that reconnects on seeing it must
        # find the port closed, and go to another replica.
        for socket_listener in self._listener.sockets:
            socket_listener.socket.close()
        self._listeners_scope.cancel()  # the accept loops end
        await self._accepting.drain(grace_s, self._connections)


async def serve_grpc(
    listener: GrpcListener,
    services: Iterable[purerpc.Service],
    *,
    authorizer: Authorizer = _allow_all,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    limits: Limits | None = None,
    observer: CallObserver | None = None,
    on_bad_certificate: Callable[[str], None] = _nobody_told,
    task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``listener`` until cancelled or drained; closes the listener.

    ``authorizer`` is asked before every call; a refused call gets UNAUTHENTICATED.
    ``observer`` is told of each call's start and of the status code it ended with.
    ``on_bad_certificate(peer)`` is told of each client certificate refused in the TLS
    handshake (mutual TLS: untrusted, expired or missing).
    Reports a ``GrpcServer`` (for ``drain``) through ``task_status``.
    """
    accepting = _Accepting(
        {service.name: service for service in services},
        authorizer,
        limits or Limits(),
        max_connections,
        listener.ssl_context,
        observer or NoObserver(),
        on_bad_certificate,
    )
    async with trio.open_nursery() as connections:
        with trio.CancelScope() as listeners_scope:
            try:
                async with trio.open_nursery() as nursery:
                    for socket_listener in listener.sockets:
                        nursery.start_soon(accepting.accept_loop, socket_listener, connections)
                    task_status.started(
                        GrpcServer(listener, accepting, listeners_scope, connections)
                    )
            finally:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
        if not accepting.draining:
            connections.cancel_scope.cancel()
