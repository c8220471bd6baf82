"""The use cases "answer a status" and "watch a mail": what became of a mail, now and as it
changes.

A mail is found on the live status board (``store.status_board``) while this process handles
it, else in the outbox (finished mails, or another replica's). A caller names it by Message-ID,
or by the idempotency key it sent it with (its own keys only). ``watch`` yields the current
record, then each change, and ends after a final state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs

from trio_mailer.core.errors import InvalidRequest, MailerError, MailNotFound
from trio_mailer.core.idempotency import validate_idempotency_key
from trio_mailer.core.mail_lifecycle import MailRecord
from trio_mailer.service.admission import AdmissionControl
from trio_mailer.store.outbox import Outbox
from trio_mailer.store.status_board import StatusBoard

MAX_MESSAGE_ID_CHARS = 256


@attrs.define
class MailStatusLookup:
    """Find a mail's record; watch it change. Every part is required."""

    board: StatusBoard
    outbox: Outbox
    admission: AdmissionControl

    async def message_id(self, caller: str, message_id: str, key: str) -> str:
        """The Message-ID a status request names, directly or by ``caller``'s idempotency key.

        Raises:
            InvalidRequest: both or a malformed key.
            MailNotFound: no mail from this caller with this key within the window.
            OutboxError: the outbox cannot be read.
        """
        if not key:
            return message_id
        if message_id:
            raise InvalidRequest("message_id, idempotency_key", "expected one of the two, got both")
        valid_key = validate_idempotency_key(key)
        assert valid_key is not None
        found = await self.admission.find(caller, valid_key)
        if found is None:
            raise KeyNotFound()
        return found

    async def find(self, message_id: str) -> MailRecord:
        """The mail's record.

        Raises:
            InvalidRequest: an empty or over-long Message-ID.
            MailNotFound: never accepted here, or older than the retention.
            OutboxError: the outbox cannot be read.
        """
        if not message_id or len(message_id) > MAX_MESSAGE_ID_CHARS:
            raise InvalidRequest(
                "message_id",
                f"expected 1 to {MAX_MESSAGE_ID_CHARS} characters, got {len(message_id)}",
            )
        record = self.board.get(message_id)
        if record is None:
            record = await self.outbox.get(message_id)
        if record is None:
            raise MailNotFound()
        return record

    async def watch(self, message_id: str) -> AsyncIterator[MailRecord]:
        """The current record, then each change, ending after a final state (errors as
        ``find``)."""
        record = await self.find(message_id)
        yield record
        while not record.state.terminal:
            # Look before waiting: a change that landed while the caller was suspended at
            # ``yield`` (or a final state already moved to the outbox) is not missed.
            latest = await self.find(record.message_id)
            if latest == record:
                await self.board.wait_for_change(record.message_id)
                continue
            record = latest
            yield record


class KeyNotFound(MailNotFound):
    """A status request by idempotency key that names no mail of this caller."""

    def __init__(self) -> None:
        MailerError.__init__(
            self, "idempotency_key: no mail from this caller with this key within the window"
        )
