"""The live status of every mail in this process, and its watchers.

The outbox holds what must survive a restart; this board holds what changes too often to write
down (an attempt starting) and wakes ``WatchStatus`` streams. The sender reports each change
here first (no I/O), then, for the changes that matter after a crash (a retry scheduled, a final
outcome), waits for the outbox to store them. A finished mail leaves the board once its outcome
is stored: from then on the outbox answers for it, until the retention period prunes it.

Watchers park on one ``trio.lowlevel.ParkingLot`` per message id, created with the first
watcher and dropped with the last, so a client that goes away leaves nothing behind.
"""

from __future__ import annotations

import attrs
import trio

from .mail_status import MailRecord, StatusChange, apply_change


@attrs.define
class StatusBoard:
    _live: dict[str, MailRecord] = attrs.Factory(dict)
    _lots: dict[str, trio.lowlevel.ParkingLot] = attrs.Factory(dict)
    _watchers: dict[str, int] = attrs.Factory(dict)

    def track(self, record: MailRecord) -> None:
        """A mail was accepted (or recovered at start-up)."""
        self._live[record.message_id] = record
        self._wake(record.message_id)

    def change(self, change: StatusChange) -> MailRecord | None:
        """Apply a sender's report; returns the new record (None for an unknown mail)."""
        record = self._live.get(change.message_id)
        if record is None or record.state.terminal:
            return None
        record = apply_change(record, change)
        self._live[change.message_id] = record
        self._wake(change.message_id)
        return record

    def forget(self, message_id: str) -> None:
        """The mail's outcome is stored in the outbox: it answers from now on."""
        self._live.pop(message_id, None)

    def get(self, message_id: str) -> MailRecord | None:
        return self._live.get(message_id)

    async def wait_for_change(self, message_id: str) -> None:
        """Return at the next change of ``message_id`` (or when it leaves the board)."""
        self._watchers[message_id] = self._watchers.get(message_id, 0) + 1
        lot = self._lots.setdefault(message_id, trio.lowlevel.ParkingLot())
        try:
            await lot.park()
        finally:
            remaining = self._watchers[message_id] - 1
            if remaining:
                self._watchers[message_id] = remaining
            else:
                del self._watchers[message_id]
                del self._lots[message_id]

    def watchers(self) -> int:
        return sum(self._watchers.values())

    def _wake(self, message_id: str) -> None:
        lot = self._lots.get(message_id)
        if lot is not None:
            lot.unpark_all()
