"""The ClientHello's ALPN list (core/tls_hello.py), read from real OpenSSL ClientHellos and
from garbage. The listener's use of it: tests/test_grpc_alpn.py."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
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
