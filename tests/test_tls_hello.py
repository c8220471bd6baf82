"""The ClientHello's ALPN list (core/tls_hello.py), and the listener refusing a TLS client
that offers ALPN without h2 with the no_application_protocol alert (RFC 7301 sec. 3.2)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme
from hypothesis import given
from hypothesis import strategies as st

from trio_mailer.core import tls_hello
from trio_mailer.grpc.listener import make_server_ssl_context

from .test_grpc_attacks import CHECK, OK, RawClient, grpc_message, open_server, raw_h2


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


@pytest.fixture
def server_context(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    return make_server_ssl_context(tmp_path / "c.pem", tmp_path / "k.pem")


async def _handshake(port: int, ca: trustme.CA, alpn: list[str] | None) -> trio.SSLStream:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


async def test_a_client_offering_only_http11_gets_no_application_protocol(
    ca: trustme.CA, server_context: ssl.SSLContext
) -> None:
    with trio.fail_after(10):
        async with open_server(tls=server_context) as server:
            with pytest.raises(trio.BrokenResourceError) as caught:
                await _handshake(server.port, ca, ["http/1.1"])
            assert "alert no application protocol" in str(caught.value.__cause__)


@pytest.mark.parametrize("alpn", [["h2"], ["http/1.1", "h2"]])
async def test_a_client_offering_h2_is_served(
    ca: trustme.CA, server_context: ssl.SSLContext, alpn: list[str]
) -> None:
    with trio.fail_after(10):
        async with open_server(tls=server_context) as server:
            tls = await _handshake(server.port, ca, alpn)
            assert tls.selected_alpn_protocol() == "h2"
            client = RawClient(tls)  # type: ignore[arg-type]
            server.clients.append(client)
            await client.send(raw_h2.PREFACE + raw_h2.SettingsFrame(0).serialize())
            result = await client.wait_status(await client.call(grpc_message(CHECK)))
            assert result.grpc_status == OK
