"""The dev web inbox over HTTP (``trio-mailer dev``): the page, the JSON API, the events.

``InboxApp`` routes a ``Request`` (from ``http_server``, on loopback only) to a ``Response``:

- ``GET /``: the page (``/app.js``, ``/app.css`` and ``/favicon.ico`` beside it; no inline
  script, so the page's own CSP can forbid it);
- ``GET /api/mails[?q=TEXT&to=ADDR&message_id=ID]``: summaries, newest first, with the id of
  the newest event in the ``Inbox-Event-ID`` header; ``DELETE /api/mails``: all of them, and
  every ``.eml`` file; ``GET /api/mails/{id}``: headers, text part, html part, raw source;
  ``DELETE /api/mails/{id}``: the mail and its file; ``GET /api/mails/{id}/html`` the html part
  alone, for the iframe; ``GET /api/mails/{id}/raw`` the source;
- ``GET /api/events[?last_event_id=ID]``: server-sent events (see ``inbox``), from after the
  ``Last-Event-ID`` header's event (else the parameter's; else from now);
- ``GET``, ``PUT``, ``DELETE /api/chaos``: the relay's faults on demand (``chaos``).

Every error is JSON, ``{"error": "..."}``, naming the parameter or field at fault.

A captured mail is untrusted HTML. The page shows it in ``<iframe sandbox="">`` (no scripts, no
same origin, no forms), loaded from ``/api/mails/{id}/html``, which is served with
``Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; img-src data:`` so
that even opened directly it runs no script and loads nothing remote. Requests whose ``Host`` is
not the loopback address the server listens on are refused (DNS rebinding); nothing answers
CORS, and every change is a ``PUT`` or ``DELETE``, which another site's page cannot send here
without a CORS preflight that nothing answers.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncGenerator
from functools import partial
from importlib import resources
from typing import Protocol

import attrs
import trio

from trio_mailer.core.call_policy import normalise_message_id
from trio_mailer.dev.chaos import OFF, Chaos, ChaosError, parse_chaos
from trio_mailer.dev.inbox import Inbox, InboxEvent, MailQuery
from trio_mailer.http_server import Request, Response, json_error, json_response

HEARTBEAT_S = 15.0  # an SSE comment this often, so a vanished client is noticed
RECONNECT_MS = 2000  # how soon a browser reconnects an event stream that broke
MAX_QUERY_CHARS = {"q": 200, "to": 254, "message_id": 998, "last_event_id": 64}

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
_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.ico": ("favicon.ico", "image/x-icon"),
}


class ChaosSwitch(Protocol):
    """The relay's faults on demand (``capture_relay.CaptureSMTPServer``)."""

    @property
    def chaos(self) -> Chaos: ...

    def set_chaos(self, chaos: Chaos) -> None: ...


class ApiError(Exception):
    """An answer other than 2xx; ``message`` names the parameter or field at fault."""

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow

    def response(self) -> Response:
        headers = () if self.allow is None else (("allow", self.allow),)
        return json_error(self.status, self.message, headers=(*headers, *_COMMON_HEADERS))


def _allow(method: str, allowed: str) -> None:
    if method not in allowed.split(", "):
        raise ApiError(405, f"method not allowed (allowed: {allowed})", allow=allowed)


def _query(query: str, known: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters, each known, given once, within its length.

    Raises:
        ApiError: 400, naming the parameter.
    """
    values: dict[str, list[str]] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        values.setdefault(name, []).append(value)
    for name, given in values.items():
        if name not in known:
            raise ApiError(400, f"{name[:60]}: unknown query parameter (known: {', '.join(known)})")
        if len(given) > 1:
            raise ApiError(400, f"{name}: expected once, got {len(given)} values")
        if len(given[0]) > MAX_QUERY_CHARS[name]:
            raise ApiError(
                400,
                f"{name}: expected at most {MAX_QUERY_CHARS[name]} characters, got {len(given[0])}",
            )
    return {name: given[0] for name, given in values.items()}


def _mail_query(query: str) -> MailQuery:
    params = _query(query, ("q", "to", "message_id"))
    message_id = params.get("message_id", "")
    if message_id:
        try:
            message_id = normalise_message_id(message_id)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
    return MailQuery(q=params.get("q", ""), to=params.get("to", "").strip(), message_id=message_id)


def _ok(value: object, *headers: tuple[str, str]) -> Response:
    return json_response(200, value, headers=(*headers, *_COMMON_HEADERS))


def _asset(name: str) -> bytes:
    return resources.files("trio_mailer.dev").joinpath("inbox_assets", name).read_bytes()


def _sse(run: str, event: InboxEvent) -> bytes:
    return f"id: {run}-{event.seq}\nevent: {event.name}\ndata: {event.data}\n\n".encode()


@attrs.define
class InboxApp:
    """The HTTP side of the inbox: routes a ``Request`` to a ``Response``."""

    inbox: Inbox
    relay: ChaosSwitch
    port: int = 0  # the bound port, for the Host check (set once serving)
    _assets: dict[str, tuple[str, bytes]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._assets = {
            path: (content_type, _asset(name)) for path, (name, content_type) in _ASSETS.items()
        }

    def _host_ok(self, host: str | None) -> bool:
        if host is None:
            return False
        return host in {f"{name}:{self.port}" for name in _LOOPBACK_HOSTS}

    async def __call__(self, request: Request) -> Response:
        if not self._host_ok(request.header("host")):
            return ApiError(421, "this inbox answers only to its loopback address").response()
        path, _, query = request.target.partition("?")
        try:
            return await self._route(request, path, query)
        except ApiError as exc:
            return exc.response()

    async def _route(self, request: Request, path: str, query: str) -> Response:
        method = request.method
        if path in self._assets:
            _allow(method, "GET")
            content_type, body = self._assets[path]
            headers: tuple[tuple[str, str], ...] = (
                ("content-type", content_type),
                *_COMMON_HEADERS,
            )
            if path == "/":
                headers = (*headers, ("content-security-policy", PAGE_CSP))
            return Response(200, headers, body)
        if path == "/api/mails":
            _allow(method, "GET, DELETE")
            if method == "DELETE":
                return _ok({"deleted": await self._delete(None)})
            mails = self.inbox.summaries(_mail_query(query))
            return _ok(mails, ("inbox-event-id", self.inbox.event_id))
        if path == "/api/events":
            _allow(method, "GET")
            params = _query(query, ("last_event_id",))
            last_event_id = request.header("last-event-id") or params.get("last_event_id")
            # Where the stream starts is taken now: a change after this request is in it.
            missed: list[InboxEvent] | None = []
            if last_event_id is not None:
                after = self.inbox.parse_event_id(last_event_id)
                missed = None if after is None else self.inbox.events_after(after)
            headers = (("content-type", "text/event-stream; charset=utf-8"), *_COMMON_HEADERS)
            stream = partial(self._events, missed, self.inbox.seq)
            return Response(200, headers, stream=stream)
        if path == "/api/chaos":
            _allow(method, "GET, PUT, DELETE")
            if method == "PUT":
                try:
                    self.relay.set_chaos(parse_chaos(request.body))
                except ChaosError as exc:
                    raise ApiError(400, str(exc)) from None
            elif method == "DELETE":
                self.relay.set_chaos(OFF)
            return _ok(self.relay.chaos.to_json())
        match = _MAIL_PATH.fullmatch(path)
        if match is None:
            raise ApiError(404, "not found")
        return await self._mail(method, int(match[1]), match[2])

    async def _mail(self, method: str, mail_id: int, part: str | None) -> Response:
        _allow(method, "GET" if part else "GET, DELETE")
        mail = self.inbox.get(mail_id)
        if mail is None:
            raise ApiError(404, f"no mail {mail_id} (deleted, or older than the inbox keeps)")
        if method == "DELETE":
            return _ok({"deleted": await self._delete(mail_id)})
        if part == "/raw":
            plain = (("content-type", "text/plain; charset=utf-8"), *_COMMON_HEADERS)
            return Response(200, plain, mail.raw().encode())
        if part == "/html":
            html = mail.html()
            if html is None:
                raise ApiError(404, f"mail {mail_id} has no html part")
            headers = (
                ("content-type", "text/html; charset=utf-8"),
                ("content-security-policy", MAIL_CSP),
                *_COMMON_HEADERS,
            )
            return Response(200, headers, html.encode())
        return _ok(self.inbox.detail(mail))

    async def _delete(self, mail_id: int | None) -> int:
        """Delete one mail (by id) or all; how many mails went."""
        try:
            if mail_id is None:
                return await self.inbox.delete_all()
            return 1 if await self.inbox.delete(mail_id) else 0
        except OSError as exc:
            name = exc.filename if isinstance(exc.filename, str) else "a file"
            raise ApiError(500, f"cannot delete {name}: {exc.strerror or exc}") from None

    async def _events(
        self, missed: list[InboxEvent] | None, seen: int
    ) -> AsyncGenerator[bytes, None]:
        """Server-sent events: ``missed`` (None: a ``reset``), then each one after ``seen``."""
        inbox = self.inbox
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        while True:
            if missed is None:  # another run's id, or older than the log: start afresh
                yield _sse(inbox.run, InboxEvent(seen, "reset", "{}"))
            else:
                for event in missed:
                    yield _sse(inbox.run, event)
            with trio.move_on_after(HEARTBEAT_S):
                await inbox.wait_changed(seen)
            if inbox.seq == seen:
                yield b": keep-alive\n\n"
            # Taken together: what comes while these are sent comes in the next round.
            missed = inbox.events_after(seen)
            seen = inbox.seq
