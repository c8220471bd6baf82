"""The dev web inbox over HTTP (h11 on trio streams): the JSON API, the .eml directory behind it,
events, the service's status of each mail, relay chaos, limits, the Host check."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

from trio_mailer import http_server
from trio_mailer.core.mail_lifecycle import MailRecord, MailState
from trio_mailer.dev.capture_relay import CaptureSMTPServer, ReceivedMail
from trio_mailer.dev.chaos import OFF, Chaos
from trio_mailer.dev.inbox import Inbox, track_statuses
from trio_mailer.dev.inbox_app import MAIL_CSP, PAGE_CSP, InboxApp
from trio_mailer.http_server import serve_http

from .fakes.fault_relay import Fault
from .helpers import FAST, Harness, send_pass

TIMEOUT_S = 20

MAIL = (
    b"From: Acme <noreply@example.com>\r\nTo: user@example.com\r\nSubject: Hello\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"Content-Language: en\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b"code 123456\r\n"
    b"--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b"<p>code <b>123456</b></p><script>alert(1)</script>\r\n--b--\r\n"
)


def mail_data(
    subject: str = "Hello", to: str = "user@example.com", text: str = "code 123456", n: int = 1
) -> bytes:
    """MAIL with another subject, recipient, text part and Message-ID."""
    return (
        MAIL.replace(b"Subject: Hello", f"Subject: {subject}".encode())
        .replace(b"To: user@example.com", f"To: {to}".encode())
        .replace(b"code 123456\r\n--b", f"{text}\r\n--b".encode())
        .replace(b"<m1@example.com>", f"<m{n}@example.com>".encode())
    )


def received(data: bytes = MAIL, file_name: str | None = None) -> ReceivedMail:
    return ReceivedMail("noreply@example.com", ("user@example.com",), data, 1, file_name)


def capture(inbox: Inbox, directory: Path, name: str, data: bytes = MAIL) -> None:
    """What the capture relay does: the .eml file first, then the inbox is told."""
    (directory / name).write_bytes(data)
    inbox.add(received(data, name))


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def chaos_relay(inbox: Inbox) -> CaptureSMTPServer:
    return CaptureSMTPServer(tls_mode="none", on_chaos=inbox.chaos_changed)


async def start(
    nursery: trio.Nursery, inbox: Inbox, max_connections: int = http_server.MAX_CONNECTIONS
) -> InboxApp:
    app = InboxApp(inbox, chaos_relay(inbox))
    app.port = await nursery.start(
        partial(serve_http, max_connections=max_connections), app, "127.0.0.1", 0
    )
    return app


async def request(
    port: int,
    method: str,
    target: str,
    *,
    host: str | None = None,
    extra: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request through h11 as a client; the status, headers and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", host or f"127.0.0.1:{port}"), *(extra or [])]
        if body:
            headers.append(("content-length", str(len(body))))
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
        if body:
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status, response_headers, answer = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                answer += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, response_headers, answer


async def get_json(port: int, target: str) -> Any:
    status, _, body = await request(port, "GET", target)
    assert status == 200, body
    return json.loads(body)


@attrs.frozen
class Event:
    id: str
    name: str
    data: dict[str, Any]


@attrs.define
class EventReader:
    """An open ``/api/events`` stream, read one server-sent event at a time."""

    stream: trio.SocketStream
    conn: h11.Connection = attrs.Factory(lambda: h11.Connection(h11.CLIENT))
    text: str = ""

    @classmethod
    async def open(
        cls, port: int, query: str = "", last_event_id: str | None = None
    ) -> EventReader:
        reader = cls(await trio.open_tcp_stream("127.0.0.1", port))
        headers = [("host", f"127.0.0.1:{port}")]
        if last_event_id is not None:
            headers.append(("last-event-id", last_event_id))
        request = h11.Request(method="GET", target="/api/events" + query, headers=headers)
        await reader.stream.send_all(reader.conn.send(request))
        await reader.stream.send_all(reader.conn.send(h11.EndOfMessage()))
        response = await reader._next()
        assert isinstance(response, h11.Response) and response.status_code == 200
        assert dict(response.headers)[b"content-type"].startswith(b"text/event-stream")
        return reader

    async def _next(self) -> object:
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            self.conn.receive_data(await self.stream.receive_some(65536))
        return event

    async def next(self) -> Event:
        """The next event (comments and the retry line are skipped)."""
        while True:
            while "\n\n" not in self.text:
                data = await self._next()
                assert isinstance(data, h11.Data), data
                self.text += data.data.decode()
            block, _, self.text = self.text.partition("\n\n")
            fields = dict(line.partition(": ")[::2] for line in block.split("\n"))
            if "event" in fields:
                return Event(fields.get("id", ""), fields["event"], json.loads(fields["data"]))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_json_api_lists_newest_first_and_shows_each_mail(tmp_path: Path) -> None:
    """/api/mails newest first, each with its Message-ID; /api/mails/{id} has headers, both
    parts and the raw source."""
    inbox = Inbox(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            inbox.add(received())
            inbox.add(received(mail_data("Second", n=2)))
            status, headers, body = await request(app.port, "GET", "/api/mails")
            assert status == 200
            assert headers["content-type"] == "application/json; charset=utf-8"
            mails = json.loads(body)
            assert [(m["id"], m["subject"], m["message_id"]) for m in mails] == [
                (2, "Second", "<m2@example.com>"),
                (1, "Hello", "<m1@example.com>"),
            ]
            assert mails[0]["has_html"] is True
            assert mails[0]["status"] is None  # nothing asked the service yet
            status, _, body = await request(app.port, "GET", "/api/mails/1")
            detail = json.loads(body)
            assert status == 200
            assert detail["text"] == "code 123456"
            assert detail["html"].startswith("<p>code <b>123456</b></p>")
            assert ["Subject", "Hello"] in detail["headers"]
            assert detail["raw"] == MAIL.decode()
            status, headers, body = await request(app.port, "GET", "/api/mails/1/html")
            assert status == 200
            assert headers["content-security-policy"] == MAIL_CSP
            assert headers["x-content-type-options"] == "nosniff"
            assert body.startswith(b"<p>code")
            status, headers, _ = await request(app.port, "GET", "/")
            assert status == 200 and headers["content-security-policy"] == PAGE_CSP
            nursery.cancel_scope.cancel()


SEARCHABLE = [
    mail_data("Your code", "alice@example.com", "Use 111111 to sign in", n=1),
    mail_data("Passwort vergessen?", "bob@example.org", "Ihr Code: 222222", n=2),
    mail_data("Welcome", "Carol@Example.COM", "Nothing to see", n=3),
]


@pytest.mark.parametrize(
    ("query", "ids"),
    [
        ("", [3, 2, 1]),
        ("?q=code", [2, 1]),  # the subject of 1, the text of 2, any case
        ("?q=PASSWORT", [2]),  # subject
        ("?q=222222", [2]),  # text part
        ("?q=Acme", [3, 2, 1]),  # the From header
        ("?q=example.org", [2]),  # the To header
        ("?q=%3Cscript", []),  # only in the html part: not searched
        ("?q=", [3, 2, 1]),  # an empty box is no filter
        ("?to=carol@example.com", [3]),  # the address, any case
        ("?to=alice@example.com&q=sign", [1]),
        ("?to=alice@example.co", []),  # the whole address, not a part of it
        ("?message_id=%3Cm2@example.com%3E", [2]),
        ("?message_id=m2@example.com", [2]),  # without the brackets
        ("?message_id=m2@example.com&q=welcome", []),
    ],
)
async def test_search_by_text_recipient_and_message_id(
    tmp_path: Path, query: str, ids: list[int]
) -> None:
    inbox = Inbox(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            for data in SEARCHABLE:
                inbox.add(received(data))
            mails = await get_json(app.port, "/api/mails" + query)
            assert isinstance(mails, list)
            assert [mail["id"] for mail in mails] == ids
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "error"),
    [
        ("GET", "/api/mails/99", b"", 404, "no mail 99 (deleted, or older than the inbox keeps)"),
        ("GET", "/api/mails/1/nope", b"", 404, "not found"),
        ("GET", "/api/nope", b"", 404, "not found"),
        ("POST", "/api/mails", b"", 405, "method not allowed (allowed: GET, DELETE)"),
        ("PATCH", "/api/chaos", b"", 405, "method not allowed (allowed: GET, PUT, DELETE)"),
        (
            "GET",
            "/api/mails?x=1",
            b"",
            400,
            "x: unknown query parameter (known: q, to, message_id)",
        ),
        ("GET", "/api/mails?q=a&q=b", b"", 400, "q: expected once, got 2 values"),
        (
            "GET",
            "/api/mails?q=" + "a" * 201,
            b"",
            400,
            "q: expected at most 200 characters, got 201",
        ),
        (
            "GET",
            "/api/mails?message_id=%3Cx",
            b"",
            400,
            "message_id: expected <local@domain> or local@domain, got '<x'",
        ),
        (
            "PUT",
            "/api/chaos",
            b'{"stage": "helo"}',
            400,
            'stage: expected one of connect, mail, rcpt, data, got "helo"',
        ),
        (
            "PUT",
            "/api/chaos",
            b"x" * (http_server.MAX_BODY_BYTES + 1),
            413,
            "request body too large",
        ),
        (
            "GET",
            "/api/events?after=1",
            b"",
            400,
            "after: unknown query parameter (known: last_event_id)",
        ),
    ],
)
async def test_every_api_error_is_json(
    tmp_path: Path, method: str, target: str, body: bytes, status: int, error: str
) -> None:
    """An error is {"error": "..."} with its status, and names the field where there is one."""
    inbox = Inbox(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            inbox.add(received())
            answer = await request(app.port, method, target, body=body)
            assert (answer[0], answer[1]["content-type"]) == (
                status,
                "application/json; charset=utf-8",
            )
            assert json.loads(answer[2]) == {"error": error}
            if status == 405:
                assert answer[1]["allow"] == error.partition("allowed: ")[2].rstrip(")")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("host", ["evil.example:80", "127.0.0.1:1", "attacker.test"])
async def test_a_foreign_host_header_is_refused(tmp_path: Path, host: str) -> None:
    """DNS rebinding: a request naming another host gets 421 (as JSON) and no data."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, Inbox(tmp_path))
            status, _, body = await request(app.port, "GET", "/api/mails", host=host)
            assert status == 421
            assert json.loads(body) == {"error": "this inbox answers only to its loopback address"}
            nursery.cancel_scope.cancel()


async def test_oversized_request_head_is_refused(tmp_path: Path) -> None:
    """A request head over the limit gets 431 (as JSON) and the connection closes."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, Inbox(tmp_path))
            big = [("x-filler", "a" * (http_server.MAX_HEAD_BYTES + 10))]
            status, _, body = await request(app.port, "GET", "/", extra=big)
            assert status == 431
            assert json.loads(body) == {"error": "bad request: request head too large"}
            nursery.cancel_scope.cancel()


async def test_delete_one_mail_removes_its_file(tmp_path: Path) -> None:
    """DELETE /api/mails/{id}: gone from the list and from the directory; others stay."""
    inbox = Inbox(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            capture(inbox, tmp_path, "a.eml")
            capture(inbox, tmp_path, "b.eml", mail_data(n=2))
            status, _, body = await request(app.port, "DELETE", "/api/mails/1")
            assert (status, json.loads(body)) == (200, {"deleted": 1})
            assert names(tmp_path) == ["b.eml"]
            assert [mail["id"] for mail in await get_json(app.port, "/api/mails")] == [2]
            assert (await request(app.port, "GET", "/api/mails/1"))[0] == 404
            assert (await request(app.port, "DELETE", "/api/mails/1"))[0] == 404
            nursery.cancel_scope.cancel()


async def test_delete_all_removes_every_eml_file(tmp_path: Path) -> None:
    """DELETE /api/mails empties the inbox and the directory's .eml files, including those too
    old to be loaded; other files stay."""
    for n in range(3):
        (tmp_path / f"old-{n}.eml").write_bytes(mail_data(n=n))
    (tmp_path / "notes.txt").write_text("mine")
    inbox = Inbox(tmp_path, max_mails=2)
    assert await inbox.load() == 2
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            capture(inbox, tmp_path, "new.eml")
            status, _, body = await request(app.port, "DELETE", "/api/mails")
            assert (status, json.loads(body)) == (200, {"deleted": 2})
            assert names(tmp_path) == ["notes.txt"]
            assert await get_json(app.port, "/api/mails") == []
            nursery.cancel_scope.cancel()


async def test_the_inbox_starts_with_the_newest_files_of_its_directory(tmp_path: Path) -> None:
    """At start the newest max_mails .eml files are loaded, newest first (a restart keeps the
    inbox); their envelope comes from the headers; new mails are numbered after them."""
    for n, subject in enumerate(["oldest", "middle", "newest"]):
        path = tmp_path / f"2026-{n}.eml"
        path.write_bytes(mail_data(subject, f"user{n}@example.com", n=n))
        os.utime(path, (1_790_000_000 + n, 1_790_000_000 + n))
    (tmp_path / "not-a-mail.txt").write_bytes(b"x")
    inbox = Inbox(tmp_path, max_mails=2)
    assert await inbox.load() == 2
    summaries = inbox.summaries()
    assert [(s["id"], s["subject"]) for s in summaries] == [(2, "newest"), (1, "middle")]
    assert summaries[0]["envelope_from"] == "noreply@example.com"
    assert summaries[0]["envelope_to"] == ["user2@example.com"]
    assert summaries[0]["received_at"] == 1_790_000_002
    assert summaries[0]["message_id"] == "<m2@example.com>"
    assert summaries[0]["file"] == "2026-2.eml"
    inbox.add(received(mail_data("live", n=9)))
    assert [s["id"] for s in inbox.summaries()] == [3, 2]


def test_a_missing_directory_is_an_empty_inbox(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "not-yet")
    assert trio.run(inbox.load) == 0
    assert inbox.newest_first() == []


async def test_events_carry_ids_and_a_reconnect_gets_what_it_missed(tmp_path: Path) -> None:
    """Each event has an id; reconnecting with Last-Event-ID replays what came meanwhile
    (mails, deletions, a clear); an id from another run gets "reset" (load everything again)."""
    inbox = Inbox(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            events = await EventReader.open(app.port)
            inbox.add(received())
            first = await events.next()
            assert (first.name, first.data["id"], first.data["message_id"]) == (
                "mail",
                1,
                "<m1@example.com>",
            )
            await events.aclose()
            # While the page is away:
            capture(inbox, tmp_path, "2.eml", mail_data("Second", n=2))
            await inbox.delete(1)
            again = await EventReader.open(app.port, last_event_id=first.id)
            missed = [await again.next() for _ in range(2)]
            assert [(e.name, e.data.get("id")) for e in missed] == [("mail", 2), ("delete", 1)]
            assert len({first.id, *(e.id for e in missed)}) == 3
            await again.aclose()
            # The page's first connection names the id GET /api/mails answered with.
            _, headers, _ = await request(app.port, "GET", "/api/mails")
            await inbox.delete_all()
            by_query = await EventReader.open(
                app.port, f"?last_event_id={headers['inbox-event-id']}"
            )
            assert (await by_query.next()).name == "clear"
            await by_query.aclose()
            stranger = await EventReader.open(app.port, last_event_id="0000-1")
            reset = await stranger.next()
            assert (reset.name, reset.id) == ("reset", inbox.event_id)
            await stranger.aclose()
            nursery.cancel_scope.cancel()


@attrs.define
class FakeStatuses:
    """The service's side, as the inbox asks it: a record per Message-ID, and its changes."""

    records: dict[str, MailRecord] = attrs.Factory(dict)
    _changed: dict[str, trio.Event] = attrs.Factory(dict)

    def set(self, record: MailRecord) -> None:
        self.records[record.message_id] = record
        self._changed.pop(record.message_id, trio.Event()).set()

    async def mail_status(self, message_id: str) -> MailRecord | None:
        await trio.lowlevel.checkpoint()
        return self.records.get(message_id)

    async def wait_for_status_change(self, message_id: str) -> None:
        await self._changed.setdefault(message_id, trio.Event()).wait()


def record(
    state: MailState, attempts: int, reply: str = "", *, duplicate: bool = False
) -> MailRecord:
    return MailRecord(
        message_id="<m1@example.com>",
        kind="password",
        envelope_from="noreply@example.com",
        envelope_to="user@example.com",
        data=MAIL,
        accepted_at_unix=1_790_000_000.0,
        state=state,
        attempts=attempts,
        last_reply_code=int(reply[:3]) if reply else None,
        last_reply_text=reply[4:],
        last_attempt_at_unix=1_790_000_001.0 if attempts else None,
        finished_at_unix=1_790_000_002.0 if state.terminal else None,
        possible_duplicate=duplicate,
    )


async def test_each_mail_shows_the_service_status_live(tmp_path: Path) -> None:
    """The inbox follows each mail's status on the service side, by its Message-ID, until it
    is final: in the summaries and as "status" events."""
    inbox = Inbox(tmp_path)
    statuses = FakeStatuses()
    statuses.set(record(MailState.SENDING, 2, "451 4.3.0 try again later"))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            await nursery.start(track_statuses, inbox, statuses)
            events = await EventReader.open(app.port)
            inbox.add(received())
            assert (await events.next()).name == "mail"
            sending = await events.next()
            assert sending.name == "status"
            assert sending.data == {
                "message_id": "<m1@example.com>",
                "status": {
                    "state": "SENDING",
                    "attempts": 2,
                    "last_reply_code": 451,
                    "last_reply_text": "4.3.0 try again later",
                    "possible_duplicate": False,
                    "accepted_at": 1_790_000_000.0,
                    "last_attempt_at": 1_790_000_001.0,
                    "finished_at": None,
                },
            }
            statuses.set(record(MailState.DELIVERED, 2, "250 2.0.0 Ok", duplicate=True))
            delivered = await events.next()
            assert delivered.data["status"]["state"] == "DELIVERED"
            [summary] = await get_json(app.port, "/api/mails")
            assert summary["status"]["possible_duplicate"] is True
            assert summary["status"]["last_reply_code"] == 250
            await events.aclose()
            nursery.cancel_scope.cancel()


class StoppedStatuses(FakeStatuses):
    """The service after its outbox closed (the end of ``dev``'s shutdown)."""

    async def mail_status(self, message_id: str) -> MailRecord | None:
        await trio.lowlevel.checkpoint()
        raise trio.ClosedResourceError("the outbox is closed")


@pytest.mark.parametrize(
    "statuses", [FakeStatuses(), StoppedStatuses()], ids=["unknown", "stopped"]
)
async def test_a_mail_without_a_status_on_the_service_side(
    tmp_path: Path, statuses: FakeStatuses
) -> None:
    """A mail another program sent through the relay, or a status asked while the service
    shuts down: status null, nothing left waiting, and nothing that stops ``dev``."""
    inbox = Inbox(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(track_statuses, inbox, statuses)
            inbox.add(received())
            await trio.testing.wait_all_tasks_blocked()
            assert inbox.summaries()[0]["status"] is None
            nursery.cancel_scope.cancel()


async def test_the_status_is_the_services_own(
    start_harness: Callable[..., AbstractAsyncContextManager[Harness]], tmp_path: Path
) -> None:
    """Through the real service (MailerApp.mail_status): a mail the relay refused once at RCPT
    shows DELIVERED after 2 attempts, with the relay's final reply."""
    inbox = Inbox(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with start_harness(env=FAST, on_mail=inbox.add) as h:
            h.relay.add_fault(Fault("RCPT", reply="451 4.3.0 try again later"))
            await h.nursery.start(track_statuses, inbox, h.app)
            message_id = await send_pass(h)
            await h.wait_finished(1)
            while (status := inbox.summaries()[0]["status"]) is None or status[
                "state"
            ] != "DELIVERED":
                await inbox.wait_changed(inbox.seq)
            assert inbox.newest_first()[0].message_id == message_id
            assert status["attempts"] == 2
            assert status["last_reply_code"] == 250
            assert status["possible_duplicate"] is False


async def test_chaos_is_set_read_and_turned_off_through_the_api(tmp_path: Path) -> None:
    """PUT /api/chaos sets the relay's chaos, GET shows it, DELETE or count 0 turns it off;
    every change is an event, and a count used up by the relay is one too."""
    inbox = Inbox(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            relay = chaos_relay(inbox)
            app = InboxApp(inbox, relay)
            app.port = await nursery.start(serve_http, app, "127.0.0.1", 0)
            events = await EventReader.open(app.port)
            assert await get_json(app.port, "/api/chaos") == OFF.to_json()
            body = b'{"stage": "rcpt", "reply": "451 4.3.0 try again later", "count": 3}'
            status, _, answer = await request(app.port, "PUT", "/api/chaos", body=body)
            assert (status, json.loads(answer)) == (200, json.loads(body))
            assert relay.chaos == Chaos("rcpt", "451 4.3.0 try again later", 3)
            assert await get_json(app.port, "/api/chaos") == json.loads(body)
            assert (await events.next()) == Event(inbox.event_id, "chaos", json.loads(body))
            assert (await relay.before_reply(None, "RCPT")) == "451 4.3.0 try again later"  # type: ignore[arg-type]
            assert (await events.next()).data["count"] == 2
            status, _, answer = await request(app.port, "DELETE", "/api/chaos")
            assert (status, json.loads(answer)) == (200, OFF.to_json())
            assert relay.chaos == OFF
            await request(app.port, "PUT", "/api/chaos", body=body)
            await request(app.port, "PUT", "/api/chaos", body=b'{"count": 0}')
            assert relay.chaos == OFF
            bad = await request(
                app.port, "PUT", "/api/chaos", body=b'{"stage": "rcpt", "reply": "250 ok"}'
            )
            assert bad[0] == 400 and json.loads(bad[2])["error"].startswith("reply: ")
            assert relay.chaos == OFF  # a refused body changes nothing
            await events.aclose()
            nursery.cancel_scope.cancel()


async def test_the_page_has_a_favicon(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, Inbox(tmp_path))
            status, headers, body = await request(app.port, "GET", "/favicon.ico")
            assert (status, headers["content-type"]) == (200, "image/x-icon")
            assert body.startswith(b"\x00\x00\x01\x00")  # an ICO file's header
            nursery.cancel_scope.cancel()


async def test_connections_beyond_the_limit_get_503(tmp_path: Path) -> None:
    """One connection over max_connections is answered 503 (as JSON) and closed; the others
    still work."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, Inbox(tmp_path), max_connections=2)
            held = [await trio.open_tcp_stream("127.0.0.1", app.port) for _ in range(2)]
            await trio.testing.wait_all_tasks_blocked()
            extra = await trio.open_tcp_stream("127.0.0.1", app.port)
            answer = b""
            while chunk := await extra.receive_some(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert answer.endswith(b'\r\n\r\n{"error": "too many connections"}')
            for stream in held:
                await stream.aclose()
            await extra.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert (await request(app.port, "GET", "/api/mails"))[0] == 200
            nursery.cancel_scope.cancel()


async def test_idle_connection_is_closed_after_the_request_timeout(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A client that connects and says nothing is dropped after REQUEST_TIMEOUT_S."""
    with trio.fail_after(http_server.REQUEST_TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, Inbox(tmp_path))
            stream = await trio.open_tcp_stream("127.0.0.1", app.port)
            start_s = trio.current_time()
            assert await stream.receive_some(4096) == b""
            assert trio.current_time() - start_s >= http_server.REQUEST_TIMEOUT_S
            await stream.aclose()
            nursery.cancel_scope.cancel()


def test_the_inbox_keeps_a_bounded_number_of_mails(tmp_path: Path) -> None:
    """Beyond max_mails the oldest are forgotten (their files stay); ids keep counting."""
    inbox = Inbox(tmp_path, max_mails=3)
    for _ in range(5):
        inbox.add(received())
    assert [mail.id for mail in inbox.newest_first()] == [5, 4, 3]
    assert inbox.get(1) is None
