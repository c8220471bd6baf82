"""The listener's HPACK encoder (internals.StatelessEncoder): it never indexes, so each
header list has one encoding, and our constant lists are encoded once. A client decoding with a
stock hpack decoder reads exactly the headers sent, before and after it resizes its table."""

from __future__ import annotations

import hpack
from hypothesis import given
from hypothesis import strategies as st

from trio_mailer.grpc.internals import StatelessEncoder
from trio_mailer.grpc.protocol import connection

_names = st.sampled_from([b"grpc-status", b"grpc-message", b"content-type", b"x-custom"])
_values = st.binary(min_size=0, max_size=40).filter(lambda v: b"\r" not in v and b"\n" not in v)
_lists = st.lists(st.tuples(_names, _values), min_size=1, max_size=5)


def test_the_constant_blocks_decode_to_the_constant_headers() -> None:
    decoder = hpack.Decoder()
    for headers, block in StatelessEncoder.constant_blocks.items():
        assert tuple(tuple(h) for h in decoder.decode(block, raw=True)) == headers
    assert len(decoder.header_table.dynamic_entries) == 0
    assert connection.status_headers(0, "") == list(connection.OK_TRAILERS)
    assert connection.status_headers(5, "") == [(b"grpc-status", b"5")]


@given(st.lists(_lists, min_size=1, max_size=8), st.integers(0, 7))
def test_every_block_decodes_and_nothing_is_ever_indexed(lists, resize_at) -> None:
    """Constant and other lists mixed, a table resize from the client's SETTINGS at some point:
    a stock decoder reads each block back, and neither side's dynamic table gets an entry."""
    encoder, decoder = StatelessEncoder(), hpack.Decoder()
    constants = list(StatelessEncoder.constant_blocks)
    for i, headers in enumerate(lists):
        resized = i == resize_at
        if resized:
            encoder.header_table_size = 1024  # what h2 does on SETTINGS_HEADER_TABLE_SIZE
        for sent in (constants[i % len(constants)], tuple(headers)):
            block = encoder.encode(sent)
            if resized:  # the next block announces the new size (RFC 7541 sec. 4.2)
                assert block[0] & 0xE0 == 0x20, block
                resized = False
            assert tuple(tuple(h) for h in decoder.decode(block, raw=True)) == sent
            assert encoder.encode(sent) == encoder.encode(sent)  # one encoding per list
    assert len(encoder.header_table.dynamic_entries) == 0
    assert len(decoder.header_table.dynamic_entries) == 0
