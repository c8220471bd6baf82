"""The ClientHello's ALPN list (core/tls_hello.py), read from real OpenSSL ClientHellos and
from garbage. The listener's use of it: tests/test_grpc_alpn.py."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_mailer.core import tls_hello


def client_hello(alpn: list[str] | None, server_name: str = "localhost") -> bytes:
    """The first record a stock OpenSSL client sends, offering ``alpn`` (None: no ALPN)."""
    context = ssl.create_default_context()
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    ("alpn", "offered"),
    [
        (["h2"], [b"h2"]),
        (["http/1.1"], [b"http/1.1"]),
        (["h2", "http/1.1"], [b"h2", b"http/1.1"]),
        (None, []),
    ],
)
def test_the_offered_protocols_are_read_from_a_real_client_hello(alpn, offered) -> None:
    hello = client_hello(alpn)
    assert tls_hello.record_bytes_needed(hello) == len(hello)
    assert tls_hello.offered_alpn(hello) == offered
    assert tls_hello.refuse_alpn(hello, b"h2") == (alpn == ["http/1.1"])


def test_an_incomplete_or_foreign_first_record_cannot_be_told() -> None:
    hello = client_hello(["http/1.1"])
    assert tls_hello.offered_alpn(hello[:-1]) is None
    assert not tls_hello.refuse_alpn(hello[:-1], b"h2")
    assert tls_hello.offered_alpn(b"PRI * HTTP/2.0\r\n") is None
    assert tls_hello.record_bytes_needed(b"") == tls_hello.RECORD_HEADER_BYTES
    assert tls_hello.record_bytes_needed(b"\x16\x03") == tls_hello.RECORD_HEADER_BYTES
    assert tls_hello.record_bytes_needed(b"PRI") == 0
    assert tls_hello.record_bytes_needed(b"\x16\x03\x01\xff\xff") == tls_hello.MAX_RECORD_BYTES


@settings(deadline=None)  # a real OpenSSL hello per example: slow on a loaded machine
@given(st.binary(max_size=300), st.integers(0, 400))
def test_garbage_never_raises(noise: bytes, cut: int) -> None:
    """Random bytes, and a real hello cut or corrupted anywhere: an answer, never an error."""
    hello = bytearray(client_hello(["http/1.1"]))
    if cut < len(hello):
        hello[cut] ^= 0xFF
    for data in (noise, bytes(hello), bytes(hello[:cut]), b"\x16\x03\x01" + noise):
        offered = tls_hello.offered_alpn(data)
        assert offered is None or all(isinstance(p, bytes) and p for p in offered)
        assert isinstance(tls_hello.refuse_alpn(data, b"h2"), bool)


def handmade_hello(*extensions: tuple[int, bytes]) -> bytes:
    """A minimal ClientHello record carrying ``extensions`` (type, data) as given."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions:
        listed = b"".join(
            k.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for k, d in extensions
        )
        body += len(listed).to_bytes(2, "big") + listed
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def alpn(*protocols: bytes, total: int | None = None) -> tuple[int, bytes]:
    listed = b"".join(len(p).to_bytes(1, "big") + p for p in protocols)
    size = len(listed) if total is None else total
    return 16, size.to_bytes(2, "big") + listed


@pytest.mark.parametrize(
    ("hello", "offered"),
    [
        (handmade_hello(), []),  # no extensions at all
        (handmade_hello((0, b"")), []),  # extensions, none of them ALPN
        (handmade_hello((10, b"\x00\x02\x00\x1d"), alpn(b"h2", b"http/1.1")), [b"h2", b"http/1.1"]),
        (handmade_hello(alpn(b"h2", total=5)), None),  # the list's length is wrong
        (handmade_hello(alpn(b"", b"h2")), None),  # an empty protocol name
        (handmade_hello((16, b"\x00\x03\x05h2")), None),  # a name running past the list
        (handmade_hello((16, b"\x00\x01\x01")), None),  # a name of 1 byte with no byte
    ],
)
def test_handmade_hellos(hello: bytes, offered: list[bytes] | None) -> None:
    assert tls_hello.offered_alpn(hello) == offered


def test_a_hello_without_a_server_name_is_read_too() -> None:
    """Without SNI first in the list (every extension read at its own offset)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    assert tls_hello.offered_alpn(outgoing.read()) == [b"http/1.1"]


def test_the_constants() -> None:
    assert tls_hello.NO_APPLICATION_PROTOCOL_ALERT == bytes.fromhex("15030300020278")
    assert tls_hello.MAX_RECORD_BYTES == 5 + 16384
    assert tls_hello.record_bytes_needed(b"\x17\x03\x03\x00\x10") == 0  # not a handshake
    assert tls_hello.offered_alpn(b"\x16\x03\x01\x00\x03\x01\x00\x00") is None  # too short
