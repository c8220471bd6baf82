"""The dev web inbox: the mails the capture relay took, in a browser (``trio-mailer dev``).

``Inbox`` keeps the newest ``MAX_MAILS`` captured mails in memory; ``InboxApp`` answers HTTP
(through ``inbox_http``) on loopback only:

- ``GET /``: the page (``/app.js`` and ``/app.css`` beside it; no inline script, so the page's
  own CSP can forbid it);
- ``GET /api/mails``: summaries, newest first; ``GET /api/mails/{id}``: headers, text part, html
  part, raw source; ``GET /api/mails/{id}/html`` the html part alone, for the iframe;
  ``GET /api/mails/{id}/raw`` the source; ``DELETE /api/mails`` empties the inbox;
- ``GET /api/events``: server-sent events, ``mail`` (a summary) and ``clear``.

A captured mail is untrusted HTML. The page shows it in ``<iframe sandbox="">`` (no scripts, no
same origin, no forms), loaded from ``/api/mails/{id}/html``, which is served with
``Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; img-src data:`` so
that even opened directly it runs no script and loads nothing remote. Requests whose ``Host`` is
not the loopback address the server listens on are refused (DNS rebinding), and nothing answers
CORS, so another site's page cannot clear the inbox.
"""

from __future__ import annotations

import collections
import email
import email.message
import email.policy
import json
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from functools import partial
from importlib import resources
from typing import Any

import attrs
import trio

from trio_mailer.dev.capture_relay import ReceivedMail
from trio_mailer.dev.inbox_http import Request, Response, plain

MAX_MAILS = 500  # the inbox forgets the oldest beyond this
HEARTBEAT_S = 15.0  # an SSE comment this often, so a vanished client is noticed
DEFAULT_INBOX_PORT = 20102

MAIL_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "frame-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_COMMON_HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)
_MAIL_PATH = re.compile(r"/api/mails/(\d{1,12})(/html|/raw)?")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@attrs.frozen
class InboxMail:
    """One captured mail, with what the page shows parsed out of it."""

    id: int
    received_at_unix: float
    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes = attrs.field(repr=False)

    def _parsed(self) -> email.message.EmailMessage:
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        return message

    def summary(self) -> dict[str, Any]:
        message = self._parsed()
        return {
            "id": self.id,
            "received_at": self.received_at_unix,
            "envelope_from": self.mail_from,
            "envelope_to": list(self.rcpt_to),
            "subject": _header(message, "Subject"),
            "from": _header(message, "From"),
            "to": _header(message, "To"),
            "date": _header(message, "Date"),
            "content_language": _header(message, "Content-Language"),
            "has_html": _part(message, "html") is not None,
            "size": len(self.data),
        }

    def detail(self) -> dict[str, Any]:
        message = self._parsed()
        return {
            **self.summary(),
            "headers": [[name, _safe_str(value)] for name, value in message.items()],
            "text": _part(message, "plain"),
            "html": _part(message, "html"),
            "raw": self.raw(),
        }

    def raw(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    def html(self) -> str | None:
        return _part(self._parsed(), "html")


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a malformed header from a test relay must not break the page
        return "(unparsable)"


def _header(message: email.message.EmailMessage, name: str) -> str:
    value = message.get(name)
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


@attrs.define
class Inbox:
    """The captured mails, newest last, and a way to wait for a change."""

    max_mails: int = MAX_MAILS
    _mails: collections.deque[InboxMail] = attrs.field(init=False)
    _next_id: int = attrs.field(init=False, default=1)
    version: int = attrs.field(init=False, default=0)
    cleared_at_version: int = attrs.field(init=False, default=0)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._mails = collections.deque(maxlen=self.max_mails)

    def add(self, mail: ReceivedMail) -> None:
        """Record ``mail`` (the capture relay's ``on_mail``)."""
        self.add_mail(mail)

    def add_mail(self, mail: ReceivedMail) -> InboxMail:
        """Record ``mail`` and return what was stored."""
        stored = InboxMail(self._next_id, time.time(), mail.mail_from, mail.rcpt_to, mail.data)
        self._next_id += 1
        self._mails.append(stored)
        self._bump()
        return stored

    def clear(self) -> None:
        self._mails.clear()
        self.cleared_at_version = self.version + 1
        self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    def newest_first(self) -> list[InboxMail]:
        return list(reversed(self._mails))

    def get(self, mail_id: int) -> InboxMail | None:
        for mail in self._mails:
            if mail.id == mail_id:
                return mail
        return None

    def after(self, mail_id: int) -> list[InboxMail]:
        """The mails with an id above ``mail_id``, oldest first."""
        return [mail for mail in self._mails if mail.id > mail_id]

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    async def wait_changed(self, seen_version: int) -> None:
        """Return once ``version`` is past ``seen_version``."""
        while self.version <= seen_version:
            await self._changed.wait()


def _json(status: int, value: object) -> Response:
    body = json.dumps(value, ensure_ascii=False).encode()
    return Response(
        status, (("content-type", "application/json; charset=utf-8"), *_COMMON_HEADERS), body
    )


def _asset(name: str) -> bytes:
    return resources.files("trio_mailer.dev").joinpath("inbox_assets", name).read_bytes()


@attrs.define
class InboxApp:
    """The HTTP side of the inbox: routes a ``Request`` to a ``Response``."""

    inbox: Inbox
    port: int = 0  # the bound port, for the Host check (set once serving)
    _assets: dict[str, tuple[str, bytes]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._assets = {
            "/": ("text/html; charset=utf-8", _asset("index.html")),
            "/app.js": ("text/javascript; charset=utf-8", _asset("app.js")),
            "/app.css": ("text/css; charset=utf-8", _asset("app.css")),
        }

    def _host_ok(self, host: str | None) -> bool:
        if host is None:
            return False
        return host in {f"{name}:{self.port}" for name in _LOOPBACK_HOSTS}

    async def __call__(self, request: Request) -> Response:
        if not self._host_ok(request.header("host")):
            return plain(421, "this inbox answers only to its loopback address\n")
        path = request.target.split("?", 1)[0]
        method = request.method
        if path in self._assets:
            if method != "GET":
                return plain(405, "method not allowed\n", headers=(("allow", "GET"),))
            content_type, body = self._assets[path]
            headers: tuple[tuple[str, str], ...] = (
                ("content-type", content_type),
                *_COMMON_HEADERS,
            )
            if path == "/":
                headers = (*headers, ("content-security-policy", PAGE_CSP))
            return Response(200, headers, body)
        if path == "/api/mails":
            if method == "GET":
                return _json(200, [mail.summary() for mail in self.inbox.newest_first()])
            if method == "DELETE":
                self.inbox.clear()
                return _json(200, {"cleared": True})
            return plain(405, "method not allowed\n", headers=(("allow", "GET, DELETE"),))
        if path == "/api/events":
            if method != "GET":
                return plain(405, "method not allowed\n", headers=(("allow", "GET"),))
            return Response(
                200,
                (
                    ("content-type", "text/event-stream; charset=utf-8"),
                    *_COMMON_HEADERS,
                ),
                stream=partial(self._events, _after(request.target)),
            )
        match = _MAIL_PATH.fullmatch(path)
        if match is None:
            return plain(404, "not found\n")
        if method != "GET":
            return plain(405, "method not allowed\n", headers=(("allow", "GET"),))
        mail = self.inbox.get(int(match[1]))
        if mail is None:
            return plain(404, "no such mail (cleared, or older than the inbox keeps)\n")
        if match[2] == "/raw":
            return Response(
                200,
                (("content-type", "text/plain; charset=utf-8"), *_COMMON_HEADERS),
                mail.raw().encode(),
            )
        if match[2] == "/html":
            html = mail.html()
            if html is None:
                return plain(404, "this mail has no html part\n")
            return Response(
                200,
                (
                    ("content-type", "text/html; charset=utf-8"),
                    ("content-security-policy", MAIL_CSP),
                    *_COMMON_HEADERS,
                ),
                html.encode(),
            )
        return _json(200, mail.detail())

    async def _events(self, after: int | None) -> AsyncIterator[bytes]:
        """Server-sent events: ``mail`` for each new one, ``clear`` when emptied.

        ``after`` (``/api/events?after=N``): the newest id the page already has; the mails
        after it are sent at once, so none is lost between loading the list and listening.
        """
        inbox = self.inbox
        seen_version = inbox.version
        last_id = inbox.last_id if after is None else after
        yield b"retry: 2000\n\n"
        for mail in inbox.after(last_id):
            last_id = mail.id
            yield _mail_event(mail)
        while True:
            with trio.move_on_after(HEARTBEAT_S):
                await inbox.wait_changed(seen_version)
            if inbox.version == seen_version:
                yield b": keep-alive\n\n"
                continue
            if inbox.cleared_at_version > seen_version:
                yield b"event: clear\ndata: {}\n\n"
            seen_version = inbox.version
            for mail in inbox.after(last_id):
                last_id = mail.id
                yield _mail_event(mail)
            last_id = max(last_id, inbox.last_id)


def _mail_event(mail: InboxMail) -> bytes:
    data = json.dumps(mail.summary(), ensure_ascii=True)  # one line: JSON escapes newlines
    return f"event: mail\ndata: {data}\n\n".encode()


def _after(target: str) -> int | None:
    query = urllib.parse.urlsplit(target).query
    values = urllib.parse.parse_qs(query).get("after", [])
    if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 12:
        return None
    return int(values[0])
