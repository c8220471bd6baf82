"""``/metrics`` over the one HTTP/1.1 server (``trio_mailer/http_server.py``, h11): what a
scraper gets, what anything else gets, and a taken port."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest
import trio

from trio_mailer.grpc.listener import BindError
from trio_mailer.metrics import Metrics, serve_metrics

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 10


async def exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Sends ``request`` and reads until the server closes: (status line, headers, body)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body


async def start(nursery: trio.Nursery) -> int:
    metrics = Metrics()
    metrics.mail_finished("delivered", 0.5)
    port: int = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
    return port


async def test_a_scrape_gets_the_text_format_and_the_connection_closes(
    nursery: trio.Nursery,
) -> None:
    """GET /metrics (a query string too): 200 OK, Prometheus' content type, the samples, then
    the server closes (one request per connection)."""
    with trio.fail_after(TIMEOUT_S):
        port = await start(nursery)
        status, headers, body = await exchange(
            port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert (headers["Connection"], int(headers["content-length"])) == ("close", len(body))
    assert b'trio_mailer_mails_total{outcome="delivered"} 1.0' in body


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, b"GET only\n"),
        (b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", 404, b"see /metrics\n"),
    ],
)
async def test_only_get_metrics_is_served(
    nursery: trio.Nursery, request_bytes: bytes, status: int, body: bytes
) -> None:
    """Another method gets 405 (with Allow: GET), another path 404, both as plain text."""
    with trio.fail_after(TIMEOUT_S):
        port = await start(nursery)
        status_line, headers, answer = await exchange(port, request_bytes)
    assert int(status_line.split()[1]) == status
    assert (headers["Content-Type"], answer) == ("text/plain", body)
    assert headers.get("Allow") == ("GET" if status == 405 else None)


async def test_a_malformed_request_gets_400_from_the_shared_server(
    nursery: trio.Nursery,
) -> None:
    """h11 refuses what is not HTTP/1.1 (the hand parser it replaced answered 405): 400, JSON."""
    with trio.fail_after(TIMEOUT_S):
        port = await start(nursery)
        status_line, headers, body = await exchange(port, b"GARBAGE\r\n\r\n")
    assert status_line == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert body.startswith(b'{"error": "bad request: ')


async def test_a_taken_metrics_port_is_a_bind_error_naming_metrics() -> None:
    """The port is taken: BindError (the CLI's start-up failure), naming the address and metrics."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                with pytest.raises(
                    BindError, match=f"cannot listen on 127.0.0.1:{port} for metrics"
                ):
                    await nursery.start(serve_metrics, Metrics(), "127.0.0.1", port)


def test_h11_is_imported_by_the_one_http_server_only() -> None:
    """One HTTP/1.1 server: no other module of the package speaks HTTP/1.1 itself (imports h11)."""
    importers = []
    for path in sorted((ROOT / "trio_mailer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name.split(".")[0] == "h11" for name in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert importers == ["trio_mailer/http_server.py"]
