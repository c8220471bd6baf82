"""Prometheus metrics, and a small ``/metrics`` HTTP endpoint on Trio.

The exposition format comes from the well-kept ``prometheus-client`` library; the endpoint is a
few lines of Trio (one bounded request per connection, GET /metrics only), so scraping never
starts a thread or blocks the event loop for longer than rendering the text takes. Each
``Metrics`` has its own registry, so tests and several apps in one process do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from trio_mailer.grpc.listener import BindError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8 * 1024
REQUEST_TIMEOUT_S = 5.0
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "trio_mailer_requests",
            "gRPC requests by method and outcome (accepted, repeat, queue_full, "
            "recipient_rate_limited, caller_rate_limited, suppressed, invalid, "
            "idempotency_conflict, idempotency_busy, unauthenticated, unavailable, "
            "deadline_exceeded, cancelled, internal)",
            ["method", "outcome"],
            registry=r,
        )
        self.mails = Counter(
            "trio_mailer_mails",
            "Mails by final outcome (delivered, failed, expired)",
            ["outcome"],
            registry=r,
        )
        self.suppressed_addresses = Gauge(
            "trio_mailer_suppressed_addresses",
            "Addresses on the suppression list now",
            registry=r,
        )
        self.delivered_by_relay = Counter(
            "trio_mailer_delivered_by_relay",
            "Mails delivered, by the relay (host:port) that took them",
            ["relay"],
            registry=r,
        )
        self.retries = Counter("trio_mailer_retries", "Attempts scheduled again", registry=r)
        self.connects = Counter(
            "trio_mailer_smtp_connects",
            "SMTP connection attempts by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.smtp_replies = Counter(
            "trio_mailer_smtp_replies",
            "Final SMTP replies to send attempts by class (2xx, 4xx, 5xx, none: session lost)",
            ["code_class"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "trio_mailer_accept_to_delivery_seconds",
            "From acceptance over gRPC to the relay's 2xx after the final '.'",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.send_latency = Histogram(
            "trio_mailer_smtp_send_seconds",
            "One SMTP transaction (MAIL to the reply to '.')",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge(
            "trio_mailer_queue_depth", "Mails waiting in the queue", registry=r
        )
        self.in_flight = Gauge("trio_mailer_in_flight", "Mails being sent now", registry=r)
        self.retry_waiting = Gauge(
            "trio_mailer_retry_waiting", "Mails waiting for a retry", registry=r
        )
        self.sessions_up = Gauge("trio_mailer_smtp_sessions_up", "Open SMTP sessions", registry=r)

    def track(
        self,
        *,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        retry_waiting: Callable[[], float],
        sessions_up: Callable[[], float],
    ) -> None:
        """Read these gauges from the live objects at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        self.retry_waiting.set_function(retry_waiting)
        self.sessions_up.set_function(sessions_up)

    def reply(self, code: int | None) -> None:
        self.smtp_replies.labels("none" if code is None else f"{code // 100}xx").inc()

    def delivered_via(self, relay: str) -> None:
        self.delivered_by_relay.labels(relay or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``host:port`` until cancelled; reports the bound port."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise BindError(
            f"cannot listen on {host}:{port} for metrics: {exc.strerror or exc}"
        ) from exc
    bound: int = listeners[0].socket.getsockname()[1]
    task_status.started(bound)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    head = await _read_head(stream)
                    status, body, content_type = _respond(metrics, head)
                    await stream.send_all(
                        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body
                    )
            except (trio.TooSlowError, trio.BrokenResourceError, OSError, ValueError) as exc:
                log.debug("metrics request ended: %r", exc)

    await trio.serve_listeners(handle, listeners)


async def _read_head(stream: trio.SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(MAX_REQUEST_BYTES)
        if not chunk:
            break
        head += chunk
        if len(head) > MAX_REQUEST_BYTES:
            raise ValueError("request head too large")
    return head


def _respond(metrics: Metrics, head: bytes) -> tuple[str, bytes, str]:
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    method, _, rest = request_line.partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    if method != "GET":
        return "405 Method Not Allowed", b"GET only\n", "text/plain"
    if path != "/metrics":
        return "404 Not Found", b"see /metrics\n", "text/plain"
    return "200 OK", metrics.render(), CONTENT_TYPE_LATEST
