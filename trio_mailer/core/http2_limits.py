"""What one gRPC client may cost: HTTP/2 limits, request-head checks, bounded deframing.

Pure: no trio, purerpc or h2 here. The listener (``trio_mailer/grpc/http2_server.py``) owns the
socket and h2's state machine; every decision about a frame, a header block or a message is made
here, in functions its tests call in microseconds.

Theory of operation. Bytes from a client pass three gates before any handler sees them:

1. ``FrameGate`` reads the 9-byte frame headers of the raw byte stream *before* h2 buffers the
   frame (h2 3.x waits for a whole frame, up to its 2^24-1 byte maximum, before checking its
   length). It refuses frames over ``MAX_FRAME_BYTES``, header blocks of more than
   ``MAX_CONTINUATION_FRAMES`` CONTINUATION frames or ``MAX_HEADER_BLOCK_BYTES`` bytes, and
   meters control frames (PING, SETTINGS, PRIORITY, WINDOW_UPDATE on stream 0, RST_STREAM, empty
   DATA) against a token bucket. A refusal is a connection error: GOAWAY with the returned code.
2. ``check_request_head`` turns a request's header block into a ``RequestHead`` or a
   ``MalformedRequest`` carrying the status the gRPC spec names (PROTOCOL-HTTP2.md); the stream
   gets that status and the connection goes on.
3. ``Deframer`` splits a stream's DATA into length-prefixed gRPC messages and refuses one whose
   declared length passes the limit before buffering it; ``decode_message`` inflates gzip or
   deflate with an output bound equal to the same limit, so a bomb costs at most that much.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib

import attrs

# -- Limits (units in the names) ----------------------------------------------------------------

# The largest request message accepted, after decompression: this API's requests are a few
# hundred bytes, so anything bigger is a client bug or an attack.
MAX_MESSAGE_BYTES = 4 * 1024
# SETTINGS_MAX_FRAME_SIZE we advertise, and the largest inbound frame accepted: the HTTP/2
# minimum, as grpcio's server does.
MAX_FRAME_BYTES = 16 * 1024
# SETTINGS_MAX_HEADER_LIST_SIZE we advertise (decoded size, RFC 9113 sec. 6.5.2).
MAX_HEADER_LIST_BYTES = 16 * 1024
# The compressed header block (HEADERS + its CONTINUATIONs) accepted on the wire.
MAX_HEADER_BLOCK_BYTES = 32 * 1024
# CONTINUATION frames after one HEADERS frame (h2 3.x would take 64 of any size).
MAX_CONTINUATION_FRAMES = 8
# SETTINGS_MAX_CONCURRENT_STREAMS: a stream beyond it gets RST_STREAM REFUSED_STREAM.
MAX_CONCURRENT_STREAMS = 100
# SETTINGS_INITIAL_WINDOW_SIZE per stream: two whole 4 KiB messages with their 5-byte prefixes.
STREAM_WINDOW_BYTES = 2 * (MAX_MESSAGE_BYTES + 5)
# What one connection's calls may hold in unfinished or untaken messages: every stream's window
# together. The connection-level window (h2's 64 KiB) is returned as bytes arrive, so that only
# the stream windows bound this, and unfinished messages cannot hold the connection shut.
CONNECTION_BUFFER_BYTES = MAX_CONCURRENT_STREAMS * STREAM_WINDOW_BYTES
# Control frames a connection may send in a burst, and per second after it.
CONTROL_FRAME_BURST = 200
CONTROL_FRAMES_PER_S = 100.0
# Control-frame tokens a call gives back when its handler answered it: a busy grpcio client sends
# a WINDOW_UPDATE on stream 0 and a BDP PING for every few calls, and that is not a flood. A
# flood (rapid reset included) makes no answered calls, so it earns nothing.
CONTROL_FRAMES_PER_ANSWERED_CALL = 4
# Bytes handed to h2 at a time. h2 3.x re-copies its input buffer per frame, and counts its open
# streams by walking all of them on every new HEADERS: in one large feed of many tiny HEADERS
# frames (HPACK makes a repeated request head a few bytes) that is quadratic. After each feed
# the events are handled, so refused and answered streams are closed before the next one.
FEED_CHUNK_BYTES = 1024
# Streams opened past SETTINGS_MAX_CONCURRENT_STREAMS (after the client acknowledged it) that a
# connection may cause in a burst, and per second after it: no compliant client opens one. A
# request refused on its own stream (malformed, oversized, undecodable) is ordinary traffic,
# answered per call, and costs no token.
REFUSAL_BURST = 50
REFUSALS_PER_S = 10.0
# Early resets (a client's RST_STREAM of a call not yet answered, before its deadline: the
# rapid-reset shape, CVE-2023-44487) a connection may send in a burst, per second after it, and
# per call the connection completes. A busy client cancelling hundreds of calls a second stays
# far inside; a flood (thousands a second, answering nothing) trips it within a fraction of a
# second. Cancels of calls already answering, and resets at the deadline, cost nothing.
RESET_BURST = 500
RESETS_PER_S = 200.0
RESETS_PER_ANSWERED_CALL = 10
# A reset this close to the call's deadline (on our clock, which starts the deadline when the
# HEADERS are read, later than the client did) is the client's deadline firing, not a reset.
DEADLINE_RESET_SLACK_S = 0.1
# Bytes read from the socket at a time: one read is processed without yielding to other
# connections, so it is kept to about one full-size frame.
READ_CHUNK_BYTES = 16 * 1024 + 9
# A handler sending a message waits while more than this is queued for the socket.
OUTPUT_HIGH_WATER_BYTES = 64 * 1024
# Replies queued for a client that does not read: past this the connection is closed.
MAX_UNSENT_OUTPUT_BYTES = 256 * 1024
# The client's connection preface (and first SETTINGS) must arrive within this.
PREFACE_TIMEOUT_S = 10.0
# A header block that is started must be completed within this.
HEADER_BLOCK_TIMEOUT_S = 10.0
# Grace for in-flight calls after a GOAWAY that a budget tripped, and for the last bytes to
# leave, when closing.
CLOSE_GRACE_S = 1.0
# A draining connection sends GOAWAY(2^31-1) and a PING, and the final GOAWAY (its last stream
# id) when the PING is answered or after this long (grpc-go's GracefulStop does the same).
DRAIN_PING_TIMEOUT_S = 1.0
# The highest stream id: the first GOAWAY of a drain names it (every stream may still come).
MAX_STREAM_ID = 2**31 - 1
# The longest grpc-timeout honoured (the spec allows 8 digits of hours).
MAX_DEADLINE_S = 24 * 3600.0

# Compression: what we inflate, in the order we advertise it.
SUPPORTED_ENCODINGS = ("identity", "gzip", "deflate")
ACCEPT_ENCODING = ",".join(SUPPORTED_ENCODINGS)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class GrpcCode(enum.IntEnum):
    """gRPC status codes (the names of the gRPC spec's statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class H2Error(enum.IntEnum):
    """HTTP/2 error codes (RFC 9113 sec. 7) used in GOAWAY and RST_STREAM."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    ENHANCE_YOUR_CALM = 0xB


# Log lines about what clients did wrong, per kind, per LOG_WINDOW_S: an attacker must not turn
# the log into its amplifier (each line is a synchronous write on the event loop).
LOG_LINES_PER_WINDOW = 10
LOG_WINDOW_S = 10.0


@attrs.define
class LogBudget:
    """``allow(kind, now_s)``: whether to log this line, and how many of its kind were dropped
    since the last one logged (to say so on that line)."""

    lines: int = LOG_LINES_PER_WINDOW
    window_s: float = LOG_WINDOW_S
    _windows: dict[str, tuple[float, int, int]] = attrs.Factory(dict)  # start, logged, dropped

    def allow(self, kind: str, now_s: float) -> tuple[bool, int]:
        start, logged, dropped = self._windows.get(kind, (now_s, 0, 0))
        if now_s - start >= self.window_s:
            start, logged = now_s, 0
        if logged >= self.lines:
            self._windows[kind] = (start, logged, dropped + 1)
            return False, 0
        self._windows[kind] = (start, logged + 1, 0)
        return True, dropped


# -- Gate 1: frames -----------------------------------------------------------------------------

FRAME_DATA = 0x0
FRAME_HEADERS = 0x1
FRAME_PRIORITY = 0x2
FRAME_RST_STREAM = 0x3
FRAME_SETTINGS = 0x4
FRAME_PUSH_PROMISE = 0x5
FRAME_PING = 0x6
FRAME_GOAWAY = 0x7
FRAME_WINDOW_UPDATE = 0x8
FRAME_CONTINUATION = 0x9
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4
FRAME_HEADER_BYTES = 9


@attrs.frozen
class ConnectionRefusal:
    """Why a connection is being closed: sent as GOAWAY ``code``; ``reason`` is for the log."""

    code: H2Error
    reason: str


@attrs.define
class TokenBucket:
    """``burst`` tokens, refilled at ``per_s``; ``take`` says whether one was left."""

    burst: float
    per_s: float
    tokens: float = attrs.field(init=False)
    last_s: float | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst

    def credit(self, tokens: float) -> None:
        """Give back ``tokens`` (never above ``burst``)."""
        self.tokens = min(self.burst, self.tokens + tokens)

    def take(self, now_s: float) -> bool:
        if self.last_s is not None:
            self.tokens = min(self.burst, self.tokens + (now_s - self.last_s) * self.per_s)
        self.last_s = now_s
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@attrs.define
class FrameGate:
    """Reads frame headers from the client's byte stream (after the preface) and judges them.

    ``scan(data, now_s)`` must see every byte, in order; it returns ``None`` while the stream is
    acceptable and the first ``ConnectionRefusal`` otherwise. ``header_block_started_s`` is the
    time the open header block began (``None`` when no block is open), for the shell's timer.
    """

    max_frame_bytes: int = MAX_FRAME_BYTES
    max_continuations: int = MAX_CONTINUATION_FRAMES
    max_header_block_bytes: int = MAX_HEADER_BLOCK_BYTES
    control: TokenBucket = attrs.Factory(
        lambda: TokenBucket(CONTROL_FRAME_BURST, CONTROL_FRAMES_PER_S)
    )
    header_block_started_s: float | None = None
    _pending: bytearray = attrs.Factory(bytearray)  # a partial frame header
    _body_left: int = 0  # bytes of the current frame's payload still to come
    _continuations: int = 0
    _block_bytes: int = 0

    def scan(self, data: bytes | bytearray | memoryview, now_s: float) -> ConnectionRefusal | None:
        view = memoryview(data)
        while view:
            if self._body_left:
                step = min(self._body_left, len(view))
                self._body_left -= step
                view = view[step:]
                continue
            need = FRAME_HEADER_BYTES - len(self._pending)
            self._pending += view[:need]
            view = view[need:]
            if len(self._pending) < FRAME_HEADER_BYTES:
                return None
            header = bytes(self._pending)
            self._pending.clear()
            refusal = self._judge(header, now_s)
            if refusal is not None:
                return refusal
        return None

    def _judge(self, header: bytes, now_s: float) -> ConnectionRefusal | None:
        high, low, kind, flags, stream_id = struct.unpack(">BHBBL", header)
        length = (high << 16) | low
        stream_id &= 0x7FFFFFFF
        self._body_left = length
        if length > self.max_frame_bytes:
            return ConnectionRefusal(
                H2Error.FRAME_SIZE_ERROR,
                f"a frame of {length} bytes, over the {self.max_frame_bytes} advertised",
            )
        if self.header_block_started_s is not None:
            if kind != FRAME_CONTINUATION:
                return None  # h2 itself refuses anything but CONTINUATION here
            self._continuations += 1
            self._block_bytes += length
            if self._continuations > self.max_continuations:
                return ConnectionRefusal(
                    H2Error.ENHANCE_YOUR_CALM,
                    f"a header block of more than {self.max_continuations} CONTINUATION frames",
                )
            if self._block_bytes > self.max_header_block_bytes:
                return ConnectionRefusal(
                    H2Error.ENHANCE_YOUR_CALM,
                    f"a header block over {self.max_header_block_bytes} bytes",
                )
            if flags & FLAG_END_HEADERS:
                self.header_block_started_s = None
            return None
        if kind in (FRAME_HEADERS, FRAME_PUSH_PROMISE) and not flags & FLAG_END_HEADERS:
            self.header_block_started_s = now_s
            self._continuations = 0
            self._block_bytes = length
            return None
        if is_control_frame(kind, flags, stream_id, length) and not self.control.take(now_s):
            return ConnectionRefusal(
                H2Error.ENHANCE_YOUR_CALM,
                f"control frames faster than {self.control.per_s:g}/s "
                f"(burst {self.control.burst:g})",
            )
        return None

    def header_block_overdue(self, now_s: float, timeout_s: float = HEADER_BLOCK_TIMEOUT_S) -> bool:
        started = self.header_block_started_s
        return started is not None and now_s - started > timeout_s


def is_control_frame(kind: int, flags: int, stream_id: int, length: int) -> bool:
    """Frames that cost the server work but carry no request: what a flood is made of."""
    if kind in (FRAME_PING, FRAME_SETTINGS, FRAME_PRIORITY, FRAME_RST_STREAM):
        return True
    if kind == FRAME_WINDOW_UPDATE:
        return stream_id == 0
    if kind == FRAME_DATA:
        return length == 0 and not flags & FLAG_END_STREAM
    return False


# -- Gate 2: the request head -------------------------------------------------------------------


@attrs.frozen
class MalformedRequest(Exception):
    """A request head the gRPC spec refuses: answered on its stream, never the connection.

    ``http_status`` is 200 for a gRPC error status, or the HTTP status the spec asks for
    (415 for a non-gRPC content-type, 405 for a method other than POST).
    """

    code: GrpcCode
    message: str
    http_status: int = 200


@attrs.frozen
class RequestHead:
    """A request's head, checked: ``/service/method``, the deadline and the metadata."""

    service: str
    method: str
    timeout_s: float | None
    encoding: str  # one of SUPPORTED_ENCODINGS
    metadata: tuple[tuple[str, str], ...]  # custom metadata, in order (binary values as text)
    content_type: str = "application/grpc"  # as sent: the response echoes +proto


_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNIT_S = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_HEADER_NAME = re.compile(rb"[0-9a-z_.\-]+")
# A printable ASCII value, not starting or ending with a space or tab (RFC 9113 sec. 8.2.1).
_HEADER_VALUE = re.compile(rb"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?")
_PATH = re.compile(r"/([A-Za-z_][A-Za-z0-9_.]*)/([A-Za-z_][A-Za-z0-9_]*)")
_CONNECTION_HEADERS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
# Headers the gRPC layer consumes; the rest is the caller's metadata.
_RESERVED = frozenset(
    (b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding")
)
_REQUIRED_PSEUDO = (b":method", b":scheme", b":path")


def parse_grpc_timeout(text: str) -> float:
    """``grpc-timeout`` (1 to 8 digits and a unit of H M S m u n) in seconds.

    Raises:
        MalformedRequest: INTERNAL, naming the header (a bad timeout is a protocol error).
    """
    match = _TIMEOUT.fullmatch(text)
    if match is None:
        raise MalformedRequest(
            GrpcCode.INTERNAL,
            "grpc-timeout: expected 1 to 8 digits and a unit of H, M, S, m, u or n, "
            f"got {text[:20]!r}",
        )
    return min(MAX_DEADLINE_S, int(match.group(1)) * _TIMEOUT_UNIT_S[match.group(2)])


def check_request_head(headers: list[tuple[bytes, bytes]]) -> RequestHead:
    """Check a request's header block against the gRPC spec; never looks at the message.

    Raises:
        MalformedRequest: the first problem, with the status and HTTP status to answer with.
    """
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.startswith(b":"):
            if regular or name not in _REQUEST_PSEUDO or name in pseudo:
                raise MalformedRequest(
                    GrpcCode.INTERNAL, f"pseudo-header {_show(name)}: misplaced or repeated"
                )
            pseudo[name] = value
            continue
        if not _HEADER_NAME.fullmatch(name):
            raise MalformedRequest(
                GrpcCode.INTERNAL,
                f"header {_show(name)}: expected a name of lower-case letters, digits, _ . -",
            )
        if name in _CONNECTION_HEADERS:
            raise MalformedRequest(
                GrpcCode.INTERNAL, f"header {_show(name)}: not allowed in HTTP/2"
            )
        if not name.endswith(b"-bin") and not _HEADER_VALUE.fullmatch(value):
            code = GrpcCode.UNAUTHENTICATED if name == b"authorization" else GrpcCode.INTERNAL
            raise MalformedRequest(
                code,
                f"header {_show(name)}: expected printable ASCII without leading or trailing "
                "whitespace",
            )
        regular.append((name, value))
    for name in _REQUIRED_PSEUDO:
        if name not in pseudo:
            raise MalformedRequest(GrpcCode.INTERNAL, f"pseudo-header {_show(name)}: missing")
    if pseudo[b":method"] != b"POST":
        raise MalformedRequest(
            GrpcCode.INTERNAL,
            f":method: expected POST, got {_show(pseudo[b':method'])}",
            http_status=405,
        )
    first = {name: value for name, value in reversed(regular)}
    content_type = first.get(b"content-type", b"")
    if not (
        content_type == b"application/grpc"
        or content_type.startswith((b"application/grpc+", b"application/grpc;"))
    ):
        raise MalformedRequest(
            GrpcCode.INTERNAL,
            f"content-type: expected application/grpc, got {_show(content_type)}",
            http_status=415,
        )
    path = _PATH.fullmatch(pseudo[b":path"].decode("ascii", "replace"))
    if path is None:
        raise MalformedRequest(
            GrpcCode.UNIMPLEMENTED,
            f":path: expected /package.Service/Method, got {_show(pseudo[b':path'])}",
        )
    if first.get(b"te") != b"trailers":
        raise MalformedRequest(GrpcCode.INTERNAL, "te: expected trailers")
    timeout_s = None
    if b"grpc-timeout" in first:
        timeout_s = parse_grpc_timeout(first[b"grpc-timeout"].decode("ascii"))
    encoding = first.get(b"grpc-encoding", b"identity").decode("ascii")
    if encoding not in SUPPORTED_ENCODINGS:
        raise MalformedRequest(
            GrpcCode.UNIMPLEMENTED,
            f"grpc-encoding: expected one of {ACCEPT_ENCODING}, got {encoding[:40]!r}",
        )
    metadata = tuple(
        (name.decode("ascii"), value.decode("latin-1"))
        for name, value in regular
        if name not in _RESERVED
    )
    return RequestHead(
        path.group(1),
        path.group(2),
        timeout_s,
        encoding,
        metadata,
        content_type.decode("ascii", "replace"),
    )


def _show(raw: bytes) -> str:
    """A header name or value for an error message: short, printable."""
    text = raw[:40].decode("ascii", "replace")
    return repr("".join(c if c.isprintable() else "?" for c in text))


# -- Gate 3: messages ---------------------------------------------------------------------------


class MessageTooLarge(Exception):
    """A message over the limit (declared, or after inflation): RESOURCE_EXHAUSTED."""

    code = GrpcCode.RESOURCE_EXHAUSTED

    def __init__(self, limit_bytes: int, got: str) -> None:
        super().__init__(f"request message larger than {limit_bytes} bytes ({got})")
        self.message = str(self)


class BadMessage(Exception):
    """A message that cannot be decoded (bad compression flag or data): INTERNAL."""

    code = GrpcCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@attrs.frozen
class Frame:
    """One length-prefixed gRPC message, still encoded."""

    compressed: bool
    payload: bytes


@attrs.define
class Deframer:
    """Splits a stream's DATA into gRPC messages; ``feed`` raises on the first bad one.

    A message whose declared length passes ``limit_bytes`` is refused from its 5-byte prefix,
    before a byte of it is buffered, so a stream costs at most ``limit_bytes + 5`` here.
    """

    limit_bytes: int = MAX_MESSAGE_BYTES
    _buffer: bytearray = attrs.Factory(bytearray)

    def feed(self, data: bytes) -> list[Frame]:
        """The messages ``data`` completes.

        Raises:
            MessageTooLarge: a declared length over the limit.
            BadMessage: a compressed-flag byte other than 0 or 1.
        """
        self._buffer += data
        frames = []
        while len(self._buffer) >= 5:
            flag, length = struct.unpack_from(">BL", self._buffer)
            if flag not in (0, 1):
                raise BadMessage(f"compressed-flag: expected 0 or 1, got {flag}")
            if length > self.limit_bytes:
                raise MessageTooLarge(self.limit_bytes, f"declared {length}")
            if len(self._buffer) < 5 + length:
                break
            frames.append(Frame(flag == 1, bytes(self._buffer[5 : 5 + length])))
            del self._buffer[: 5 + length]
        return frames

    @property
    def partial(self) -> bool:
        """Whether a message has begun and not ended (the stream must not end here)."""
        return bool(self._buffer)


def decode_message(frame: Frame, encoding: str, limit_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """The message's bytes, inflated with at most ``limit_bytes`` of output.

    Raises:
        MessageTooLarge: it inflates past the limit (a bomb stops there).
        BadMessage: compressed without an encoding, or the data does not inflate.
    """
    if not frame.compressed:
        return frame.payload
    if encoding == "identity":
        raise BadMessage("compressed-flag set, but grpc-encoding is identity or missing")
    # gzip: a gzip header and trailer; deflate: the zlib format (as grpcio sends it).
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(frame.payload, limit_bytes + 1)
    except zlib.error as exc:
        raise BadMessage(f"{encoding} data does not inflate: {exc}") from None
    if len(out) > limit_bytes or inflater.unconsumed_tail:
        raise MessageTooLarge(limit_bytes, f"inflates past it from {len(frame.payload)}")
    if not inflater.eof:
        raise BadMessage(f"{encoding} data is truncated")
    return out
