"""What a TLS ClientHello offers by ALPN, read from its first record; and the refusal alert.

Python's ``ssl`` module lets a server name its ALPN protocols but, when a client offers none of
them, carries on with no protocol (OpenSSL's NOACK) instead of refusing with the
``no_application_protocol`` alert RFC 7301 sec. 3.2 asks for. The gRPC listener reads the
ClientHello before the handshake starts: a client that offers ALPN without ``h2`` gets that
alert and the connection closes; anything else goes on to OpenSSL unchanged.

Pure: bytes in, a decision out. Anything unexpected (not a handshake record, a ClientHello
spread over records, a truncated or malformed extension list) gives ``None``: "cannot tell",
and OpenSSL decides as before.
"""

from __future__ import annotations

import struct

RECORD_HEADER_BYTES = 5
# The largest TLS record (RFC 8446 sec. 5.1: 2^14 bytes of plaintext; a ClientHello is plain).
MAX_RECORD_BYTES = RECORD_HEADER_BYTES + 2**14
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_ALPN_EXTENSION = 16
# A fatal alert (level 2), no_application_protocol (120), in a TLS 1.2-versioned record (what a
# server sends before its ServerHello, in TLS 1.2 and 1.3 alike).
NO_APPLICATION_PROTOCOL_ALERT = bytes((21, 3, 3, 0, 2, 2, 120))


def record_bytes_needed(data: bytes) -> int:
    """How many bytes of ``data`` to read before judging it: the whole first record when it
    is a handshake record (at most ``MAX_RECORD_BYTES``), its header while that is incomplete,
    0 when it is something else (nothing to wait for)."""
    if len(data) < RECORD_HEADER_BYTES:
        return 0 if data[:1] not in (b"", bytes((_HANDSHAKE,))) else RECORD_HEADER_BYTES
    if data[0] != _HANDSHAKE:
        return 0
    return min(MAX_RECORD_BYTES, RECORD_HEADER_BYTES + int.from_bytes(data[3:5], "big"))


def offered_alpn(data: bytes) -> list[bytes] | None:
    """The ALPN protocols the ClientHello at the start of ``data`` offers, in order; ``[]``
    when it has no ALPN extension; ``None`` when that cannot be told from ``data``."""
    try:
        return _offered_alpn(memoryview(data))
    except (IndexError, ValueError, struct.error):
        return None


def _offered_alpn(data: memoryview) -> list[bytes] | None:
    if len(data) < RECORD_HEADER_BYTES or data[0] != _HANDSHAKE:
        return None
    record_length = int.from_bytes(data[3:5], "big")
    body = data[RECORD_HEADER_BYTES : RECORD_HEADER_BYTES + record_length]
    if len(body) < record_length or len(body) < 4 or body[0] != _CLIENT_HELLO:
        return None
    hello_length = int.from_bytes(body[1:4], "big")
    hello = body[4 : 4 + hello_length]
    if len(hello) < hello_length:
        return None  # spread over several records: cannot tell
    at = 2 + 32  # legacy_version, random
    at += 1 + hello[at]  # legacy_session_id
    at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher_suites
    at += 1 + hello[at]  # legacy_compression_methods
    if at == len(hello):
        return []  # no extensions at all
    extensions_end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
    if extensions_end != len(hello):
        return None
    at += 2
    while at < extensions_end:
        kind, length = struct.unpack_from(">HH", hello, at)
        at += 4
        if at + length > extensions_end:
            return None
        if kind == _ALPN_EXTENSION:
            return _protocol_list(hello[at : at + length])
        at += length
    return []


def _protocol_list(extension: memoryview) -> list[bytes] | None:
    total = int.from_bytes(extension[0:2], "big")
    if total + 2 != len(extension):
        return None
    protocols, at = [], 2
    while at < len(extension):
        length = extension[at]
        if length == 0 or at + 1 + length > len(extension):
            return None
        protocols.append(bytes(extension[at + 1 : at + 1 + length]))
        at += 1 + length
    return protocols


def refuse_alpn(data: bytes, supported: bytes) -> bool:
    """Whether the ClientHello offers ALPN without ``supported``: answer with the alert."""
    offered = offered_alpn(data)
    return bool(offered) and supported not in (offered or [])
