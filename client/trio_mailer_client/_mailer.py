"""``open_mailer`` and ``Mailer``: the trio-mailer API over grpcio, awaited from Trio."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import trio

from trio_mailer_client._api import MailerApi, SendCall
from trio_mailer_client._bridge import await_future, next_message
from trio_mailer_client._generated import mailer_pb2
from trio_mailer_client._policy import (
    DEFAULT_TIMEOUT_S,
    backoff_s,
    check_idempotency_key,
    normalise_message_id,
)
from trio_mailer_client._retry import with_retries
from trio_mailer_client._types import (
    Accepted,
    MailerError,
    MailState,
    MailStatus,
    Refused,
    SendResult,
)

try:  # optional: with it, a call made under a span carries its traceparent
    from opentelemetry import propagate as _propagate
except ImportError:  # pragma: no cover - the package without OpenTelemetry
    _propagate = None  # type: ignore[assignment]

SERVICE = "/trio_mailer.v1.Mailer/"
_SEND_METHODS: dict[str, Any] = {  # the request message class of each send method
    "Send": mailer_pb2.SendRequest,
    "SendPass": mailer_pb2.MsgRequest,
    "SendRetrieve": mailer_pb2.MsgRequest,
}
# Reconnect soon after the service restarts (grpcio's default first backoff is 1 s, up to 120 s),
# and notice a dead connection (a host that vanished without a FIN) within about 40 s. Not
# grpc.min_reconnect_backoff_ms: it is also the connect timeout (20 s), which must stay generous.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # The client retries by its own rules (one idempotency key, one overall timeout).
    ("grpc.enable_retries", 0),
)
WATCH_RECONNECT_CAP_S = 2.0


def tls_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS to the service: verified against the system's roots, or ``ca_file``; with
    ``cert_file`` and ``key_file``, a client certificate for a service that requires one.

    Raises:
        OSError: a file cannot be read (the message names it).
    """

    def read(path: str | Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


@asynccontextmanager
async def open_mailer(
    target: str,
    *,
    token: str | None = None,
    tls: bool | grpc.ChannelCredentials = False,
    options: Sequence[tuple[str, Any]] = (),
) -> AsyncIterator[Mailer]:
    """A ``Mailer`` on one gRPC channel to ``target`` ("host:port"), closed on exit.

    Args:
        target: the service's address, "host:port".
        token: the bearer token the service expects (one of the tokens in its
            MAILER_AUTH_TOKENS_FILE), if any.
        tls: False for plaintext (loopback, or a mesh that encrypts), True for TLS verified
            against the system's roots, or credentials from ``tls_credentials``.
        options: extra grpcio channel options; they override ``CHANNEL_OPTIONS``.
    """
    merged = [*CHANNEL_OPTIONS, *options]
    if tls is False:
        channel = grpc.insecure_channel(target, options=merged)
    else:
        credentials = grpc.ssl_channel_credentials() if tls is True else tls
        channel = grpc.secure_channel(target, credentials, options=merged)
    try:
        yield Mailer(channel, token=token)
    finally:
        channel.close()


class Mailer(MailerApi):
    """The trio-mailer API. Make one with ``open_mailer``; share it between tasks.

    Every method takes ``timeout`` (seconds, overall): attempts that end with UNAVAILABLE or
    DEADLINE_EXCEEDED are tried again, with capped jittered backoff, until it runs out.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        token: str | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._channel = channel
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._jitter = jitter
        self._send = {
            name: channel.unary_unary(
                SERVICE + name,
                request_serializer=request.SerializeToString,
                response_deserializer=mailer_pb2.MsgReply.FromString,
            )
            for name, request in _SEND_METHODS.items()
        }
        self._get_status = channel.unary_unary(
            SERVICE + "GetStatus",
            request_serializer=mailer_pb2.StatusRequest.SerializeToString,
            response_deserializer=mailer_pb2.MailStatus.FromString,
        )
        self._watch_status = channel.unary_stream(
            SERVICE + "WatchStatus",
            request_serializer=mailer_pb2.StatusRequest.SerializeToString,
            response_deserializer=mailer_pb2.MailStatus.FromString,
        )

    async def _submit(self, call: SendCall, timeout: float) -> SendResult:
        """One ``Send``/``SendPass``/``SendRetrieve`` call, retried within ``timeout``."""
        request = call.request()
        method = self._send[call.method]
        key = call.idempotency_key

        async def attempt(remaining_s: float) -> SendResult:
            reply = await self._unary(method, request, remaining_s)
            if reply.sent:
                return Accepted(message_id=reply.message_id, idempotency_key=key)
            retry_after = reply.retry_after_ms / 1000 if reply.retry_after_ms else None
            return Refused(reason=reply.reason, retry_after=retry_after, idempotency_key=key)

        return await with_retries(attempt, timeout, jitter=self._jitter)

    async def status(
        self,
        message_id: str | None = None,
        *,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> MailStatus:
        """Where a mail stands, by its Message-ID (with or without angle brackets) or by the
        idempotency key it was sent with.

        Raises:
            MailerError: NOT_FOUND for a mail the service does not know; as ``send_pass``.
            ValueError: neither or both of ``message_id`` and ``idempotency_key``.
        """
        request = _status_request(message_id, idempotency_key)

        async def attempt(remaining_s: float) -> MailStatus:
            return status_from_message(await self._unary(self._get_status, request, remaining_s))

        return await with_retries(attempt, timeout, jitter=self._jitter)

    async def watch(
        self, message_id: str | None = None, *, idempotency_key: str | None = None
    ) -> AsyncIterator[MailStatus]:
        """The mail's status now, then every change, ending after a terminal state.

        Use it with ``contextlib.aclosing``. When the connection breaks (the service restarts),
        the watch reconnects with backoff and goes on; a status already yielded is not repeated.

        Raises:
            MailerError: a final status (NOT_FOUND, UNAUTHENTICATED...).
        """
        request = _status_request(message_id, idempotency_key)
        last: MailStatus | None = None
        retry = 0
        while True:
            call = self._watch_status(request, metadata=self._call_metadata())
            try:
                while (message := await next_message(call, call)) is not None:
                    status = status_from_message(message)
                    retry = 0
                    if status != last:
                        last = status
                        yield status
                    if status.state.terminal:
                        return
                if last is not None and last.state.terminal:
                    return
                code, details = "UNAVAILABLE", "the stream ended before a terminal state"
            except grpc.RpcError as exc:
                code, details = _code_and_details(exc)
            finally:
                call.cancel()
            if code != "UNAVAILABLE":
                raise MailerError(code, details, attempts=retry + 1)
            await trio.sleep(min(WATCH_RECONNECT_CAP_S, backoff_s(retry, self._jitter)))
            retry += 1

    def _call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The token, and the caller's current span as ``traceparent`` (when OpenTelemetry is
        installed and a span is current): the service's spans continue the caller's trace."""
        if _propagate is None:
            return self._metadata
        carrier: dict[str, str] = {}
        _propagate.inject(carrier)
        if not carrier:
            return self._metadata
        return (*(self._metadata or ()), *carrier.items())

    async def _unary(self, method: Any, request: Any, timeout_s: float) -> Any:
        future = method.future(request, timeout=timeout_s, metadata=self._call_metadata())
        try:
            return await await_future(future)
        except grpc.RpcError as exc:
            raise MailerError(*_code_and_details(exc)) from None


def _code_and_details(exc: grpc.RpcError) -> tuple[str, str]:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else None
    return (code.name if code is not None else "UNKNOWN", details or "")


def _status_request(message_id: str | None, idempotency_key: str | None) -> Any:
    if (message_id is None) == (idempotency_key is None):
        raise ValueError("give message_id or idempotency_key (one of them)")
    if message_id is not None:
        return mailer_pb2.StatusRequest(message_id=normalise_message_id(message_id))
    return mailer_pb2.StatusRequest(idempotency_key=check_idempotency_key(idempotency_key or ""))


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    return getattr(message, field).ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


def status_from_message(message: Any) -> MailStatus:
    """A ``MailStatus`` from the service's ``trio_mailer.v1.MailStatus`` message."""
    return MailStatus(
        message_id=message.message_id,
        state=MailState(mailer_pb2.MailStatus.State.Name(message.state)),
        attempts=message.attempts,
        last_reply_code=message.last_reply_code,
        last_reply_text=message.last_reply_text,
        accepted_at=_time(message, "accepted_at"),
        last_attempt_at=_time(message, "last_attempt_at"),
        finished_at=_time(message, "finished_at"),
        possible_duplicate=message.possible_duplicate,
    )
