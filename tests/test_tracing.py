"""Traces: a caller's span continues through the service to each SMTP attempt, exported over
OTLP/HTTP to a real receiver (http.server on loopback, decoding the protobuf with
opentelemetry-proto); JSON logs name the current span; off, nothing of the SDK is loaded."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import trio_mailer_client
from trio_mailer import tracing
from trio_mailer.core.mail_lifecycle import MailState
from trio_mailer.logs import JsonFormatter
from trio_mailer_client import Accepted

from .fakes.fault_relay import Fault
from .helpers import Harness

ROOT = Path(__file__).resolve().parent.parent
CALLER_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331
RETRY_WAIT = MailState.RETRY_WAIT


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf in, ``ExportTraceServiceResponse``
    out; every request decoded and kept."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.posts: list[tuple[str, str]] = []  # path, content type
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.posts.append((self.path, self.headers.get("Content-Type", "")))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.requests.append(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[SpanMessage]:
        return [
            span
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def service_names(self) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.requests
            for resource_spans in request.resource_spans
            for attribute in resource_spans.resource.attributes
            if attribute.key == "service.name"
        }


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(timeout=10)


def attributes(span: SpanMessage) -> dict[str, object]:
    values: dict[str, object] = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


def span_id(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


@asynccontextmanager
async def traced_service(
    start_harness: Callable[..., Any], receiver: OtlpReceiver, **options: Any
) -> AsyncIterator[Harness]:
    """The service with traces exported to ``receiver`` (flushed when the block ends)."""
    traces = tracing.start_tracing(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "mailer-under-test"}
    )
    try:
        async with start_harness(**options) as h:
            yield h
    finally:
        await trio.to_thread.run_sync(traces.shutdown)
    assert not tracing.enabled()


async def send_under_caller_span(h: Harness) -> str:
    """send_pass through the client package while the caller's own span is current."""
    caller = SpanContext(
        CALLER_TRACE_ID, CALLER_SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)
    )
    with trace.use_span(NonRecordingSpan(caller)):
        async with trio_mailer_client.open_mailer(f"127.0.0.1:{h.grpc_port}") as mailer:
            result = await mailer.send_pass("user@example.com", "424242")
    assert isinstance(result, Accepted)
    return result.message_id


async def test_a_call_is_traced_from_the_callers_span_to_the_relays_reply(
    start_harness: Callable[..., Any], otlp_receiver: OtlpReceiver
) -> None:
    """The caller's traceparent continues into a SERVER span; compose, store, queue wait and
    the SMTP attempt are its children, with the relay, the reply code and no duplicate."""
    with trio.fail_after(60):
        async with traced_service(start_harness, otlp_receiver) as h:
            message_id = await send_under_caller_span(h)
            await h.wait_finished(1)
    assert otlp_receiver.posts and set(otlp_receiver.posts) == {
        ("/v1/traces", "application/x-protobuf")
    }
    assert otlp_receiver.service_names() == {"mailer-under-test"}
    spans = [s for s in otlp_receiver.spans() if span_id(s.trace_id) == CALLER_TRACE_ID]
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == sorted(
        ["trio_mailer.v1.Mailer/SendPass", "compose", "store", "queue wait", "smtp attempt"]
    ), [s.name for s in spans]
    assert len(spans) == 5
    server = by_name["trio_mailer.v1.Mailer/SendPass"]
    assert server.kind == SpanMessage.SPAN_KIND_SERVER
    assert span_id(server.parent_span_id) == CALLER_SPAN_ID
    assert attributes(server) == {
        "rpc.system": "grpc",
        "rpc.service": "trio_mailer.v1.Mailer",
        "rpc.method": "SendPass",
        "rpc.grpc.status_code": 0,
    }
    for name in ("compose", "store", "queue wait", "smtp attempt"):
        assert by_name[name].parent_span_id == server.span_id, name
    assert attributes(by_name["compose"]) == {"mailer.kind": "password"}
    assert attributes(by_name["store"]) == {"mailer.message_id": message_id}
    attempt = by_name["smtp attempt"]
    assert attempt.kind == SpanMessage.SPAN_KIND_CLIENT
    assert attributes(attempt) == {
        "mailer.message_id": message_id,
        "mailer.relay": f"127.0.0.1:{h.relay_port}",
        "mailer.attempt": 1,
        "mailer.outcome": "delivered",
        "smtp.reply_code": 250,
        "mailer.possible_duplicate": False,
    }
    assert attempt.status.code != attempt.status.STATUS_CODE_ERROR
    # The steps in order: compose and store inside the call, then the wait, then the attempt.
    wait = by_name["queue wait"]
    assert server.start_time_unix_nano <= by_name["compose"].start_time_unix_nano
    assert by_name["compose"].end_time_unix_nano <= by_name["store"].start_time_unix_nano
    assert by_name["store"].end_time_unix_nano <= server.end_time_unix_nano
    assert wait.end_time_unix_nano <= attempt.start_time_unix_nano
    assert wait.start_time_unix_nano >= by_name["store"].start_time_unix_nano - 10_000_000


async def test_a_retried_attempt_is_traced_under_the_accepting_call(
    start_harness: Callable[..., Any], otlp_receiver: OtlpReceiver
) -> None:
    """A session lost after the final dot: the first attempt's span says retry and possible
    duplicate, the second (later, after a backoff) delivered; both under the call's span."""
    with trio.fail_after(60):
        async with traced_service(
            start_harness, otlp_receiver, env={"MAILER_RETRY_BASE_S": "0.05"}
        ) as h:
            h.relay.add_fault(Fault("DOT", drop=True))
            await send_under_caller_span(h)
            await h.wait_finished(1)
    spans = [s for s in otlp_receiver.spans() if span_id(s.trace_id) == CALLER_TRACE_ID]
    server = next(s for s in spans if s.kind == SpanMessage.SPAN_KIND_SERVER)
    attempts = sorted(
        (s for s in spans if s.name == "smtp attempt"), key=lambda s: s.start_time_unix_nano
    )
    assert [attributes(s)["mailer.attempt"] for s in attempts] == [1, 2]
    assert all(s.parent_span_id == server.span_id for s in attempts)
    first, second = (attributes(s) for s in attempts)
    assert (first["mailer.outcome"], first["mailer.possible_duplicate"]) == ("retry", True)
    assert "smtp.reply_code" not in first  # the session broke: no reply
    assert attempts[0].status.code == attempts[0].status.STATUS_CODE_ERROR
    assert (second["mailer.outcome"], second["smtp.reply_code"]) == ("delivered", 250)
    assert second["mailer.possible_duplicate"] is True
    assert [s.name for s in spans].count("queue wait") == 1


async def test_an_attempt_after_a_restart_is_traced_under_the_accepting_call(
    start_harness: Callable[..., Any], otlp_receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """The trace context is stored with the mail: a run that starts on the same outbox file
    (the first left the mail waiting for a retry) traces its attempt under the call's span."""
    env = {
        "MAILER_OUTBOX": str(tmp_path / "outbox.sqlite3"),
        "MAILER_RETRY_BASE_S": "30",
        "MAILER_RETRY_MAX_S": "30",
    }
    traces = tracing.start_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url})
    try:
        with trio.fail_after(60):
            async with start_harness(env=env) as first:
                first.relay.add_fault(Fault("MAIL", reply="451 4.3.0 try again later", times=-1))
                message_id = await send_under_caller_span(first)
                board = first.app.board
                while (record := board.get(message_id)) is None or record.state is not RETRY_WAIT:
                    await board.wait_for_change(message_id)  # until the retry is scheduled
                assert record.attempts == 1
            async with start_harness(env=env) as second:
                (finished,) = await second.wait_finished(1)
                assert (finished.delivery.message_id, finished.outcome) == (message_id, "delivered")
    finally:
        await trio.to_thread.run_sync(traces.shutdown)
    spans = [s for s in otlp_receiver.spans() if span_id(s.trace_id) == CALLER_TRACE_ID]
    server = next(s for s in spans if s.kind == SpanMessage.SPAN_KIND_SERVER)
    attempts = [attributes(s) for s in spans if s.name == "smtp attempt"]
    assert [(a["mailer.attempt"], a["mailer.outcome"]) for a in attempts] == [
        (1, "retry"),
        (2, "delivered"),
    ]
    assert all(s.parent_span_id == server.span_id for s in spans if s.name == "smtp attempt")
    assert all(a["mailer.message_id"] == message_id for a in attempts)


def test_json_logs_name_the_current_span() -> None:
    """A line written under a span carries its trace_id and span_id; without one, neither."""
    provider = TracerProvider()
    record_args = ("trio_mailer", logging.INFO, __file__, 1, "hello", None, None)
    formatter = JsonFormatter()
    with provider.get_tracer("test").start_as_current_span("work") as span:
        inside = json.loads(formatter.format(logging.LogRecord(*record_args)))
        context = span.get_span_context()
    outside = json.loads(formatter.format(logging.LogRecord(*record_args)))
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in outside and "span_id" not in outside


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "x"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, ("otlp", "http://c:4318/v1/traces")),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x",
            },
            ("otlp", "http://t:1/x"),
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp", None)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console", None)),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
    ],
)
def test_the_otel_variables_decide_whether_traces_are_on(
    env: dict[str, str], expected: tuple[str, str | None] | None
) -> None:
    """Off unless an exporter or an OTLP endpoint is named; none and OTEL_SDK_DISABLED win."""
    settings = tracing.tracing_settings(env)
    got = None if settings is None else (settings.exporter, settings.endpoint)
    assert got == expected


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ],
)
def test_an_exporter_the_service_lacks_is_named(env: dict[str, str], variable: str) -> None:
    with pytest.raises(tracing.TracingError, match=variable):
        tracing.tracing_settings(env)


_OFF_PROBE = """
import sys
from trio_mailer import tracing
from trio_mailer.cli import main
traces = tracing.start_tracing({"OTEL_SERVICE_NAME": "x"})
assert traces.describe() == "off" and not tracing.enabled()
with tracing.server_span("s", "m", [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]):
    assert tracing.current_traceparent() == ""
print(sorted(n for n in sys.modules if n.startswith("opentelemetry.sdk")
             or n.startswith("opentelemetry.exporter")))
"""


def _probe(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (from the project root)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_off_loads_neither_the_sdk_nor_an_exporter() -> None:
    """Without OTEL_* variables the service imports the API only: no SDK, no exporter, no
    span extracted from a caller's traceparent."""
    result = _probe(_OFF_PROBE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


_MISSING_EXTRA_PROBE = """
import sys
for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
    sys.modules[name] = None  # as if not installed: find_spec answers None, import fails
from trio_mailer.cli import main
sys.exit(main(["serve"]))
"""


def test_traces_asked_for_without_the_extra_stop_start_up_naming_it() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT without trio-mailer[otel]: exit status 2, the extra named."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    result = _probe(_MISSING_EXTRA_PROBE, env)
    assert result.returncode == 2, result.stderr
    assert "pip install 'trio-mailer[otel]'" in result.stderr


def test_the_client_sends_no_traceparent_without_a_span() -> None:
    """Outside any span the client's metadata is the token alone (or nothing)."""
    from trio_mailer_client._mailer import Mailer

    mailer = Mailer.__new__(Mailer)
    mailer._metadata = None
    assert mailer._call_metadata() is None
    caller = SpanContext(
        CALLER_TRACE_ID, CALLER_SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)
    )
    mailer._metadata = (("authorization", "Bearer t"),)
    with trace.use_span(NonRecordingSpan(caller)):
        metadata = mailer._call_metadata()
    assert metadata == (
        ("authorization", "Bearer t"),
        ("traceparent", f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"),
    )
