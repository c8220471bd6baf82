"""OpenTelemetry traces: one span per gRPC call, and the mail's life under it.

Theory of operation
-------------------
Off, and free, unless the standard ``OTEL_*`` variables ask for traces: then the SDK and the
OTLP/HTTP exporter (the optional extra ``trio-mailer[otel]``) are imported and installed by
``start_tracing``, called once by the CLI's ``serve`` and ``dev``. Without them only
``opentelemetry-api`` is loaded, nothing extracts a ``traceparent`` and every helper here
returns at once.

Traces are on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``), or
when it is unset and an OTLP endpoint is (``OTEL_EXPORTER_OTLP_ENDPOINT``, or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_TRACES_EXPORTER=none`` or
``OTEL_SDK_DISABLED=true`` turns them off. The SDK reads the rest itself (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_EXPORTER_OTLP_HEADERS``...).

The spans:

- ``server_span``: one SERVER span per gRPC call (``trio_mailer.v1.Mailer/SendPass``), the child
  of the caller's W3C ``traceparent`` when its metadata carries one.
- ``span``: the use case's steps under it (``compose``, ``store``). Their errors set the
  status to ERROR with the error's class name only: an exception's text may hold an address.
- The accepting call's context travels with the queued mail (``Delivery.traceparent``, from
  ``current_traceparent``) and is stored with it (``MailRecord.traceparent``): each ``smtp
  attempt`` span, and the ``queue wait`` before the first, is a child of the call's span however
  much later the sender gets to it, after a restart or on another replica too.

The pure core (``trio_mailer/core/``) never imports this module nor OpenTelemetry.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import attrs
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACER_NAME = "trio_mailer"
DEFAULT_SERVICE_NAME = "trio-mailer"
EXPORTERS = ("otlp", "console")
OTEL_EXTRA_HINT = "pip install 'trio-mailer[otel]'"
# The gRPC codes a server span reports as an error (OpenTelemetry's semantic conventions for
# gRPC servers); the others (NOT_FOUND, INVALID_ARGUMENT...) are the caller's business.
_SERVER_ERROR_CODES = frozenset({2, 4, 12, 13, 14, 15})  # UNKNOWN, DEADLINE_EXCEEDED, ...

_W3C = TraceContextTextMapPropagator()
_NULL: AbstractContextManager[None] = nullcontext()


class TracingError(Exception):
    """The ``OTEL_*`` variables ask for something this service cannot do (or the extra is
    missing); ``str()`` says which variable and what to do."""


@attrs.frozen
class TracingSettings:
    """What the ``OTEL_*`` variables ask for (``None`` from ``tracing_settings``: off)."""

    exporter: str  # "otlp" (OTLP over HTTP, protobuf) or "console"
    endpoint: str | None  # the traces URL; None: the exporter's default
    service_name: str


def tracing_settings(env: Mapping[str, str]) -> TracingSettings | None:
    """The traces ``env`` asks for; None when it asks for none.

    Raises:
        TracingError: an exporter or protocol this service does not offer.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not names:
        if not (traces_endpoint or base_endpoint):
            return None
        names = ["otlp"]
    if names == ["none"]:
        return None
    if len(names) != 1 or names[0] not in EXPORTERS:
        raise TracingError(
            f"OTEL_TRACES_EXPORTER: expected one of otlp, console or none, got {','.join(names)}"
        )
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    ) or "http/protobuf"
    if names[0] == "otlp" and protocol.strip() != "http/protobuf":
        raise TracingError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: expected http/protobuf (OTLP over HTTP), got {protocol}"
        )
    endpoint = traces_endpoint or (
        base_endpoint.rstrip("/") + "/v1/traces" if base_endpoint else None
    )
    service_name = env.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME
    return TracingSettings(names[0], endpoint, service_name)


@attrs.define
class Tracing:
    """Installed traces; ``shutdown()`` exports what is still buffered (at the process's end)."""

    settings: TracingSettings | None
    _provider: Any = None  # the SDK's TracerProvider; Any: the SDK is an optional extra

    def describe(self) -> str:
        if self.settings is None:
            return "off"
        where = self.settings.endpoint or "the exporter's default endpoint"
        target = "standard output" if self.settings.exporter == "console" else where
        return f"{self.settings.exporter} to {target} as {self.settings.service_name}"

    def shutdown(self) -> None:
        global _installed
        if self._provider is not None:
            self._provider.shutdown()
            use_tracer_provider(None)
            _installed = Tracing(None)


_installed = Tracing(None)  # what start_tracing installed


def describe_tracing() -> str:
    """Where traces go ("off" when nowhere), for the start-up log."""
    return _installed.describe()


def start_tracing(env: Mapping[str, str]) -> Tracing:
    """Install the SDK and the exporter when ``env`` asks for traces (see the module's
    docstring); a no-op ``Tracing`` otherwise, with nothing imported.

    Raises:
        TracingError: a bad ``OTEL_*`` variable, or traces asked for without the extra.
    """
    settings = tracing_settings(env)
    if settings is None:
        return Tracing(None)
    needed = ["opentelemetry.sdk"]
    if settings.exporter == "otlp":
        needed.append("opentelemetry.exporter.otlp.proto.http")
    for name in needed:
        if importlib.util.find_spec(name) is None:
            raise TracingError(
                f"the OTEL_* variables ask for traces, but {name} is not installed: "
                f"{OTEL_EXTRA_HINT}"
            )
    provider = _sdk_provider(settings)
    use_tracer_provider(provider)
    global _installed
    _installed = Tracing(settings, provider)
    return _installed


def _sdk_provider(settings: TracingSettings) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    version = importlib.metadata.version("trio-mailer")
    resource = Resource.create({"service.name": settings.service_name, "service.version": version})
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if settings.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


# The tracer every span here comes from; a no-op one until ``use_tracer_provider``.
_tracer: Tracer = trace.NoOpTracer()
_enabled = False


def use_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Make spans from ``provider`` (None: none, the default). ``start_tracing`` calls it;
    tests call it with their own provider."""
    global _tracer, _enabled
    _enabled = provider is not None
    _tracer = trace.NoOpTracer() if provider is None else provider.get_tracer(TRACER_NAME)


def enabled() -> bool:
    return _enabled


def caller_context(metadata: Sequence[tuple[str, str]]) -> Context:
    """The trace context of a call's ``traceparent``/``tracestate`` metadata (an empty one
    when there is none or it is malformed)."""
    carrier: dict[str, str] = {}
    for key, value in metadata:
        if key in ("traceparent", "tracestate"):
            carrier[key] = value
    return _W3C.extract(carrier)


@contextmanager
def _server_span(service: str, method: str, metadata: Sequence[tuple[str, str]]) -> Iterator[Span]:
    with _tracer.start_as_current_span(
        f"{service}/{method}",
        context=caller_context(metadata),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        record_exception=False,
        set_status_on_exception=False,
    ) as server:
        yield server


def server_span(
    service: str, method: str, metadata: Sequence[tuple[str, str]]
) -> AbstractContextManager[Span | None]:
    """A SERVER span for one call, the child of the caller's ``traceparent`` (None: off);
    ``call_ended`` gives it the call's status."""
    if not _enabled:
        return _NULL
    return _server_span(service, method, metadata)


def call_ended(span: Span | None, code: int | None) -> None:
    """The gRPC status a call ended with (None: never sent, the call was cancelled)."""
    if span is None:
        return
    code = 1 if code is None else code  # CANCELLED
    span.set_attribute("rpc.grpc.status_code", code)
    if code in _SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR))


@contextmanager
def _child_span(
    name: str, context: Context | None, kind: SpanKind, attributes: Mapping[str, Any]
) -> Iterator[Span]:
    with _tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=dict(attributes),
        record_exception=False,
        set_status_on_exception=False,
    ) as child:
        try:
            yield child
        except Exception as exc:
            # The class only: an exception's text may hold an address or a caller's values.
            child.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def span(name: str, **attributes: Any) -> AbstractContextManager[Span | None]:
    """A span under the current one (None: off). An error leaving it sets ERROR with its
    class name only."""
    if not _enabled:
        return _NULL
    return _child_span(name, None, SpanKind.INTERNAL, attributes)


def current_traceparent() -> str:
    """The current span as a W3C ``traceparent`` ("" when none, or traces are off): what a
    queued mail carries to its attempts."""
    if not _enabled:
        return ""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def _stored_context(traceparent: str) -> Context | None:
    if not traceparent:
        return None
    return _W3C.extract({"traceparent": traceparent})


def queue_wait(traceparent: str, waited_s: float, **attributes: Any) -> None:
    """A ``queue wait`` span that ended now, ``waited_s`` seconds long, under the accepting
    call's span."""
    if not _enabled:
        return
    end_ns = time.time_ns()
    start_ns = end_ns - max(0, round(waited_s * 1e9))
    wait = _tracer.start_span(
        "queue wait",
        context=_stored_context(traceparent),
        attributes=attributes,
        start_time=start_ns,
    )
    wait.end(end_time=end_ns)


def attempt_span(traceparent: str, **attributes: Any) -> AbstractContextManager[Span | None]:
    """An ``smtp attempt`` CLIENT span under the accepting call's span (a root span for a
    mail that carries no context); ``attempt_ended`` gives it the outcome."""
    if not _enabled:
        return _NULL
    return _child_span("smtp attempt", _stored_context(traceparent), SpanKind.CLIENT, attributes)


def attempt_ended(
    span: Span | None,
    *,
    outcome: str,
    reply_code: int | None,
    possible_duplicate: bool,
) -> None:
    """``outcome``: delivered, retry or failed."""
    if span is None:
        return
    span.set_attribute("mailer.outcome", outcome)
    if reply_code is not None:
        span.set_attribute("smtp.reply_code", reply_code)
    span.set_attribute("mailer.possible_duplicate", possible_duplicate)
    if outcome != "delivered":
        span.set_status(Status(StatusCode.ERROR, outcome))
