"""The gRPC front under attack: raw HTTP/2 frames and stock grpcio clients against the listener.

Every attack of issue 11's table, each asserting what the attacker gets (a status on its
stream, a GOAWAY code, a closed connection) and that a well-behaved call on another connection
succeeds during and after it. Loopback only, every loop bounded, every test under fail_after.
"""

from __future__ import annotations

import logging
import signal
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import grpc
import h2.config
import h2.connection
import h2.events
import purerpc
import pytest
import trio
import trustme
from purerpc.rpc import Cardinality, RPCSignature

from trio_mailer.core import http2_limits as lim
from trio_mailer.grpc import http2_server
from trio_mailer.grpc.health_service import HealthState, ServingStatus, health_service
from trio_mailer.grpc.listener import (
    Limits,
    bound_port,
    make_server_ssl_context,
    open_grpc_listener,
    serve_grpc,
)
from trio_mailer.grpc_std.health.v1 import health_pb2

from . import raw_h2
from .helpers import subprocess_env
from .raw_h2 import RawClient, grpc_headers, grpc_message

OK, INTERNAL, UNIMPLEMENTED, UNAUTHENTICATED = 0, 13, 12, 16
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED = 8, 4
GOOD_TOKEN = "good-token-1234567890"
SECRET = "do-not-log-this-value"
CHECK = health_pb2.HealthCheckRequest(service="").SerializeToString()
TIMEOUT_S = 20


class _TestService:
    """Methods to misbehave with: one that raises, one that sleeps, one behind a token."""

    def __init__(self) -> None:
        self.calls = 0

    async def fail(self, message: Any) -> Any:
        self.calls += 1
        raise RuntimeError(f"bug with {message.service}")

    async def sleep(self, message: Any) -> Any:
        await trio.sleep(30)
        return health_pb2.HealthCheckResponse()

    async def guarded(self, message: Any) -> Any:
        self.calls += 1
        return health_pb2.HealthCheckResponse(status=1)

    def service(self) -> purerpc.Service:
        service = purerpc.Service("test.Attack")
        signature = RPCSignature(
            Cardinality.UNARY_UNARY,
            health_pb2.HealthCheckRequest,
            health_pb2.HealthCheckResponse,
        )
        service.add_method("Fail", self.fail, signature)
        service.add_method("Sleep", self.sleep, signature)
        service.add_method("Guarded", self.guarded, signature)
        return service


def _authorize(service: str, method: str, metadata: Sequence[tuple[str, str]], peer: str) -> bool:
    if method != "Guarded":
        return True
    return ("authorization", f"Bearer {GOOD_TOKEN}") in metadata


@attrs.define
class Server:
    port: int
    state: HealthState
    test_service: _TestService
    clients: list[RawClient] = attrs.Factory(list)

    async def connect(self, *, preface: bool = True) -> RawClient:
        """A raw client, closed when the server stops."""
        client = await RawClient.connect(self.port, preface=preface)
        self.clients.append(client)
        return client


@asynccontextmanager
async def open_server(
    limits: Limits | None = None, *, max_connections: int = 100, tls: Any = None
) -> AsyncIterator[Server]:
    state = HealthState([], initial=ServingStatus.SERVING)
    state.set(ServingStatus.SERVING)
    test_service = _TestService()
    async with trio.open_nursery() as nursery:
        listener = await open_grpc_listener("127.0.0.1", 0, tls)
        await nursery.start(
            lambda task_status: serve_grpc(
                listener,
                [health_service(state), test_service.service()],
                authorizer=_authorize,
                max_connections=max_connections,
                limits=limits,
                task_status=task_status,
            )
        )
        server = Server(bound_port(listener), state, test_service)
        try:
            yield server
        finally:
            for client in server.clients:
                await client.aclose()
            nursery.cancel_scope.cancel()


async def probe(port: int) -> None:
    """A well-behaved Health/Check on a connection of its own succeeds."""
    client = await RawClient.connect(port)
    try:
        result = await client.wait_status(await client.call(grpc_message(CHECK)))
        assert result.grpc_status == OK, result
        assert health_pb2.HealthCheckResponse.FromString(bytes(result.data[5:])).status == 1
    finally:
        await client.aclose()


# ---- settings ----


async def test_server_advertises_bounded_settings() -> None:
    """16 KiB frames, 16 KiB header lists, 100 streams, a window for two 4 KiB messages."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            await client.read_until(lambda c: bool(c.server_settings))
            settings = raw_h2.SettingsFrame
            assert client.server_settings[settings.MAX_FRAME_SIZE] == 16 * 1024
            assert client.server_settings[settings.MAX_HEADER_LIST_SIZE] == 16 * 1024
            assert client.server_settings[settings.MAX_CONCURRENT_STREAMS] == 100
            assert client.server_settings[settings.INITIAL_WINDOW_SIZE] == 2 * (4096 + 5)
            await client.aclose()


# ---- frames and header blocks ----


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(
            lambda c: (
                c.headers_frame(1, grpc_headers(), end_headers=False)
                + raw_h2.frame_header(2**24 - 1, lim.FRAME_CONTINUATION, 0, 1)
            ),
            id="16MiB-continuation",
        ),
        pytest.param(
            lambda c: raw_h2.frame_header(1 << 20, lim.FRAME_DATA, 0, 1), id="1MiB-data-frame"
        ),
    ],
)
async def test_frames_over_16_kib_get_goaway_frame_size_error(attack: Any) -> None:
    """The frame header alone is enough: nothing of the body is buffered."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            await client.send(attack(client))
            await client.wait_closed()
            assert client.goaway == lim.H2Error.FRAME_SIZE_ERROR
            await probe(server.port)


async def test_too_many_continuation_frames_get_enhance_your_calm() -> None:
    """64 CONTINUATION frames (h2 would take them): GOAWAY after the 8th."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            frames = client.headers_frame(1, grpc_headers(), end_headers=False)
            frames += b"".join(raw_h2.continuation(1, b"\x00" * 8) for _ in range(64))
            await client.send(frames)
            await client.wait_closed()
            assert client.goaway == lim.H2Error.ENHANCE_YOUR_CALM
            await probe(server.port)


async def test_a_header_list_over_16_kib_gets_enhance_your_calm() -> None:
    """One 20 KiB header value (in HEADERS + CONTINUATION): GOAWAY ENHANCE_YOUR_CALM."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            await client.read_until(lambda c: bool(c.server_settings))  # ACKed: limits apply
            block = client.encoder.encode([*grpc_headers(), ("x-big", "x" * 20_000)])
            frame = raw_h2.HeadersFrame(1, block[:16000])
            await client.send(
                frame.serialize() + raw_h2.continuation(1, block[16000:], end_headers=True)
            )
            await client.wait_closed()
            assert client.goaway == lim.H2Error.ENHANCE_YOUR_CALM
            await probe(server.port)


async def test_a_header_block_must_complete_in_time() -> None:
    """HEADERS without END_HEADERS, then silence: GOAWAY ENHANCE_YOUR_CALM."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server(Limits(header_block_timeout_s=0.3)) as server:
            client = await server.connect()
            await client.read_until(lambda c: bool(c.server_settings))  # ACKed before the block
            await client.send(client.headers_frame(1, grpc_headers(), end_headers=False))
            await probe(server.port)  # during
            await client.wait_closed()
            assert client.goaway == lim.H2Error.ENHANCE_YOUR_CALM
            await probe(server.port)


# ---- floods ----


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(raw_h2.ping(), id="ping"),
        pytest.param(raw_h2.settings(), id="settings"),
        pytest.param(raw_h2.window_update(0), id="window-update-0"),
        pytest.param(raw_h2.rst(1), id="rst-stream"),
        pytest.param(raw_h2.empty_data(1), id="empty-data"),
    ],
)
async def test_control_frame_floods_get_goaway_enhance_your_calm(frame: bytes) -> None:
    """1,000 control frames at once: GOAWAY ENHANCE_YOUR_CALM; others unaffected."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            if frame in (raw_h2.rst(1), raw_h2.empty_data(1)):
                await client.wait_status(await client.call(grpc_message(CHECK)))
            await probe(server.port)
            await client.send(frame * 1000)
            await client.wait_closed()
            assert client.goaway == lim.H2Error.ENHANCE_YOUR_CALM
            await probe(server.port)


async def test_control_frames_at_a_modest_rate_are_fine() -> None:
    """150 PINGs (within the burst) are all answered; the connection stays."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            await client.send(raw_h2.ping() * 150)
            await client.read_until(lambda c: c.pings_acked == 150)
            assert client.goaway is None
            result = await client.wait_status(await client.call(grpc_message(CHECK)))
            assert result.grpc_status == OK
            await client.aclose()


async def test_rapid_reset_gets_enhance_your_calm() -> None:
    """HEADERS then RST_STREAM, 1,000 times (CVE-2023-44487): GOAWAY; others unaffected."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            burst = b""
            for _ in range(1000):
                stream_id = client.new_stream_id()
                burst += client.headers_frame(stream_id, grpc_headers(raw_h2.HEALTH_WATCH))
                burst += raw_h2.rst(stream_id)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, burst)
                await probe(server.port)  # during
            await client.wait_closed()
            assert client.goaway == lim.H2Error.ENHANCE_YOUR_CALM
            await probe(server.port)
            assert server.state.statistics().watchers == 0


async def test_a_client_that_never_reads_is_cut_off() -> None:
    """PINGs from a client that reads nothing: closed once the unsent ACKs pass the bound."""
    limits = Limits(control_frame_burst=10**9, control_frames_per_s=10**9)
    with trio.fail_after(TIMEOUT_S):
        async with open_server(limits) as server:
            sock = trio.socket.socket()
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", server.port))
            stream = trio.SocketStream(sock)
            await stream.send_all(raw_h2.PREFACE + raw_h2.SettingsFrame(0).serialize())
            pings = raw_h2.ping() * 10_000
            sent = 0
            with trio.move_on_after(10) as scope:
                try:
                    for _ in range(200):  # 34 MB of ACKs if nothing stopped them
                        await stream.send_all(pings)
                        sent += 1
                except trio.BrokenResourceError:
                    pass
            assert not scope.cancelled_caught, f"still open after {sent * 10_000} PINGs"
            assert sent < 200
            await probe(server.port)
            await stream.aclose()


# ---- streams ----


async def test_streams_beyond_100_are_refused() -> None:
    """140 Watch streams on one connection: 100 served, 40 get REFUSED_STREAM."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            await client.read_until(lambda c: bool(c.server_settings))
            ids = [client.new_stream_id() for _ in range(140)]
            burst = b""
            for stream_id in ids:
                burst += client.headers_frame(stream_id, grpc_headers(raw_h2.HEALTH_WATCH))
                message = raw_h2.DataFrame(stream_id, grpc_message(CHECK))
                message.flags.add("END_STREAM")
                burst += message.serialize()
            await client.send(burst)
            await client.read_until(
                lambda c: (
                    sum(1 for s in ids if s in c.streams) == len(ids)
                    and all(c.streams[s].data or c.streams[s].reset for s in ids)
                )
            )
            refused = [s for s in ids if client.streams[s].reset == lim.H2Error.REFUSED_STREAM]
            served = [s for s in ids if client.streams[s].data]
            assert (len(served), len(refused)) == (100, 40)
            assert client.goaway is None
            await probe(server.port)  # during
            await client.aclose()
            await probe(server.port)


async def test_a_client_that_keeps_opening_refused_streams_gets_goaway() -> None:
    """20,000 streams on one connection (the table's row): past the stream limit each refusal
    costs a refusal token, and the connection gets GOAWAY ENHANCE_YOUR_CALM."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            await client.read_until(lambda c: bool(c.server_settings))
            frames = []
            for _ in range(20_000):
                stream_id = client.new_stream_id()
                frames.append(client.headers_frame(stream_id, grpc_headers(raw_h2.HEALTH_WATCH)))
                message = raw_h2.DataFrame(stream_id, grpc_message(CHECK))
                message.flags.add("END_STREAM")
                frames.append(message.serialize())
            burst = b"".join(frames)
            async with trio.open_nursery() as nursery:

                async def send_all() -> None:
                    try:
                        await client.send(burst)
                    except trio.BrokenResourceError:
                        pass  # the server closed the connection mid-burst

                nursery.start_soon(send_all)
                await probe(server.port)  # during
            await client.wait_closed()
            assert client.goaway == lim.H2Error.ENHANCE_YOUR_CALM
            refused = [
                s for s, r in client.streams.items() if r.reset == lim.H2Error.REFUSED_STREAM
            ]
            assert lim.REFUSAL_BURST <= len(refused) < 500  # the burst, and what refilled
            await probe(server.port)
            assert server.state.statistics().watchers == 0


async def test_malformed_requests_are_answered_each_on_its_stream() -> None:
    """1,000 requests with a bad content-type at once: a per-call refusal is ordinary traffic,
    so each gets its 415 and the connection stays (issue 22: no GOAWAY for per-call answers)."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            bad = _head(content_type="text/plain")
            ids = [client.new_stream_id() for _ in range(1000)]
            await client.send(b"".join(client.headers_frame(i, bad, end_stream=True) for i in ids))
            await client.read_until(lambda c: all(i in c.streams for i in ids))
            assert {client.streams[i].header(":status") for i in ids} == {"415"}
            assert client.goaway is None
            result = await client.wait_status(await client.call(grpc_message(CHECK)))
            assert result.grpc_status == OK
            await client.aclose()


# ---- messages ----


async def test_oversized_message_fails_only_its_stream() -> None:
    """A message declaring 1 MiB: RESOURCE_EXHAUSTED on it; the next call on the connection
    works."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            big = await client.call(grpc_message(b"x" * 1000, declared=1 << 20), end_stream=False)
            result = await client.wait_status(big)
            assert result.grpc_status == RESOURCE_EXHAUSTED
            assert "larger than 4096 bytes" in (result.header("grpc-message") or "")
            good = await client.wait_status(await client.call(grpc_message(CHECK)))
            assert good.grpc_status == OK
            assert client.goaway is None
            await client.aclose()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compression_bombs_are_refused_on_their_streams(encoding: str) -> None:
    """40 streams, each 1 MB inflating from ~1 KB: RESOURCE_EXHAUSTED on every one."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            bomb = raw_h2.deflate_bomb(1_000_000, gzip=encoding == "gzip")
            headers = grpc_headers(grpc_encoding=encoding)
            ids = []
            for _ in range(40):
                ids.append(await client.call(grpc_message(bomb, compressed=True), headers))
            for stream_id in ids:
                assert (await client.wait_status(stream_id)).grpc_status == RESOURCE_EXHAUSTED
            assert client.goaway is None
            await probe(server.port)
            await client.aclose()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_requests_within_the_limit_are_served(encoding: str) -> None:
    """gzip and deflate inflate correctly; the response advertises what we accept."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            payload = raw_h2.deflate_bomb(0, gzip=encoding == "gzip")  # an empty request
            headers = grpc_headers(grpc_encoding=encoding)
            result = await client.wait_status(
                await client.call(grpc_message(payload, compressed=True), headers)
            )
            assert result.grpc_status == OK
            assert result.header("grpc-accept-encoding") == "identity,gzip,deflate"
            await client.aclose()


async def test_a_call_failing_authentication_costs_no_inflation(monkeypatch) -> None:
    """A bomb to a guarded method without a token: UNAUTHENTICATED, nothing inflated."""
    inflated = []
    original = lim.decode_message
    monkeypatch.setattr(
        http2_server.lim, "decode_message", lambda *a: inflated.append(1) or original(*a)
    )
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            bomb = grpc_message(raw_h2.deflate_bomb(1_000_000), compressed=True)
            headers = grpc_headers("/test.Attack/Guarded", grpc_encoding="deflate")
            result = await client.wait_status(await client.call(bomb, headers))
            assert result.grpc_status == UNAUTHENTICATED
            assert inflated == [] and server.test_service.calls == 0
            token = ("authorization", f"Bearer {GOOD_TOKEN}")
            result = await client.wait_status(
                await client.call(
                    grpc_message(CHECK), [*grpc_headers("/test.Attack/Guarded"), token]
                )
            )
            assert result.grpc_status == OK and server.test_service.calls == 1
            await client.aclose()


async def _h2_client_exchange(stream: trio.SocketStream, conn: Any) -> list[Any]:
    """Send what h2's client queued, then read one chunk: the events it gives."""
    await stream.send_all(conn.data_to_send())
    chunk = await stream.receive_some(65536)
    assert chunk, "the server closed the connection"
    return list(conn.receive_data(chunk))


async def test_many_streams_each_sending_half_a_message_first_all_finish() -> None:
    """64 calls on one connection, each sending the first half of a 4 KiB message before any
    sends its second half (flow control allowing), as h2's own client state machine keeps it:
    together the halves are more than the 64 KiB connection window. Every call still finishes,
    because bytes held in an unfinished message are returned to the connection's window (the
    per-stream window still bounds each call)."""
    message = grpc_message(health_pb2.HealthCheckRequest(service="x" * 4080).SerializeToString())
    assert 4000 < len(message) <= 4096 + 5
    half = len(message) // 2
    headers = grpc_headers(path="/test.Attack/Guarded", authorization=f"Bearer {GOOD_TOKEN}")
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                ids = list(range(1, 128, 2))
                for stream_id in ids:
                    conn.send_headers(stream_id, headers)
                ended: set[int] = set()
                statuses: dict[int, str] = {}

                async def send(stream_id: int, data: bytes, *, end: bool) -> None:
                    # Waits for window; a stall here is the bug (fail_after ends the test).
                    while conn.local_flow_control_window(stream_id) < len(data):
                        for event in await _h2_client_exchange(stream, conn):
                            note(event)
                    conn.send_data(stream_id, data, end_stream=end)

                def note(event: Any) -> None:
                    if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                        for name, value in event.headers:
                            if name == b"grpc-status":
                                statuses[event.stream_id] = value.decode()
                    if isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                        ended.add(event.stream_id)

                for stream_id in ids:
                    await send(stream_id, message[:half], end=False)
                for stream_id in ids:
                    await send(stream_id, message[half:], end=True)
                while len(ended) < len(ids):
                    for event in await _h2_client_exchange(stream, conn):
                        note(event)
                assert statuses == {stream_id: "0" for stream_id in ids}
                assert server.test_service.calls == len(ids)


async def test_data_past_a_streams_window_is_refused_not_buffered() -> None:
    """The connection's window is returned as bytes arrive, so only the stream's window bounds
    what one call may hold: a client that sends past it (one DATA frame of 8,203 bytes, before
    any message of it can reach the handler) once it has acknowledged our SETTINGS gets
    FLOW_CONTROL_ERROR, and other connections are served."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            await client.read_until(lambda c: bool(c.server_settings))  # and ACKed them
            stream_id = client.new_stream_id()
            head = client.headers_frame(stream_id, grpc_headers(path="/test.Attack/Sleep"))
            data = raw_h2.DataFrame(stream_id, bytes(lim.STREAM_WINDOW_BYTES + 1)).serialize()
            await client.send(head + data)
            await client.read_until(
                lambda c: (
                    c.goaway is not None
                    or c.streams.get(stream_id, raw_h2.StreamResult()).reset is not None
                )
            )
            flow_control_error = 0x3
            reset = client.streams.get(stream_id, raw_h2.StreamResult()).reset
            assert flow_control_error in (client.goaway, reset), (client.goaway, reset)
            await probe(server.port)
            await client.aclose()


# ---- malformed requests: a status on that stream, the connection kept ----

_GOOD = dict(grpc_headers())


def _head(**changes: str | None) -> list[tuple[str, str]]:
    headers = dict(_GOOD)
    for name, value in changes.items():
        name = name.replace("_", "-").replace("pseudo-", ":")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    pseudo = [(k, v) for k, v in headers.items() if k.startswith(":")]
    return pseudo + [(k, v) for k, v in headers.items() if not k.startswith(":")]


MALFORMED = [
    ("wrong content-type", _head(content_type="text/plain"), 415, INTERNAL),
    ("no content-type", _head(content_type=None), 415, INTERNAL),
    ("content-type json", _head(content_type="application/json"), 415, INTERNAL),
    ("missing te", _head(te=None), 200, INTERNAL),
    ("te gzip", _head(te="gzip"), 200, INTERNAL),
    ("unknown path", _head(pseudo_path="/no.Such/Method"), 200, UNIMPLEMENTED),
    ("path without method", _head(pseudo_path="/grpc.health.v1.Health"), 200, UNIMPLEMENTED),
    ("path not absolute", _head(pseudo_path="grpc.health.v1.Health/Check"), 200, UNIMPLEMENTED),
    ("GET", _head(pseudo_method="GET"), 405, INTERNAL),
    ("missing :method", _head(pseudo_method=None), 200, INTERNAL),
    ("missing :path", _head(pseudo_path=None), 200, INTERNAL),
    ("grpc-timeout no unit", _head(grpc_timeout="10"), 200, INTERNAL),
    ("grpc-timeout bad unit", _head(grpc_timeout="10x"), 200, INTERNAL),
    ("grpc-timeout 9 digits", _head(grpc_timeout="123456789S"), 200, INTERNAL),
    ("grpc-timeout negative", _head(grpc_timeout="-1S"), 200, INTERNAL),
    ("unknown encoding", _head(grpc_encoding="snappy"), 200, UNIMPLEMENTED),
    ("upper-case name", [*_head(), ("X-Custom", "1")], 200, INTERNAL),
    ("space in name", [*_head(), ("x custom", "1")], 200, INTERNAL),
    ("connection header", [*_head(), ("connection", "keep-alive")], 200, INTERNAL),
    ("trailing space", [*_head(), ("x-custom", "value ")], 200, INTERNAL),
    ("control char in value", [*_head(), ("x-custom", "a\x01b")], 200, INTERNAL),
    ("empty bearer", [*_head(), ("authorization", "Bearer ")], 200, UNAUTHENTICATED),
    ("pseudo after regular", [*_head(), (":authority", "x")], 200, INTERNAL),
]


async def test_malformed_requests_get_a_status_on_their_stream() -> None:
    """23 malformed heads on one connection: each its status; then a good call works on it."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            for name, headers, http_status, grpc_status in MALFORMED:
                result = await client.wait_status(await client.call(grpc_message(CHECK), headers))
                got = (result.header(":status"), result.grpc_status)
                assert got == (str(http_status), grpc_status), name
                assert result.header("grpc-message"), name
            assert client.goaway is None and not client.closed
            unknown = _head(grpc_encoding="snappy")
            result = await client.wait_status(await client.call(grpc_message(CHECK), unknown))
            assert result.header("grpc-accept-encoding") == "identity,gzip,deflate"
            good = await client.wait_status(await client.call(grpc_message(CHECK)))
            assert good.grpc_status == OK
            await client.aclose()
            await probe(server.port)


@pytest.mark.parametrize(
    ("message", "status"),
    [
        pytest.param(grpc_message(b"\xff\xff"), INTERNAL, id="not-protobuf"),
        pytest.param(grpc_message(CHECK, compressed=True), INTERNAL, id="compressed-identity"),
        pytest.param(b"\x02\x00\x00\x00\x00", INTERNAL, id="bad-flag"),
        pytest.param(grpc_message(CHECK)[:-1] if CHECK else b"\x00\x00\x00", INTERNAL, id="cut"),
        pytest.param(grpc_message(CHECK) * 2, INTERNAL, id="two-for-unary"),
        pytest.param(b"", INTERNAL, id="none-for-unary"),
    ],
)
async def test_malformed_messages_get_internal_on_their_stream(message: bytes, status: int) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            assert (await client.wait_status(await client.call(message))).grpc_status == status
            good = await client.wait_status(await client.call(grpc_message(CHECK)))
            assert good.grpc_status == OK
            await client.aclose()


async def test_grpc_timeout_is_enforced() -> None:
    """grpc-timeout 200m on a handler that sleeps 30 s: DEADLINE_EXCEEDED in about 0.2 s."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            headers = grpc_headers("/test.Attack/Sleep", grpc_timeout="200m")
            result = await client.wait_status(await client.call(grpc_message(CHECK), headers))
            assert result.grpc_status == DEADLINE_EXCEEDED
            await client.aclose()


async def test_unexpected_errors_are_internal_and_logged_once(caplog) -> None:
    """A handler bug: INTERNAL with a generic message; one ERROR naming the method only."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server() as server:
            client = await server.connect()
            request = health_pb2.HealthCheckRequest(service=SECRET).SerializeToString()
            headers = grpc_headers("/test.Attack/Fail")
            result = await client.wait_status(await client.call(grpc_message(request), headers))
            assert (result.grpc_status, result.header("grpc-message")) == (
                INTERNAL,
                "internal error",
            )
            await client.aclose()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "test.Attack/Fail" in errors[0].getMessage()
    assert SECRET not in errors[0].getMessage()


# ---- connections ----


async def test_a_connection_without_preface_is_closed() -> None:
    """A TCP connection that sends nothing is closed after the preface timeout."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server(Limits(preface_timeout_s=0.3)) as server:
            client = await server.connect(preface=False)
            await probe(server.port)
            await client.wait_closed()
            await probe(server.port)


async def test_a_connection_without_calls_is_closed_when_idle() -> None:
    """After its last call, a plaintext connection gets GOAWAY NO_ERROR after the idle time."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server(Limits(idle_timeout_s=0.5)) as server:
            client = await server.connect()
            result = await client.wait_status(await client.call(grpc_message(CHECK)))
            assert result.grpc_status == OK
            await client.wait_closed()
            assert client.goaway == lim.H2Error.NO_ERROR


async def test_a_tls_connection_without_calls_is_closed_when_idle(ca, tmp_path) -> None:
    """The same over TLS (ALPN h2)."""
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    context = make_server_ssl_context(tmp_path / "c.pem", tmp_path / "k.pem")
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client_context.set_alpn_protocols(["h2"])
    with trio.fail_after(TIMEOUT_S):
        async with open_server(Limits(idle_timeout_s=0.5), tls=context) as server:
            tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
            tls = trio.SSLStream(tcp, client_context, server_hostname="127.0.0.1")
            await tls.do_handshake()
            client = RawClient(tls)  # type: ignore[arg-type]
            server.clients.append(client)
            await client.send(raw_h2.PREFACE + raw_h2.SettingsFrame(0).serialize())
            result = await client.wait_status(await client.call(grpc_message(CHECK)))
            assert result.grpc_status == OK
            await client.wait_closed()
            assert client.goaway == lim.H2Error.NO_ERROR


async def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    """MAILER_MAX_CONNECTIONS=3: the 4th connection is closed; a freed slot is reused."""
    with trio.fail_after(TIMEOUT_S):
        async with open_server(max_connections=3) as server:
            held = [await server.connect() for _ in range(3)]
            for client in held:
                await client.read_until(lambda c: bool(c.server_settings))
            extra = await server.connect()
            await extra.wait_closed()
            assert not extra.server_settings
            await held.pop().aclose()
            with trio.fail_after(5):
                while True:  # the server notices the close on its own schedule
                    try:
                        await probe(server.port)
                        break
                    except (AssertionError, trio.BrokenResourceError):
                        await trio.sleep(0.05)
            for client in held:
                await client.aclose()


EMFILE_SERVER = textwrap.dedent(
    """
    import resource, sys, trio
    from trio_mailer.grpc.health_service import HealthState, ServingStatus, health_service
    from trio_mailer.grpc.listener import Limits, bound_port, open_grpc_listener, serve_grpc

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    async def main():
        state = HealthState([], initial=ServingStatus.SERVING)
        state.set(ServingStatus.SERVING)
        listener = await open_grpc_listener("127.0.0.1", 0)
        print(bound_port(listener), flush=True)
        await serve_grpc(listener, [health_service(state)], max_connections=1000,
                         limits=Limits(preface_timeout_s=60))

    trio.run(main)
    """
)


async def test_accept_survives_running_out_of_file_descriptors() -> None:
    """RLIMIT_NOFILE 64 and 100 idle connections: the server stays up, serves its open
    connections during it and new ones after, and logs the EMFILE once per episode."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", EMFILE_SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    idle: list[trio.SocketStream] = []
    good: RawClient | None = None
    try:
        with trio.fail_after(TIMEOUT_S * 2):
            assert process.stdout is not None and process.stderr is not None
            port = int((await process.stdout.receive_some(100)).decode().strip())
            good = await RawClient.connect(port)
            assert (await good.wait_status(await good.call(grpc_message(CHECK)))).grpc_status == 0
            for _ in range(100):
                idle.append(await trio.open_tcp_stream("127.0.0.1", port))
            await trio.sleep(0.5)  # let the server hit EMFILE on the backlog
            during = await good.wait_status(await good.call(grpc_message(CHECK)))
            assert during.grpc_status == OK
            for stream in idle:
                await stream.aclose()
            idle.clear()
            while True:  # the server frees the descriptors as it notices the closes
                try:
                    await probe(port)
                    break
                except (AssertionError, trio.BrokenResourceError, OSError):
                    await trio.sleep(0.1)
            assert process.returncode is None
            await good.aclose()
            process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                await process.wait()
            stderr = (await process.stderr.receive_some(100_000)).decode()
            # Once per episode: each "failed" line is closed by one "works again" (under load the
            # freed descriptors can run out again while the backlog drains: a second episode).
            lines = [line for line in stderr.splitlines() if line.startswith("accept() ") and line]
            assert lines, stderr
            assert lines[::2] == [lines[0]] * len(lines[::2]), stderr
            assert lines[1::2] == ["accept() works again"] * len(lines[1::2]), stderr
            assert len(lines) % 2 == 0 and len(lines) <= 6, stderr
            assert "Too many open files" in lines[0], stderr
    finally:
        for stream in idle:
            await stream.aclose()
        if good is not None:
            await good.aclose()
        if process.returncode is None:
            process.kill()
            await process.wait()


# ---- stock grpcio clients ----


def _grpcio_calls(port: int) -> dict[str, Any]:
    """gzip, deflate, oversized on a shared channel with a Watch stream open on it."""
    results: dict[str, Any] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(raw_h2.HEALTH_CHECK)
        watch = channel.unary_stream(raw_h2.HEALTH_WATCH)
        results["gzip"] = check(CHECK, compression=grpc.Compression.Gzip, timeout=10)
        results["deflate"] = check(CHECK, compression=grpc.Compression.Deflate, timeout=10)
        watching = watch(CHECK, timeout=30)
        results["watch_first"] = next(watching)
        big = health_pb2.HealthCheckRequest(service="x" * 10_000).SerializeToString()
        try:
            check(big, timeout=10)
        except grpc.RpcError as exc:
            results["oversized"] = exc.code()
        try:
            check(
                health_pb2.HealthCheckRequest(service="x" * 1_000_000).SerializeToString(),
                compression=grpc.Compression.Gzip,
                timeout=10,
            )
        except grpc.RpcError as exc:
            results["oversized_gzip"] = exc.code()
        results["after"] = check(CHECK, timeout=10)
        watching.cancel()
        try:
            next(watching)
        except grpc.RpcError as exc:
            results["watch_end"] = exc.code()
    return results


async def test_grpcio_gzip_deflate_and_oversized_on_a_shared_channel() -> None:
    """One grpcio channel: gzip and deflate served; an oversized call gets RESOURCE_EXHAUSTED
    while a Watch stream and later calls on the same connection go on."""
    with trio.fail_after(TIMEOUT_S * 2):
        async with open_server() as server:
            results = await trio.to_thread.run_sync(_grpcio_calls, server.port)
    serving = health_pb2.HealthCheckResponse(status=1).SerializeToString()
    assert results["gzip"] == results["deflate"] == results["after"] == serving
    assert results["watch_first"] == serving
    assert results["oversized"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert results["oversized_gzip"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert results["watch_end"] == grpc.StatusCode.CANCELLED  # by us, not UNAVAILABLE


def _busy_grpcio_client(port: int, calls: int, in_flight: int) -> int:
    """``calls`` Health/Check calls, ``in_flight`` at a time on one channel; how many succeeded."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(raw_h2.HEALTH_CHECK)
        pending = [check.future(CHECK, timeout=10) for _ in range(in_flight)]
        succeeded = 0
        for started in range(in_flight, calls + in_flight):
            pending.pop(0).result()  # raises on any failure
            succeeded += 1
            if started < calls:
                pending.append(check.future(CHECK, timeout=10))
        return succeeded


async def test_a_busy_grpcio_client_is_not_mistaken_for_a_flood() -> None:
    """1,500 calls, 64 in flight on one connection: grpcio's WINDOW_UPDATEs and BDP PINGs are
    paid for by the answered calls, and WINDOW_UPDATE on a finished stream is tolerated."""
    with trio.fail_after(TIMEOUT_S * 3):
        async with open_server() as server:
            done = await trio.to_thread.run_sync(_busy_grpcio_client, server.port, 1500, 64)
    assert done == 1500


# ---- ALPN: a TLS client must offer h2 (RFC 7301 sec. 3.2) ----


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
