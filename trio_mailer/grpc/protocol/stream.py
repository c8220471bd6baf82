"""One gRPC call's stream, as the protocol object keeps it: its head, its input, its state.

No I/O: the connection (``connection.py``) feeds it DATA and asks it what to answer; the Trio
layer reads its messages through the connection. A stream's input is bounded by its window: the
deframer refuses a message over the limit from its 5-byte prefix, and the bytes buffered here
are returned to the stream's flow-control window only as the handler takes them.
"""

from __future__ import annotations

from collections import deque

import attrs

from trio_mailer.core import http2_limits as lim

# The response content-types: the request's, when it named proto explicitly.
GRPC = b"application/grpc"
GRPC_PROTO = b"application/grpc+proto"


@attrs.define(eq=False, slots=True)
class GrpcStream:
    """A call's stream from the request head until the stream ends at our side."""

    stream_id: int
    head: lim.RequestHead
    started_s: float
    deadline_s: float | None
    deframer: lim.Deframer
    messages: deque[lim.Frame] = attrs.Factory(deque)
    input_ended: bool = False
    # Received bytes buffered here and not yet returned to the stream's window.
    unacked_bytes: int = 0
    headers_sent: bool = False
    # The stream ended at our side: a status sent, or the client's RST_STREAM. ``end_code`` is
    # the status the client got (CANCELLED for its own reset).
    ended: bool = False
    end_code: int | None = None
    end_message: str = ""

    @property
    def content_type(self) -> bytes:
        return GRPC_PROTO if self.head.content_type == "application/grpc+proto" else GRPC

    def feed(self, data: bytes) -> None:
        """Buffer DATA of this stream.

        Raises:
            lim.MessageTooLarge, lim.BadMessage: the message must be refused on this stream.
        """
        self.unacked_bytes += len(data)
        self.messages.extend(self.deframer.feed(data))

    def take(self) -> tuple[lim.Frame | None, int]:
        """The next message, and the bytes to return to the stream's window for it."""
        if not self.messages:
            return None, 0
        frame = self.messages.popleft()
        size = 5 + len(frame.payload)
        self.unacked_bytes -= size
        return frame, size

    def release(self) -> int:
        """Drop the buffered input; the bytes to return to the stream's window."""
        self.messages.clear()
        size, self.unacked_bytes = self.unacked_bytes, 0
        return size

    def reset_is_early(self, now_s: float) -> bool:
        """A client's reset of this stream looks like the rapid-reset shape: nothing was
        answered yet, and its deadline (if any) was not near. A reset after the response
        began, or at the deadline (within ``DEADLINE_RESET_SLACK_S``: the client's clock
        started first), is an ordinary cancel."""
        if self.headers_sent:
            return False
        return self.deadline_s is None or now_s < self.deadline_s - lim.DEADLINE_RESET_SLACK_S
