"""A frame-level HTTP/2 client for attacking the listener: hyperframe frames, hpack headers.

Not h2's client state machine: an attacker breaks the rules, and this client lets it. It reads
the server's frames, ACKs its SETTINGS, and keeps what the tests assert on: each stream's
response headers and trailers (``status(stream_id)``), RST_STREAM codes, the GOAWAY code and
whether the server closed the connection.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable

import attrs
import hpack
import trio
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


def grpc_headers(path: str = HEALTH_CHECK, **extra: str) -> list[tuple[str, str]]:
    """A well-formed gRPC request head; ``extra`` adds headers (``_`` in names becomes ``-``)."""
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return headers + [(name.replace("_", "-"), value) for name, value in extra.items()]


def grpc_message(payload: bytes, *, compressed: bool = False, declared: int | None = None) -> bytes:
    """A length-prefixed gRPC message (``declared`` overrides the length field)."""
    length = len(payload) if declared is None else declared
    return struct.pack(">BL", int(compressed), length) + payload


def deflate_bomb(size: int, *, gzip: bool = False) -> bytes:
    """``size`` zero bytes, compressed (about 1,000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
    return compressor.compress(bytes(size)) + compressor.flush()


@attrs.define
class StreamResult:
    headers: list[list[tuple[str, str]]] = attrs.Factory(list)
    data: bytearray = attrs.Factory(bytearray)
    ended: bool = False
    reset: int | None = None

    def header(self, name: str) -> str | None:
        for block in self.headers:
            for key, value in block:
                if key == name:
                    return value
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.header("grpc-status")
        return None if value is None else int(value)


@attrs.define
class RawClient:
    stream: trio.SocketStream
    encoder: hpack.Encoder = attrs.Factory(hpack.Encoder)
    decoder: hpack.Decoder = attrs.Factory(hpack.Decoder)
    streams: dict[int, StreamResult] = attrs.Factory(dict)
    server_settings: dict[int, int] = attrs.Factory(dict)
    goaway: int | None = None
    closed: bool = False
    pings_acked: int = 0
    _buffer: bytearray = attrs.Factory(bytearray)
    _next_stream: int = 1
    _pending_headers: tuple[int, bytearray, bool] | None = None

    @classmethod
    async def connect(cls, port: int, *, preface: bool = True) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        if preface:
            try:
                await client.send(PREFACE + SettingsFrame(0).serialize())
            except BaseException:
                await client.aclose()
                raise
        return client

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def new_stream_id(self) -> int:
        stream_id = self._next_stream
        self._next_stream += 2
        return stream_id

    def headers_frame(
        self,
        stream_id: int,
        headers: Iterable[tuple[str, str]],
        *,
        end_stream: bool = False,
        end_headers: bool = True,
    ) -> bytes:
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(list(headers))
        if end_headers:
            frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    async def call(
        self,
        message: bytes = grpc_message(b""),
        headers: Iterable[tuple[str, str]] | None = None,
        *,
        end_stream: bool = True,
    ) -> int:
        """Start a request (headers, then ``message``); its stream id."""
        stream_id = self.new_stream_id()
        data = DataFrame(stream_id)
        data.data = message
        if end_stream:
            data.flags.add("END_STREAM")
        await self.send(self.headers_frame(stream_id, headers or grpc_headers()) + data.serialize())
        return stream_id

    async def read_until(self, done: Callable[[RawClient], bool]) -> None:
        """Read frames until ``done(self)`` or the connection closes; the caller bounds time."""
        while not done(self) and not self.closed:
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                self.closed = True
                return
            self._buffer += chunk
            await self._parse()

    async def wait_status(self, stream_id: int) -> StreamResult:
        await self.read_until(
            lambda c: (
                stream_id in c.streams
                and (c.streams[stream_id].ended or c.streams[stream_id].reset is not None)
            )
        )
        return self.streams.setdefault(stream_id, StreamResult())

    async def wait_closed(self) -> None:
        await self.read_until(lambda c: False)

    async def _parse(self) -> None:
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(bytes(self._buffer[:9])))
            if len(self._buffer) < 9 + length:
                return
            frame.parse_body(memoryview(bytes(self._buffer[9 : 9 + length])))
            del self._buffer[: 9 + length]
            await self._on_frame(frame)

    async def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                self.server_settings.update(frame.settings)
                ack = SettingsFrame(0)
                ack.flags.add("ACK")
                try:
                    await self.send(ack.serialize())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        elif isinstance(frame, HeadersFrame | ContinuationFrame):
            if isinstance(frame, HeadersFrame):
                self._pending_headers = (
                    frame.stream_id,
                    bytearray(frame.data),
                    "END_STREAM" in frame.flags,
                )
            elif self._pending_headers is not None:
                self._pending_headers[1].extend(frame.data)
            if "END_HEADERS" in frame.flags and self._pending_headers is not None:
                stream_id, block, ended = self._pending_headers
                self._pending_headers = None
                result = self.streams.setdefault(stream_id, StreamResult())
                decoded = self.decoder.decode(bytes(block))
                result.headers.append([(str(k), str(v)) for k, v in decoded])
                result.ended = result.ended or ended
        elif isinstance(frame, DataFrame):
            result = self.streams.setdefault(frame.stream_id, StreamResult())
            result.data += frame.data
            result.ended = result.ended or "END_STREAM" in frame.flags
        elif isinstance(frame, RstStreamFrame):
            result = self.streams.setdefault(frame.stream_id, StreamResult())
            if result.reset is None:  # the first one says why (later ones answer our frames)
                result.reset = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            self.goaway = frame.error_code
        elif isinstance(frame, PingFrame) and "ACK" in frame.flags:
            self.pings_acked += 1


def ping(payload: bytes = b"12345678") -> bytes:
    return PingFrame(0, payload).serialize()


def settings() -> bytes:
    return SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 4096}).serialize()


def window_update(stream_id: int, increment: int = 1) -> bytes:
    return WindowUpdateFrame(stream_id, window_increment=increment).serialize()


def rst(stream_id: int, code: int = 0x8) -> bytes:
    return RstStreamFrame(stream_id, error_code=code).serialize()


def empty_data(stream_id: int) -> bytes:
    return DataFrame(stream_id, b"").serialize()


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """A raw frame header (for frames larger than anything hyperframe should build)."""
    return struct.pack(">BHBBL", length >> 16, length & 0xFFFF, kind, flags, stream_id)


def continuation(stream_id: int, data: bytes, *, end_headers: bool = False) -> bytes:
    frame = ContinuationFrame(stream_id, data)
    if end_headers:
        frame.flags.add("END_HEADERS")
    return frame.serialize()
