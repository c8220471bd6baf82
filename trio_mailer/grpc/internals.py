"""Every use of h2's, hpack's and purerpc's private parts, in one place.

Pinned dependencies (purerpc 0.8.0, which pins h2 3.x and hpack 3.x) whose public APIs lack a
few things the gRPC front needs. Each is here, named in ``PRIVATE_NAMES`` and checked by
``problems()``; ``tests/test_internals.py`` fails naming what moved when an upgrade breaks one,
and fails if any other module touches these names. When that happens, adapt this module:
nothing else imports a private name.

- ``H2Connection``: h2's connection, tolerating WINDOW_UPDATE on a stream it has forgotten;
  returning received bytes to the connection's window and to a stream's window separately;
  queueing a frame h2 would not build itself (a GOAWAY that leaves the connection open, so the
  streams below its last id can still be answered).
- ``StatelessEncoder``: hpack's encoder that never indexes (reads the table's ``resized``).
- ``PurerpcStream``: the stream purerpc's ``call_server_*`` wrappers drive. Its contract is
  purerpc's private ``GRPCProtoStream`` (``receive_message``, ``send_message``, ``close``,
  ``end_stream_event``); this stand-in speaks it over the Trio layer's call.
- ``client_channel``: purerpc's client channel (``purerpc.client._Channel``) on a stream it did
  not open, for ``trio-mailer send``.
"""

from __future__ import annotations

import inspect
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import h2.connection
import h2.exceptions
import h2.stream
import hpack
from google.protobuf.message import DecodeError
from hyperframe.frame import Frame as WireFrame
from hyperframe.frame import WindowUpdateFrame

if TYPE_CHECKING:  # purerpc (and anyio with it) loads only where a client or the canary runs:
    # the protocol object (grpc/protocol/) imports this module and no event-loop library.
    import anyio.abc
    import purerpc

# The private names used here, for the canary: (module, object, attribute, what it is for).
PRIVATE_NAMES = (
    ("purerpc.client", "purerpc.client", "_Channel", "the channel class Client(...) accepts"),
    (
        "h2.connection",
        "H2Connection",
        "_receive_window_update_frame",
        "H2Connection tolerates WINDOW_UPDATE on forgotten streams",
    ),
    (
        "h2.connection",
        "H2Connection",
        "_prepare_for_sending",
        "H2Connection queues frames h2 does not build (GOAWAY, one window's update)",
    ),
    (
        "h2.connection",
        "H2Connection",
        "_inbound_flow_control_window_manager",
        "H2Connection returns bytes to the connection's window alone",
    ),
    ("hpack", "HeaderTable", "resized", "StatelessEncoder sees a pending table-size update"),
    (
        "h2.connection",
        "H2ConnectionStateMachine",
        "_transitions",
        "a purerpc client's calls in flight survive a server's graceful GOAWAY",
    ),
    (
        "purerpc.grpc_socket",
        "GRPCSocket",
        "_grpc_connection",
        "client_channel reaches the client's h2 connection (h2_connection.state_machine)",
    ),
)
# ``_Channel`` sets this attribute in ``__aenter__``; stubs read it through ``Client``.
CHANNEL_SOCKET_ATTRIBUTE = "_grpc_socket"
# The methods of purerpc's GRPCProtoStream that its server wrappers call (PurerpcStream's).
STREAM_CONTRACT = ("receive_message", "send_message", "close", "end_stream_event")

Channel = Any  # purerpc.client._Channel (imported by client_channel)


class H2Connection(h2.connection.H2Connection):  # type: ignore[misc]
    """h2 3.x with the three things the gRPC front needs that its public API lacks."""

    def _receive_window_update_frame(self, frame: Any) -> Any:
        # RFC 9113 sec. 5.1: WINDOW_UPDATE "can be received in this state for a short period
        # after a frame containing END_STREAM is sent". h2 3.x answers it with GOAWAY
        # STREAM_CLOSED once the stream has left its table (a busy grpcio client does that).
        try:
            return super()._receive_window_update_frame(frame)
        except h2.exceptions.StreamClosedError:
            return [], []

    def acknowledge_connection_data(self, size: int) -> None:
        """Return ``size`` received bytes to the connection-level window only."""
        increment = self._inbound_flow_control_window_manager.process_bytes(size)
        if increment:
            self._prepare_for_sending([WindowUpdateFrame(0, window_increment=increment)])

    def acknowledge_stream_data(self, size: int, stream_id: int) -> None:
        """Return ``size`` consumed bytes to ``stream_id``'s window only (if still open)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.open:
            self._prepare_for_sending(stream.acknowledge_received_data(size))

    def queue_frame(self, frame: WireFrame) -> None:
        """Queue ``frame`` for sending, in order with h2's own frames, without changing h2's
        state (h2's ``close_connection`` would refuse every frame after its GOAWAY)."""
        self._prepare_for_sending([frame])


class StatelessEncoder(hpack.Encoder):  # type: ignore[misc]
    """hpack's encoder that never adds to its dynamic table, so a header list always encodes to
    the same block, and the blocks of constant header lists can be encoded once (``constant``).

    Every header goes out as a never-indexed literal (or a static-table index): the table stays
    empty and the only state is a pending table-size update after the client's SETTINGS, which
    hpack emits on the next block as usual. Costs a few bytes per response against indexing,
    and saves HPACK's table search per header.
    """

    constant_blocks: ClassVar[dict[tuple[tuple[bytes, bytes], ...], bytes]] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        key = tuple(headers)
        if not self.header_table.resized:
            block = self.constant_blocks.get(key)
            if block is not None:
                return block
        return bytes(super().encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in key], huffman))

    @classmethod
    def add_constant(cls, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        """Encode ``headers`` once; every encoder then sends that block for this list."""
        cls.constant_blocks[headers] = cls().encode(headers)


class CallIO(Protocol):
    """What a call offers its handler (the Trio layer's call)."""

    async def receive(self) -> bytes | None:
        """The next request message's bytes, or None when the request ended."""
        ...

    async def send(self, data: bytes) -> None:
        """Send one response message's bytes."""
        ...

    async def close(self, code: int, message: str) -> None:
        """End the call with this status."""
        ...


class BadRequestMessage(Exception):
    """A request message that does not parse as the method's request type."""


class PurerpcStream:
    """The stream purerpc's server wrappers (``call_server_*``) drive, over a ``CallIO``."""

    end_stream_event: Any = None  # the wrappers look here when input ends: nothing to report

    def __init__(self, call: CallIO, request_type: Any) -> None:
        self._call = call
        self._request_type = request_type

    async def receive_message(self) -> Any:
        data = await self._call.receive()
        if data is None:
            return None
        try:
            return self._request_type.FromString(data)
        except DecodeError:
            raise BadRequestMessage("the request message does not parse") from None

    async def send_message(self, message: Any) -> None:
        await self._call.send(message.SerializeToString())

    async def close(self, status: purerpc.Status) -> None:
        await self._call.close(int(status.int_value), status.status_message or "")


class _GoAwayTolerantStates(h2.connection.H2ConnectionStateMachine):  # type: ignore[misc]
    """h2 3.x's connection states, except that a GOAWAY received leaves an open client open.

    h2 3.x moves to CLOSED on any GOAWAY and then refuses every frame, so the calls in flight
    on a server that drains gracefully (GOAWAY, PING, then their responses) would die with a
    ProtocolError. RFC 9113 sec. 6.8: streams up to the GOAWAY's last id go on. purerpc
    ignores the ConnectionTerminated event; a new call after it is refused by the server.
    """

    _transitions: ClassVar[dict[Any, Any]] = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY): (
            None,
            h2.connection.ConnectionState.CLIENT_OPEN,
        ),
        # A client that has closed (its own GOAWAY) while the server's drain PING, SETTINGS or
        # window updates were on their way: ignored, not a ProtocolError in purerpc's reader.
        **{
            (h2.connection.ConnectionState.CLOSED, received): (
                None,
                h2.connection.ConnectionState.CLOSED,
            )
            for received in (
                h2.connection.ConnectionInputs.RECV_PING,
                h2.connection.ConnectionInputs.RECV_SETTINGS,
                h2.connection.ConnectionInputs.RECV_WINDOW_UPDATE,
                h2.connection.ConnectionInputs.RECV_PRIORITY,
            )
        },
    }


async def client_channel(
    stack: AsyncExitStack, host: str, port: int, stream: anyio.abc.ByteStream
) -> Any:
    """A purerpc channel speaking on ``stream`` (which the caller closes), for ``Client``;
    its calls in flight survive a server's graceful GOAWAY (``_GoAwayTolerantStates``)."""
    import purerpc.client
    from purerpc.grpc_proto import GRPCProtoSocket
    from purerpc.grpclib.config import GRPCConfiguration

    channel = purerpc.client._Channel(host, port)
    socket = GRPCProtoSocket(GRPCConfiguration(client_side=True), stream)
    socket._grpc_connection.h2_connection.state_machine = _GoAwayTolerantStates()
    await stack.enter_async_context(socket)
    setattr(channel, CHANNEL_SOCKET_ATTRIBUTE, socket)
    return channel


def problems() -> list[str]:
    """What moved in purerpc, h2 or hpack, in words; empty while this module still fits."""
    import purerpc.client
    import purerpc.grpc_socket
    import purerpc.grpclib.connection
    import purerpc.wrappers
    from purerpc.grpc_proto import GRPCProtoStream

    found = []
    if not inspect.isclass(getattr(purerpc.client, "_Channel", None)):
        found.append("purerpc.client._Channel is gone (client_channel builds one)")
    else:
        source = inspect.getsource(purerpc.client._Channel)
        if f"self.{CHANNEL_SOCKET_ATTRIBUTE}" not in source:
            found.append(
                f"purerpc.client._Channel no longer keeps its socket in {CHANNEL_SOCKET_ATTRIBUTE}"
            )
    if f"channel.{CHANNEL_SOCKET_ATTRIBUTE}" not in inspect.getsource(purerpc.client):
        found.append(
            f"purerpc.client no longer reads channel.{CHANNEL_SOCKET_ATTRIBUTE} to open streams"
        )
    for name in STREAM_CONTRACT:
        if not any(name in inspect.getsource(cls) for cls in GRPCProtoStream.__mro__[:-1]):
            found.append(f"purerpc's GRPCProtoStream has no {name} (PurerpcStream stands in)")
    wrappers = inspect.getsource(purerpc.wrappers)
    for name in ("receive_message", "send_message", "close(", "end_stream_event"):
        if f"stream.{name}" not in wrappers:
            found.append(f"purerpc's wrappers no longer call stream.{name} (PurerpcStream)")
    for name in (
        "_receive_window_update_frame",
        "_prepare_for_sending",
    ):
        if not callable(getattr(h2.connection.H2Connection, name, None)):
            found.append(f"h2.connection.H2Connection.{name} moved (H2Connection uses it)")
    conn = h2.connection.H2Connection()
    manager = getattr(conn, "_inbound_flow_control_window_manager", None)
    if not callable(getattr(manager, "process_bytes", None)):
        found.append("h2's connection window manager moved (acknowledge_connection_data)")
    if not callable(getattr(h2.stream.H2Stream, "acknowledge_received_data", None)):
        found.append("h2.stream.H2Stream.acknowledge_received_data moved")
    if not isinstance(getattr(h2.connection.H2ConnectionStateMachine, "_transitions", None), dict):
        found.append("h2's H2ConnectionStateMachine._transitions moved (_GoAwayTolerantStates)")
    socket_source = inspect.getsource(purerpc.grpc_socket.GRPCSocket.__init__)
    if "self._grpc_connection = GRPCConnection" not in socket_source:
        found.append("purerpc's GRPCSocket no longer keeps its _grpc_connection (client_channel)")
    connection_source = inspect.getsource(purerpc.grpclib.connection.GRPCConnection.__init__)
    if "self.h2_connection = " not in connection_source:
        found.append("purerpc's GRPCConnection no longer keeps h2_connection (client_channel)")
    if not hasattr(hpack.Encoder().header_table, "resized"):
        found.append("hpack's HeaderTable has no resized flag (StatelessEncoder reads it)")
    return found
