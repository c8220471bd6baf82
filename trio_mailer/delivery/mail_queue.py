"""The outbound queue: admission in front, retries behind, and a bound on both.

Theory of operation
-------------------
Accepted mail enters through a ``trio.open_memory_channel(queue_size)`` with ``put_nowait``: the
gRPC handler never waits, and a full channel is the caller's signal to back off
(``sent=false, reason="queue full"``).

Mail that must be tried again later waits in a heap ordered by due time (``retry_at``). A sender
asks ``next_due()`` for work and gets, in this order: a retry whose time has come; else a new mail
from the channel, but only while the retry heap has room for every mail in flight (so a failed
attempt always finds a place and nothing is dropped); else it waits until either becomes
possible. A mail deferred with a 4xx therefore never holds up the mails behind it.

Mail held in memory is bounded: at most ``capacity`` in the channel plus ``retry_capacity``
waiting for a retry or in flight. When the heap is full, the senders stop taking new mail, the
channel fills, and callers are refused at once: that is the backpressure.

A place reserved by a gRPC call whose mail is being written to the outbox is the call's: mail
recovered from the outbox at start-up waits for a place nobody holds (``put_recovered``), and
``close()`` (shutdown) stops new reservations but closes the channel only once every reserved
place is filled or released, so a mail stored while shutdown begins is still queued, delivered
in the drain and answered ``sent=true``.

``close()`` stops admission; ``next_due()`` returns ``None`` once the channel is drained, no
retry is waiting and no mail is in flight anywhere.
"""

from __future__ import annotations

import heapq
import itertools
import math

import attrs
import trio

from trio_mailer.core.errors import ShuttingDown
from trio_mailer.core.message import OutgoingMail


@attrs.frozen
class Delivery:
    """An accepted mail and its delivery history so far."""

    mail: OutgoingMail
    accepted_at_s: float  # trio clock
    attempts: int = 0
    last_reply: str = ""  # the last SMTP reply or failure, for the log
    last_reply_code: int | None = None  # its code; None when the session broke
    possible_duplicate: bool = False  # a session broke after the final "." once
    # The accepting call's span, W3C traceparent ("": none): its attempts are traced under it.
    # Stored with the mail (MailRecord.traceparent): a mail recovered from the outbox keeps it.
    traceparent: str = ""

    @property
    def message_id(self) -> str:
        return self.mail.message_id

    def replace(self, **changes: object) -> Delivery:
        """``attrs.evolve(self, **changes)``, at a fraction of its cost (twice per mail)."""
        fields = {
            "mail": self.mail,
            "accepted_at_s": self.accepted_at_s,
            "attempts": self.attempts,
            "last_reply": self.last_reply,
            "last_reply_code": self.last_reply_code,
            "possible_duplicate": self.possible_duplicate,
            "traceparent": self.traceparent,
        }
        fields.update(changes)
        return Delivery(**fields)  # type: ignore[arg-type]  # the keys are the fields above


@attrs.frozen
class QueueStatistics:
    queued: int  # accepted, not yet taken by a sender
    retry_waiting: int
    in_flight: int
    capacity: int
    retry_capacity: int
    closed: bool


@attrs.define
class MailQueue:
    _send: trio.MemorySendChannel[Delivery]
    _receive: trio.MemoryReceiveChannel[Delivery]
    capacity: int
    retry_capacity: int
    _retries: list[tuple[float, int, Delivery]] = attrs.Factory(list)
    _sequence: itertools.count[int] = attrs.Factory(itertools.count)
    _in_flight: int = 0
    _channel_drained: bool = False
    _reserved: int = 0
    _waiters: set[trio.CancelScope] = attrs.Factory(set)
    _closing: bool = False
    _room: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    @classmethod
    def open(cls, capacity: int, retry_capacity: int) -> MailQueue:
        send, receive = trio.open_memory_channel[Delivery](capacity)
        return cls(send, receive, capacity, retry_capacity)

    # ---- the gRPC side ----

    def put_nowait(self, mail: OutgoingMail) -> Delivery:
        """Accept ``mail`` without waiting.

        Raises:
            trio.WouldBlock: the queue is full.
            ShuttingDown: the queue was closed for shutdown.
        """
        self.reserve_nowait()
        return self.put_reserved(mail, accepted_at_s=trio.current_time())

    def full(self) -> bool:
        """True when ``put_nowait`` would refuse: lets a caller skip building a message."""
        return self._send.statistics().current_buffer_used + self._reserved >= self.capacity

    def reserve_nowait(self) -> None:
        """Hold a place for a mail that is being written to the outbox.

        The place is kept while the commit runs, so a mail that was stored always finds room;
        ``put_reserved`` fills it, ``release`` gives it back.

        Raises:
            trio.WouldBlock: the queue is full.
            ShuttingDown: the queue was closed for shutdown.
        """
        if self._closing:
            raise ShuttingDown()
        if self.full():
            raise trio.WouldBlock
        self._reserved += 1

    def release(self) -> None:
        self._reserved -= 1
        self._after_reservation()

    def _after_reservation(self) -> None:
        self._room.unpark_all()
        if self._closing and self._reserved == 0:
            self._send.close()
            self._wake()

    def put_reserved(
        self, mail: OutgoingMail, accepted_at_s: float, traceparent: str = ""
    ) -> Delivery:
        """Fill a place taken with ``reserve_nowait`` (``traceparent``: the accepting call's
        span, see ``Delivery``).

        Raises:
            ShuttingDown: the queue was closed meanwhile (the mail is in the outbox, and the
                next start delivers it).
        """
        delivery = Delivery(mail, accepted_at_s=accepted_at_s, traceparent=traceparent)
        try:
            self._send.send_nowait(delivery)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ShuttingDown() from None
        finally:
            self._reserved -= 1
            self._after_reservation()
        return delivery

    async def put_recovered(self, delivery: Delivery) -> None:
        """Queue a mail found unfinished in the outbox at start-up, waiting for a place that
        no gRPC call has reserved.

        Raises:
            ShuttingDown: the queue was closed.
        """
        while True:
            if self._closing:
                raise ShuttingDown()
            if not self.full():
                self._send.send_nowait(delivery)
                return
            await self._room.park()

    async def wait_for_room(self) -> None:
        """Return when a place may have been freed (``full()`` may be true again: look)."""
        await self._room.park()

    def close(self) -> None:
        """Take no more mail; the senders finish what is queued or waiting (and what the
        calls holding a reserved place put in)."""
        self._closing = True
        self._room.unpark_all()
        if self._reserved == 0:
            self._send.close()
        self._wake()

    # ---- the sender side ----

    async def next_due(self) -> Delivery | None:
        """The next mail to attempt, or None when there is no more work at all."""
        if not self._channel_drained and (
            not self._retries or self._retries[0][0] > trio.current_time()
        ):
            # The common case under load, without a cancel scope: a new mail is waiting and
            # the retry heap has room for it.
            if len(self._retries) + self._in_flight < self.retry_capacity:
                await trio.lowlevel.checkpoint_if_cancelled()  # as ``receive()`` would
                try:
                    delivery = self._receive.receive_nowait()
                except trio.WouldBlock:
                    pass
                except trio.EndOfChannel:
                    self._channel_drained = True
                else:
                    self._in_flight += 1
                    self._room.unpark_all()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return delivery
        while True:
            now = trio.current_time()
            if self._retries and self._retries[0][0] <= now:
                _, _, delivery = heapq.heappop(self._retries)
                self._in_flight += 1
                return delivery
            if self._channel_drained and not self._retries and self._in_flight == 0:
                return None
            deadline = self._retries[0][0] if self._retries else math.inf
            room = len(self._retries) + self._in_flight < self.retry_capacity
            with trio.move_on_at(deadline) as scope:
                self._waiters.add(scope)
                try:
                    if room and not self._channel_drained:
                        delivery = await self._receive.receive()
                        self._in_flight += 1
                        self._room.unpark_all()
                        return delivery
                    await trio.sleep_forever()
                except trio.EndOfChannel:
                    self._channel_drained = True
                finally:
                    self._waiters.discard(scope)

    def retry_at(self, delivery: Delivery, at_s: float) -> None:
        """Put an in-flight ``delivery`` back, due at ``at_s`` (trio clock)."""
        heapq.heappush(self._retries, (at_s, next(self._sequence), delivery))
        self._in_flight -= 1
        self._wake()

    def finish(self, delivery: Delivery) -> None:
        """An in-flight ``delivery`` reached its outcome (delivered or failed)."""
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        # A waiter re-examines the state: a retry due sooner, room for new mail, or the end.
        for scope in self._waiters:
            scope.cancel()

    # ---- reporting ----

    def take_leftovers(self) -> list[Delivery]:
        """Remove and return what is still queued or waiting (for the shutdown report)."""
        leftovers = [delivery for _, _, delivery in sorted(self._retries)]
        self._retries.clear()
        while True:
            try:
                leftovers.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return leftovers

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            queued=self._send.statistics().current_buffer_used,
            retry_waiting=len(self._retries),
            in_flight=self._in_flight,
            capacity=self.capacity,
            retry_capacity=self.retry_capacity,
            closed=self._closing,
        )
