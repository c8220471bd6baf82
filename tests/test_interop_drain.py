"""Issue 22's graceful drain: SIGTERM a running service while calls are in flight.

As grpc-go's ``GracefulStop``: the listener closes, the client gets GOAWAY(2^31-1) and a PING,
then (after the PING's ACK) GOAWAY with the last stream id the server will answer; every
stream at or below it is answered: unary calls finish OK, streams end with UNAVAILABLE "server
is shutting down" in their trailers; health turns NOT_SERVING first; the process exits within
MAILER_SHUTDOWN_GRACE_S. A frame-level client (tests/raw_h2.py) records the frames in order.
"""

from __future__ import annotations

import signal
import ssl
from pathlib import Path
from typing import Any

import attrs
import trio
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, PingFrame

from trio_mailer.grpc_std.health.v1 import health_pb2
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest, StatusRequest

from .fakes.fault_relay import FaultRelay
from .helpers import Service, running_service
from .interop.support import KEEP_WAITING, MAILER, RETRY_LATER
from .raw_h2 import HEALTH_WATCH, RawClient, grpc_headers, grpc_message

GRACE_S = 2
EXIT_SLACK_S = 1.0  # the interpreter's own exit after the drain
LAST_STREAM_ID = 2**31 - 1
NO_ERROR = 0
OK, UNAVAILABLE = 0, 14
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@attrs.define
class RecordingClient(RawClient):
    """A raw client that keeps every frame it read, in order, ACKs the server's PINGs (as
    every HTTP/2 client must), and sends ``on_first_goaway`` as soon as the first GOAWAY is
    read: before the ACK of a PING that follows it."""

    frames: list[Frame] = attrs.Factory(list)
    on_first_goaway: bytes = b""

    async def _on_frame(self, frame: Frame) -> None:
        self.frames.append(frame)
        if isinstance(frame, GoAwayFrame) and self.on_first_goaway:
            late, self.on_first_goaway = self.on_first_goaway, b""
            await self._send_quietly(late)
        if isinstance(frame, PingFrame) and "ACK" not in frame.flags:
            ack = PingFrame(0, frame.opaque_data)
            ack.flags.add("ACK")
            await self._send_quietly(ack.serialize())
        await super()._on_frame(frame)

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server closed the connection: the frames say how

    def goaways(self) -> list[tuple[int, int]]:
        return [(f.last_stream_id, f.error_code) for f in self.frames if isinstance(f, GoAwayFrame)]

    def index(self, found: Any, start: int = 0) -> int | None:
        """The position of the first frame from ``start`` for which ``found(frame)``."""
        return next((n for n, f in enumerate(self.frames) if n >= start and found(f)), None)


def messages(data: bytes) -> list[bytes]:
    """The length-prefixed gRPC messages in a stream's data."""
    out = []
    while len(data) >= 5:
        length = int.from_bytes(data[1:5], "big")
        out.append(data[5 : 5 + length])
        data = data[5 + length :]
    return out


def health_statuses(client: RecordingClient, stream_id: int) -> list[int]:
    result = client.streams.get(stream_id)
    data = bytes(result.data) if result is not None else b""
    return [health_pb2.HealthCheckResponse.FromString(m).status for m in messages(data)]


def is_health_update(stream_id: int, status: int) -> Any:
    encoded = grpc_message(health_pb2.HealthCheckResponse(status=status).SerializeToString())
    return lambda f: isinstance(f, DataFrame) and f.stream_id == stream_id and f.data == encoded


def mailer_call(client: RawClient, stream_id: int, method: str, message: Any) -> bytes:
    """A whole unary or server-streaming request on ``stream_id``."""
    data = DataFrame(stream_id, grpc_message(message.SerializeToString()))
    data.flags.add("END_STREAM")
    return client.headers_frame(stream_id, grpc_headers(f"{MAILER}/{method}")) + data.serialize()


@attrs.define
class Exit:
    """When the service's process ended."""

    at: float | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    async def wait_for(self, service: Service) -> None:
        """Collect ``service``'s stderr (so that it never blocks on a full pipe) until it exits."""
        await service.finish()
        self.at = trio.current_time()
        self.done.set()


async def test_sigterm_drains_gracefully(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """SIGTERM with a health Watch, a WatchStatus and a half-sent GetStatus in flight, and one
    more GetStatus sent on the first GOAWAY: the frames of a graceful drain, in order."""
    relay = FaultRelay(ssl_context=relay_tls)
    relay.add_fault(RETRY_LATER)  # the watched mail stays unfinished through the drain
    env = {**KEEP_WAITING, "MAILER_SHUTDOWN_GRACE_S": str(GRACE_S)}
    with trio.fail_after(GRACE_S + 40):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            async with running_service(relay_port, ca_file, tmp_path, **env) as (service, port):
                ended = Exit()
                nursery.start_soon(ended.wait_for, service)
                client = await RecordingClient.connect(port)
                try:
                    observed, signalled_at = await _drain(client, service, port)
                finally:
                    await client.aclose()
                with trio.fail_after(GRACE_S + 10):
                    await ended.done.wait()
            nursery.cancel_scope.cancel()
    assert ended.at is not None
    observed["exit_within_grace"] = ended.at - signalled_at <= GRACE_S + EXIT_SLACK_S
    assert observed == {
        "goaways": [(LAST_STREAM_ID, NO_ERROR), (observed["late_stream"], NO_ERROR)],
        "ping_between_goaways": True,
        "not_serving_before_goaway": True,
        "new_connection_refused": True,
        "in_flight_unary": OK,
        "late_unary": OK,
        "watch_status": (UNAVAILABLE, "server is shutting down"),
        "health_watch": (UNAVAILABLE, NOT_SERVING),
        "resets": {},
        "closed": True,
        "late_stream": observed["late_stream"],
        "exit_within_grace": True,
    }, service.text[-3000:]


async def _drain(
    client: RecordingClient, service: Service, port: int
) -> tuple[dict[str, Any], float]:
    """Open the calls, SIGTERM, read to the end; what the client saw, and when it signalled."""
    # A mail the relay keeps putting off.
    sent = await client.wait_status(
        await client.call(
            grpc_message(MsgRequest(to="user@example.com", code="1").SerializeToString()),
            grpc_headers(f"{MAILER}/SendPass"),
        )
    )
    reply = MsgReply.FromString(messages(bytes(sent.data))[0])
    assert reply.sent, reply
    status_request = StatusRequest(message_id=reply.message_id)

    health = await client.call(
        grpc_message(health_pb2.HealthCheckRequest(service="").SerializeToString()),
        grpc_headers(HEALTH_WATCH),
    )
    with trio.fail_after(30):  # serving once the start-up relay check passed
        await client.read_until(lambda c: SERVING in health_statuses(c, health))

    watch = client.new_stream_id()
    await client.send(mailer_call(client, watch, "WatchStatus", status_request))
    await client.read_until(lambda c: watch in c.streams and bool(c.streams[watch].data))

    # Half sent: its request message goes out only after the first GOAWAY.
    in_flight = client.new_stream_id()
    await client.send(client.headers_frame(in_flight, grpc_headers(f"{MAILER}/GetStatus")))
    rest = DataFrame(in_flight, grpc_message(status_request.SerializeToString()))
    rest.flags.add("END_STREAM")
    late = client.new_stream_id()
    client.on_first_goaway = rest.serialize() + mailer_call(
        client, late, "GetStatus", status_request
    )

    before_signal = len(client.frames)
    signalled_at = trio.current_time()
    service.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(GRACE_S / 2):
        await client.read_until(lambda c: c.goaway is not None)
    try:
        extra = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        refused = True
    else:
        refused = False
        await extra.aclose()
    with trio.fail_after(GRACE_S + 10):
        await client.wait_closed()

    first_goaway = client.index(lambda f: isinstance(f, GoAwayFrame))
    goaways = [n for n, f in enumerate(client.frames) if isinstance(f, GoAwayFrame)]
    pings = [
        n for n, f in enumerate(client.frames) if isinstance(f, PingFrame) and "ACK" not in f.flags
    ]
    not_serving = client.index(is_health_update(health, NOT_SERVING), before_signal)
    watch_result = client.streams[watch]
    health_result = client.streams[health]
    observed: dict[str, Any] = {
        "goaways": client.goaways(),
        "ping_between_goaways": len(goaways) >= 2
        and any(goaways[0] < n < goaways[1] for n in pings),
        "not_serving_before_goaway": first_goaway is not None
        and not_serving is not None
        and not_serving < first_goaway,
        "new_connection_refused": refused,
        "in_flight_unary": client.streams[in_flight].grpc_status
        if in_flight in client.streams
        else None,
        "late_unary": client.streams[late].grpc_status if late in client.streams else None,
        "watch_status": (
            watch_result.grpc_status,
            (watch_result.header("grpc-message") or "").partition(";")[0],
        ),
        "health_watch": (health_result.grpc_status, health_statuses(client, health)[-1]),
        "resets": {
            s: r.reset for s, r in client.streams.items() if r.reset not in (None, NO_ERROR)
        },
        "closed": client.closed,
        "late_stream": late,
    }
    return observed, signalled_at
