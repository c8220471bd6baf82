"""The live status of every mail in this process, and its watchers.

The outbox holds what must survive a restart; this board holds what changes too often to write
down (an attempt starting) and wakes ``WatchStatus`` streams. The sender reports each change
here first (no I/O), then, for the changes that matter after a crash (a retry scheduled, a final
outcome), waits for the outbox to store them. A finished mail leaves the board once its outcome
is stored: from then on the outbox answers for it, until the retention period prunes it.

Watchers wait on ``Wakeups`` keyed by message id, so a client that goes away leaves nothing
behind.
"""

from __future__ import annotations

import logging

import attrs

from trio_mailer.core.mail_lifecycle import MailRecord, StatusChange, check_change
from trio_mailer.wakeups import Wakeups

log = logging.getLogger(__name__)


@attrs.define
class StatusBoard:
    _live: dict[str, MailRecord] = attrs.Factory(dict)
    _wakeups: Wakeups = attrs.Factory(Wakeups)

    def track(self, record: MailRecord) -> None:
        """A mail was accepted (or recovered at start-up)."""
        self._live[record.message_id] = record
        self._wakeups.wake(record.message_id)

    def change(self, change: StatusChange) -> MailRecord | None:
        """Apply a sender's report; returns the new record (None for an unknown or finished mail).

        A change the lifecycle table refuses is logged at ERROR with the Message-ID and leaves
        the mail in the defined state ``check_change`` chose; it never raises.
        """
        record = self._live.get(change.message_id)
        if record is None or record.state.terminal:
            return None
        applied = check_change(record, change)
        if applied.problem is not None:
            log.error("status board: %s", applied.problem, extra={"message_id": change.message_id})
        record = applied.record
        self._live[change.message_id] = record
        self._wakeups.wake(change.message_id)
        return record

    def changed_elsewhere(self, message_id: str) -> None:
        """Another replica stored a change of ``message_id`` (a NOTIFY): wake its watchers."""
        self._wakeups.wake(message_id)

    def forget(self, message_id: str) -> None:
        """The mail's outcome is stored in the outbox: it answers from now on."""
        self._live.pop(message_id, None)

    def get(self, message_id: str) -> MailRecord | None:
        return self._live.get(message_id)

    async def wait_for_change(self, message_id: str) -> None:
        """Return at the next change of ``message_id``."""
        await self._wakeups.wait(message_id)

    def unfinished(self) -> tuple[int, float | None]:
        """Mails accepted (or recovered) and not finished: how many, and the oldest one's
        acceptance time (Unix seconds; None when there is none)."""
        open_records = [r for r in self._live.values() if not r.state.terminal]
        oldest = min((r.accepted_at_unix for r in open_records), default=None)
        return len(open_records), oldest

    def watchers(self) -> int:
        return self._wakeups.waiting()
