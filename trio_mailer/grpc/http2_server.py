"""One gRPC-over-HTTP/2 server connection: h2 driven by us, purerpc's services and wrappers on top.

This replaces the piece under purerpc's API that could not be made safe from outside
(``GRPCProtoSocket`` / ``GRPCConnection``): purerpc 0.8.0 fails the whole connection on an
oversized message, inflates gzip as zlib without a bound, drops RST_STREAM, ignores
grpc-timeout, closes the connection on a malformed header, and advertises 2^24-1 byte frames and
65,536 streams. Services are still ``purerpc.Service`` objects called through purerpc's
``call_server_*`` wrappers, with a ``Call`` that offers the stream methods those wrappers use.

Theory of operation. One reader task owns the socket's receiving side: each chunk passes the
pure ``FrameGate`` (frame sizes, CONTINUATION count, control-frame rate), is fed to h2 in
``FEED_CHUNK_BYTES`` pieces, and h2's events are dispatched at once, without awaiting. A new
stream's head is checked (``check_request_head``); a bad one is answered on its stream. A good
one becomes a ``Call`` served in its own task under a cancel scope that carries its deadline; a
client's RST_STREAM cancels that scope. DATA goes into the call's ``Deframer``; its bytes are
returned to the connection's flow-control window on arrival and to the stream's only when the
handler takes the message, so one stream buffers at most ``STREAM_WINDOW_BYTES`` and a
connection at most ``MAX_CONCURRENT_STREAMS`` of those (``CONNECTION_BUFFER_BYTES``), and no
set of unfinished messages can hold the connection's window shut.
Messages are inflated in the call's task, after the authorizer said yes. Every h2 output goes
to one buffer drained by a writer task; a client that lets it pass ``MAX_UNSENT_OUTPUT_BYTES``
is cut off. A connection with no call for ``idle_timeout_s`` gets GOAWAY NO_ERROR.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import purerpc
import trio
from google.protobuf.message import DecodeError
from hyperframe.frame import Frame as WireFrame
from hyperframe.frame import SettingsFrame, WindowUpdateFrame
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

from trio_mailer.core import http2_limits as lim
from trio_mailer.core.http2_limits import GrpcCode, H2Error

log = logging.getLogger("trio_mailer.grpc.listener")
_log_budget = lim.LogBudget()


def log_client_fault(level: int, kind: str, message: str, *args: object) -> None:
    """Log what a client did wrong, at most ``LOG_LINES_PER_WINDOW`` lines of a kind per
    ``LOG_WINDOW_S``; the next line logged says how many were dropped."""
    allowed, dropped = _log_budget.allow(kind, trio.current_time())
    if allowed:
        suffix = f" ({dropped} more like it not logged)" if dropped else ""
        log.log(level, message + suffix, *args)


# Decides whether a call to ``service``/``method`` with these request headers may proceed.
Authorizer = Callable[[str, str, Sequence[tuple[str, str]]], bool]

_CALLERS = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: call_server_stream_unary,
    Cardinality.STREAM_STREAM: call_server_stream_stream,
}
# h2 refuses a stream by itself (GOAWAY PROTOCOL_ERROR) past this many open ones; we refuse
# with REFUSED_STREAM at ``max_concurrent_streams`` first, so this is never reached.
_H2_HARD_STREAM_LIMIT = 2**20


class _H2Connection(h2.connection.H2Connection):  # type: ignore[misc]
    """h2 3.x, tolerating WINDOW_UPDATE on a stream it has closed and forgotten.

    RFC 9113 sec. 5.1: WINDOW_UPDATE "can be received in this state for a short period after a
    frame containing END_STREAM is sent". h2 3.x answers it with GOAWAY STREAM_CLOSED once the
    stream has left its table, which a busy grpcio client (64 calls in flight) triggers within
    seconds. This overrides one private method (checked by tests/test_purerpc_internals.py).
    """

    def _receive_window_update_frame(self, frame: Any) -> Any:
        try:
            return super()._receive_window_update_frame(frame)
        except h2.exceptions.StreamClosedError:
            return [], []

    # h2 returns consumed bytes to both windows at once (``acknowledge_received_data``); we
    # return them to the connection's window on arrival and to the stream's when the handler
    # takes its message. These two use h2's window managers and frame queue (private; checked
    # by tests/test_purerpc_internals.py).

    def acknowledge_connection_data(self, size: int) -> None:
        """Return ``size`` received bytes to the connection-level window only."""
        increment = self._inbound_flow_control_window_manager.process_bytes(size)
        if increment:
            self._prepare_for_sending([WindowUpdateFrame(0, window_increment=increment)])

    def acknowledge_stream_data(self, size: int, stream_id: int) -> None:
        """Return ``size`` consumed bytes to ``stream_id``'s window only (if still open)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.open:
            self._prepare_for_sending(stream.acknowledge_received_data(size))


class _StatelessEncoder(hpack.Encoder):  # type: ignore[misc]
    """hpack's encoder that never adds to its dynamic table, so a header list always encodes to
    the same block: the blocks of our constant header lists are encoded once, at import.

    Every header goes out as a never-indexed literal (or a static-table index): the table stays
    empty and the only state is a pending table-size update after the client's SETTINGS, which
    hpack emits on the next block as usual. Costs a few bytes per response against indexing,
    and saves HPACK's table search per header (about a sixth of h2's work on a unary call).
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        key = tuple(headers)
        if not self.header_table.resized:
            block = _CONSTANT_BLOCKS.get(key)
            if block is not None:
                return block
        return bytes(super().encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in key], huffman))


_RESPONSE_HEADERS = (
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", lim.ACCEPT_ENCODING.encode()),
)
_OK_TRAILERS = ((b"grpc-status", b"0"),)
_CONSTANT_BLOCKS: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}
for _headers in (_RESPONSE_HEADERS, _OK_TRAILERS, _RESPONSE_HEADERS + _OK_TRAILERS):
    _CONSTANT_BLOCKS[_headers] = _StatelessEncoder().encode(_headers)


@attrs.frozen
class Limits:
    """What one connection may cost; the defaults are the documented production limits."""

    max_message_bytes: int = lim.MAX_MESSAGE_BYTES
    max_concurrent_streams: int = lim.MAX_CONCURRENT_STREAMS
    max_unsent_output_bytes: int = lim.MAX_UNSENT_OUTPUT_BYTES
    preface_timeout_s: float = lim.PREFACE_TIMEOUT_S
    header_block_timeout_s: float = lim.HEADER_BLOCK_TIMEOUT_S
    idle_timeout_s: float = 300.0
    control_frame_burst: int = lim.CONTROL_FRAME_BURST
    control_frames_per_s: float = lim.CONTROL_FRAMES_PER_S
    refusal_burst: int = lim.REFUSAL_BURST
    refusals_per_s: float = lim.REFUSALS_PER_S


class _ConnectionDone(Exception):
    """Close the connection (GOAWAY already queued when there is one to send)."""


class _CallFailed(Exception):
    """End this call with ``code``: raised inside the call's task."""

    def __init__(self, code: GrpcCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status_headers(code: int, message: str) -> list[tuple[bytes, bytes]]:
    if code == 0 and not message:
        return list(_OK_TRAILERS)
    headers = [(b"grpc-status", str(int(code)).encode())]
    if message:
        # The spec's percent-encoding: printable ASCII except %, everything else as %XX.
        quoted = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        headers.append((b"grpc-message", quoted.encode("ascii")))
    return headers


class Call:
    """One gRPC call on a connection: the stream interface purerpc's server wrappers use."""

    def __init__(self, conn: Http2Connection, stream_id: int, head: lim.RequestHead) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.head = head
        self.scope = trio.CancelScope()
        self.end_stream_event: Any = None  # purerpc's wrappers look here when input ends
        self._deframer = lim.Deframer(conn.limits.max_message_bytes)
        self._frames: deque[lim.Frame] = deque()
        self._input_ended = False
        self._input_changed = trio.Event()
        self.failure: _CallFailed | None = None
        self.reset_by_client = False
        self.closed = False  # we ended the stream (trailers sent or reset)
        self._headers_sent = False
        self._message_type: Any = None
        self.unacked_bytes = 0

    # -- fed by the reader task (synchronous) --

    def data_received(self, data: bytes, flow_controlled: int) -> None:
        if self.failure is not None or self.closed:
            self._conn.ack(self.stream_id, flow_controlled)
            return
        self._conn.ack(self.stream_id, flow_controlled - len(data))  # padding: at once
        # The connection's window at once, the stream's when the message is taken: an
        # unfinished message holds only its own stream's window, never the connection's
        # (else 64 streams each holding half a message would stall the connection).
        self._conn.ack_connection(len(data))
        self.unacked_bytes += len(data)
        try:
            self._frames.extend(self._deframer.feed(data))
        except (lim.MessageTooLarge, lim.BadMessage) as exc:
            self.fail(exc.code, exc.message)
            self._conn.charge_refusal("refused messages")
            return
        self._wake()

    def input_ended(self) -> None:
        self._input_ended = True
        if self._deframer.partial and self.failure is None:
            self.fail(GrpcCode.INTERNAL, "the request ended inside a message")
        self._wake()

    def fail(self, code: GrpcCode, message: str) -> None:
        """End the call with ``code`` on its stream, whatever its handler is doing."""
        if self.failure is None:
            self.failure = _CallFailed(code, message)
        self._release_input()
        self.scope.cancel()

    def client_reset(self) -> None:
        self.reset_by_client = True
        self.closed = True
        self._release_input()
        self.scope.cancel()

    def _release_input(self) -> None:
        self._frames.clear()
        if self.unacked_bytes:
            self._conn.ack_stream(self.stream_id, self.unacked_bytes)
            self.unacked_bytes = 0
        self._wake()

    def _wake(self) -> None:
        self._input_changed.set()
        self._input_changed = trio.Event()

    # -- purerpc's stream interface, used by the wrappers in the call's task --

    def expect_message_type(self, message_type: Any) -> None:
        self._message_type = message_type

    async def receive_message(self) -> Any:
        while not self._frames:
            if self.failure is not None:
                raise self.failure
            if self._input_ended:
                return None
            await self._input_changed.wait()
        frame = self._frames.popleft()
        size = 5 + len(frame.payload)
        self.unacked_bytes -= size
        self._conn.ack_stream(self.stream_id, size)
        try:
            data = lim.decode_message(
                frame, self.head.encoding, self._conn.limits.max_message_bytes
            )
        except (lim.MessageTooLarge, lim.BadMessage) as exc:
            raise _CallFailed(exc.code, exc.message) from None
        try:
            return self._message_type.FromString(data)
        except DecodeError:
            raise _CallFailed(GrpcCode.INTERNAL, "the request message does not parse") from None

    async def send_message(self, message: Any) -> None:
        payload = message.SerializeToString()
        await self._conn.send_data(self, b"\0" + len(payload).to_bytes(4, "big") + payload)

    async def close(self, status: purerpc.Status) -> None:
        # purerpc's wrappers call this when the handler has answered.
        self._conn.answered(self)
        self._conn.finish_call(self, int(status.int_value), status.status_message or "")
        await trio.lowlevel.checkpoint()

    # -- used by the connection --

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        self._headers_sent = True
        return list(_RESPONSE_HEADERS)

    @property
    def headers_sent(self) -> bool:
        return self._headers_sent


class Http2Connection:
    """Serves the gRPC calls of one client connection until it ends, then closes the stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        services: dict[str, purerpc.Service],
        authorizer: Authorizer,
        limits: Limits,
        peer: str = "?",
    ) -> None:
        self._stream = stream
        self._services = services
        self._authorizer = authorizer
        self.limits = limits
        self._peer = peer
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # checked by check_request_head, per stream
            normalize_inbound_headers=False,
            # Ours: lower-case constants and percent-encoded status messages (_status_headers),
            # so h2's per-header checks and rewriting (about 5% of a refused call) buy nothing.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = _H2Connection(config)
        self._h2.encoder = _StatelessEncoder()
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _H2_HARD_STREAM_LIMIT,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: lim.MAX_FRAME_BYTES,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: lim.MAX_HEADER_LIST_BYTES,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: lim.STREAM_WINDOW_BYTES,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Values given to ``Settings(initial_values=...)`` count as already acknowledged, so h2
        # never applies them to its own decoder: set the header-list bound it enforces here.
        self._h2.decoder.max_header_list_size = lim.MAX_HEADER_LIST_BYTES
        self._h2.max_inbound_frame_size = lim.MAX_FRAME_BYTES
        self._gate = lim.FrameGate(
            control=lim.TokenBucket(limits.control_frame_burst, limits.control_frames_per_s)
        )
        self._refusals = lim.TokenBucket(limits.refusal_burst, limits.refusals_per_s)
        self._calls: dict[int, Call] = {}
        self._out = bytearray()
        self._out_ready = trio.Event()
        self._window_changed = trio.Event()
        self._preface_seen = 0  # bytes of the client preface (and first frame header) seen
        self._receive_scope = trio.CancelScope()
        self._born_s = self._idle_since = trio.current_time()
        self._drained = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- the connection's life --

    async def serve(self) -> None:
        try:
            async with self._stream:
                self._h2.initiate_connection()
                self._queue_initial_settings()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._write_loop)
                    try:
                        await self._read_loop()
                    except _ConnectionDone:
                        pass
                    # Let the last bytes (a GOAWAY, final statuses) leave, briefly.
                    with trio.move_on_after(lim.CLOSE_GRACE_S):
                        await self._drain(0)
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.debug("gRPC connection from %s ended: %r", self._peer, group)

    def _queue_initial_settings(self) -> None:
        """h2's SETTINGS, but advertising our stream limit (h2 keeps a higher one as a backstop)."""
        data = self._h2.data_to_send()
        frame, length = WireFrame.parse_frame_header(memoryview(data[:9]))
        if isinstance(frame, SettingsFrame):
            frame.parse_body(memoryview(data[9 : 9 + length]))
            frame.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] = (
                self.limits.max_concurrent_streams
            )
            data = frame.serialize() + data[9 + length :]
        self._out += data
        self._out_ready.set()

    async def _read_loop(self) -> None:
        while True:
            self._receive_scope = trio.CancelScope(deadline=self._receive_deadline())
            chunk: bytes | bytearray = b""
            with self._receive_scope:
                try:
                    chunk = await self._stream.receive_some(lim.READ_CHUNK_BYTES)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    self._end_calls()
                    raise _ConnectionDone
            if self._receive_scope.cancelled_caught:
                self._on_timeout()
                continue
            self._on_bytes(chunk)

    def _receive_deadline(self) -> float:
        deadlines = [math.inf]
        if self._preface_seen < len(lim.PREFACE):
            deadlines.append(self._born_s + self.limits.preface_timeout_s)
        if self._gate.header_block_started_s is not None:
            deadlines.append(self._gate.header_block_started_s + self.limits.header_block_timeout_s)
        if not self._calls:
            deadlines.append(self._idle_since + self.limits.idle_timeout_s)
        return min(deadlines)

    def _update_deadline(self) -> None:
        self._receive_scope.deadline = self._receive_deadline()

    def _on_timeout(self) -> None:
        now = trio.current_time()
        if self._preface_seen < len(lim.PREFACE):
            log_client_fault(
                logging.INFO,
                "preface",
                "closed a gRPC connection from %s: no HTTP/2 preface in time",
                self._peer,
            )
            raise _ConnectionDone
        if self._gate.header_block_overdue(now, self.limits.header_block_timeout_s):
            self._go_away(H2Error.ENHANCE_YOUR_CALM, "a header block did not complete in time")
        if not self._calls and now >= self._idle_since + self.limits.idle_timeout_s:
            log.debug("closing an idle gRPC connection from %s", self._peer)
            self._go_away(H2Error.NO_ERROR, None)

    def _on_bytes(self, chunk: bytes | bytearray) -> None:
        now = trio.current_time()
        if self._preface_seen < len(lim.PREFACE):
            take = chunk[: len(lim.PREFACE) - self._preface_seen]
            if lim.PREFACE[self._preface_seen : self._preface_seen + len(take)] != take:
                log_client_fault(
                    logging.INFO, "not-h2", "closed a connection from %s: not HTTP/2", self._peer
                )
                raise _ConnectionDone
            self._preface_seen += len(take)
            refusal = self._gate.scan(chunk[len(take) :], now)
        else:
            refusal = self._gate.scan(chunk, now)
        if refusal is not None:
            self._go_away(refusal.code, refusal.reason)
        for start in range(0, len(chunk), lim.FEED_CHUNK_BYTES):
            try:
                events = self._h2.receive_data(chunk[start : start + lim.FEED_CHUNK_BYTES])
            except h2.exceptions.ProtocolError as exc:
                self._flush()  # h2 queued its GOAWAY
                log_client_fault(
                    logging.INFO,
                    "h2-error",
                    "closed a gRPC connection from %s: HTTP/2 error: %s",
                    self._peer,
                    exc,
                )
                self._end_calls()
                raise _ConnectionDone from None
            for event in events:
                self._on_event(event)
            self._flush()

    def _go_away(self, code: H2Error, reason: str | None) -> None:
        if reason is not None:
            log_client_fault(
                logging.WARNING,
                f"goaway-{code.name}",
                "closed a gRPC connection from %s with GOAWAY %s: %s",
                self._peer,
                code.name,
                reason,
            )
        self._h2.close_connection(error_code=int(code))
        self._flush()
        self._end_calls()
        raise _ConnectionDone

    def _end_calls(self) -> None:
        for call in list(self._calls.values()):
            call.client_reset()

    # -- h2 events --

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event.stream_id, list(event.headers), event.stream_ended is not None)
        elif isinstance(event, h2.events.DataReceived):
            call = self._calls.get(event.stream_id)
            if call is None:
                self.ack(event.stream_id, event.flow_controlled_length)
            else:
                call.data_received(event.data, event.flow_controlled_length)
            if event.stream_ended is not None and call is not None:
                call.input_ended()
        elif isinstance(event, h2.events.StreamEnded | h2.events.TrailersReceived):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.input_ended()
        elif isinstance(event, h2.events.StreamReset):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.client_reset()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_changed.set()
            self._window_changed = trio.Event()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._end_calls()
            raise _ConnectionDone

    def _on_request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if len(self._calls) >= self.limits.max_concurrent_streams:
            self.charge_refusal("streams refused past the concurrency limit")
            self._reset(stream_id, H2Error.REFUSED_STREAM)
            return
        try:
            head = lim.check_request_head(headers)
        except lim.MalformedRequest as bad:
            self.charge_refusal("malformed requests")
            log_client_fault(
                logging.INFO,
                "malformed",
                "refused a malformed gRPC request from %s: %s",
                self._peer,
                bad.message,
            )
            self._answer_only(stream_id, bad.code, bad.message, bad.http_status)
            return
        call = Call(self, stream_id, head)
        if ended:
            call.input_ended()
        self._calls[stream_id] = call
        if head.timeout_s is not None:
            call.scope.deadline = trio.current_time() + head.timeout_s
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_call, call)
        self._update_deadline()

    def answered(self, call: Call) -> None:
        """A handler answered ``call``: real work, which earns control-frame tokens."""
        if not call.closed:
            self._gate.control.credit(lim.CONTROL_FRAMES_PER_ANSWERED_CALL)

    def charge_refusal(self, what: str) -> None:
        """A stream we refuse costs the client a token: a client that keeps sending requests we
        refuse (past the stream limit, malformed, oversized) is a flood."""
        if not self._refusals.take(trio.current_time()):
            self._go_away(
                H2Error.ENHANCE_YOUR_CALM,
                f"{what}: more than {self._refusals.burst:g} at once or {self._refusals.per_s:g}/s",
            )

    def _answer_only(self, stream_id: int, code: GrpcCode, message: str, http_status: int) -> None:
        """A trailers-only response (the stream's input is dropped)."""
        headers = [
            (b":status", str(http_status).encode()),
            (b"content-type", b"application/grpc"),
            (b"grpc-accept-encoding", lim.ACCEPT_ENCODING.encode()),
            *_status_headers(code, message),
        ]
        try:
            self._h2.send_headers(stream_id, headers, end_stream=True)
            if self._h2_stream_open(stream_id):
                self._h2.reset_stream(stream_id, error_code=int(H2Error.NO_ERROR))
        except h2.exceptions.H2Error as exc:
            log.debug("could not answer stream %d: %r", stream_id, exc)
        self._flush()

    def _h2_stream_open(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def _reset(self, stream_id: int, code: H2Error) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code=int(code))
        except h2.exceptions.H2Error as exc:
            log.debug("could not reset stream %d: %r", stream_id, exc)
        self._flush()

    # -- calls --

    async def _serve_call(self, call: Call) -> None:
        name = f"{call.head.service}/{call.head.method}"
        try:
            with call.scope:
                await self._run_handler(call)
            if call.closed:
                return
            if call.failure is not None:
                self.finish_call(call, call.failure.code, call.failure.message)
            elif call.scope.cancelled_caught:
                self.finish_call(call, GrpcCode.DEADLINE_EXCEEDED, "deadline exceeded")
            else:
                self.finish_call(call, GrpcCode.INTERNAL, "the call ended without a status")
        except _CallFailed as failed:
            self.finish_call(call, failed.code, failed.message)
        except RpcFailedError as error:
            self.answered(call)
            self.finish_call(call, error.status.int_value, error.status.status_message or "")
        except PurerpcProtocolError as exc:  # the wrappers: zero or several requests for unary
            self.finish_call(call, GrpcCode.INTERNAL, str(exc))
        except Exception:
            # The handler's own errors are mapped by it; this is a bug. The method name only:
            # a request's content never goes to the log.
            log.exception("unexpected error in gRPC method %s", name)
            self.finish_call(call, GrpcCode.INTERNAL, "internal error")
        finally:
            self._calls.pop(call.stream_id, None)
            call.closed = True
            if not self._calls:
                self._idle_since = trio.current_time()
            self._update_deadline()

    async def _run_handler(self, call: Call) -> None:
        await trio.lowlevel.checkpoint()  # a call reset in the same batch ends here
        head = call.head
        service = self._services.get(head.service)
        method = service.methods.get(head.method) if service else None
        if method is None:
            raise _CallFailed(
                GrpcCode.UNIMPLEMENTED, f"method {head.service}/{head.method} is not implemented"
            )
        if not self._authorizer(head.service, head.method, head.metadata):
            # Before a byte of the request is inflated or a handler runs.
            raise _CallFailed(
                GrpcCode.UNAUTHENTICATED,
                "missing or invalid credentials: send authorization: Bearer <token>",
            )
        call.expect_message_type(method.signature.request_type)
        request = RequestReceived(call.stream_id, "http", head.service, head.method, "")
        # As purerpc hands it over: a timedelta, or None without grpc-timeout.
        request.timeout = None if head.timeout_s is None else timedelta(seconds=head.timeout_s)
        request.message_encoding = head.encoding
        request.custom_metadata = head.metadata

        def handler(message: Any) -> Any:
            # Not ``async``: a streaming method returns an async iterator, which purerpc's
            # wrappers iterate; a unary one returns a coroutine, which they await.
            return method.method_fn(message, request=request)

        await _CALLERS[method.signature.cardinality](handler, call)

    async def send_data(self, call: Call, data: bytes) -> None:
        """Send one framed message on ``call``'s stream, as the client's windows allow."""
        view = memoryview(data)
        while view:
            if call.closed:
                raise _CallFailed(GrpcCode.CANCELLED, "the stream is closed")
            if not call.headers_sent:
                self._h2.send_headers(call.stream_id, call.response_headers())
                self._flush()
            window = min(
                self._h2.local_flow_control_window(call.stream_id),
                self._h2.max_outbound_frame_size,
            )
            if window <= 0:
                await self._window_changed.wait()
                continue
            self._h2.send_data(call.stream_id, bytes(view[:window]))
            view = view[window:]
            self._flush()
            await self._drain()

    def finish_call(self, call: Call, code: int, message: str) -> None:
        """Send the call's status (trailers, or a trailers-only response) and end its stream."""
        if call.closed:
            return
        call.closed = True
        try:
            if call.headers_sent:
                self._h2.send_headers(
                    call.stream_id, _status_headers(code, message), end_stream=True
                )
            else:
                headers = call.response_headers() + _status_headers(code, message)
                self._h2.send_headers(call.stream_id, headers, end_stream=True)
            # The client may still be sending: stop it, and return its window.
            if self._h2_stream_open(call.stream_id):
                self._h2.reset_stream(call.stream_id, error_code=int(H2Error.NO_ERROR))
        except h2.exceptions.H2Error as exc:
            log.debug("could not end stream %d: %r", call.stream_id, exc)
        call._release_input()
        self._flush()

    def ack(self, stream_id: int, size: int) -> None:
        """Return ``size`` consumed bytes to the client's flow-control windows (both)."""
        if size <= 0:
            return
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.H2Error as exc:
            log.debug("could not acknowledge data on stream %d: %r", stream_id, exc)
        self._flush()

    def ack_connection(self, size: int) -> None:
        """Return ``size`` received bytes to the connection's window (buffered in a call)."""
        if size > 0:
            self._h2.acknowledge_connection_data(size)
            self._flush()

    def ack_stream(self, stream_id: int, size: int) -> None:
        """Return ``size`` bytes a call has taken (or dropped) to its stream's window."""
        if size > 0:
            self._h2.acknowledge_stream_data(size, stream_id)
            self._flush()

    # -- output --

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if not data:
            return
        self._out += data
        self._out_ready.set()
        if len(self._out) > self.limits.max_unsent_output_bytes:
            log_client_fault(
                logging.WARNING,
                "not-reading",
                "closed a gRPC connection from %s: it does not read (%d bytes unsent)",
                self._peer,
                len(self._out),
            )
            self._out.clear()
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()

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

    async def _drain(self, high_water_bytes: int = lim.OUTPUT_HIGH_WATER_BYTES) -> None:
        """Wait while more than ``high_water_bytes`` wait for the socket (backpressure for
        handlers; 0 when closing). Not "until empty": under steady load from many calls the
        buffer is never empty, and every handler would wait forever."""
        while len(self._out) > high_water_bytes:
            await self._drained.wait()


async def serve_connection(
    stream: trio.abc.Stream,
    services: dict[str, purerpc.Service],
    authorizer: Authorizer,
    limits: Limits,
    peer: str = "?",
) -> None:
    """Serve one connection until it ends; closes ``stream``."""
    await Http2Connection(stream, services, authorizer, limits, peer).serve()
