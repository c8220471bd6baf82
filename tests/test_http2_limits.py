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

from .raw_h2 import grpc_headers


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
    assert lim.check_request_head(_head(headers)).encoding == "identity"


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
    bomb = lim.Frame(True, zlib.compress(bytes(100_000_000)))
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
