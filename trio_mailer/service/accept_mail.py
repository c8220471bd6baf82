"""The use case "accept a mail": may this send become a mail, and if so, store it and queue it.

Whatever the caller (a gRPC handler, the CLI, a test), one ``SendOrder`` goes through the same
steps, in this order:

1. **Draining?** A service that is stopping takes nothing (``ShuttingDown``).
2. **Queue full, no key?** The flood's path: nothing to look up or build. The answer waits its
   turn (``core.load_shedding``), so delivery keeps the loop; a place freed meanwhile is taken.
3. **Admission** (``service.admission``): the idempotency key (a repeat answers with its first
   reply), the suppression list, the recipient and caller limits.
4. **Compose** the message (``core.message.MailComposer``: render, build, check the bytes).
5. **Reserve** a queue place, **store** the record (durable before the answer with the file
   outbox; the key and rate-limit rows in the same commit), **track** it on the status board,
   and **queue** it for the senders.

The answer is ``Accepted`` (``repeat`` when an earlier call's mail answers) or ``Refused``
(queue full, rate limited, suppressed, with when to retry). Errors are core errors
(``core.errors``): the caller's adapter turns them into its own vocabulary. A call whose
deadline passes before its mail is stored stores nothing and gets ``DeadlineExceeded``.

Every order's outcome is counted in ``trio_mailer_requests_total{method,outcome}``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import datetime

import attrs
import trio

from trio_mailer import tracing
from trio_mailer.core.addresses import mask
from trio_mailer.core.errors import (
    DeadlineExceeded,
    GrpcStatus,
    InternalError,
    InvalidRequest,
    MailerError,
    MessageBuildError,
    OutboxError,
    ShuttingDown,
)
from trio_mailer.core.idempotency import payload_fingerprint, validate_idempotency_key
from trio_mailer.core.load_shedding import DEADLINE_MARGIN_S, RefusalPacer
from trio_mailer.core.mail_lifecycle import MailRecord
from trio_mailer.core.message import MailComposer, OutgoingMail
from trio_mailer.core.rendering import MailTemplates, RenderError
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.logs import printable
from trio_mailer.metrics import Metrics
from trio_mailer.service.admission import (
    CALLER_LIMITED,
    RECIPIENT_LIMITED,
    SUPPRESSED,
    AdmissionControl,
    Refusal,
    Repeat,
    Ticket,
)
from trio_mailer.store.admission_tables import IdempotencyHit, StoreRefusal
from trio_mailer.store.outbox import Outbox
from trio_mailer.store.status_board import StatusBoard

log = logging.getLogger("trio_mailer.grpc.mailer_service")

QUEUE_FULL_REASON = "queue full"
DRAINING_LOG_INTERVAL_S = 1.0  # at most one line this often for the calls a drain refuses
# The metrics' outcome label for each refusal reason, and for each error status.
REFUSAL_OUTCOMES = {
    QUEUE_FULL_REASON: "queue_full",
    RECIPIENT_LIMITED: "recipient_rate_limited",
    CALLER_LIMITED: "caller_rate_limited",
    SUPPRESSED: "suppressed",
}
ERROR_OUTCOMES = {
    GrpcStatus.INVALID_ARGUMENT: "invalid",
    GrpcStatus.UNAVAILABLE: "unavailable",
    GrpcStatus.FAILED_PRECONDITION: "idempotency_conflict",
    GrpcStatus.ABORTED: "idempotency_busy",
    GrpcStatus.DEADLINE_EXCEEDED: "deadline_exceeded",
}
_STORE_REFUSALS = {
    "recipient": RECIPIENT_LIMITED,
    "caller": CALLER_LIMITED,
    "suppressed": SUPPRESSED,
}


@attrs.frozen
class SendOrder:
    """One send, whatever its RPC: what admission, the log and the metrics need, and how to
    build the mail."""

    method: str  # for the metrics: Send, SendPass, SendRetrieve
    kind: str  # for the log
    to: str
    key: str  # the idempotency key as sent ("" for none)
    fingerprint_fields: tuple[tuple[str, str], ...]
    compose: Callable[[datetime], OutgoingMail]
    caller: str  # who is calling (idempotency space, caller limit)
    deadline_s: float  # on the trio clock; inf for none

    @property
    def wait_s(self) -> float | None:
        """How long a repeat may wait for its first call (None: no deadline of its own)."""
        if math.isinf(self.deadline_s):
            return None
        return max(0.0, self.deadline_s - trio.current_time())


@attrs.frozen
class Accepted:
    message_id: str
    repeat: bool = False  # an earlier call with the same key was accepted: its mail answers


@attrs.frozen
class Refused:
    reason: str  # QUEUE_FULL_REASON, RECIPIENT_LIMITED, CALLER_LIMITED, SUPPRESSED
    retry_after_s: float  # 0.0: not something that passes by waiting


Answer = Accepted | Refused


@attrs.define
class AcceptMail:
    """The acceptance use case (see the module's docstring). Every part is required."""

    composer: MailComposer
    queue: MailQueue
    outbox: Outbox
    board: StatusBoard
    admission: AdmissionControl
    metrics: Metrics
    pacer: RefusalPacer
    refusal_wait_s: float
    now: Callable[[], datetime]  # the Date header's clock
    wall_clock: Callable[[], float]  # unix seconds, stored with the record
    draining: bool = False
    refused_queue_full: int = 0
    _room_watch: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _last_full_log: float = attrs.field(init=False, default=-math.inf)
    refused_draining: int = attrs.field(init=False, default=0)  # ShuttingDown answers
    _draining_unlogged: int = attrs.field(init=False, default=0)  # since the last such line
    _last_draining_log: float = attrs.field(init=False, default=-math.inf)  # trio time

    @property
    def templates(self) -> MailTemplates:
        return self.composer.templates

    def replace_templates(self, templates: MailTemplates) -> None:
        """Use ``templates`` from the next order on (a reload; they were checked already)."""
        self.composer = attrs.evolve(self.composer, templates=templates)

    async def __call__(self, order: SendOrder) -> Answer:
        """Accept ``order`` or refuse it.

        Raises:
            MailerError: the order is invalid, the service is stopping, the key conflicts or
                is busy, the deadline passed before the mail was stored (``DeadlineExceeded``).
            OutboxError: the mail cannot be stored now.
        """
        outcome = "internal"
        try:
            with trio.move_on_at(order.deadline_s):
                answer = await self._admit(order)
                if isinstance(answer, Refused):
                    outcome = REFUSAL_OUTCOMES[answer.reason]
                else:
                    outcome = "repeat" if answer.repeat else "accepted"
                return answer
            log.info("%s call past its deadline before its mail was stored", order.method)
            raise DeadlineExceeded("deadline exceeded; nothing was stored")
        except (MailerError, OutboxError) as exc:
            outcome = ERROR_OUTCOMES.get(exc.grpc_status, "internal")
            raise
        except trio.Cancelled:
            # The front's deadline for the call fired, or the client went away.
            past = trio.current_time() >= order.deadline_s
            outcome = "deadline_exceeded" if past else "cancelled"
            raise
        finally:
            self.metrics.requests.labels(order.method, outcome).inc()

    async def _admit(self, order: SendOrder) -> Answer:
        try:
            if self.draining:
                raise ShuttingDown()
            if not order.key and self.queue.full():
                # The flood's path: nothing to look up, nothing to count, nothing to build;
                # and the answer waits its turn, so that delivery keeps the loop.
                room = await self._refusal_turn(order)
                if self.draining:
                    raise ShuttingDown()
                if not room:
                    return self._queue_full(order.kind)
            key = validate_idempotency_key(order.key)
            ticket = await self.admission.begin(
                order.caller,
                key,
                payload_fingerprint(order.method, order.fingerprint_fields),
                order.to,
                wait_s=order.wait_s,
            )
        except ShuttingDown:
            self._refused_draining()
            raise
        except MailerError as exc:
            log.info("refused %s request: %s", order.kind, printable(exc.message))
            raise
        try:
            return await self._accept(order, ticket)
        finally:
            ticket.close()

    async def _accept(self, order: SendOrder, ticket: Ticket) -> Answer:
        kind = order.kind
        try:
            if ticket.repeat is not None:
                return _repeated(ticket.repeat)
            refusal = ticket.refusal()
            if refusal is not None:
                return await self._refuse(order, ticket, refusal)
            # Under overload most calls end here: refuse before the costly validation and
            # message building, so the flood leaves the sender the CPU (and the GIL).
            if self.queue.full() and not await self._refusal_turn(order):
                return await self._refuse(order, ticket, None)
            with tracing.span("compose", **{"mailer.kind": kind}):
                mail = order.compose(self.now())
            try:
                self.queue.reserve_nowait()
            except trio.WouldBlock:
                return await self._refuse(order, ticket, None)
            # The call's span goes with the mail, stored: its attempts are traced under it,
            # even after a restart or on another replica.
            record = MailRecord.accepted(
                mail,
                accepted_at_unix=self.wall_clock(),
                traceparent=tracing.current_traceparent(),
            )
            try:
                # Durable before the caller hears sent=true (with the file outbox); the key and
                # the rate-limit row are in the same commit.
                acceptance = ticket.acceptance(mail.message_id)
                with tracing.span("store", **{"mailer.message_id": mail.message_id}):
                    if acceptance is None:
                        await self.outbox.add(record)
                    else:
                        await self.outbox.add(record, acceptance)
            except IdempotencyHit as hit:
                self.queue.release()
                return _repeated(ticket.resolve(hit.entry))
            except StoreRefusal as refused:
                # A shared outbox: another replica's accepts filled the limit, or it
                # suppressed the address.
                self.queue.release()
                reason = _STORE_REFUSALS[refused.reason]
                return self._refused(kind, order.to, Refusal(reason, refused.retry_after_s))
            except BaseException:
                self.queue.release()
                raise
            ticket.accepted(mail.message_id)
            self.board.track(record)
            self.queue.put_reserved(
                mail, accepted_at_s=trio.current_time(), traceparent=record.traceparent
            )
        except OutboxError as exc:
            log.error("cannot store a %s mail: %s", kind, exc)
            raise
        except MessageBuildError as exc:
            log.error("message failed its safety check: %s", printable(exc.detail))
            raise
        except MailerError as exc:
            log.info("refused %s request: %s", kind, printable(exc.message))
            raise
        except RenderError as exc:
            log.warning("rendering failed for a %s request: %s", kind, printable(str(exc)))
            raise InvalidRequest("request", "the values cannot be rendered into the mail") from None
        except Exception as exc:
            log.exception("unexpected error while accepting a %s mail", kind)
            raise InternalError() from exc
        log.debug("accepted %s mail %s", kind, mail.message_id)
        return Accepted(mail.message_id)

    async def _refuse(self, order: SendOrder, ticket: Ticket, refusal: Refusal | None) -> Answer:
        """A refusal; but a stored first call of the ticket's key answers instead."""
        repeat = await ticket.stored_repeat()
        if repeat is not None:
            return _repeated(repeat)
        if refusal is None:
            return self._queue_full(order.kind)
        return self._refused(order.kind, order.to, refusal)

    def _refused(self, kind: str, to: str, refusal: Refusal) -> Refused:
        # Without the code; the address masked.
        log.info("refused %s mail to %s: %s", kind, mask(to), refusal.reason)
        return Refused(refusal.reason, refusal.retry_after_s)

    def _refused_draining(self) -> None:
        """A drain refuses every call: one summary line a second at most (a busy service gets
        hundreds of calls in its first moments of a drain), the first at once; the stop
        summary counts them all."""
        self.refused_draining += 1
        self._draining_unlogged += 1
        now = trio.current_time()
        if now - self._last_draining_log >= DRAINING_LOG_INTERVAL_S:
            log.info("refused %d send call(s): server is shutting down", self._draining_unlogged)
            self._draining_unlogged = 0
            self._last_draining_log = now

    def _queue_full(self, kind: str) -> Refused:
        self.refused_queue_full += 1
        # One line per second at most: a flood must not turn into a flood of log lines.
        now = time.monotonic()
        if now - self._last_full_log >= 1.0:
            log.warning(
                "refusing %s mail: queue full (%d refused so far)",
                kind,
                self.refused_queue_full,
            )
            self._last_full_log = now
        return Refused(QUEUE_FULL_REASON, self.admission.pace.next_place_s())

    async def _refusal_turn(self, order: SendOrder) -> bool:
        """The queue is full: wait for this call's turn to be refused (``core.load_shedding``),
        within ``refusal_wait_s`` and the call's deadline. True when there is room after all."""
        now = trio.current_time()
        latest = min(now + self.refusal_wait_s, order.deadline_s - DEADLINE_MARGIN_S)
        turn = self.pacer.turn_s(now, latest)
        if turn > now:
            with trio.move_on_at(turn):
                # One waiter at a time (the lock is FIFO) watches for a freed place, so a place
                # is taken as soon as the senders free it, not at the next turn, and a freed
                # place wakes one task, not every waiting call.
                async with self._room_watch:
                    while self.queue.full():
                        await self.queue.wait_for_room()
        return not self.queue.full()


def _repeated(repeat: Repeat) -> Accepted:
    return Accepted(repeat.message_id, repeat=True)
