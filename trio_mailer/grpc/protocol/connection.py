"""The server side of one gRPC-over-HTTP/2 connection, as an object without I/O.

Bytes in, events and bytes out, as h11's ``Connection`` and hypercorn's ``protocol/h2.py``:
``receive_data(data, now_s)`` returns ``events.Event``s, ``data_to_send()`` the bytes to write,
and the Trio layer calls ``take_message``, ``send_message`` and ``end_call`` for its handlers,
``on_timer`` at ``next_deadline()``, and ``start_drain`` when the server stops. Time is always
passed in; nothing here imports trio. h2 3.x keeps the HTTP/2 state machine; every decision
about what a client may cost is made in ``trio_mailer.core.http2_limits``.

Theory of operation.

- **Streams are counted as RFC 9113 sec. 5.1.2 counts them**: a stream counts from its HEADERS
  until it ends at our side (the status sent, or the client's RST_STREAM), not until a
  handler's clean-up, so a client that respects SETTINGS_MAX_CONCURRENT_STREAMS is never
  refused. Past the limit a stream gets REFUSED_STREAM; once the client has acknowledged our
  SETTINGS, each such refusal costs a token of the refusal budget.
- **Per-call answers are ordinary traffic**: a malformed head, an oversized or undecodable
  message, a deadline, a client's cancel are answered (or forgotten) on their stream alone.
- **Budgets trip only on what no compliant client does**: control-frame floods (``FrameGate``;
  a RST_STREAM of a call we were serving is given back and judged below), early resets (a
  reset of a call not answered yet, before its deadline) far above the calls the connection
  completes, and refused streams past the limit. A tripped budget sends GOAWAY
  ENHANCE_YOUR_CALM naming the last stream the server will answer, and every stream at or
  below it is answered; the Trio layer stops reading.
- **Flow control never becomes a connection error for a compliant request**: our SETTINGS
  (with the stream window) apply from the client's ACK, so a client sending before it has
  them may use the protocol's default window; received bytes go back to the connection's
  window on arrival and to the stream's when the handler takes the message; a message over
  the limit is refused from its 5-byte prefix with RESOURCE_EXHAUSTED on its stream.
- **Graceful drain** (grpc-go's ``GracefulStop``): GOAWAY(2^31-1) and a PING; when the PING is
  answered (or after ``DRAIN_PING_TIMEOUT_S``), GOAWAY with the last stream id. Streams above
  it are refused; the ones below are served to the end.
"""

from __future__ import annotations

import logging
import urllib.parse

import attrs
import h2.config
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame, SettingsFrame

from trio_mailer.core import http2_limits as lim
from trio_mailer.core.http2_limits import GrpcCode, H2Error
from trio_mailer.grpc.internals import H2Connection, StatelessEncoder
from trio_mailer.grpc.protocol import events as ev
from trio_mailer.grpc.protocol.stream import GRPC, GRPC_PROTO, GrpcStream

log = logging.getLogger("trio_mailer.grpc.listener")
_log_budget = lim.LogBudget()


def log_client_fault(level: int, kind: str, now_s: float, message: str, *args: object) -> None:
    """Log what a client did wrong, at most ``LOG_LINES_PER_WINDOW`` lines of a kind per
    ``LOG_WINDOW_S``; the next line logged says how many were dropped."""
    allowed, dropped = _log_budget.allow(kind, now_s)
    if allowed:
        suffix = f" ({dropped} more like it not logged)" if dropped else ""
        log.log(level, message + suffix, *args)


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
    reset_burst: int = lim.RESET_BURST
    resets_per_s: float = lim.RESETS_PER_S


# h2 refuses a stream by itself (GOAWAY PROTOCOL_ERROR) past this many open ones; we refuse
# with REFUSED_STREAM at ``max_concurrent_streams`` first, so this is never reached.
_H2_HARD_STREAM_LIMIT = 2**20
_DRAIN_PING = b"drain..."


def _response_headers(content_type: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b":status", b"200"),
        (b"content-type", content_type),
        (b"grpc-accept-encoding", lim.ACCEPT_ENCODING.encode()),
    )


RESPONSE_HEADERS = {ct: _response_headers(ct) for ct in (GRPC, GRPC_PROTO)}
OK_TRAILERS = ((b"grpc-status", b"0"),)
for _headers in RESPONSE_HEADERS.values():
    for _block in (_headers, OK_TRAILERS, _headers + OK_TRAILERS):
        StatelessEncoder.add_constant(_block)


def status_headers(code: int, message: str) -> list[tuple[bytes, bytes]]:
    """``grpc-status`` and (when there is one) the percent-encoded ``grpc-message``."""
    if code == 0 and not message:
        return list(OK_TRAILERS)
    headers = [(b"grpc-status", str(int(code)).encode())]
    if message:
        # The spec's percent-encoding: printable ASCII except %, everything else as %XX.
        quoted = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        headers.append((b"grpc-message", quoted.encode("ascii")))
    return headers


class StreamGone(Exception):
    """The call's stream has ended at our side: nothing more can be sent on it."""


class ServerConnection:
    """One client connection's HTTP/2 and gRPC framing (see the module's docstring)."""

    def __init__(self, limits: Limits, now_s: float, peer: str = "?") -> None:
        self.limits = limits
        self.peer = peer
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # checked by check_request_head, per stream
            normalize_inbound_headers=False,
            # Ours: lower-case constants and percent-encoded status messages (status_headers).
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = H2Connection(config)
        self._h2.encoder = StatelessEncoder()
        # What h2 enforces from the start (counted as acknowledged by h2): a hard stream limit
        # behind ours, the header-list bound and frame size (both the protocol's defaults or
        # tighter), no push. The stream window is announced below and applies from the ACK.
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _H2_HARD_STREAM_LIMIT,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: lim.MAX_FRAME_BYTES,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: lim.MAX_HEADER_LIST_BYTES,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._h2.decoder.max_header_list_size = lim.MAX_HEADER_LIST_BYTES
        self._h2.max_inbound_frame_size = lim.MAX_FRAME_BYTES
        self._h2.initiate_connection()
        # Pending in h2 until the client's ACK: then h2 applies it to every stream's window.
        self._h2.update_settings(
            {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: lim.STREAM_WINDOW_BYTES}
        )
        self._h2.data_to_send()  # both SETTINGS frames, replaced by the one we advertise:
        self._out = bytearray(self._settings_frame().serialize())
        self._gate = lim.FrameGate(
            control=lim.TokenBucket(limits.control_frame_burst, limits.control_frames_per_s)
        )
        self._refusals = lim.TokenBucket(limits.refusal_burst, limits.refusals_per_s)
        self._resets = lim.TokenBucket(limits.reset_burst, limits.resets_per_s)
        self._live: dict[int, GrpcStream] = {}
        self._preface_seen = 0  # bytes of the client preface seen
        self._settings_acked = False
        self._born_s = self._idle_since_s = now_s
        self._drain_ping_s: float | None = None  # when a drain's PING went out
        self._highest_stream_id = 0  # the last request processed (answered or being served)
        self.last_stream_id: int | None = None  # the final GOAWAY's, once sent
        self.graceful = True  # False once a budget tripped: stop reading
        self.ended = False  # ConnectionEnded was returned: close the socket

    def _settings_frame(self) -> SettingsFrame:
        frame = SettingsFrame(0)
        frame.settings = {
            SettingsFrame.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
            SettingsFrame.MAX_FRAME_SIZE: lim.MAX_FRAME_BYTES,
            SettingsFrame.MAX_HEADER_LIST_SIZE: lim.MAX_HEADER_LIST_BYTES,
            SettingsFrame.INITIAL_WINDOW_SIZE: lim.STREAM_WINDOW_BYTES,
            SettingsFrame.ENABLE_PUSH: 0,
        }
        return frame

    # -- what the Trio layer asks --

    def data_to_send(self) -> bytes:
        """The bytes to write to the client, in order (and forget them)."""
        self._out += self._h2.data_to_send()
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def live_calls(self) -> int:
        """Streams being served (counted against SETTINGS_MAX_CONCURRENT_STREAMS)."""
        return len(self._live)

    def stream(self, stream_id: int) -> GrpcStream | None:
        return self._live.get(stream_id)

    @property
    def finished(self) -> bool:
        """The final GOAWAY is sent and no call is left: close once the bytes are out."""
        return self.ended or (self.last_stream_id is not None and not self._live)

    def next_deadline(self) -> float:
        """When ``on_timer`` must be called next (``inf``: never)."""
        deadlines = [float("inf")]
        if self._preface_seen < len(lim.PREFACE):
            deadlines.append(self._born_s + self.limits.preface_timeout_s)
        if self._gate.header_block_started_s is not None:
            deadlines.append(self._gate.header_block_started_s + self.limits.header_block_timeout_s)
        if not self._live and self.last_stream_id is None:
            deadlines.append(self._idle_since_s + self.limits.idle_timeout_s)
        if self._drain_ping_s is not None and self.last_stream_id is None:
            deadlines.append(self._drain_ping_s + lim.DRAIN_PING_TIMEOUT_S)
        return min(deadlines)

    def on_timer(self, now_s: float) -> list[ev.Event]:
        """Act on what ``next_deadline`` announced."""
        if self.ended:
            return []
        if self._preface_seen < len(lim.PREFACE):
            if now_s >= self._born_s + self.limits.preface_timeout_s:
                log_client_fault(
                    logging.INFO,
                    "preface",
                    now_s,
                    "closed a gRPC connection from %s: no HTTP/2 preface in time",
                    self.peer,
                )
                return self._end("no preface in time")
            return []
        if self._gate.header_block_overdue(now_s, self.limits.header_block_timeout_s):
            return self._trip(
                H2Error.ENHANCE_YOUR_CALM, "a header block did not complete in time", now_s
            )
        if self.last_stream_id is not None:
            return []
        if self._drain_ping_s is not None:
            if now_s >= self._drain_ping_s + lim.DRAIN_PING_TIMEOUT_S:
                return self._final_goaway(H2Error.NO_ERROR)
            return []
        if not self._live and now_s >= self._idle_since_s + self.limits.idle_timeout_s:
            log.debug("closing an idle gRPC connection from %s", self.peer)
            return self._final_goaway(H2Error.NO_ERROR)
        return []

    def start_drain(self, now_s: float) -> list[ev.Event]:
        """Begin a graceful close: GOAWAY(2^31-1) and a PING (the final GOAWAY follows)."""
        if self.ended or self.last_stream_id is not None or self._drain_ping_s is not None:
            return []
        if self._preface_seen < len(lim.PREFACE):
            return self._end("the server is stopping")
        self._h2.queue_frame(
            GoAwayFrame(0, last_stream_id=lim.MAX_STREAM_ID, error_code=int(H2Error.NO_ERROR))
        )
        self._h2.ping(_DRAIN_PING)
        self._drain_ping_s = now_s
        return []

    # -- bytes in --

    def receive_data(self, data: bytes | bytearray, now_s: float) -> list[ev.Event]:
        """Take bytes from the client; what happened, in order."""
        if self.ended or not self.graceful:
            return []
        view = memoryview(data)
        if self._preface_seen < len(lim.PREFACE):
            take = bytes(view[: len(lim.PREFACE) - self._preface_seen])
            if lim.PREFACE[self._preface_seen : self._preface_seen + len(take)] != take:
                log_client_fault(
                    logging.INFO,
                    "not-h2",
                    now_s,
                    "closed a connection from %s: not HTTP/2",
                    self.peer,
                )
                return self._end("not HTTP/2")
            self._preface_seen += len(take)
            skip = len(take)
        else:
            skip = 0
        out: list[ev.Event] = []
        # In pieces: h2 3.x re-copies its input per frame, and the events of each piece are
        # handled before the next (refused and answered streams close before more arrive).
        for start in range(0, len(view), lim.FEED_CHUNK_BYTES):
            piece = view[start : start + lim.FEED_CHUNK_BYTES]
            # The gate sees the bytes after the preface (h2 takes the preface itself).
            refusal = self._gate.scan(piece[max(0, skip - start) :], now_s)
            if refusal is not None:
                out += self._trip(refusal.code, refusal.reason, now_s)
                return out
            try:
                h2_events = self._h2.receive_data(bytes(piece))
            except h2.exceptions.ProtocolError as exc:
                log_client_fault(
                    logging.INFO,
                    "h2-error",
                    now_s,
                    "closed a gRPC connection from %s: HTTP/2 error: %s",
                    self.peer,
                    exc,
                )
                out += self._end(f"HTTP/2 error: {exc}")  # h2 queued its GOAWAY
                return out
            for event in h2_events:  # after a trip too: the streams below it go on
                out += self._on_h2_event(event, now_s)
                if self.ended:
                    return out
            if not self.graceful:
                return out  # a budget tripped: read no further
        return out

    def _on_h2_event(self, event: h2.events.Event, now_s: float) -> list[ev.Event]:
        if isinstance(event, h2.events.RequestReceived):
            return self._on_request(
                event.stream_id, list(event.headers), event.stream_ended is not None, now_s
            )
        if isinstance(event, h2.events.DataReceived):
            return self._on_data(event, now_s)
        if isinstance(event, h2.events.StreamEnded | h2.events.TrailersReceived):
            stream = self._live.get(event.stream_id)
            return [] if stream is None else self._input_ended(stream, now_s)
        if isinstance(event, h2.events.StreamReset):
            return self._on_reset(event.stream_id, now_s)
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            return [ev.WindowOpened()]
        if isinstance(event, h2.events.SettingsAcknowledged):
            self._settings_acked = True
            return [ev.WindowOpened()]
        if isinstance(event, h2.events.PingAckReceived):
            if event.ping_data == _DRAIN_PING and self.last_stream_id is None:
                return self._final_goaway(H2Error.NO_ERROR)
            return []
        if isinstance(event, h2.events.ConnectionTerminated):
            return self._end(f"the client sent GOAWAY {event.error_code!r}")
        return []

    def _on_request(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool, now_s: float
    ) -> list[ev.Event]:
        if self.last_stream_id is not None:
            # After the final GOAWAY (RFC 9113 sec. 6.8): not processed; the client retries it
            # elsewhere. Not the client's fault: it had not seen the GOAWAY yet.
            self._reset(stream_id, H2Error.REFUSED_STREAM)
            return []
        self._highest_stream_id = stream_id
        if len(self._live) >= self.limits.max_concurrent_streams:
            self._reset(stream_id, H2Error.REFUSED_STREAM)
            # Before it has our SETTINGS a client may assume no limit: only refused, not charged.
            if self._settings_acked and not self._refusals.take(now_s):
                return self._trip(
                    H2Error.ENHANCE_YOUR_CALM,
                    f"streams opened past the limit of {self.limits.max_concurrent_streams}: "
                    f"more than {self._refusals.burst:g} at once or {self._refusals.per_s:g}/s",
                    now_s,
                )
            return []
        try:
            head = lim.check_request_head(headers)
        except lim.MalformedRequest as bad:
            log_client_fault(
                logging.INFO,
                "malformed",
                now_s,
                "refused a malformed gRPC request from %s: %s",
                self.peer,
                bad.message,
            )
            self._answer_only(stream_id, bad.code, bad.message, bad.http_status)
            return []
        deadline_s = None if head.timeout_s is None else now_s + head.timeout_s
        stream = GrpcStream(
            stream_id, head, now_s, deadline_s, lim.Deframer(self.limits.max_message_bytes)
        )
        self._live[stream_id] = stream
        out: list[ev.Event] = [ev.CallStarted(stream)]
        if ended:
            out += self._input_ended(stream, now_s)
        return out

    def _on_data(self, event: h2.events.DataReceived, now_s: float) -> list[ev.Event]:
        stream = self._live.get(event.stream_id)
        size = event.flow_controlled_length
        if stream is None:
            # A stream already answered (or refused): its bytes go straight back.
            self._ack_both(event.stream_id, size)
            return []
        # Padding at once; the connection's window at once, the stream's when the message is
        # taken: an unfinished message holds only its own stream's window.
        self._ack_both(event.stream_id, size - len(event.data))
        if event.data:
            self._h2.acknowledge_connection_data(len(event.data))
        try:
            stream.feed(event.data)
        except (lim.MessageTooLarge, lim.BadMessage) as refused:
            self.end_call(stream, refused.code, refused.message, now_s)
            return [ev.CallEnded(stream.stream_id, int(refused.code))]
        if event.stream_ended is not None:
            return self._input_ended(stream, now_s)
        return [ev.InputChanged(stream.stream_id)]

    def _input_ended(self, stream: GrpcStream, now_s: float) -> list[ev.Event]:
        stream.input_ended = True
        if stream.deframer.partial:
            self.end_call(stream, GrpcCode.INTERNAL, "the request ended inside a message", now_s)
            return [ev.CallEnded(stream.stream_id, int(GrpcCode.INTERNAL))]
        return [ev.InputChanged(stream.stream_id)]

    def _on_reset(self, stream_id: int, now_s: float) -> list[ev.Event]:
        stream = self._live.pop(stream_id, None)
        if stream is None:
            return []  # a stream already ended at our side: the gate counted it
        self._gate.control.credit(1)  # a call's cancel is judged here, not as a control frame
        stream.ended = True
        stream.end_code = int(GrpcCode.CANCELLED)
        stream.release()
        self._became_idle(now_s)
        out: list[ev.Event] = [ev.CallEnded(stream_id, int(GrpcCode.CANCELLED))]
        if stream.reset_is_early(now_s) and not self._resets.take(now_s):
            out += self._trip(
                H2Error.ENHANCE_YOUR_CALM,
                f"calls reset before any answer: more than {self._resets.burst:g} at once or "
                f"{self._resets.per_s:g}/s beyond the calls answered",
                now_s,
            )
        return out

    # -- calls, for the Trio layer --

    def take_message(self, stream: GrpcStream) -> lim.Frame | None:
        """The call's next buffered message (its bytes go back to the stream's window)."""
        frame, size = stream.take()
        if size and not stream.ended:
            self._h2.acknowledge_stream_data(size, stream.stream_id)
        return frame

    def send_message(self, stream: GrpcStream, data: memoryview) -> int:
        """Send as much of ``data`` as the client's windows take now; how much was sent (0:
        wait for ``WindowOpened``).

        Raises:
            StreamGone: the stream has ended at our side.
        """
        if stream.ended:
            raise StreamGone
        try:
            if not stream.headers_sent:
                self._h2.send_headers(stream.stream_id, RESPONSE_HEADERS[stream.content_type])
                stream.headers_sent = True
            window: int = min(
                self._h2.local_flow_control_window(stream.stream_id),
                self._h2.max_outbound_frame_size,
                len(data),
            )
            if window <= 0:
                return 0
            self._h2.send_data(stream.stream_id, bytes(data[:window]))
        except h2.exceptions.H2Error as exc:  # h2 saw the stream end first
            log.debug("could not send on stream %d: %r", stream.stream_id, exc)
            raise StreamGone from None
        return window

    def end_call(self, stream: GrpcStream, code: int, message: str, now_s: float) -> None:
        """Send the call's status (trailers, or a trailers-only response); the stream ends
        at our side and stops counting against the stream limit at once."""
        if stream.ended:
            return
        stream.ended = True
        stream.end_code = int(code)
        stream.end_message = message
        self._live.pop(stream.stream_id, None)
        # A call answered is work done: it earns back the tokens a busy client spends.
        self._gate.control.credit(lim.CONTROL_FRAMES_PER_ANSWERED_CALL)
        self._resets.credit(lim.RESETS_PER_ANSWERED_CALL)
        try:
            if stream.headers_sent:
                self._h2.send_headers(
                    stream.stream_id, status_headers(code, message), end_stream=True
                )
            else:
                headers = RESPONSE_HEADERS[stream.content_type] + tuple(
                    status_headers(code, message)
                )
                self._h2.send_headers(stream.stream_id, headers, end_stream=True)
            # The client may still be sending: stop it.
            if self._h2_stream_open(stream.stream_id):
                self._h2.reset_stream(stream.stream_id, error_code=int(H2Error.NO_ERROR))
        except h2.exceptions.H2Error as exc:
            log.debug("could not end stream %d: %r", stream.stream_id, exc)
        stream.release()
        self._became_idle(now_s)

    # -- helpers --

    def _became_idle(self, now_s: float) -> None:
        if not self._live:
            self._idle_since_s = now_s

    def _ack_both(self, stream_id: int, size: int) -> None:
        if size > 0:
            try:
                self._h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.H2Error as exc:
                log.debug("could not acknowledge data on stream %d: %r", stream_id, exc)

    def _answer_only(self, stream_id: int, code: GrpcCode, message: str, http_status: int) -> None:
        """A trailers-only response to a request refused from its head."""
        headers = [
            (b":status", str(http_status).encode()),
            (b"content-type", GRPC),
            (b"grpc-accept-encoding", lim.ACCEPT_ENCODING.encode()),
            *status_headers(code, message),
        ]
        try:
            self._h2.send_headers(stream_id, headers, end_stream=True)
            if self._h2_stream_open(stream_id):
                self._h2.reset_stream(stream_id, error_code=int(H2Error.NO_ERROR))
        except h2.exceptions.H2Error as exc:
            log.debug("could not answer stream %d: %r", stream_id, exc)

    def _h2_stream_open(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def _reset(self, stream_id: int, code: H2Error) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code=int(code))
        except h2.exceptions.H2Error as exc:
            log.debug("could not reset stream %d: %r", stream_id, exc)

    def _final_goaway(self, code: H2Error) -> list[ev.Event]:
        """GOAWAY naming the last stream we will answer: every stream up to it is served."""
        last = self._highest_stream_id
        self._h2.queue_frame(GoAwayFrame(0, last_stream_id=last, error_code=int(code)))
        self.last_stream_id = last
        return [ev.GoingAway(last, graceful=self.graceful)]

    def _trip(self, code: H2Error, reason: str, now_s: float) -> list[ev.Event]:
        """A budget tripped: GOAWAY ``code``; the calls so far are still answered."""
        log_client_fault(
            logging.WARNING,
            f"goaway-{code.name}",
            now_s,
            "closing a gRPC connection from %s with GOAWAY %s: %s",
            self.peer,
            code.name,
            reason,
        )
        self.graceful = False
        if self.last_stream_id is not None:  # a drain already named the last stream
            return [ev.GoingAway(self.last_stream_id, graceful=False)]
        return self._final_goaway(code)

    def _end(self, reason: str) -> list[ev.Event]:
        self.ended = True
        return [ev.ConnectionEnded(reason)]
