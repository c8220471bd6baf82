"""The bounded outbound queue between the gRPC handlers and the sender.

A ``trio.open_memory_channel(size)``: the handlers put with ``put_nowait`` and never wait; a full
queue is the caller's signal to back off (``sent=false, reason="queue full"``), which keeps
memory bounded when the relay is slow or down.
"""

from __future__ import annotations

import attrs
import trio

from .errors import ShuttingDown
from .message import OutgoingMail


@attrs.frozen
class QueueStatistics:
    queued: int
    capacity: int
    closed: bool


@attrs.define
class MailQueue:
    _send: trio.MemorySendChannel[OutgoingMail]
    receive: trio.MemoryReceiveChannel[OutgoingMail]
    capacity: int

    @classmethod
    def open(cls, capacity: int) -> MailQueue:
        send, receive = trio.open_memory_channel[OutgoingMail](capacity)
        return cls(send, receive, capacity)

    def put_nowait(self, mail: OutgoingMail) -> None:
        """Queue ``mail`` without waiting.

        Raises:
            trio.WouldBlock: the queue is full.
            ShuttingDown: the queue was closed for shutdown.
        """
        try:
            self._send.send_nowait(mail)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ShuttingDown() from None

    def close(self) -> None:
        """Take no more mail; the sender drains what is queued, then sees the end."""
        self._send.close()

    def take_leftovers(self) -> list[OutgoingMail]:
        """Remove and return whatever is still queued (for reporting at shutdown)."""
        leftovers = []
        while True:
            try:
                leftovers.append(self.receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return leftovers

    def statistics(self) -> QueueStatistics:
        stats = self._send.statistics()
        return QueueStatistics(
            queued=stats.current_buffer_used,
            capacity=self.capacity,
            closed=stats.open_send_channels == 0,
        )
