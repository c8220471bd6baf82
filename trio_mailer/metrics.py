"""Prometheus metrics, and the ``/metrics`` HTTP endpoint.

The exposition format comes from the well-kept ``prometheus-client`` library; the endpoint is a
handler on the one HTTP/1.1 server (``http_server.py``, h11 on Trio; GET /metrics only, one
request per connection), so scraping never starts a thread or blocks the event loop for longer
than rendering the text takes. Each ``Metrics`` has its own registry, so tests and several apps
in one process do not collide.

Conventions (https://prometheus.io/docs/practices/naming/ and the client libraries' own):
``process_*`` and ``python_*`` collectors on the registry; no ``*_created`` series (they double
the series count and most dashboards ignore them); every labelled counter has a series at 0
for each known label value from the start, so ``rate()`` and alerts see the first event (the
known values are the ``*_LABELS`` tables below: add a value there when code starts using it);
``trio_mailer_build_info`` is 1 with the version as a label; the gRPC counters have the shape of
the common gRPC exporters (go-grpc-prometheus, py-grpc-prometheus), so their dashboards work.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable, Sequence
from functools import partial

import purerpc
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from trio_mailer.core.caller_auth import REFUSAL_REASONS
from trio_mailer.core.errors import BindError
from trio_mailer.http_server import Request, Response, serve_http

REQUEST_TIMEOUT_S = 5.0
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# A mail's life, and each step of it, from 10 ms to the time to live: beyond it a mail is
# expired, so no finite bound past the TTL is of use (``life_buckets_s``).
_LIFE_BOUNDS_S = (*LATENCY_BUCKETS_S, 1800, 3600, 7200, 21600, 43200, 86400, 172800, 345600, 604800)
DEFAULT_TTL_S = 600.0  # MAILER_MESSAGE_TTL_S's default
# Accepting a mail takes well under 10 ms (one fsync with the file outbox): finer buckets there.
ACCEPT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

# Process-wide in prometheus-client: no *_created series anywhere.
disable_created_metrics()  # type: ignore[no-untyped-call]

MAILER_SERVICE = "trio_mailer.v1.Mailer"
# The known label values, pre-created at 0.
SEND_OUTCOMES = (
    "accepted",
    "repeat",  # answered from its idempotency key
    "queue_full",
    "recipient_rate_limited",
    "caller_rate_limited",
    "suppressed",
    "invalid",
    "idempotency_conflict",
    "idempotency_busy",
    "unauthenticated",
    "unavailable",
    "deadline_exceeded",  # past the caller's deadline before the mail was stored
    "cancelled",  # the caller went away (or the server is stopping)
    "internal",
)
STATUS_OUTCOMES = (
    "ok",
    "not_found",
    "invalid",
    "unauthenticated",
    "unavailable",
    "deadline_exceeded",  # the server's deadline for the call fired
    "cancelled",  # the client reset the call (or went away)
    "internal",
)
REQUEST_LABELS: dict[str, tuple[str, ...]] = {
    "Send": SEND_OUTCOMES,
    "SendPass": SEND_OUTCOMES,
    "SendRetrieve": SEND_OUTCOMES,
    "GetStatus": STATUS_OUTCOMES,
    "WatchStatus": STATUS_OUTCOMES,
}
GRPC_TYPES = {
    "Send": "unary",
    "SendPass": "unary",
    "SendRetrieve": "unary",
    "GetStatus": "unary",
    "WatchStatus": "server_stream",
}
GRPC_CODES = (
    "OK",
    "CANCELLED",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "DEADLINE_EXCEEDED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "UNAUTHENTICATED",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "INTERNAL",
)
MAIL_OUTCOMES = ("delivered", "failed", "expired")
CONNECT_RESULTS = ("ok", "failed")
REPLY_CLASSES = ("2xx", "4xx", "5xx", "none")
_OUTCOME_OF_CODE = {
    "OK": "ok",
    "NOT_FOUND": "not_found",
    "INVALID_ARGUMENT": "invalid",
    "UNAUTHENTICATED": "unauthenticated",
    "UNAVAILABLE": "unavailable",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
    "CANCELLED": "cancelled",
    "INTERNAL": "internal",
}


SEND_METHODS = frozenset(("Send", "SendPass", "SendRetrieve"))


def life_buckets_s(ttl_s: float) -> tuple[float, ...]:
    """Histogram bounds for a mail's life: 10 ms, 25 ms, ... up to ``ttl_s``, the last one."""
    return (*(bound for bound in _LIFE_BOUNDS_S if bound < ttl_s), ttl_s)


def _code_name(code: int) -> str:
    try:
        return str(purerpc.StatusCode(code).name)
    except ValueError:
        return str(code)


def _version() -> str:
    try:
        return importlib.metadata.version("trio-mailer")
    except importlib.metadata.PackageNotFoundError:  # running from a bare source tree
        return "unknown"


class Metrics:
    def __init__(self, *, ttl_s: float = DEFAULT_TTL_S, relays: Sequence[str] = ()) -> None:
        """``ttl_s``: the mails' time to live (the largest finite bucket of the latency
        histograms); ``relays``: the configured relays ("host:port"), pre-created at 0."""
        self._children: dict[tuple[int, str], Counter] = {}
        self._attempt_children: dict[tuple[str, str], Histogram] = {}
        self._finished_children: dict[str, Histogram] = {}
        life = life_buckets_s(ttl_s)
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "trio_mailer_build_info",
            "Always 1; the labels say which build is running",
            ["version", "python_version"],
            registry=r,
        )
        self.build_info.labels(_version(), platform.python_version()).set(1)
        self.grpc_started = Counter(
            "grpc_server_started",
            "RPCs started on the server",
            ["grpc_type", "grpc_service", "grpc_method"],
            registry=r,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self.accept_latency = Histogram(
            "trio_mailer_accept_seconds",
            "SendPass/SendRetrieve, from the request to the reply (outbox commit included)",
            buckets=ACCEPT_BUCKETS_S,
            registry=r,
        )
        self.outbox_unfinished = Gauge(
            "trio_mailer_outbox_unfinished",
            "Accepted mails not yet delivered, failed or expired",
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "trio_mailer_outbox_oldest_unfinished_age_seconds",
            "Age of the oldest unfinished mail (0 when there is none)",
            registry=r,
        )
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
        self.accepted_to_finished = Histogram(
            "trio_mailer_accepted_to_finished_seconds",
            "From acceptance over gRPC to the mail's final state (delivered, failed, expired)",
            ["outcome"],
            buckets=life,
            registry=r,
        )
        self.queue_wait = Histogram(
            "trio_mailer_queue_wait_seconds",
            "From acceptance to the start of the mail's first attempt (a sender took it and had "
            "a session)",
            buckets=life,
            registry=r,
        )
        self.smtp_attempt = Histogram(
            "trio_mailer_smtp_attempt_seconds",
            "One attempt on an open session (MAIL to the final reply, or the session lost), by "
            "relay (host:port) and reply class (2xx, 4xx, 5xx, none: session lost)",
            ["relay", "code_class"],
            buckets=life,
            registry=r,
        )
        self.auth_failures = Counter(
            "trio_mailer_auth_failures",
            "Failed authentication by reason (missing, bad_scheme, unknown_token, "
            "bad_client_certificate)",
            ["reason"],
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
        self.health_serving = Gauge(
            "trio_mailer_health_serving",
            "1 while the gRPC health status of the server is SERVING, else 0 (NOT_SERVING)",
            registry=r,
        )
        self._precreate(relays)

    def _precreate(self, relays: Sequence[str]) -> None:
        """A series at 0 for every known label value."""
        for method, outcomes in REQUEST_LABELS.items():
            for outcome in outcomes:
                self.requests.labels(method, outcome)
            self.grpc_started.labels(GRPC_TYPES[method], MAILER_SERVICE, method)
            for code in GRPC_CODES:
                self.grpc_handled.labels(GRPC_TYPES[method], MAILER_SERVICE, method, code)
        for outcome in MAIL_OUTCOMES:
            self.mails.labels(outcome)
        for result in CONNECT_RESULTS:
            self.connects.labels(result)
        for code_class in REPLY_CLASSES:
            self.smtp_replies.labels(code_class)
            for relay in relays:
                self.smtp_attempt.labels(relay, code_class)
        for relay in relays:
            self.delivered_by_relay.labels(relay)
        for outcome in MAIL_OUTCOMES:
            self.accepted_to_finished.labels(outcome)
        for reason in REFUSAL_REASONS:
            self.auth_failures.labels(reason)

    def track_outbox(
        self,
        unfinished: Callable[[], tuple[int, float | None]],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Read the outbox gauges at scrape time: ``unfinished()`` gives the count and the
        oldest unfinished mail's acceptance time (Unix seconds, None when there is none)."""
        self.outbox_unfinished.set_function(lambda: unfinished()[0])

        def oldest_age() -> float:
            oldest = unfinished()[1]
            return 0.0 if oldest is None else max(0.0, wall_clock() - oldest)

        self.outbox_oldest_age.set_function(oldest_age)

    def call_started(self, service: str, method: str) -> None:
        """The gRPC front started serving a call (``grpc_server_started_total``)."""
        if service == MAILER_SERVICE and method in GRPC_TYPES:
            self.grpc_started.labels(GRPC_TYPES[method], MAILER_SERVICE, method).inc()

    def call_finished(self, service: str, method: str, code: int) -> None:
        """The call ended with ``code`` on the wire (CANCELLED: the client reset it):
        ``grpc_server_handled_total``, and for GetStatus and WatchStatus also
        ``trio_mailer_requests_total`` (the sends count their own outcomes)."""
        if service != MAILER_SERVICE or method not in GRPC_TYPES:
            return
        name = _code_name(code)
        self.grpc_handled.labels(GRPC_TYPES[method], MAILER_SERVICE, method, name).inc()
        if method not in SEND_METHODS:
            self.requests.labels(method, _OUTCOME_OF_CODE.get(name, "internal")).inc()

    def unauthenticated(self, method: str) -> None:
        """A send refused before its handler ran: no bearer token, or a wrong one (the gRPC
        counters and the status methods' outcomes come from ``call_finished``)."""
        if method in SEND_METHODS:
            self.requests.labels(method, "unauthenticated").inc()

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

    def track_health(self, serving: Callable[[], bool]) -> None:
        """Read ``trio_mailer_health_serving`` at scrape time: ``serving()`` says whether the
        health status is SERVING (the alert on NOT_SERVING reads it)."""
        self.health_serving.set_function(lambda: 1.0 if serving() else 0.0)

    def reply(self, code: int | None) -> None:
        self._child(self.smtp_replies, "none" if code is None else f"{code // 100}xx").inc()

    def delivered_via(self, relay: str) -> None:
        self._child(self.delivered_by_relay, relay or "unknown").inc()

    def auth_failed(self, reason: str) -> None:
        self._child(self.auth_failures, reason).inc()

    def mail_finished(self, outcome: str, seconds: float) -> None:
        """A mail reached its final state ``outcome``, ``seconds`` after it was accepted."""
        self._child(self.mails, outcome).inc()
        child = self._finished_children.get(outcome)
        if child is None:
            child = self._finished_children[outcome] = self.accepted_to_finished.labels(outcome)
        child.observe(seconds)

    def attempt(self, relay: str, code: int | None, seconds: float) -> None:
        """One SMTP attempt to ``relay`` ended with ``code`` (None: the session was lost)."""
        code_class = "none" if code is None else f"{code // 100}xx"
        key = (relay or "unknown", code_class)
        child = self._attempt_children.get(key)
        if child is None:
            child = self._attempt_children[key] = self.smtp_attempt.labels(*key)
        child.observe(seconds)

    def _child(self, family: Counter, label: str) -> Counter:
        """``family.labels(label)``, remembered: the lookup takes a lock and builds a tuple,
        and these are counted for every mail. Bounded: one entry per label value, and the
        values are a few reply classes, outcomes and the configured relays."""
        key = (id(family), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(label)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``host:port`` until cancelled; reports the bound port.

    Raises:
        BindError: ``host:port`` cannot be listened on.
    """
    try:
        await serve_http(
            partial(_answer, metrics),
            host,
            port,
            request_timeout_s=REQUEST_TIMEOUT_S,
            task_status=task_status,
        )
    except OSError as exc:  # bare: the bind (see serve_http)
        raise BindError(
            f"cannot listen on {host}:{port} for metrics: {exc.strerror or exc}"
        ) from exc


_CLOSE = ("Connection", "close")  # a scrape is one request: nothing to keep a connection for
_TEXT = (("Content-Type", "text/plain"), _CLOSE)


async def _answer(metrics: Metrics, request: Request) -> Response:
    if request.method != "GET":
        return Response(405, (*_TEXT, ("Allow", "GET")), b"GET only\n")
    if request.target.partition("?")[0] != "/metrics":
        return Response(404, _TEXT, b"see /metrics\n")
    return Response(200, (("Content-Type", CONTENT_TYPE_LATEST), _CLOSE), metrics.render())
