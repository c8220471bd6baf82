"""The one HTTP/1.1 server: a small loop on Trio streams, with h11 doing the protocol.

Both HTTP endpoints serve through it: the dev web inbox (``dev/inbox_app.py``) and Prometheus'
``/metrics`` (``metrics.py``). Each gives a ``Handler``, a ``Request`` in and a ``Response`` out.

Why h11 and not hypercorn: hypercorn 0.18 needs h2>=4.3, and purerpc 0.8.0 pins h2<4; h11 is
the pure HTTP/1.1 state machine hypercorn itself uses, so the protocol is the well-kept part and
this module is only the I/O loop (as in h11's ``examples/trio-server.py``).

Bounded on purpose, since a browser tab left open for days is a normal client:

- at most ``MAX_CONNECTIONS`` at once; one more gets ``503`` and is closed;
- a request head of at most ``MAX_HEAD_BYTES`` (else ``431``), a body of at most
  ``MAX_BODY_BYTES`` (else ``413``);
- each request must arrive within ``request_timeout_s`` (idle keep-alive included), and each
  write must complete within ``WRITE_TIMEOUT_S``; a streamed response (server-sent events) lives
  until the client goes away or a write stalls. A response with ``connection: close`` ends its
  connection.

Every error it answers itself (a malformed request, a limit, a handler that raised) is JSON,
``{"error": "..."}``, as the inbox's own errors are (``json_error``).
"""

from __future__ import annotations

import contextlib
import http
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial

import attrs
import h11
import trio

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 30.0
"""Default budget for one request to arrive, idle keep-alive included."""
WRITE_TIMEOUT_S = 10.0
READ_CHUNK_BYTES = 16 * 1024


@attrs.frozen
class Request:
    method: str
    target: str  # the path and query, as sent
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@attrs.frozen
class Response:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # A streamed body (server-sent events): sent chunk by chunk, then the connection closes.
    stream: Callable[[], AsyncGenerator[bytes, None]] | None = None


Handler = Callable[[Request], Awaitable[Response]]


JSON_TYPE = "application/json; charset=utf-8"


def json_response(
    status: int, value: object, *, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = json.dumps(value, ensure_ascii=False).encode()
    return Response(status, (("content-type", JSON_TYPE), *headers), body)


def json_error(status: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """An error as every answer of this server gives it: ``{"error": message}``."""
    return json_response(status, {"error": message}, headers=headers)


_TOO_MANY_BODY = b'{"error": "too many connections"}'
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_MANY_BODY), _TOO_MANY_BODY)
)


_REASONS = {status.value: status.phrase.encode("ascii") for status in http.HTTPStatus}


class _ClientGone(Exception):
    pass


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; reports the bound port through
    ``task_status``.

    Raises:
        OSError: the port cannot be bound. Only the bind raises a bare OSError: what fails later
            comes out of the connections' nursery as an ExceptionGroup.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    limiter = trio.CapacityLimiter(max_connections)
    task_status.started(bound)
    connection = partial(_connection, handler, limiter, request_timeout_s)
    await trio.serve_listeners(connection, listeners)


async def _connection(
    handler: Handler,
    limiter: trio.CapacityLimiter,
    request_timeout_s: float,
    stream: trio.SocketStream,
) -> None:
    async with stream:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            # Before any request, so no h11 state to speak of: a fixed answer, then close.
            with trio.move_on_after(WRITE_TIMEOUT_S):
                try:
                    await stream.send_all(_TOO_MANY)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return
        try:
            await _serve_connection(handler, request_timeout_s, stream)
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            limiter.release()


async def _serve_connection(
    handler: Handler, request_timeout_s: float, stream: trio.SocketStream
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while True:
        with trio.move_on_after(request_timeout_s) as timer:
            try:
                request = await _read_request(stream, conn)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await _send_response(stream, conn, json_error(status, f"bad request: {exc}"))
                return
            except _BodyTooLarge:
                await _send_response(stream, conn, json_error(413, "request body too large"))
                return
        if timer.cancelled_caught or request is None:
            return
        try:
            response = await handler(request)
        except Exception:
            log.exception("error answering %s %s", request.method, request.target[:200])
            response = json_error(500, "internal error")
        await _send_response(stream, conn, response)
        if response.stream is not None or conn.our_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


class _BodyTooLarge(Exception):
    pass


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(READ_CHUNK_BYTES)
        conn.receive_data(data)


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
    event = await _next_event(stream, conn)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
    # h11 bounds what it buffers for an incomplete head; this bounds the complete one too.
    head_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
    if head_bytes > MAX_HEAD_BYTES:
        raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
    body = bytearray()
    while True:
        part = await _next_event(stream, conn)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > MAX_BODY_BYTES:
                raise _BodyTooLarge()
        elif isinstance(part, h11.EndOfMessage):
            break
        else:
            return None
    headers = tuple(
        (name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in event.headers
    )
    return Request(
        method=event.method.decode("ascii", "replace"),
        target=event.target.decode("latin-1"),
        headers=headers,
        body=bytes(body),
    )


async def _write(stream: trio.SocketStream, data: bytes | None) -> None:
    if not data:
        return
    with trio.move_on_after(WRITE_TIMEOUT_S) as timer:
        await stream.send_all(data)
    if timer.cancelled_caught:
        raise _ClientGone()


async def _send_response(
    stream: trio.SocketStream, conn: h11.Connection, response: Response
) -> None:
    headers = [(name.encode(), value.encode()) for name, value in response.headers]
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
    else:
        headers.append((b"connection", b"close"))
    reason = _REASONS.get(response.status, b"")
    head = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    await _write(stream, head)
    if response.stream is None:
        await _write(stream, conn.send(h11.Data(data=response.body)))
        await _write(stream, conn.send(h11.EndOfMessage()))
        return
    # aclosing: a client that goes away ends the generator here, not in the garbage collector.
    async with contextlib.aclosing(response.stream()) as chunks:
        async for chunk in chunks:
            await _write(stream, conn.send(h11.Data(data=chunk)))
