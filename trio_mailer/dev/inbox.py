"""The dev inbox's mails: the capture relay's ``.eml`` directory, in memory, with an event log.

Theory of operation
-------------------
The directory is the inbox. At start ``Inbox.load`` reads the newest ``max_mails`` ``.eml``
files already there (by modification time), so a restart of ``trio-mailer dev`` shows what the
last run captured; from then on the capture relay tells ``add`` of each mail it wrote. Deleting
a mail deletes its file; deleting all deletes every ``.eml`` file of the directory. Beyond
``max_mails`` the oldest mails leave memory (their files stay).

Every change is an event in a bounded log, numbered in order: ``mail`` (a summary), ``delete``,
``clear``, ``status`` (the service's status of a Message-ID) and ``chaos`` (the relay's faults
on demand). An event's id on the wire is ``<run>-<number>``, ``<run>`` drawn at start: a client
that comes back with the id of the last event it saw gets every event after it, or, when that
id is from another run or older than the log, a ``reset`` (load everything again).

``track_statuses`` follows each mail's status on the service side, by its Message-ID, through
``MailStatuses`` (``MailerApp`` in ``trio-mailer dev``): asked once, then at each change (and
every ``STATUS_POLL_S`` in case one was missed) until the status is final or the service does
not know the mail.
"""

from __future__ import annotations

import collections
import email
import email.message
import email.policy
import email.utils
import json
import logging
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from trio_mailer.core.errors import OutboxError
from trio_mailer.core.mail_lifecycle import MailRecord
from trio_mailer.dev.capture_relay import ReceivedMail
from trio_mailer.dev.chaos import Chaos

log = logging.getLogger(__name__)

MAX_MAILS = 500  # the inbox forgets the oldest beyond this (their files stay)
EVENT_LOG_SIZE = 2000  # events kept for clients that reconnect
STATUS_POLL_S = 5.0  # a mail's status is asked again this often while it is not final


@attrs.frozen
class MailQuery:
    """``GET /api/mails``'s filters; an empty one is no filter."""

    q: str = ""  # case-insensitive, in From, To, Subject and the text part
    to: str = ""  # one recipient address, any case
    message_id: str = ""  # with angle brackets


ALL = MailQuery()


@attrs.frozen
class InboxMail:
    """One captured mail, with what the list and the search need parsed out of it once."""

    id: int
    received_at_unix: float
    envelope_from: str
    envelope_to: tuple[str, ...]
    data: bytes = attrs.field(repr=False)
    file_name: str | None
    message_id: str
    subject: str
    from_: str
    to: str
    date: str
    content_language: str
    text: str | None = attrs.field(repr=False)
    has_html: bool
    recipients: frozenset[str]  # case-folded: the envelope's and the To header's

    @classmethod
    def parse(
        cls,
        mail_id: int,
        received_at_unix: float,
        data: bytes,
        file_name: str | None,
        envelope: tuple[str, tuple[str, ...]] | None,
    ) -> InboxMail:
        """``envelope`` None (a file from an earlier run): read from the From and To headers."""
        message = _parsed(data)
        to = _header(message, "To")
        to_addresses = tuple(address for _, address in email.utils.getaddresses([to]) if address)
        if envelope is None:
            envelope = (email.utils.parseaddr(_header(message, "From"))[1], to_addresses)
        return cls(
            id=mail_id,
            received_at_unix=received_at_unix,
            envelope_from=envelope[0],
            envelope_to=envelope[1],
            data=data,
            file_name=file_name,
            message_id=_header(message, "Message-ID").strip(),
            subject=_header(message, "Subject"),
            from_=_header(message, "From"),
            to=to,
            date=_header(message, "Date"),
            content_language=_header(message, "Content-Language"),
            text=_part(message, "plain"),
            has_html=_part(message, "html") is not None,
            recipients=frozenset(a.casefold() for a in (*envelope[1], *to_addresses)),
        )

    def matches(self, query: MailQuery) -> bool:
        if query.message_id and query.message_id != self.message_id:
            return False
        if query.to and query.to.casefold() not in self.recipients:
            return False
        if query.q:
            needle = query.q.casefold()
            fields = (self.from_, self.to, self.subject, self.text or "")
            return any(needle in field.casefold() for field in fields)
        return True

    def summary(self, status: MailRecord | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "message_id": self.message_id,
            "received_at": self.received_at_unix,
            "envelope_from": self.envelope_from,
            "envelope_to": list(self.envelope_to),
            "subject": self.subject,
            "from": self.from_,
            "to": self.to,
            "date": self.date,
            "content_language": self.content_language,
            "has_html": self.has_html,
            "size": len(self.data),
            "file": self.file_name,
            "status": None if status is None else status_json(status),
        }

    def detail(self, status: MailRecord | None) -> dict[str, Any]:
        message = _parsed(self.data)
        return {
            **self.summary(status),
            "headers": [[name, _safe_str(value)] for name, value in message.items()],
            "text": self.text,
            "html": _part(message, "html"),
            "raw": self.raw(),
        }

    def raw(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    def html(self) -> str | None:
        return _part(_parsed(self.data), "html")


def status_json(record: MailRecord) -> dict[str, Any]:
    """What ``GetStatus`` answers for a mail, as JSON (state names as in ``MailStatus``)."""
    return {
        "state": record.state.name,
        "attempts": record.attempts,
        "last_reply_code": record.last_reply_code,
        "last_reply_text": record.last_reply_text,
        "possible_duplicate": record.possible_duplicate,
        "accepted_at": record.accepted_at_unix,
        "last_attempt_at": record.last_attempt_at_unix,
        "finished_at": record.finished_at_unix,
    }


def _parsed(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a malformed header from a test relay must not break the page
        return "(unparsable)"


def _header(message: email.message.EmailMessage, name: str) -> str:
    try:
        value = message.get(name)
    except Exception:  # the header parser can fail on a malformed value; shown as missing
        return ""
    return "" if value is None else _safe_str(value)


def _part(message: email.message.EmailMessage, subtype: str) -> str | None:
    try:
        body = message.get_body(preferencelist=(subtype,))
        if body is None or body.get_content_subtype() != subtype:
            return None
        content = body.get_content()
    except Exception:  # a broken part is shown as missing, not as an error page
        return None
    return content if isinstance(content, str) else None


@attrs.frozen
class InboxEvent:
    seq: int
    name: str
    data: str  # JSON, one line


def _newest_files(directory: Path, limit: int) -> list[tuple[float, str, bytes]]:
    """The newest ``limit`` ``.eml`` files as (mtime, name, content), oldest first; runs in a
    worker thread. A file that vanished or cannot be read is left out."""
    try:
        paths = [path for path in directory.iterdir() if path.suffix == ".eml"]
    except FileNotFoundError:
        return []
    stamped = []
    for path in paths:
        try:
            stamped.append((path.stat().st_mtime, path.name))
        except OSError:
            continue
    found = []
    for mtime, name in sorted(stamped)[-limit:]:
        try:
            found.append((mtime, name, (directory / name).read_bytes()))
        except OSError as exc:
            log.warning("dev inbox: cannot read %s: %s", directory / name, exc)
    return found


def _delete_files(directory: Path, names: Iterable[str]) -> None:
    """Delete ``names`` in ``directory`` (already gone is fine); runs in a worker thread.

    Raises:
        OSError: the first file that could not be deleted (after trying them all).
    """
    failed: OSError | None = None
    for name in names:
        try:
            (directory / name).unlink(missing_ok=True)
        except OSError as exc:
            failed = failed or exc
    if failed is not None:
        raise failed


def _eml_names(directory: Path) -> list[str]:
    try:
        return [path.name for path in directory.iterdir() if path.suffix == ".eml"]
    except FileNotFoundError:
        return []


@attrs.define
class Inbox:
    """The captured mails, newest last, their service statuses, and the event log."""

    directory: Path
    max_mails: int = MAX_MAILS
    event_log_size: int = EVENT_LOG_SIZE
    run: str = attrs.field(factory=lambda: secrets.token_hex(4))
    seq: int = attrs.field(init=False, default=0)  # the number of the newest event
    _mails: collections.deque[InboxMail] = attrs.field(init=False, factory=collections.deque)
    _statuses: dict[str, MailRecord] = attrs.field(init=False, factory=dict)
    _events: collections.deque[InboxEvent] = attrs.field(init=False)
    _next_id: int = attrs.field(init=False, default=1)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._events = collections.deque(maxlen=self.event_log_size)

    async def load(self) -> int:
        """Read the newest ``max_mails`` ``.eml`` files of the directory; returns how many."""
        found = await trio.to_thread.run_sync(_newest_files, self.directory, self.max_mails)
        for mtime, name, data in found:
            self._keep(InboxMail.parse(self._take_id(), mtime, data, name, None))
        return len(found)

    def add(self, mail: ReceivedMail) -> None:
        """Record a mail the relay captured (its ``on_mail``)."""
        envelope = (mail.mail_from, mail.rcpt_to)
        stored = InboxMail.parse(self._take_id(), time.time(), mail.data, mail.file_name, envelope)
        self._keep(stored)
        self._emit("mail", stored.summary(self._statuses.get(stored.message_id)))

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _keep(self, mail: InboxMail) -> None:
        if len(self._mails) >= self.max_mails:
            self._forget_status(self._mails.popleft().message_id)
        self._mails.append(mail)

    def newest_first(self) -> list[InboxMail]:
        return list(reversed(self._mails))

    def get(self, mail_id: int) -> InboxMail | None:
        for mail in self._mails:
            if mail.id == mail_id:
                return mail
        return None

    def summaries(self, query: MailQuery = ALL) -> list[dict[str, Any]]:
        """The mails that match ``query``, newest first, with their statuses."""
        return [
            mail.summary(self._statuses.get(mail.message_id))
            for mail in reversed(self._mails)
            if mail.matches(query)
        ]

    def detail(self, mail: InboxMail) -> dict[str, Any]:
        return mail.detail(self._statuses.get(mail.message_id))

    async def delete(self, mail_id: int) -> bool:
        """Delete a mail and its file; False when there is no such mail.

        Raises:
            OSError: the file could not be deleted (the mail stays).
        """
        mail = self.get(mail_id)
        if mail is None:
            return False
        if mail.file_name is not None:
            await trio.to_thread.run_sync(_delete_files, self.directory, [mail.file_name])
        if mail in self._mails:  # not deleted by someone else meanwhile
            self._mails.remove(mail)
            self._forget_status(mail.message_id)
            self._emit("delete", {"id": mail_id})
        return True

    async def delete_all(self) -> int:
        """Delete every mail and every ``.eml`` file of the directory; returns how many mails.

        Raises:
            OSError: a file could not be deleted (the others are; the inbox is emptied).
        """
        count = len(self._mails)
        names = await trio.to_thread.run_sync(_eml_names, self.directory)
        try:
            await trio.to_thread.run_sync(_delete_files, self.directory, names)
        finally:
            self._mails.clear()
            self._statuses.clear()
            self._emit("clear", {})
        return count

    # ---- the service's side ----

    def message_ids(self) -> set[str]:
        return {mail.message_id for mail in self._mails if mail.message_id}

    def set_status(self, message_id: str, record: MailRecord | None) -> None:
        """The service's status of ``message_id`` (None: it does not know the mail)."""
        if self._statuses.get(message_id) == record or message_id not in self.message_ids():
            return
        if record is None:
            del self._statuses[message_id]
        else:
            self._statuses[message_id] = record
        status = None if record is None else status_json(record)
        self._emit("status", {"message_id": message_id, "status": status})

    def _forget_status(self, message_id: str) -> None:
        if all(mail.message_id != message_id for mail in self._mails):
            self._statuses.pop(message_id, None)

    def chaos_changed(self, chaos: Chaos) -> None:
        """The relay's chaos changed (its ``on_chaos``)."""
        self._emit("chaos", chaos.to_json())

    # ---- events ----

    def _emit(self, name: str, value: object) -> None:
        self.seq += 1
        # ensure_ascii: one line whatever the mail holds, as a server-sent event needs.
        self._events.append(InboxEvent(self.seq, name, json.dumps(value, ensure_ascii=True)))
        self._changed.set()
        self._changed = trio.Event()

    @property
    def event_id(self) -> str:
        """The id of the newest event (``<run>-<number>``)."""
        return f"{self.run}-{self.seq}"

    def parse_event_id(self, text: str) -> int | None:
        """The event number in an id of this run; None for another run's or a malformed one."""
        run, _, number = text.strip().rpartition("-")
        if run != self.run or not number.isdigit() or len(number) > 12:
            return None
        return int(number)

    def events_after(self, seq: int) -> list[InboxEvent] | None:
        """The events after number ``seq``; None when some of them are no longer kept."""
        if seq > self.seq:
            return None
        oldest = self._events[0].seq if self._events else self.seq + 1
        if seq + 1 < oldest and seq < self.seq:
            return None
        return [event for event in self._events if event.seq > seq]

    async def wait_changed(self, seen_seq: int) -> None:
        """Return once there is an event after number ``seen_seq``."""
        while self.seq <= seen_seq:
            await self._changed.wait()


class MailStatuses(Protocol):
    """Where a mail stands on the service side, as ``GetStatus`` answers (``MailerApp``).

    ``mail_status`` raises ``OutboxError`` when the outbox cannot be read (asked again later),
    and ``trio.ClosedResourceError`` once the service has stopped (no longer asked).
    """

    async def mail_status(self, message_id: str) -> MailRecord | None: ...

    async def wait_for_status_change(self, message_id: str) -> None: ...


@attrs.define
class _StatusFollower:
    inbox: Inbox
    statuses: MailStatuses
    following: set[str] = attrs.Factory(set)
    settled: set[str] = attrs.Factory(set)  # final, or unknown to the service

    async def follow(self, message_id: str) -> None:
        try:
            while True:
                try:
                    record = await self.statuses.mail_status(message_id)
                except trio.ClosedResourceError:
                    return  # the service has stopped (its outbox is closed): nothing more comes
                except OutboxError as exc:
                    log.warning("dev inbox: cannot read the status of %s: %s", message_id, exc)
                else:
                    self.inbox.set_status(message_id, record)
                    if record is None or record.state.terminal:
                        self.settled.add(message_id)
                        return
                with trio.move_on_after(STATUS_POLL_S):
                    await self.statuses.wait_for_status_change(message_id)
        finally:
            self.following.discard(message_id)


async def track_statuses(
    inbox: Inbox,
    statuses: MailStatuses,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep each mail's service status in ``inbox``, live, until it is final; runs until
    cancelled."""
    follower = _StatusFollower(inbox, statuses)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            seen = inbox.seq
            present = inbox.message_ids()
            follower.settled &= present
            for message_id in present - follower.following - follower.settled:
                follower.following.add(message_id)
                nursery.start_soon(follower.follow, message_id)
            await inbox.wait_changed(seen)
