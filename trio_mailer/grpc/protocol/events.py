"""What the HTTP/2 protocol object tells the Trio layer: the event vocabulary.

``ServerConnection.receive_data`` and ``ServerConnection.on_timer`` return lists of these; the
Trio layer (``trio_mailer/grpc/http2_server.py``) acts on each: it starts a handler task, wakes a
handler waiting for input or for window, cancels a handler whose stream ended without it, ends
the streaming calls of a draining connection, or closes the socket. No event asks for I/O of its
own: the bytes to send are always in ``ServerConnection.data_to_send()``.
"""

from __future__ import annotations

import attrs

from trio_mailer.grpc.protocol.stream import GrpcStream


@attrs.frozen(slots=True)
class CallStarted:
    """A request head passed its checks: serve it on ``stream`` (which may have ended already,
    when its reset or refusal came in the same bytes: then there is nothing to run)."""

    stream: GrpcStream


@attrs.frozen(slots=True)
class InputChanged:
    """A message arrived on the call, or its input ended: wake its reader."""

    stream_id: int


@attrs.frozen(slots=True)
class CallEnded:
    """The call's stream ended without its handler: the client reset it (``code`` CANCELLED),
    or a message was refused and answered (``code`` is what the client got). Stop the handler;
    whatever it sends from now on is dropped."""

    stream_id: int
    code: int


@attrs.frozen(slots=True)
class WindowOpened:
    """The client's flow-control windows grew: handlers waiting to send may go on."""


@attrs.frozen(slots=True)
class GoingAway:
    """The final GOAWAY is sent: no stream above ``last_stream_id`` will be served.

    ``graceful`` (a drain, or an idle connection): the calls in flight finish, streaming
    responses end with UNAVAILABLE, and the connection closes when none is left. Otherwise (a
    budget tripped): the connection stops reading; its calls get a short grace, then end."""

    last_stream_id: int
    graceful: bool


@attrs.frozen(slots=True)
class ConnectionEnded:
    """The connection is over (the client closed it, broke the protocol, or sent GOAWAY):
    end every call and close the socket after the last bytes are sent."""

    reason: str


Event = CallStarted | InputChanged | CallEnded | WindowOpened | GoingAway | ConnectionEnded
