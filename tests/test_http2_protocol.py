"""The gRPC front's protocol object, bytes in and events out (as h11's tests): no socket, no
event loop. A stock h2 client state machine makes the bytes; the server's bytes go back to it,
so every frame is checked by a real HTTP/2 implementation too."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hyperframe.frame import Frame, GoAwayFrame, PingFrame

from trio_mailer.core import http2_limits as lim
from trio_mailer.core.http2_limits import GrpcCode, H2Error
from trio_mailer.grpc.internals import _GoAwayTolerantStates
from trio_mailer.grpc.protocol import events as ev
from trio_mailer.grpc.protocol.connection import Limits, ServerConnection, StreamGone

PATH = "/grpc.health.v1.Health/Check"


def request_headers(
    path: str = PATH, content_type: str = "application/grpc", **extra: str
) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", content_type),
        ("te", "trailers"),
        *extra.items(),
    ]


def message(payload: bytes, declared: int | None = None) -> bytes:
    size = len(payload) if declared is None else declared
    return b"\0" + size.to_bytes(4, "big") + payload


class Pair:
    """A server protocol object and an h2 client, wired through bytes; time is ``now``."""

    def __init__(self, limits: Limits | None = None, *, ack_settings: bool = True) -> None:
        self.now = 100.0
        self.server = ServerConnection(limits or Limits(), self.now)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        # As trio_mailer's own client does: h2 3.x would refuse every frame after a GOAWAY.
        self.client.state_machine = _GoAwayTolerantStates()
        self.client.initiate_connection()
        self.client_events: list[Any] = []
        self.frames: list[Frame] = []
        self.server_events: list[ev.Event] = []
        if ack_settings:
            self.exchange()

    def to_server(self) -> list[ev.Event]:
        events = self.server.receive_data(self.client.data_to_send(), self.now)
        self.server_events += events
        return events

    def to_client(self) -> None:
        data = self.server.data_to_send()
        self.frames += _frames(data)
        self.client_events += self.client.receive_data(data)

    def exchange(self) -> list[ev.Event]:
        events = self.to_server()
        self.to_client()
        events += self.to_server()
        self.to_client()
        return events

    def open(self, body: bytes | None = b"", *, end: bool = True, **headers: str) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, request_headers(**headers), end_stream=body is None)
        if body is not None:
            self.client.send_data(stream_id, message(body), end_stream=end)
        return stream_id

    def status(self, stream_id: int) -> str | None:
        for event in self.client_events:
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                if event.stream_id == stream_id:
                    for name, value in event.headers:
                        if name == b"grpc-status":
                            return value.decode()
        return None

    def resets(self, code: int) -> list[int]:
        return [
            e.stream_id
            for e in self.client_events
            if isinstance(e, h2.events.StreamReset) and e.error_code == code
        ]

    def goaways(self) -> list[tuple[int, int]]:
        return [(f.last_stream_id, f.error_code) for f in self.frames if isinstance(f, GoAwayFrame)]


def _frames(data: bytes) -> list[Frame]:
    frames, view = [], memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


def started(events: list[ev.Event]) -> list[int]:
    return [e.stream.stream_id for e in events if isinstance(e, ev.CallStarted)]


def answer(pair: Pair, stream_id: int, code: int = 0) -> None:
    stream = pair.server.stream(stream_id)
    assert stream is not None
    pair.server.end_call(stream, code, "", pair.now)


# ---- streams are counted as RFC 9113 sec. 5.1.2 counts them ----


def test_a_stream_answered_stops_counting_at_once() -> None:
    """100 calls in flight (the limit); one answered: a new call is served, not refused, even
    though nothing else happened (no handler's clean-up to wait for)."""
    pair = Pair()
    ids = [pair.open(b"x") for _ in range(100)]
    assert started(pair.exchange()) == ids
    answer(pair, ids[0])
    pair.to_client()
    new = pair.open(b"x")
    assert started(pair.exchange()) == [new]
    assert pair.resets(H2Error.REFUSED_STREAM) == []
    assert pair.server.live_calls == 100


def test_past_the_limit_a_stream_is_refused_and_charged_only_after_the_settings_ack() -> None:
    """Before the client has our SETTINGS it may assume no limit: streams past 100 are refused
    but cost nothing; after its ACK each costs a refusal token, and the budget trips."""
    pair = Pair(Limits(max_concurrent_streams=2, refusal_burst=3), ack_settings=False)
    for _ in range(10):
        pair.open(b"x")
    pair.to_server()  # the client has not seen our SETTINGS: no ACK in these bytes
    pair.to_client()
    assert len(pair.resets(H2Error.REFUSED_STREAM)) == 8
    assert pair.goaways() == []
    pair.to_server()  # the ACK
    # Now past the limit it has seen: an h2 client would not, a raw one can.
    pair.client.remote_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000}
    )
    for _ in range(4):
        pair.open(b"x")
    pair.exchange()
    assert pair.goaways() == [(27, H2Error.ENHANCE_YOUR_CALM)]


# ---- per-call answers ----


def test_an_oversized_message_is_refused_on_its_stream_before_the_settings_ack() -> None:
    """A 9 KiB request sent before the client has our SETTINGS (its window is the protocol's
    64 KiB then): RESOURCE_EXHAUSTED on that call, no connection error (issue 22: the CLI
    with a 9,000-character code saw 'Flow control window shrunk below 0')."""
    pair = Pair(ack_settings=False)
    stream_id = pair.open(b"x" * 9000)
    events = [e for e in pair.to_server() if not isinstance(e, ev.WindowOpened)]
    assert [type(e) for e in events] == [ev.CallStarted, ev.CallEnded]
    pair.to_client()
    assert pair.status(stream_id) == str(int(GrpcCode.RESOURCE_EXHAUSTED))
    assert pair.goaways() == []
    pair.to_server()
    other = pair.open(b"ok")
    assert started(pair.exchange()) == [other]


def test_malformed_heads_are_answered_without_a_budget() -> None:
    """A thousand malformed requests: each answered 415 on its stream, nothing else."""
    pair = Pair()
    ids = []
    for _ in range(10):
        ids += [pair.open(None, content_type="text/plain") for _ in range(100)]
        assert pair.exchange() == []
    assert [pair.status(i) for i in ids] == [str(int(GrpcCode.INTERNAL))] * 1000
    assert pair.goaways() == []


@pytest.mark.parametrize(
    ("content_type", "echoed"),
    [
        ("application/grpc", b"application/grpc"),
        ("application/grpc+proto", b"application/grpc+proto"),
        ("application/grpc;charset=utf-8", b"application/grpc"),
    ],
)
def test_the_response_content_type_echoes_proto(content_type: str, echoed: bytes) -> None:
    pair = Pair()
    stream_id = pair.open(b"x", content_type=content_type)
    pair.exchange()
    stream = pair.server.stream(stream_id)
    assert stream is not None
    pair.server.send_message(stream, memoryview(message(b"reply")))
    answer(pair, stream_id)
    pair.to_client()
    response = next(e for e in pair.client_events if isinstance(e, h2.events.ResponseReceived))
    assert (b"content-type", echoed) in response.headers


# ---- resets: cancels are ordinary, the rapid-reset shape is not ----


def _open_and_reset(pair: Pair, count: int, **headers: str) -> None:
    for _ in range(count):
        stream_id = pair.open(None, **headers)
        pair.client.reset_stream(stream_id, error_code=H2Error.CANCEL)


def test_rapid_reset_trips_and_the_goaway_names_the_last_stream() -> None:
    """HEADERS then RST_STREAM, 1,000 times: past the burst of early resets, GOAWAY
    ENHANCE_YOUR_CALM naming the last stream seen; the connection stops reading."""
    pair = Pair()
    _open_and_reset(pair, 1000)
    pair.exchange()
    [(last, code)] = pair.goaways()
    assert code == H2Error.ENHANCE_YOUR_CALM
    assert last == 2 * (lim.RESET_BURST + 1) - 1  # the stream whose reset tripped it
    assert not pair.server.graceful


def test_cancels_of_calls_already_answering_are_free() -> None:
    """2,000 calls whose response began, each then cancelled by the client: no GOAWAY."""
    pair = Pair()
    for _ in range(20):
        ids = [pair.open(b"x", end=False) for _ in range(100)]
        pair.exchange()
        for stream_id in ids:
            stream = pair.server.stream(stream_id)
            assert stream is not None
            pair.server.send_message(stream, memoryview(message(b"first")))
        pair.to_client()
        for stream_id in ids:
            pair.client.reset_stream(stream_id, error_code=H2Error.CANCEL)
        events = pair.exchange()
        assert sorted(e.stream_id for e in events if isinstance(e, ev.CallEnded)) == ids
    assert pair.goaways() == []


def test_resets_at_the_deadline_are_free() -> None:
    """Calls with a 1 ms deadline, reset by the client when it passed: ordinary, however
    many; and resets before the deadline refill as calls are answered."""
    pair = Pair()
    for _ in range(10):
        ids = [pair.open(b"x", end=False, **{"grpc-timeout": "1m"}) for _ in range(100)]
        pair.exchange()
        pair.now += 0.002
        for stream_id in ids:
            pair.client.reset_stream(stream_id, error_code=H2Error.CANCEL)
        pair.exchange()
    assert pair.goaways() == []


def test_answered_calls_earn_back_early_resets() -> None:
    """A client that cancels many calls early but also completes calls stays within the
    budget: each answered call gives back ``RESETS_PER_ANSWERED_CALL``."""
    pair = Pair()
    for _ in range(40):
        _open_and_reset(pair, 50)
        pair.exchange()
        ids = [pair.open(b"x") for _ in range(5)]
        pair.exchange()
        for stream_id in ids:
            answer(pair, stream_id)
        pair.to_client()
    assert pair.goaways() == []


# ---- a budget tripped: the streams at or below the last id are still answered ----


def test_after_a_tripped_budget_the_calls_in_flight_are_answered() -> None:
    pair = Pair(Limits(control_frame_burst=20))
    ids = [pair.open(b"x") for _ in range(3)]
    pair.exchange()
    for _ in range(30):
        pair.client.ping(b"12345678")
    events = pair.exchange()
    assert [e for e in events if isinstance(e, ev.GoingAway)] == [
        ev.GoingAway(ids[-1], graceful=False)
    ]
    for stream_id in ids:
        answer(pair, stream_id)
    pair.to_client()
    assert [pair.status(i) for i in ids] == ["0", "0", "0"]
    assert pair.server.finished


# ---- the graceful drain ----


def test_drain_goaway_ping_then_the_last_stream_id() -> None:
    """GOAWAY(2^31-1) and a PING; a call opened meanwhile is served; at the PING's ACK,
    GOAWAY with the last stream id; a stream above it is refused; the connection is finished
    when the calls in flight are answered."""
    pair = Pair()
    first = pair.open(b"x")
    pair.exchange()
    pair.server.start_drain(pair.now)
    data = pair.server.data_to_send()
    frames = _frames(data)
    assert [type(f) for f in frames] == [GoAwayFrame, PingFrame]
    assert frames[0].last_stream_id == lim.MAX_STREAM_ID and frames[0].error_code == 0
    second = pair.open(b"x")  # sent before the client saw the GOAWAY
    events = pair.to_server()
    assert started(events) == [second]
    pair.client_events += pair.client.receive_data(data)  # the client ACKs the PING
    events = pair.to_server()
    assert events == [ev.GoingAway(second, graceful=True)]
    pair.to_client()
    assert pair.goaways() == [(second, 0)]
    third = pair.open(b"x")
    assert pair.to_server() == []
    pair.to_client()
    assert pair.resets(H2Error.REFUSED_STREAM) == [third]
    assert not pair.server.finished
    answer(pair, first)
    answer(pair, second)
    assert pair.server.finished
    pair.to_client()
    assert (pair.status(first), pair.status(second)) == ("0", "0")


def test_drain_without_the_ping_ack_goes_on_after_its_timeout() -> None:
    pair = Pair()
    pair.server.start_drain(pair.now)
    pair.server.data_to_send()
    assert pair.server.next_deadline() == pair.now + lim.DRAIN_PING_TIMEOUT_S
    assert pair.server.on_timer(pair.now + 0.5) == []
    events = pair.server.on_timer(pair.now + lim.DRAIN_PING_TIMEOUT_S)
    assert events == [ev.GoingAway(0, graceful=True)]
    assert pair.server.finished


def test_an_idle_connection_gets_goaway_no_error() -> None:
    pair = Pair(Limits(idle_timeout_s=5))
    stream_id = pair.open(b"x")
    pair.exchange()
    answer(pair, stream_id)
    assert pair.server.next_deadline() == pair.now + 5
    assert pair.server.on_timer(pair.now + 5) == [ev.GoingAway(stream_id, graceful=True)]
    pair.to_client()
    assert pair.goaways() == [(stream_id, 0)]


# ---- flow control ----


def test_messages_are_returned_to_the_stream_window_when_taken() -> None:
    """Two 4 KiB messages fill the stream's window; taking them gives it back (the
    connection's window was given back on arrival)."""
    pair = Pair()
    stream_id = pair.open(b"y" * 4000, end=False)
    pair.client.send_data(stream_id, message(b"z" * 4000))
    pair.exchange()
    assert pair.client.local_flow_control_window(stream_id) == lim.STREAM_WINDOW_BYTES - 8010
    stream = pair.server.stream(stream_id)
    assert stream is not None
    frames = [pair.server.take_message(stream), pair.server.take_message(stream)]
    assert [f.payload if f else None for f in frames] == [b"y" * 4000, b"z" * 4000]
    assert pair.server.take_message(stream) is None
    pair.to_client()
    assert pair.client.local_flow_control_window(stream_id) == lim.STREAM_WINDOW_BYTES
    assert (
        pair.client.local_flow_control_window(stream_id) <= pair.client.outbound_flow_control_window
    )


def test_sending_on_an_ended_stream_raises() -> None:
    pair = Pair()
    stream_id = pair.open(b"x")
    pair.exchange()
    stream = pair.server.stream(stream_id)
    assert stream is not None
    answer(pair, stream_id)
    with pytest.raises(StreamGone):
        pair.server.send_message(stream, memoryview(b"late"))


def test_a_response_waits_for_the_clients_window() -> None:
    """A client with a 10-byte stream window: 10 bytes go now, the rest after its update."""
    pair = Pair(ack_settings=False)
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    pair.exchange()
    stream_id = pair.open(b"x")
    pair.exchange()
    stream = pair.server.stream(stream_id)
    assert stream is not None
    data = memoryview(message(b"z" * 20))
    assert pair.server.send_message(stream, data) == 10
    assert pair.server.send_message(stream, data[10:]) == 0
    pair.to_client()
    pair.client.increment_flow_control_window(100, stream_id=stream_id)
    assert ev.WindowOpened() in pair.to_server()
    assert pair.server.send_message(stream, data[10:]) == 15


@pytest.mark.parametrize(
    ("timeout", "elapsed_s", "early"),
    [
        (None, 100.0, True),  # no deadline: any reset before an answer is early
        ("2S", 1.85, True),
        ("2S", 1.95, False),  # within DEADLINE_RESET_SLACK_S of the deadline: the client's
        ("1m", 0.0, False),  # deadline fired first (its clock started before ours)
    ],
)
def test_a_reset_near_the_deadline_is_the_deadline(
    timeout: str | None, elapsed_s: float, early: bool
) -> None:
    pair = Pair()
    headers = {} if timeout is None else {"grpc-timeout": timeout}
    stream_id = pair.open(b"x", end=False, **headers)
    pair.exchange()
    stream = pair.server.stream(stream_id)
    assert stream is not None
    assert stream.reset_is_early(pair.now + elapsed_s) == early
    pair.server.send_message(stream, memoryview(message(b"first")))
    assert not stream.reset_is_early(pair.now)  # answering: a cancel, never early
