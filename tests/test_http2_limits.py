"""The pure HTTP/2 limits: frame gate, request-head checks, deframing and bounded inflation."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mailer.core import http2_limits as lim
from trio_mailer.core.http2_limits import GrpcCode, H2Error

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def grpc_headers(path: str = HEALTH_CHECK, **extra: str) -> list[tuple[str, str]]:
    """A well-formed gRPC request head; ``extra`` adds headers (``_`` in names becomes ``-``).

    (As tests/raw_h2.py's, which loads trio: this file stays pure, as tools/mutate.py runs it
    without conftest and the service.)"""
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return headers + [(name.replace("_", "-"), value) for name, value in extra.items()]


def _frame(length: int, kind: int, flags: int = 0, stream_id: int = 0) -> bytes:
    header = struct.pack(">BHBBL", length >> 16, length & 0xFFFF, kind, flags, stream_id)
    return header + bytes(length)


def _head(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers]


# ---- FrameGate ----


def test_gate_passes_ordinary_frames_split_anywhere() -> None:
    """Frames cut at every byte boundary are judged the same as whole ones."""
    data = _frame(100, lim.FRAME_HEADERS, lim.FLAG_END_HEADERS, 1) + _frame(
        16384, lim.FRAME_DATA, 1, 1
    )
    gate = lim.FrameGate()
    for i in range(len(data)):
        assert gate.scan(data[i : i + 1], 0.0) is None


def test_gate_refuses_a_frame_over_16_kib_from_its_header() -> None:
    gate = lim.FrameGate()
    refusal = gate.scan(_frame(16385, lim.FRAME_DATA, 0, 1)[:9], 0.0)
    assert refusal is not None and refusal.code == H2Error.FRAME_SIZE_ERROR


def test_gate_counts_continuation_frames() -> None:
    gate = lim.FrameGate()
    assert gate.scan(_frame(10, lim.FRAME_HEADERS, 0, 1), 5.0) is None
    assert gate.header_block_started_s == 5.0
    for _ in range(lim.MAX_CONTINUATION_FRAMES):
        assert gate.scan(_frame(10, lim.FRAME_CONTINUATION, 0, 1), 5.0) is None
    refusal = gate.scan(_frame(10, lim.FRAME_CONTINUATION, 0, 1), 5.0)
    assert refusal is not None and refusal.code == H2Error.ENHANCE_YOUR_CALM


def test_gate_bounds_the_header_block_bytes() -> None:
    gate = lim.FrameGate()
    assert gate.scan(_frame(16384, lim.FRAME_HEADERS, 0, 1), 0.0) is None
    assert gate.scan(_frame(16384, lim.FRAME_CONTINUATION, 0, 1), 0.0) is None
    refusal = gate.scan(_frame(1, lim.FRAME_CONTINUATION, 0, 1), 0.0)
    assert refusal is not None and "header block over" in refusal.reason


def test_gate_ends_the_block_and_its_timer_on_end_headers() -> None:
    gate = lim.FrameGate()
    gate.scan(_frame(10, lim.FRAME_HEADERS, 0, 1), 1.0)
    assert gate.header_block_overdue(1.0 + lim.HEADER_BLOCK_TIMEOUT_S + 1)
    gate.scan(_frame(10, lim.FRAME_CONTINUATION, lim.FLAG_END_HEADERS, 1), 2.0)
    assert gate.header_block_started_s is None
    assert not gate.header_block_overdue(100.0)


@pytest.mark.parametrize(
    ("kind", "flags", "stream_id", "length", "control"),
    [
        (lim.FRAME_PING, 0, 0, 8, True),
        (lim.FRAME_SETTINGS, 0, 0, 0, True),
        (lim.FRAME_PRIORITY, 0, 1, 5, True),
        (lim.FRAME_RST_STREAM, 0, 1, 4, True),
        (lim.FRAME_WINDOW_UPDATE, 0, 0, 4, True),
        (lim.FRAME_WINDOW_UPDATE, 0, 1, 4, False),
        (lim.FRAME_DATA, 0, 1, 0, True),
        (lim.FRAME_DATA, lim.FLAG_END_STREAM, 1, 0, False),
        (lim.FRAME_DATA, 0, 1, 10, False),
        (lim.FRAME_HEADERS, lim.FLAG_END_HEADERS, 1, 10, False),
    ],
)
def test_control_frames_are_the_ones_that_carry_no_request(
    kind: int, flags: int, stream_id: int, length: int, control: bool
) -> None:
    assert lim.is_control_frame(kind, flags, stream_id, length) is control


def test_control_frames_beyond_the_burst_are_refused_and_the_bucket_refills() -> None:
    gate = lim.FrameGate(control=lim.TokenBucket(3, 10.0))
    ping = _frame(8, lim.FRAME_PING)
    assert [gate.scan(ping, 0.0) for _ in range(3)] == [None, None, None]
    refusal = gate.scan(ping, 0.0)
    assert refusal is not None and refusal.code == H2Error.ENHANCE_YOUR_CALM
    gate = lim.FrameGate(control=lim.TokenBucket(3, 10.0))
    for i in range(100):  # 10 per second, sent at 10 per second: never refused
        assert gate.scan(ping, i / 10) is None


def test_log_budget_drops_lines_past_the_window_and_counts_them() -> None:
    budget = lim.LogBudget(lines=2, window_s=10.0)
    assert [budget.allow("x", 0.0) for _ in range(4)] == [
        (True, 0),
        (True, 0),
        (False, 0),
        (False, 0),
    ]
    assert budget.allow("y", 1.0) == (True, 0)  # kinds are counted apart
    assert budget.allow("x", 10.0) == (True, 2)  # a new window says what was dropped
    assert budget.allow("x", 11.0) == (True, 0)


def test_credit_refills_the_bucket_up_to_its_burst() -> None:
    bucket = lim.TokenBucket(3, 0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    bucket.credit(2)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    bucket.credit(100)
    assert bucket.tokens == 3


# ---- grpc-timeout ----


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1S", 1.0),
        ("200m", 0.2),
        ("5M", 300.0),
        ("1H", 3600.0),
        ("1000u", 0.001),
        ("99999999H", lim.MAX_DEADLINE_S),
        ("0S", 0.0),
        ("1000000n", 0.001),
    ],
)
def test_grpc_timeout_parses(text: str, seconds: float) -> None:
    assert lim.parse_grpc_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "S", "1s", "-1S", "1.5S", "123456789S", " 1S", "1S "])
def test_bad_grpc_timeout_is_internal_naming_the_header(text: str) -> None:
    with pytest.raises(lim.MalformedRequest) as info:
        lim.parse_grpc_timeout(text)
    assert info.value.code == GrpcCode.INTERNAL and info.value.message.startswith("grpc-timeout")


# ---- the request head ----


def test_a_good_head_gives_service_method_deadline_encoding_and_metadata() -> None:
    head = lim.check_request_head(
        _head(
            grpc_headers(
                "/trio_mailer.v1.Mailer/SendCode",
                grpc_timeout="2S",
                grpc_encoding="gzip",
                authorization="Bearer x",
                user_agent="grpc-python/1.85",
            )
        )
    )
    assert head == lim.RequestHead(
        "trio_mailer.v1.Mailer",
        "SendCode",
        2.0,
        "gzip",
        (("authorization", "Bearer x"), ("user-agent", "grpc-python/1.85")),
    )


def test_content_type_with_a_subtype_is_accepted() -> None:
    headers = [
        (k, "application/grpc+proto" if k == "content-type" else v) for k, v in grpc_headers()
    ]
    head = lim.check_request_head(_head(headers))
    assert (head.encoding, head.content_type) == ("identity", "application/grpc+proto")
    assert lim.check_request_head(_head(grpc_headers())).content_type == "application/grpc"


def test_binary_metadata_values_are_not_checked_as_text() -> None:
    headers = [*_head(grpc_headers()), (b"trace-bin", b"\x00\xff ")]
    assert lim.check_request_head(headers).metadata == (("trace-bin", "\x00\xff "),)


@pytest.mark.parametrize(
    ("change", "code", "http_status"),
    [
        ({"content-type": "text/html"}, GrpcCode.INTERNAL, 415),
        ({":method": "PUT"}, GrpcCode.INTERNAL, 405),
        ({":path": "/x"}, GrpcCode.UNIMPLEMENTED, 200),
        ({"te": "deflate"}, GrpcCode.INTERNAL, 200),
        ({"grpc-encoding": "br"}, GrpcCode.UNIMPLEMENTED, 200),
        ({"grpc-timeout": "soon"}, GrpcCode.INTERNAL, 200),
    ],
)
def test_malformed_heads_name_their_status(
    change: dict[str, str], code: GrpcCode, http_status: int
) -> None:
    headers = dict(grpc_headers())
    headers.update(change)
    with pytest.raises(lim.MalformedRequest) as info:
        lim.check_request_head(_head(list(headers.items())))
    assert (info.value.code, info.value.http_status) == (code, http_status)


@given(st.lists(st.tuples(st.binary(max_size=30), st.binary(max_size=30)), max_size=12))
def test_any_head_is_either_accepted_or_refused_with_a_status(
    raw: list[tuple[bytes, bytes]],
) -> None:
    """No header block makes the check raise anything but MalformedRequest."""
    try:
        head = lim.check_request_head(_head(grpc_headers()) + raw)
    except lim.MalformedRequest as bad:
        assert bad.code in GrpcCode and bad.message
    else:
        assert head.service == "grpc.health.v1.Health"


# ---- Deframer and decode_message ----


def test_deframer_refuses_an_oversized_message_from_its_prefix() -> None:
    deframer = lim.Deframer(4096)
    with pytest.raises(lim.MessageTooLarge):
        deframer.feed(b"\x00" + struct.pack(">L", 4097))


def test_deframer_refuses_an_unknown_compressed_flag() -> None:
    with pytest.raises(lim.BadMessage):
        lim.Deframer().feed(b"\x02\x00\x00\x00\x00")


@given(st.lists(st.binary(max_size=100), max_size=5), st.integers(1, 50))
def test_deframer_returns_every_message_however_the_bytes_are_cut(
    messages: list[bytes], step: int
) -> None:
    wire = b"".join(b"\x00" + struct.pack(">L", len(m)) + m for m in messages)
    deframer = lim.Deframer()
    frames = []
    for i in range(0, len(wire), step):
        frames += deframer.feed(wire[i : i + step])
    assert [f.payload for f in frames] == messages and not deframer.partial


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
def test_gzip_and_deflate_inflate_up_to_the_limit(encoding: str, compress) -> None:
    exact = lim.Frame(True, compress(b"a" * 4096))
    assert lim.decode_message(exact, encoding, 4096) == b"a" * 4096
    over = lim.Frame(True, compress(b"a" * 4097))
    with pytest.raises(lim.MessageTooLarge):
        lim.decode_message(over, encoding, 4096)


def test_a_bomb_stops_at_the_limit() -> None:
    bomb = lim.Frame(True, zlib.compress(bytes(10_000_000)))  # 10 MB from about 10 KB
    with pytest.raises(lim.MessageTooLarge):
        lim.decode_message(bomb, "deflate", 4096)


@pytest.mark.parametrize(
    ("frame", "encoding"),
    [
        (lim.Frame(True, b"plain"), "identity"),
        (lim.Frame(True, b"not gzip"), "gzip"),
        (lim.Frame(True, zlib.compress(b"abc")[:-3]), "deflate"),
        (lim.Frame(True, zlib.compress(b"abc")), "gzip"),  # deflate data, gzip announced
    ],
)
def test_undecodable_messages_are_bad_messages(frame: lim.Frame, encoding: str) -> None:
    with pytest.raises(lim.BadMessage):
        lim.decode_message(frame, encoding)


def test_the_module_is_pure() -> None:
    """Importing it loads none of trio, h2, purerpc or anyio."""
    code = (
        "import sys, trio_mailer.core.http2_limits;"
        "bad = [m for m in ('trio', 'h2', 'purerpc', 'anyio', 'hyperframe') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the documented limits and the protocol's own numbers ----


def test_the_limits_are_the_ones_the_readme_documents() -> None:
    """README "The gRPC port under attack": a change here is a change of what a client may cost,
    and must change that table too."""
    assert {
        "MAX_MESSAGE_BYTES": lim.MAX_MESSAGE_BYTES,
        "MAX_FRAME_BYTES": lim.MAX_FRAME_BYTES,
        "MAX_HEADER_LIST_BYTES": lim.MAX_HEADER_LIST_BYTES,
        "MAX_HEADER_BLOCK_BYTES": lim.MAX_HEADER_BLOCK_BYTES,
        "MAX_CONTINUATION_FRAMES": lim.MAX_CONTINUATION_FRAMES,
        "MAX_CONCURRENT_STREAMS": lim.MAX_CONCURRENT_STREAMS,
        "STREAM_WINDOW_BYTES": lim.STREAM_WINDOW_BYTES,
        "CONNECTION_BUFFER_BYTES": lim.CONNECTION_BUFFER_BYTES,
        "CONTROL_FRAME_BURST": lim.CONTROL_FRAME_BURST,
        "CONTROL_FRAMES_PER_S": lim.CONTROL_FRAMES_PER_S,
        "CONTROL_FRAMES_PER_ANSWERED_CALL": lim.CONTROL_FRAMES_PER_ANSWERED_CALL,
        "FEED_CHUNK_BYTES": lim.FEED_CHUNK_BYTES,
        "REFUSAL_BURST": lim.REFUSAL_BURST,
        "REFUSALS_PER_S": lim.REFUSALS_PER_S,
        "RESET_BURST": lim.RESET_BURST,
        "RESETS_PER_S": lim.RESETS_PER_S,
        "RESETS_PER_ANSWERED_CALL": lim.RESETS_PER_ANSWERED_CALL,
        "DEADLINE_RESET_SLACK_S": lim.DEADLINE_RESET_SLACK_S,
        "DRAIN_PING_TIMEOUT_S": lim.DRAIN_PING_TIMEOUT_S,
        "MAX_STREAM_ID": lim.MAX_STREAM_ID,
        "READ_CHUNK_BYTES": lim.READ_CHUNK_BYTES,
        "OUTPUT_HIGH_WATER_BYTES": lim.OUTPUT_HIGH_WATER_BYTES,
        "MAX_UNSENT_OUTPUT_BYTES": lim.MAX_UNSENT_OUTPUT_BYTES,
        "PREFACE_TIMEOUT_S": lim.PREFACE_TIMEOUT_S,
        "HEADER_BLOCK_TIMEOUT_S": lim.HEADER_BLOCK_TIMEOUT_S,
        "CLOSE_GRACE_S": lim.CLOSE_GRACE_S,
        "MAX_DEADLINE_S": lim.MAX_DEADLINE_S,
        "LOG_LINES_PER_WINDOW": lim.LOG_LINES_PER_WINDOW,
        "LOG_WINDOW_S": lim.LOG_WINDOW_S,
    } == {
        "MAX_MESSAGE_BYTES": 4096,
        "MAX_FRAME_BYTES": 16384,
        "MAX_HEADER_LIST_BYTES": 16384,
        "MAX_HEADER_BLOCK_BYTES": 32768,
        "MAX_CONTINUATION_FRAMES": 8,
        "MAX_CONCURRENT_STREAMS": 100,
        "STREAM_WINDOW_BYTES": 8202,
        "CONNECTION_BUFFER_BYTES": 820200,
        "CONTROL_FRAME_BURST": 200,
        "CONTROL_FRAMES_PER_S": 100.0,
        "CONTROL_FRAMES_PER_ANSWERED_CALL": 4,
        "FEED_CHUNK_BYTES": 1024,
        "REFUSAL_BURST": 50,
        "REFUSALS_PER_S": 10.0,
        "RESET_BURST": 500,
        "RESETS_PER_S": 200.0,
        "RESETS_PER_ANSWERED_CALL": 10,
        "DEADLINE_RESET_SLACK_S": 0.1,
        "DRAIN_PING_TIMEOUT_S": 1.0,
        "MAX_STREAM_ID": 2147483647,
        "READ_CHUNK_BYTES": 16393,
        "OUTPUT_HIGH_WATER_BYTES": 65536,
        "MAX_UNSENT_OUTPUT_BYTES": 262144,
        "PREFACE_TIMEOUT_S": 10.0,
        "HEADER_BLOCK_TIMEOUT_S": 10.0,
        "CLOSE_GRACE_S": 1.0,
        "MAX_DEADLINE_S": 86400.0,
        "LOG_LINES_PER_WINDOW": 10,
        "LOG_WINDOW_S": 10.0,
    }


def test_the_protocol_numbers_are_the_specs() -> None:
    """gRPC statuscodes.md, RFC 9113 sec. 6 (frame types, flags), sec. 7 (error codes), 3.4."""
    assert {c.name: c.value for c in GrpcCode} == {
        "OK": 0,
        "CANCELLED": 1,
        "UNKNOWN": 2,
        "INVALID_ARGUMENT": 3,
        "DEADLINE_EXCEEDED": 4,
        "RESOURCE_EXHAUSTED": 8,
        "UNIMPLEMENTED": 12,
        "INTERNAL": 13,
        "UNAVAILABLE": 14,
        "UNAUTHENTICATED": 16,
    }
    assert {e.name: e.value for e in H2Error} == {
        "NO_ERROR": 0,
        "PROTOCOL_ERROR": 1,
        "INTERNAL_ERROR": 2,
        "FLOW_CONTROL_ERROR": 3,
        "FRAME_SIZE_ERROR": 6,
        "REFUSED_STREAM": 7,
        "CANCEL": 8,
        "ENHANCE_YOUR_CALM": 11,
    }
    assert [
        lim.FRAME_DATA,
        lim.FRAME_HEADERS,
        lim.FRAME_PRIORITY,
        lim.FRAME_RST_STREAM,
        lim.FRAME_SETTINGS,
        lim.FRAME_PUSH_PROMISE,
        lim.FRAME_PING,
        lim.FRAME_GOAWAY,
        lim.FRAME_WINDOW_UPDATE,
        lim.FRAME_CONTINUATION,
    ] == list(range(10))
    assert (lim.FLAG_END_STREAM, lim.FLAG_END_HEADERS, lim.FRAME_HEADER_BYTES) == (1, 4, 9)
    assert lim.PREFACE == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert lim.SUPPORTED_ENCODINGS == ("identity", "gzip", "deflate")
    assert lim.ACCEPT_ENCODING == "identity,gzip,deflate"


# ---- more of the frame gate: each boundary ----


def test_a_frame_of_exactly_the_limit_passes() -> None:
    assert lim.FrameGate().scan(_frame(16384, lim.FRAME_DATA, 0, 1), 0.0) is None
    refusal = lim.FrameGate(max_frame_bytes=100).scan(_frame(101, lim.FRAME_DATA, 0, 1)[:9], 0.0)
    assert refusal == lim.ConnectionRefusal(
        H2Error.FRAME_SIZE_ERROR, "a frame of 101 bytes, over the 100 advertised"
    )


def test_a_frame_length_uses_all_24_bits() -> None:
    """0x01_0000 bytes (the high byte set, the low 16 bits zero) is over 16 KiB."""
    refusal = lim.FrameGate().scan(_frame(0x10000, lim.FRAME_DATA, 0, 1)[:9], 0.0)
    assert refusal is not None and refusal.reason.startswith("a frame of 65536 bytes")


def test_the_body_of_a_frame_is_skipped_not_read_as_headers() -> None:
    """A PING's 8 payload bytes look like nothing: only whole frame headers are judged."""
    gate = lim.FrameGate(control=lim.TokenBucket(2, 0.0))
    assert gate.scan(_frame(8, lim.FRAME_PING) + _frame(8, lim.FRAME_PING), 0.0) is None
    assert gate.scan(_frame(8, lim.FRAME_PING), 0.0) is not None  # the third: over the burst


def test_continuations_and_bytes_at_their_limits_pass() -> None:
    gate = lim.FrameGate(max_continuations=2, max_header_block_bytes=30)
    assert gate.scan(_frame(10, lim.FRAME_HEADERS, 0, 1), 0.0) is None
    assert gate.scan(_frame(10, lim.FRAME_CONTINUATION, 0, 1), 0.0) is None
    assert gate.scan(_frame(10, lim.FRAME_CONTINUATION, lim.FLAG_END_HEADERS, 1), 0.0) is None
    assert gate.header_block_started_s is None
    # A new block counts from zero again.
    assert gate.scan(_frame(10, lim.FRAME_HEADERS, 0, 3), 1.0) is None
    assert gate.scan(_frame(10, lim.FRAME_CONTINUATION, 0, 3), 1.0) is None
    assert gate.scan(_frame(11, lim.FRAME_CONTINUATION, 0, 3), 1.0) == lim.ConnectionRefusal(
        H2Error.ENHANCE_YOUR_CALM, "a header block over 30 bytes"
    )
    gate = lim.FrameGate(max_continuations=2)
    for frame in [_frame(1, lim.FRAME_HEADERS, 0, 1)] + [_frame(1, lim.FRAME_CONTINUATION)] * 2:
        assert gate.scan(frame, 0.0) is None
    assert gate.scan(_frame(1, lim.FRAME_CONTINUATION), 0.0) == lim.ConnectionRefusal(
        H2Error.ENHANCE_YOUR_CALM, "a header block of more than 2 CONTINUATION frames"
    )


def test_a_push_promise_opens_a_header_block_too() -> None:
    gate = lim.FrameGate()
    gate.scan(_frame(4, lim.FRAME_PUSH_PROMISE, 0, 1), 3.0)
    assert gate.header_block_started_s == 3.0


def test_headers_with_end_headers_open_no_block() -> None:
    gate = lim.FrameGate()
    gate.scan(_frame(4, lim.FRAME_HEADERS, lim.FLAG_END_HEADERS | lim.FLAG_END_STREAM, 1), 3.0)
    assert gate.header_block_started_s is None


def test_inside_a_block_another_frame_is_left_to_h2_and_not_counted() -> None:
    """Only CONTINUATION may follow; h2 refuses the rest, and a PING there costs no token."""
    gate = lim.FrameGate(control=lim.TokenBucket(1, 0.0))
    gate.scan(_frame(4, lim.FRAME_HEADERS, 0, 1), 0.0)
    assert gate.scan(_frame(8, lim.FRAME_PING), 0.0) is None
    assert gate.scan(_frame(8, lim.FRAME_PING), 0.0) is None
    assert gate.header_block_started_s == 0.0


def test_the_header_block_timer_fires_only_past_its_timeout() -> None:
    gate = lim.FrameGate()
    assert not gate.header_block_overdue(1e9)  # no block open
    gate.scan(_frame(4, lim.FRAME_HEADERS, 0, 1), 100.0)
    assert not gate.header_block_overdue(110.0)  # exactly the 10 s default
    assert gate.header_block_overdue(110.5)
    assert not gate.header_block_overdue(102.0, timeout_s=2.0)
    assert gate.header_block_overdue(102.5, timeout_s=2.0)


def test_the_reserved_bit_of_the_stream_id_is_ignored() -> None:
    """WINDOW_UPDATE on stream 0 with the reserved high bit set is still a control frame."""
    gate = lim.FrameGate(control=lim.TokenBucket(1, 0.0))
    frame = _frame(4, lim.FRAME_WINDOW_UPDATE, 0, 0x80000000)
    assert gate.scan(frame, 0.0) is None
    refusal = gate.scan(frame, 0.0)
    assert refusal == lim.ConnectionRefusal(
        H2Error.ENHANCE_YOUR_CALM, "control frames faster than 0/s (burst 1)"
    )


def test_the_default_gate_takes_a_burst_of_200_control_frames() -> None:
    gate = lim.FrameGate()
    ping = _frame(8, lim.FRAME_PING)
    assert all(gate.scan(ping, 0.0) is None for _ in range(200))
    refusal = gate.scan(ping, 0.0)
    assert refusal is not None and refusal.reason == "control frames faster than 100/s (burst 200)"


def test_the_bucket_refills_in_proportion_to_the_time_passed() -> None:
    bucket = lim.TokenBucket(10, 4.0)
    assert bucket.tokens == 10 and bucket.last_s is None
    for _ in range(10):
        assert bucket.take(0.0)
    assert not bucket.take(0.0)
    assert bucket.take(0.25)  # 0.25 s at 4/s: exactly one token
    assert not bucket.take(0.25)
    assert bucket.take(0.5) and bucket.tokens == 0
    assert bucket.take(100.0) and bucket.tokens == 9  # refilled to the burst, one taken
    bucket.credit(0.5)
    assert bucket.tokens == 9.5


def test_the_log_budget_opens_a_new_window_exactly_at_its_end() -> None:
    budget = lim.LogBudget(lines=1, window_s=10.0)
    assert budget.allow("x", 0.0) == (True, 0)
    assert budget.allow("x", 9.9) == (False, 0)
    assert budget.allow("x", 9.95) == (False, 0)
    assert budget.allow("x", 10.0) == (True, 2)
    default = lim.LogBudget()
    assert [default.allow("y", 0.0)[0] for _ in range(11)] == [True] * 10 + [False]
    assert default.allow("y", 9.0) == (False, 0)
    assert default.allow("y", 10.0) == (True, 2)


# ---- more of the request head ----


def _refused(headers: list[tuple[bytes, bytes]]) -> lim.MalformedRequest:
    with pytest.raises(lim.MalformedRequest) as info:
        lim.check_request_head(headers)
    return info.value


@pytest.mark.parametrize(
    ("headers", "code", "message"),
    [
        (
            [*_head(grpc_headers()), (b":method", b"POST")],
            GrpcCode.INTERNAL,
            "pseudo-header ':method': misplaced or repeated",
        ),
        (
            [(b":method", b"POST"), (b":method", b"POST"), *_head(grpc_headers())[1:]],
            GrpcCode.INTERNAL,
            "pseudo-header ':method': misplaced or repeated",
        ),
        (
            [(b":status", b"200"), *_head(grpc_headers())],
            GrpcCode.INTERNAL,
            "pseudo-header ':status': misplaced or repeated",
        ),
        (
            [*_head(grpc_headers()), (b"X-Upper", b"1")],
            GrpcCode.INTERNAL,
            "header 'X-Upper': expected a name of lower-case letters, digits, _ . -",
        ),
        (
            [*_head(grpc_headers()), (b"connection", b"close")],
            GrpcCode.INTERNAL,
            "header 'connection': not allowed in HTTP/2",
        ),
        (
            [*_head(grpc_headers()), (b"x-note", b"trailing ")],
            GrpcCode.INTERNAL,
            "header 'x-note': expected printable ASCII without leading or trailing whitespace",
        ),
        (
            [*_head(grpc_headers()), (b"authorization", b"Bearer \x01")],
            GrpcCode.UNAUTHENTICATED,
            "header 'authorization': expected printable ASCII without leading or trailing "
            "whitespace",
        ),
        (
            [h for h in _head(grpc_headers()) if h[0] != b":path"],
            GrpcCode.INTERNAL,
            "pseudo-header ':path': missing",
        ),
        (
            [h for h in _head(grpc_headers()) if h[0] != b":scheme"],
            GrpcCode.INTERNAL,
            "pseudo-header ':scheme': missing",
        ),
        (
            [h for h in _head(grpc_headers()) if h[0] != b"te"],
            GrpcCode.INTERNAL,
            "te: expected trailers",
        ),
        (
            [h for h in _head(grpc_headers()) if h[0] != b"content-type"],
            GrpcCode.INTERNAL,
            "content-type: expected application/grpc, got ''",
        ),
        (
            [
                (k, b"application/grpcx" if k == b"content-type" else v)
                for k, v in _head(grpc_headers())
            ],
            GrpcCode.INTERNAL,
            "content-type: expected application/grpc, got 'application/grpcx'",
        ),
        (
            [(k, b"GET" if k == b":method" else v) for k, v in _head(grpc_headers())],
            GrpcCode.INTERNAL,
            ":method: expected POST, got 'GET'",
        ),
        (
            [(k, b"/Svc" if k == b":path" else v) for k, v in _head(grpc_headers())],
            GrpcCode.UNIMPLEMENTED,
            ":path: expected /package.Service/Method, got '/Svc'",
        ),
        (
            [*_head(grpc_headers()), (b"grpc-encoding", b"br")],
            GrpcCode.UNIMPLEMENTED,
            "grpc-encoding: expected one of identity,gzip,deflate, got 'br'",
        ),
    ],
)
def test_each_refusal_of_a_head_says_what_was_wrong(
    headers: list[tuple[bytes, bytes]], code: GrpcCode, message: str
) -> None:
    refused = _refused(headers)
    assert (refused.code, refused.message) == (code, message)


@pytest.mark.parametrize(
    "content_type", ["application/grpc", "application/grpc+json", "application/grpc;v=1"]
)
def test_grpc_content_types_with_a_subtype_or_parameters_are_accepted(content_type: str) -> None:
    headers = [(k, content_type if k == "content-type" else v) for k, v in grpc_headers("/a.B/C")]
    head = lim.check_request_head(_head(headers))
    assert (head.service, head.method, head.timeout_s, head.metadata) == ("a.B", "C", None, ())


def test_the_first_of_repeated_headers_counts_and_all_stay_in_the_metadata() -> None:
    headers = _head(grpc_headers(grpc_timeout="3S", grpc_encoding="deflate"))
    headers += [(b"grpc-timeout", b"9S"), (b"x-a", b"1"), (b"x-a", b"2"), (b"te", b"nope")]
    head = lim.check_request_head(headers)
    assert (head.timeout_s, head.encoding) == (3.0, "deflate")
    assert head.metadata == (("x-a", "1"), ("x-a", "2"))


def test_a_metadata_value_may_hold_inner_spaces_and_a_name_dots_and_underscores() -> None:
    headers = [*_head(grpc_headers()), (b"x_a.b-c", b"a  b"), (b"x-one", b"!")]
    assert lim.check_request_head(headers).metadata == (("x_a.b-c", "a  b"), ("x-one", "!"))


def test_an_empty_metadata_value_is_accepted() -> None:
    assert lim.check_request_head([*_head(grpc_headers()), (b"x-e", b"")]).metadata == (
        ("x-e", ""),
    )


def test_unprintable_bytes_in_a_refusal_are_shown_as_question_marks_and_cut() -> None:
    refused = _refused([*_head(grpc_headers()), (b"X\x00" + b"y" * 60, b"1")])
    assert refused.message.startswith("header 'X?" + "y" * 38 + "': expected a name")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("99999999S", 86400.0),
        ("24H", 86400.0),
        ("1441M", 86400.0),
        ("1439M", 86340.0),
        ("1n", 1e-9),
        ("12345678u", 12.345678),
    ],
)
def test_grpc_timeouts_at_their_bounds(text: str, seconds: float) -> None:
    assert lim.parse_grpc_timeout(text) == pytest.approx(seconds, rel=1e-12)


def test_a_bad_grpc_timeout_message_shows_the_value_cut() -> None:
    with pytest.raises(lim.MalformedRequest) as info:
        lim.parse_grpc_timeout("x" * 30)
    assert info.value.message == (
        f"grpc-timeout: expected 1 to 8 digits and a unit of H, M, S, m, u or n, got {'x' * 20!r}"
    )
    assert info.value.http_status == 200


# ---- more of the deframer and inflation ----


def test_a_message_of_exactly_the_limit_passes_and_its_flag_is_kept() -> None:
    deframer = lim.Deframer(10)
    wire = b"\x01" + struct.pack(">L", 10) + b"x" * 10 + b"\x00" + struct.pack(">L", 0)
    assert deframer.feed(wire[:7]) == []
    assert deframer.partial
    assert deframer.feed(wire[7:]) == [lim.Frame(True, b"x" * 10), lim.Frame(False, b"")]
    assert not deframer.partial
    with pytest.raises(lim.MessageTooLarge) as info:
        deframer.feed(b"\x00" + struct.pack(">L", 11))
    assert info.value.message == "request message larger than 10 bytes (declared 11)"
    assert info.value.code == GrpcCode.RESOURCE_EXHAUSTED


def test_the_default_deframer_takes_4_kib() -> None:
    wire = b"\x00" + struct.pack(">L", 4096) + bytes(4096)
    assert lim.Deframer().feed(wire) == [lim.Frame(False, bytes(4096))]
    with pytest.raises(lim.MessageTooLarge):
        lim.Deframer().feed(b"\x00" + struct.pack(">L", 4097))


def test_a_prefix_is_judged_once_all_five_bytes_are_there() -> None:
    deframer = lim.Deframer(10)
    assert deframer.feed(b"\x00\x00\x00\x00") == [] and deframer.partial
    with pytest.raises(lim.BadMessage) as info:
        lim.Deframer().feed(b"\x07" + struct.pack(">L", 0))
    assert info.value.message == "compressed-flag: expected 0 or 1, got 7"
    assert info.value.code == GrpcCode.INTERNAL


def test_an_uncompressed_message_is_returned_as_it_is_whatever_the_encoding() -> None:
    assert lim.decode_message(lim.Frame(False, b"raw"), "gzip") == b"raw"


def test_inflation_errors_say_what_went_wrong() -> None:
    with pytest.raises(lim.BadMessage) as info:
        lim.decode_message(lim.Frame(True, b"x"), "identity")
    assert info.value.message == "compressed-flag set, but grpc-encoding is identity or missing"
    with pytest.raises(lim.BadMessage) as info:
        lim.decode_message(lim.Frame(True, zlib.compress(b"abcdef")[:-2]), "deflate")
    assert info.value.message == "deflate data is truncated"
    with pytest.raises(lim.BadMessage) as info:
        lim.decode_message(lim.Frame(True, b"not gzip"), "gzip")
    assert info.value.message.startswith("gzip data does not inflate: ")
    with pytest.raises(lim.MessageTooLarge) as info:
        lim.decode_message(lim.Frame(True, gzip.compress(b"a" * 11)), "gzip", 10)
    assert info.value.message.startswith("request message larger than 10 bytes (inflates past it")


def test_the_default_inflation_bound_is_4_kib() -> None:
    assert lim.decode_message(lim.Frame(True, gzip.compress(bytes(4096))), "gzip") == bytes(4096)
    with pytest.raises(lim.MessageTooLarge):
        lim.decode_message(lim.Frame(True, gzip.compress(bytes(4097))), "gzip")


def test_a_frame_header_split_across_reads_is_judged_whole() -> None:
    """Five bytes of a header, then the rest with the next frame: both frames are judged."""
    header = struct.pack(">BHBBL", 0, 0xFFFF, lim.FRAME_DATA, 0, 1)
    gate = lim.FrameGate()
    assert gate.scan(_frame(4, lim.FRAME_PING)[:5], 0.0) is None
    assert gate.scan(_frame(4, lim.FRAME_PING)[5:] + header[:5], 0.0) is None
    refusal = gate.scan(header[5:], 0.0)
    assert refusal == lim.ConnectionRefusal(
        H2Error.FRAME_SIZE_ERROR, "a frame of 65535 bytes, over the 16384 advertised"
    )


def test_window_updates_on_a_stream_are_not_control_frames_to_the_gate() -> None:
    """Only stream 0's WINDOW_UPDATE counts against the bucket (the reserved bit masked off,
    nothing else)."""
    gate = lim.FrameGate(control=lim.TokenBucket(1, 0.0))
    on_stream_1 = _frame(4, lim.FRAME_WINDOW_UPDATE, 0, 1)
    assert all(gate.scan(on_stream_1, 0.0) is None for _ in range(5))


def test_the_log_budget_counts_each_window_from_its_own_start() -> None:
    """Windows start at the first line, not at 0; a new window allows exactly ``lines``."""
    budget = lim.LogBudget(lines=2, window_s=10.0)
    assert [budget.allow("x", 100.0)[0] for _ in range(3)] == [True, True, False]
    assert budget.allow("x", 105.0) == (False, 0)  # the window that began at 100 goes on
    assert [budget.allow("x", 110.0) for _ in range(3)] == [(True, 2), (True, 0), (False, 0)]


def test_a_path_that_is_not_ascii_is_unimplemented_not_a_crash() -> None:
    base = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pkg.Svc/M\xff"),
        (b":authority", b"x"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    with pytest.raises(lim.MalformedRequest) as info:
        lim.check_request_head(base)
    assert info.value.code == lim.GrpcCode.UNIMPLEMENTED


def test_a_bad_message_says_what_is_wrong() -> None:
    error = lim.BadMessage("gzip data is truncated")
    assert (str(error), error.message) == ("gzip data is truncated", "gzip data is truncated")
