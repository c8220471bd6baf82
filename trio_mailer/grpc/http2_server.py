"""The Trio layer of one gRPC connection: the socket, a task per call, the timers.

Everything about HTTP/2 and gRPC framing is in the protocol object
(``trio_mailer/grpc/protocol/connection.py``, no I/O); this module moves bytes between it and
the socket and runs purerpc's services on it:

- one reader task feeds the protocol what the socket gives, and acts on the events: a
  ``CallStarted`` becomes a handler task (purerpc's ``call_server_*`` wrappers over a ``Call``),
  under a cancel scope carrying the call's deadline; a ``CallEnded`` cancels its handler; a
  ``GoingAway`` ends the streaming calls of a drain (UNAVAILABLE "server is shutting down");
- one writer task sends what the protocol produced; a client that lets more than
  ``max_unsent_output_bytes`` pile up is cut off; handlers sending a message wait while more
  than ``OUTPUT_HIGH_WATER_BYTES`` wait for the socket;
- the reader waits (reads nothing) while more handler tasks run than the stream limit allows,
  including the ones whose streams were reset and are still finishing (grpc-go 1.58.3's
  defence against rapid reset: a reset frees the stream, not yet the work);
- ``drain()`` starts a graceful close; the connection ends when the protocol is finished.

Messages are inflated in the call's task, after the authorizer said yes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

import purerpc
import trio
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.exceptions import ProtocolError as PurerpcProtocolError
from purerpc.grpclib.exceptions import RpcFailedError
from purerpc.rpc import Cardinality
from purerpc.wrappers import (
    call_server_stream_stream,
    call_server_stream_unary,
    call_server_unary_stream,
    call_server_unary_unary,
)

from trio_mailer import tracing
from trio_mailer.core import http2_limits as lim
from trio_mailer.core.http2_limits import GrpcCode
from trio_mailer.grpc.internals import BadRequestMessage, PurerpcStream
from trio_mailer.grpc.protocol import events as ev
from trio_mailer.grpc.protocol.connection import Limits, ServerConnection, StreamGone
from trio_mailer.grpc.protocol.stream import GrpcStream

__all__ = ["Authorizer", "CallObserver", "Http2Connection", "Limits", "NoObserver"]

log = logging.getLogger("trio_mailer.grpc.listener")

# Decides whether a call to ``service``/``method`` with these request headers may proceed.
# The last argument is the peer's address ("host:port"), for the log of a refusal.
Authorizer = Callable[[str, str, Sequence[tuple[str, str]], str], bool]

_CALLERS = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: call_server_stream_unary,
    Cardinality.STREAM_STREAM: call_server_stream_stream,
}
_STREAMING_RESPONSES = (Cardinality.UNARY_STREAM, Cardinality.STREAM_STREAM)
SHUTTING_DOWN = "server is shutting down"


class CallObserver(Protocol):
    """Told of every call the front serves, with the status code on the wire at its end
    (CANCELLED when the client reset it)."""

    def call_started(self, service: str, method: str) -> None: ...

    def call_finished(self, service: str, method: str, code: int) -> None: ...


class NoObserver:
    def call_started(self, service: str, method: str) -> None:
        pass

    def call_finished(self, service: str, method: str, code: int) -> None:
        pass


class _CallFailed(Exception):
    """End this call with ``code``: raised inside the call's task."""

    def __init__(self, code: GrpcCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Call:
    """One gRPC call: what purerpc's wrappers read from and write to (through PurerpcStream)."""

    def __init__(self, conn: Http2Connection, stream: GrpcStream) -> None:
        self._conn = conn
        self.stream = stream
        deadline = float("inf") if stream.deadline_s is None else stream.deadline_s
        self.scope = trio.CancelScope(deadline=deadline)
        self.streaming_response = False
        self._changed = trio.Event()

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def receive(self) -> bytes | None:
        proto = self._conn.proto
        while True:
            if self.stream.ended:
                raise _CallFailed(GrpcCode.CANCELLED, "the stream ended")
            frame = proto.take_message(self.stream)
            if frame is not None:
                self._conn.flush()
                try:
                    return lim.decode_message(
                        frame, self.stream.head.encoding, proto.limits.max_message_bytes
                    )
                except (lim.MessageTooLarge, lim.BadMessage) as exc:
                    raise _CallFailed(exc.code, exc.message) from None
            if self.stream.input_ended:
                return None
            await self._changed.wait()

    async def send(self, data: bytes) -> None:
        framed = memoryview(b"\0" + len(data).to_bytes(4, "big") + data)
        while framed:
            try:
                sent = self._conn.proto.send_message(self.stream, framed)
            except StreamGone:
                raise _CallFailed(GrpcCode.CANCELLED, "the stream ended") from None
            self._conn.flush()
            if not sent:
                await self._conn.window_opened()
                continue
            framed = framed[sent:]
            await self._conn.output_below(lim.OUTPUT_HIGH_WATER_BYTES)

    async def close(self, code: int, message: str) -> None:
        self._conn.end_call(self, code, message)
        await trio.lowlevel.checkpoint()


class Http2Connection:
    """Serves the gRPC calls of one client connection until it ends, then closes the stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        services: dict[str, purerpc.Service],
        authorizer: Authorizer,
        limits: Limits,
        peer: str = "?",
        observer: CallObserver | None = None,
    ) -> None:
        self._stream = stream
        self._services = services
        self._authorizer = authorizer
        self._observer = observer or NoObserver()
        self.peer = peer
        self.proto = ServerConnection(limits, trio.current_time(), peer)
        self._calls: dict[int, Call] = {}  # handler tasks still running, by stream id
        self._out = bytearray()
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._window = trio.Event()
        self._tasks_done = trio.Event()
        self._receive_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None

    # -- the connection's life --

    async def serve(self) -> None:
        try:
            async with self._stream:
                self.flush()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._write_loop)
                    await self._read_loop()
                    if not self.proto.graceful:  # a budget tripped: a grace for the calls
                        with trio.move_on_after(lim.CLOSE_GRACE_S):
                            while self.proto.live_calls:
                                await self._task_finished()
                    self._end_calls(GrpcCode.UNAVAILABLE, "the connection is closing")
                    # Let the last bytes (a GOAWAY, final statuses) leave, briefly.
                    with trio.move_on_after(lim.CLOSE_GRACE_S):
                        await self.output_below(0)
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.debug("gRPC connection from %s ended: %r", self.peer, group)
        finally:
            for call in list(self._calls.values()):  # cancelled with the nursery
                self._finished(call)

    def drain(self) -> None:
        """Begin a graceful close (see ``ServerConnection.start_drain``)."""
        self._handle(self.proto.start_drain(trio.current_time()))

    async def _read_loop(self) -> None:
        limit = self.proto.limits.max_concurrent_streams
        while not self.proto.finished and self.proto.graceful:
            while len(self._calls) > limit:  # reset streams whose handlers still run
                await self._task_finished()
            self._receive_scope = trio.CancelScope(deadline=self.proto.next_deadline())
            chunk: bytes | bytearray = b""
            with self._receive_scope:
                try:
                    chunk = await self._stream.receive_some(lim.READ_CHUNK_BYTES)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    self._end_calls(GrpcCode.CANCELLED, "")
                    return
            now = trio.current_time()
            if self._receive_scope.cancelled_caught:
                self._handle(self.proto.on_timer(now))
            else:
                self._handle(self.proto.receive_data(chunk, now))

    def _handle(self, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.CallStarted):
                self._start_call(event)
            elif isinstance(event, ev.InputChanged):
                call = self._calls.get(event.stream_id)
                if call is not None:
                    call.wake()
            elif isinstance(event, ev.CallEnded):
                call = self._calls.get(event.stream_id)
                if call is not None:
                    call.scope.cancel()
                    call.wake()
            elif isinstance(event, ev.WindowOpened):
                self._window.set()
                self._window = trio.Event()
            elif isinstance(event, ev.GoingAway):
                if event.graceful:
                    for call in list(self._calls.values()):
                        if call.streaming_response:
                            self.end_call(call, GrpcCode.UNAVAILABLE, SHUTTING_DOWN)
            elif isinstance(event, ev.ConnectionEnded):
                self._end_calls(GrpcCode.CANCELLED, "")
        self.flush()

    def _start_call(self, event: ev.CallStarted) -> None:
        stream = event.stream
        self._observer.call_started(stream.head.service, stream.head.method)
        if stream.ended:  # reset or refused in the same bytes: no handler to run
            self._observer.call_finished(
                stream.head.service, stream.head.method, stream.end_code or 0
            )
            return
        assert self._nursery is not None
        call = Call(self, stream)
        self._calls[stream.stream_id] = call
        self._nursery.start_soon(self._serve_call, call)

    def end_call(self, call: Call, code: int, message: str) -> None:
        """Answer ``call`` with this status and stop its handler."""
        self.proto.end_call(call.stream, code, message, trio.current_time())
        call.scope.cancel()
        call.wake()
        self.flush()

    def _end_calls(self, code: GrpcCode, message: str) -> None:
        """End every call: answered with ``code`` where the connection can still carry it,
        else (``CANCELLED``: the client is gone) only marked ended."""
        for call in list(self._calls.values()):
            if code == GrpcCode.CANCELLED:
                call.stream.ended = True
                if call.stream.end_code is None:
                    call.stream.end_code = int(code)
                call.scope.cancel()
                call.wake()
            else:
                self.end_call(call, code, message)

    # -- calls --

    async def _serve_call(self, call: Call) -> None:
        head = call.stream.head
        # The caller's traceparent continues here: the handler's spans are under this one.
        with tracing.server_span(head.service, head.method, head.metadata) as span:
            try:
                await self._serve_traced_call(call)
            finally:
                tracing.call_ended(span, call.stream.end_code)

    async def _serve_traced_call(self, call: Call) -> None:
        head = call.stream.head
        try:
            with call.scope:
                await self._run_handler(call)
            if call.stream.ended:
                return
            if call.scope.cancelled_caught:
                self.end_call(call, GrpcCode.DEADLINE_EXCEEDED, "deadline exceeded")
            else:
                self.end_call(call, GrpcCode.INTERNAL, "the call ended without a status")
        except _CallFailed as failed:
            self.end_call(call, failed.code, failed.message)
        except BadRequestMessage as bad:
            self.end_call(call, GrpcCode.INTERNAL, str(bad))
        except RpcFailedError as error:
            self.end_call(call, error.status.int_value, error.status.status_message or "")
        except PurerpcProtocolError as exc:  # the wrappers: zero or several requests for unary
            self.end_call(call, GrpcCode.INTERNAL, str(exc))
        except Exception:
            # The handler's own errors are mapped by it; this is a bug. The method name only:
            # a request's content never goes to the log.
            log.exception("unexpected error in gRPC method %s/%s", head.service, head.method)
            self.end_call(call, GrpcCode.INTERNAL, "internal error")
        finally:
            self._finished(call)

    def _finished(self, call: Call) -> None:
        if self._calls.pop(call.stream.stream_id, None) is None:
            return
        head = call.stream.head
        code = call.stream.end_code
        self._observer.call_finished(
            head.service, head.method, int(GrpcCode.CANCELLED) if code is None else code
        )
        self._tasks_done.set()
        self._tasks_done = trio.Event()
        self._update_receive_deadline()

    async def _task_finished(self) -> None:
        await self._tasks_done.wait()

    async def _run_handler(self, call: Call) -> None:
        await trio.lowlevel.checkpoint()  # a call reset in the same batch ends here
        head = call.stream.head
        service = self._services.get(head.service)
        method = service.methods.get(head.method) if service else None
        if method is None:
            raise _CallFailed(
                GrpcCode.UNIMPLEMENTED, f"method {head.service}/{head.method} is not implemented"
            )
        if not self._authorizer(head.service, head.method, head.metadata, self.peer):
            # Before a byte of the request is inflated or a handler runs.
            raise _CallFailed(
                GrpcCode.UNAUTHENTICATED,
                "missing or invalid credentials: send authorization: Bearer <token>",
            )
        cardinality = method.signature.cardinality
        call.streaming_response = cardinality in _STREAMING_RESPONSES
        if call.streaming_response and self.proto.last_stream_id is not None:
            raise _CallFailed(GrpcCode.UNAVAILABLE, SHUTTING_DOWN)
        request = RequestReceived(call.stream.stream_id, "http", head.service, head.method, "")
        # As purerpc hands it over: a timedelta, or None without grpc-timeout.
        request.timeout = None if head.timeout_s is None else timedelta(seconds=head.timeout_s)
        request.message_encoding = head.encoding
        request.custom_metadata = head.metadata
        request.deadline_s = call.stream.deadline_s  # the same clock and instant as the scope's

        def handler(message: Any) -> Any:
            # Not ``async``: a streaming method returns an async iterator, which purerpc's
            # wrappers iterate; a unary one returns a coroutine, which they await.
            return method.method_fn(message, request=request)

        stream = PurerpcStream(call, method.signature.request_type)
        await _CALLERS[cardinality](handler, stream)

    # -- output --

    def flush(self) -> None:
        """Queue what the protocol produced for the writer; re-aim the reader's timer."""
        data = self.proto.data_to_send()
        if data:
            self._out += data
            self._out_ready.set()
            if len(self._out) > self.proto.limits.max_unsent_output_bytes:
                log.warning(
                    "closed a gRPC connection from %s: it does not read (%d bytes unsent)",
                    self.peer,
                    len(self._out),
                )
                self._out.clear()
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
        self._update_receive_deadline()

    def _update_receive_deadline(self) -> None:
        if self.proto.finished or not self.proto.graceful:
            self._receive_scope.cancel()
        else:
            self._receive_scope.deadline = self.proto.next_deadline()

    async def window_opened(self) -> None:
        await self._window.wait()

    async def _write_loop(self) -> None:
        while True:
            await self._out_ready.wait()
            while self._out:
                chunk = bytes(self._out[: lim.READ_CHUNK_BYTES])
                del self._out[: len(chunk)]
                await self._stream.send_all(chunk)
                self._drained.set()  # wakes every waiter: each checks its own condition
                self._drained = trio.Event()
            self._out_ready = trio.Event()

    async def output_below(self, high_water_bytes: int) -> None:
        """Wait while more than ``high_water_bytes`` wait for the socket (backpressure for
        handlers; 0 when closing). Not "until empty": under steady load from many calls the
        buffer is never empty, and every handler would wait forever."""
        while len(self._out) > high_water_bytes:
            await self._drained.wait()
