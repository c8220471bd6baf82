"""Admission: may this call become a mail? Idempotency keys, rate limits, the suppression list.

The handlers call it with (caller identity, idempotency key, payload fingerprint, recipient),
whatever the RPC (SendPass, SendRetrieve, and any later one), so every send path gets the same
rules. The decisions are pure (``core.idempotency``, ``core.rate_limits``, ``core.addresses``,
``core.suppression``); this module holds their state and ties it to the outbox.

Theory of operation
-------------------
``begin`` opens a ``Ticket`` for a call:

1. **Key.** With a key, (caller, key) is looked up in memory. A key whose first call is still
   being handled makes this call wait for that outcome (at most its own deadline, then ABORTED).
   A finished one answers at once: the first reply when the fingerprint matches, else
   FAILED_PRECONDITION (``KeyConflict``). A key past ``window_s`` counts as unused. Otherwise the
   call registers the key as in flight and goes on.
2. **Refusals** (``ticket.refusal()``): a suppressed recipient, then the recipient limit, then the
   caller limit. Passing reserves a slot in both windows at once, so concurrent calls cannot all
   slip through. Before the handler answers any refusal (these, or "queue full") to a keyed call
   that memory did not know, ``stored_repeat`` asks the outbox: after a restart, the repeat of a
   stored mail must get its first reply, not "rate limited".
3. **Store.** The handler stores the mail with ``ticket.acceptance(...)``: the key and the
   rate-limit row go in the mail's own commit (no extra fsync). The outbox checks the key again
   inside that transaction, so a key that memory had forgotten (a restart, an eviction) still
   yields one mail; its ``IdempotencyHit`` goes through ``ticket.resolve``.
4. ``ticket.accepted(message_id)`` remembers the key as finished. ``ticket.close()`` (always, in
   a ``finally``) releases the reserved slots and forgets the key of a call that was not
   accepted, so a refused first call does not consume its key, and wakes the waiting repeats.

Memory stays bounded: finished keys are kept for at most ``MAX_REMEMBERED_KEYS`` (the oldest go
first; the outbox still knows them), the windows forget what has left their period, and the
suppression list holds the addresses the relay called dead within ``suppress_s``.

Clocks: wall-clock unix seconds (``wall_clock``), because the windows and keys are stored and
must mean the same after a restart. Tests pass one tied to the trio clock.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import attrs
import trio

from trio_mailer.core.addresses import mask, normalise
from trio_mailer.core.errors import OutboxError
from trio_mailer.core.idempotency import KeyBusy, KeyConflict
from trio_mailer.core.rate_limits import Pace, RateLimit, SlidingWindow
from trio_mailer.core.suppression import is_dead_address, parse_reply
from trio_mailer.store.admission_tables import Acceptance, KeyEntry, Suppression
from trio_mailer.store.outbox import Outbox

log = logging.getLogger(__name__)

MAX_REMEMBERED_KEYS = 100_000  # finished keys kept in memory; older ones are asked of the outbox
KEY_WAIT_MAX_S = 30.0  # how long a repeat waits for its first call without a deadline of its own
PRUNE_INTERVAL_S = 60.0  # how often the windows and the stored admission rows are pruned

RECIPIENT_LIMITED = "recipient rate limited"
CALLER_LIMITED = "caller rate limited"
SUPPRESSED = "suppressed"


@attrs.frozen
class Refusal:
    reason: str
    retry_after_s: float  # 0.0: not something that passes by waiting


@attrs.frozen
class Repeat:
    """The first call's outcome, answered to a repeat."""

    message_id: str


@attrs.define(eq=False)
class _KeyState:
    fingerprint: str
    done: trio.Event = attrs.field(factory=trio.Event)
    message_id: str | None = None  # set when the first call was accepted
    created_at_unix: float = 0.0


@attrs.define(eq=False)
class Ticket:
    """One call's passage through admission (see the module docstring)."""

    _control: AdmissionControl
    caller: str
    key: str | None
    fingerprint: str
    recipient: str  # normalised
    now_unix: float
    repeat: Repeat | None = None  # set: answer the first call's reply, nothing else to do
    _state: _KeyState | None = None  # the key this call holds in flight
    _reserved: bool = False
    _accepted: bool = False

    def refusal(self) -> Refusal | None:
        """Suppressed, or over a rate limit; None: go on (a slot is then reserved)."""
        return self._control._refusal(self)

    async def stored_repeat(self) -> Repeat | None:
        """Before a refusal: the stored first call of this key, if the outbox has one.

        Raises:
            KeyConflict: the stored key was used for another payload.
        """
        if self.key is None or self._state is None:
            return None
        try:
            entry = await self._control.outbox.find_key(
                self.caller, self.key, self.now_unix - self._control.window_s
            )
        except OutboxError as exc:
            log.error("cannot look up an idempotency key: %s", exc)
            return None
        return None if entry is None else self.resolve(entry)

    def acceptance(self, message_id: str) -> Acceptance | None:
        """What the outbox stores beside the mail, in its commit (None: nothing)."""
        control = self._control
        check_suppressed = control.shared_store and control.suppress_s > 0
        if self.key is None and not control.limits_on and not check_suppressed:
            return None
        shared = control.shared_store
        return Acceptance(
            message_id=message_id,
            caller=self.caller,
            recipient=self.recipient,
            accepted_at_unix=self.now_unix,
            key=self.key,
            fingerprint=self.fingerprint,
            key_window_s=control.window_s,
            log_for_limits=control.limits_on,
            recipient_limit=_pair(control.recipient_limit) if shared else None,
            caller_limit=_pair(control.caller_limit) if shared else None,
            check_suppressed=check_suppressed,
        )

    def resolve(self, entry: KeyEntry) -> Repeat:
        """The key turned out to be stored already (``IdempotencyHit``, or ``stored_repeat``).

        Raises:
            KeyConflict: it was used for another payload.
        """
        self._control._remember(self, entry)
        if entry.fingerprint != self.fingerprint:
            raise KeyConflict()
        self.repeat = Repeat(entry.message_id)
        return self.repeat

    def accepted(self, message_id: str) -> None:
        self._accepted = True
        if self._state is not None:
            self._state.message_id = message_id
            self._state.created_at_unix = self.now_unix

    def close(self) -> None:
        self._control._close(self)


def _pair(limit: RateLimit | None) -> tuple[int, float] | None:
    return None if limit is None else (limit.count, limit.period_s)


@attrs.define(eq=False)
class AdmissionControl:
    outbox: Outbox
    window_s: float
    recipient_limit: RateLimit | None = None
    caller_limit: RateLimit | None = None
    suppress_s: float = 0.0
    wall_clock: Callable[[], float] = time.time
    on_suppressed: Callable[[int], None] | None = None  # told the list's length on each change
    pace: Pace = attrs.field(factory=Pace)
    _keys: collections.OrderedDict[tuple[str, str], _KeyState] = attrs.field(
        factory=collections.OrderedDict
    )
    _recipients: SlidingWindow | None = attrs.field(init=False)
    _callers: SlidingWindow | None = attrs.field(init=False)
    _suppressed: dict[str, Suppression] = attrs.field(factory=dict)
    _to_store: dict[str, Suppression] = attrs.field(factory=dict)
    _store_wanted: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._recipients = SlidingWindow(self.recipient_limit) if self.recipient_limit else None
        self._callers = SlidingWindow(self.caller_limit) if self.caller_limit else None

    @property
    def shared_store(self) -> bool:
        """The outbox is shared by replicas: it checks the limits and the suppression list
        against every replica's rows in the mail's commit (this memory holds only this
        replica's)."""
        return self.outbox.shared

    @property
    def limits_on(self) -> bool:
        return self._recipients is not None or self._callers is not None

    # ---- start-up and upkeep ----

    async def load(self) -> None:
        """Read the rate-limit log and the suppression list back from the outbox.

        Raises:
            OutboxError: the outbox cannot be read.
        """
        now = self.wall_clock()
        periods = [w.limit.period_s for w in (self._recipients, self._callers) if w is not None]
        if periods:
            for row in await self.outbox.accepted_since(now - max(periods)):
                if self._recipients is not None:
                    self._recipients.reserve(row.recipient, row.accepted_at_unix)
                if self._callers is not None:
                    self._callers.reserve(row.caller, row.accepted_at_unix)
        for entry in await self.outbox.list_suppressed(now):
            self._suppressed[entry.address] = entry
        self._suppressed_changed()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Store new suppressions as they come, and prune now and then (runs until cancelled)."""
        task_status.started()
        while True:
            with trio.move_on_after(PRUNE_INTERVAL_S):
                await self._store_wanted.wait()
            self._store_wanted = trio.Event()
            await self.flush()
            await self._prune()

    async def flush(self) -> None:
        """Store the suppressions not yet in the outbox (one that fails waits for next time)."""
        while self._to_store:
            address, entry = next(iter(self._to_store.items()))
            try:
                await self.outbox.suppress(entry)
            except OutboxError as exc:
                log.error("cannot store the suppression of %s: %s", mask(address), exc)
                return
            if self._to_store.get(address) is entry:
                del self._to_store[address]

    async def _prune(self) -> None:
        now = self.wall_clock()
        periods = [0.0]
        for window in (self._recipients, self._callers):
            if window is not None:
                window.prune(now)
                periods.append(window.limit.period_s)
        expired = [a for a, s in self._suppressed.items() if s.until_unix <= now]
        for address in expired:
            del self._suppressed[address]
        if expired:
            self._suppressed_changed()
        try:
            await self.outbox.prune_admission(
                keys_before=now - self.window_s, log_before=now - max(periods), now_unix=now
            )
        except OutboxError as exc:
            log.error("cannot prune the admission tables: %s", exc)

    # ---- a call ----

    async def begin(
        self,
        caller: str,
        key: str | None,
        fingerprint: str,
        recipient: str,
        *,
        wait_s: float | None = None,
    ) -> Ticket:
        """Open the ticket of a call (see the module docstring).

        Args:
            wait_s: how long a repeat may wait for its first call (the caller's deadline).

        Raises:
            KeyConflict: the key was used for another payload.
            KeyBusy: the first call with the key outlasted ``wait_s``.
        """
        ticket = Ticket(self, caller, key, fingerprint, normalise(recipient), self.wall_clock())
        if key is None:
            return ticket
        slot = (caller, key)
        state = self._keys.get(slot)
        if state is not None and state.message_id is None:  # the first call is in flight
            limit_s = KEY_WAIT_MAX_S if wait_s is None else max(0.0, wait_s)
            with trio.move_on_after(limit_s) as waiting:
                while (state := self._keys.get(slot)) is not None and state.message_id is None:
                    await state.done.wait()
            if waiting.cancelled_caught:
                raise KeyBusy()
            ticket.now_unix = self.wall_clock()
        if state is not None and state.created_at_unix > ticket.now_unix - self.window_s:
            assert state.message_id is not None
            self._keys.move_to_end(slot)
            if state.fingerprint != fingerprint:
                raise KeyConflict()
            ticket.repeat = Repeat(state.message_id)
            return ticket
        ticket._state = self._keys[slot] = _KeyState(fingerprint)
        self._keys.move_to_end(slot)
        self._evict()
        return ticket

    def _refusal(self, ticket: Ticket) -> Refusal | None:
        now = ticket.now_unix
        entry = self._suppressed.get(ticket.recipient)
        if entry is not None and entry.until_unix > now:
            return Refusal(SUPPRESSED, 0.0)
        wait_recipient = (
            0.0
            if self._recipients is None
            else self._recipients.retry_after_s(ticket.recipient, now)
        )
        if wait_recipient > 0:
            return Refusal(RECIPIENT_LIMITED, wait_recipient)
        wait_caller = (
            0.0 if self._callers is None else self._callers.retry_after_s(ticket.caller, now)
        )
        if wait_caller > 0:
            return Refusal(CALLER_LIMITED, wait_caller)
        if self._recipients is not None:
            self._recipients.reserve(ticket.recipient, now)
        if self._callers is not None:
            self._callers.reserve(ticket.caller, now)
        ticket._reserved = True
        return None

    def _remember(self, ticket: Ticket, entry: KeyEntry) -> None:
        state = ticket._state
        if state is None:
            return
        state.fingerprint = entry.fingerprint
        state.message_id = entry.message_id
        state.created_at_unix = entry.created_at_unix
        ticket._accepted = False  # this call made nothing; its reserved slots go back
        ticket._state = None
        state.done.set()

    def _close(self, ticket: Ticket) -> None:
        if ticket._reserved and not ticket._accepted:
            if self._recipients is not None:
                self._recipients.release(ticket.recipient, ticket.now_unix)
            if self._callers is not None:
                self._callers.release(ticket.caller, ticket.now_unix)
        ticket._reserved = False
        state = ticket._state
        if state is None:
            return
        ticket._state = None
        if state.message_id is None and ticket.key is not None:
            # Not accepted: the key is not consumed.
            slot = (ticket.caller, ticket.key)
            if self._keys.get(slot) is state:
                del self._keys[slot]
        state.done.set()

    def _evict(self) -> None:
        # The oldest finished keys go; one in flight is moved to the end (there are at most as
        # many of those as calls being handled).
        for _ in range(len(self._keys)):
            if len(self._keys) <= MAX_REMEMBERED_KEYS:
                return
            slot, state = self._keys.popitem(last=False)
            if state.message_id is None:
                self._keys[slot] = state

    async def find(self, caller: str, key: str) -> str | None:
        """The message_id that ``caller``'s ``key`` made within the window, or None.

        Raises:
            OutboxError: the outbox cannot be read.
        """
        now = self.wall_clock()
        state = self._keys.get((caller, key))
        if state is not None and state.message_id is not None:
            return state.message_id if state.created_at_unix > now - self.window_s else None
        entry = await self.outbox.find_key(caller, key, now - self.window_s)
        return None if entry is None else entry.message_id

    # ---- suppression ----

    def mail_failed(self, recipient: str, last_reply: str, message_id: str) -> bool:
        """A mail failed for good: suppress its recipient if the relay called it dead.

        Returns:
            True when the address was put on the list.
        """
        if self.suppress_s <= 0:
            return False
        reply = parse_reply(last_reply)
        if reply is None or not is_dead_address(reply):
            return False
        now = self.wall_clock()
        entry = Suppression(
            address=normalise(recipient),
            since_unix=now,
            until_unix=now + self.suppress_s,
            reply_code=reply.code,
            reply_text=reply.text[:500],
            message_id=message_id,
        )
        self._suppressed[entry.address] = entry
        self._to_store[entry.address] = entry
        self._store_wanted.set()
        self._suppressed_changed()
        log.info(
            "suppressing %s for %gs: the relay answered RCPT with %d %s",
            mask(entry.address),
            self.suppress_s,
            reply.code,
            reply.text[:80],
        )
        return True

    def suppressed(self) -> list[Suppression]:
        now = self.wall_clock()
        return sorted(
            (s for s in self._suppressed.values() if s.until_unix > now), key=lambda s: s.address
        )

    async def unsuppress(self, address: str) -> bool:
        """Take ``address`` off the list (in memory and in the outbox).

        Raises:
            OutboxError: the outbox cannot be written.
        """
        normal = normalise(address)
        self._to_store.pop(normal, None)
        stored = await self.outbox.unsuppress(normal)
        in_memory = self._suppressed.pop(normal, None) is not None
        self._suppressed_changed()
        return stored or in_memory

    def _suppressed_changed(self) -> None:
        if self.on_suppressed is not None:
            self.on_suppressed(len(self._suppressed))

    def statistics(self) -> dict[str, int]:
        return {
            "keys_remembered": len(self._keys),
            "recipients_counted": 0 if self._recipients is None else len(self._recipients),
            "callers_counted": 0 if self._callers is None else len(self._callers),
            "suppressed": len(self._suppressed),
        }
