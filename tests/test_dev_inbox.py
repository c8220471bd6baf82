"""The dev web inbox over HTTP (h11 on trio streams): the JSON API, events, limits, Host check."""

from __future__ import annotations

import json

import h11
import pytest
import trio

from trio_mailer.dev import inbox_http
from trio_mailer.dev.capture_relay import ReceivedMail
from trio_mailer.dev.inbox import MAIL_CSP, PAGE_CSP, Inbox, InboxApp
from trio_mailer.dev.inbox_http import serve_http

TIMEOUT_S = 20

MAIL = (
    b"From: Acme <noreply@example.com>\r\nTo: user@example.com\r\nSubject: Hello\r\n"
    b"Content-Language: en\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b"code 123456\r\n"
    b"--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b"<p>code <b>123456</b></p><script>alert(1)</script>\r\n--b--\r\n"
)


def received(data: bytes = MAIL) -> ReceivedMail:
    return ReceivedMail("noreply@example.com", ("user@example.com",), data, 1)


async def start(nursery: trio.Nursery, inbox: Inbox) -> InboxApp:
    app = InboxApp(inbox)
    app.port = await nursery.start(serve_http, app, "127.0.0.1", 0)
    return app


async def request(
    port: int,
    method: str,
    target: str,
    *,
    host: str | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request through h11 as a client; the status, headers and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", host or f"127.0.0.1:{port}"), *(extra or [])]
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status, response_headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, response_headers, body


async def test_json_api_lists_newest_first_and_shows_each_mail() -> None:
    """/api/mails newest first; /api/mails/{id} has headers, both parts and the raw source."""
    inbox = Inbox()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            inbox.add(received())
            inbox.add(received(MAIL.replace(b"Subject: Hello", b"Subject: Second")))
            status, headers, body = await request(app.port, "GET", "/api/mails")
            assert status == 200
            assert headers["content-type"] == "application/json; charset=utf-8"
            mails = json.loads(body)
            assert [(m["id"], m["subject"]) for m in mails] == [(2, "Second"), (1, "Hello")]
            assert mails[0]["has_html"] is True
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
            assert (await request(app.port, "GET", "/api/mails/99"))[0] == 404
            assert (await request(app.port, "DELETE", "/api/mails"))[0] == 200
            assert json.loads((await request(app.port, "GET", "/api/mails"))[2]) == []
            nursery.cancel_scope.cancel()


async def test_events_stream_new_mails_and_clear() -> None:
    """/api/events sends a mail event for each capture and a clear event on DELETE."""
    inbox = Inbox()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, inbox)
            inbox.add(received())  # before the page listened: sent because of ?after=0
            stream = await trio.open_tcp_stream("127.0.0.1", app.port)
            await stream.send_all(
                f"GET /api/events?after=0 HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n\r\n".encode()
            )
            seen = b""
            while b"event: mail" not in seen:
                seen += await stream.receive_some(65536)
            assert b"text/event-stream" in seen
            inbox.add(received(MAIL.replace(b"Subject: Hello", b"Subject: Live")))
            while b'"subject": "Live"' not in seen:
                seen += await stream.receive_some(65536)
            inbox.clear()
            while b"event: clear" not in seen:
                seen += await stream.receive_some(65536)
            assert seen.count(b"event: mail") == 2
            await stream.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("host", ["evil.example:80", "127.0.0.1:1", "attacker.test"])
async def test_a_foreign_host_header_is_refused(host: str) -> None:
    """DNS rebinding: a request naming another host gets 421 and no data."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, Inbox())
            status, _, body = await request(app.port, "GET", "/api/mails", host=host)
            assert status == 421 and b"[" not in body
            nursery.cancel_scope.cancel()


async def test_oversized_request_head_is_refused() -> None:
    """A request head over the limit gets 431 and the connection closes."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, Inbox())
            big = [("x-filler", "a" * (inbox_http.MAX_HEAD_BYTES + 10))]
            status, _, _ = await request(app.port, "GET", "/", extra=big)
            assert status == 431
            nursery.cancel_scope.cancel()


async def test_connections_beyond_the_limit_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    """One connection over max_connections is answered 503 and closed; the others still work."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = InboxApp(Inbox())
            app.port = await nursery.start(
                lambda task_status: serve_http(
                    app, "127.0.0.1", 0, max_connections=2, task_status=task_status
                )
            )
            held = [await trio.open_tcp_stream("127.0.0.1", app.port) for _ in range(2)]
            await trio.testing.wait_all_tasks_blocked()
            extra = await trio.open_tcp_stream("127.0.0.1", app.port)
            answer = b""
            while chunk := await extra.receive_some(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ")
            for stream in held:
                await stream.aclose()
            await extra.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert (await request(app.port, "GET", "/api/mails"))[0] == 200
            nursery.cancel_scope.cancel()


async def test_idle_connection_is_closed_after_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """A client that connects and says nothing is dropped after REQUEST_TIMEOUT_S."""
    with trio.fail_after(inbox_http.REQUEST_TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, Inbox())
            stream = await trio.open_tcp_stream("127.0.0.1", app.port)
            start_s = trio.current_time()
            assert await stream.receive_some(4096) == b""
            assert trio.current_time() - start_s >= inbox_http.REQUEST_TIMEOUT_S
            await stream.aclose()
            nursery.cancel_scope.cancel()


def test_the_inbox_keeps_a_bounded_number_of_mails() -> None:
    """Beyond max_mails the oldest are forgotten; ids keep counting."""
    inbox = Inbox(max_mails=3)
    for _ in range(5):
        inbox.add(received())
    assert [mail.id for mail in inbox.newest_first()] == [5, 4, 3]
    assert inbox.get(1) is None
