"""Building a MailerService in-process for the admission tests (no network, no sender)."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

import attrs
import purerpc
import pytest
import trio

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.message import MailComposer
from trio_mailer.core.rate_limits import RateLimit
from trio_mailer.core.rendering import MailTemplates
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.grpc.mailer_service import MailerService
from trio_mailer.metrics import Metrics
from trio_mailer.service.admission import AdmissionControl
from trio_mailer.store.outbox import MemoryOutbox, Outbox
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

from .helpers import mailer_service

TEMPLATES = MailTemplates.load(shipped_templates_dir())


@attrs.frozen
class FakeCall:
    """What purerpc hands a handler as ``request``: the call's headers and deadline."""

    custom_metadata: tuple[tuple[str, str], ...] = ()
    timeout: datetime.timedelta | None = None


def as_caller(name: str, timeout_s: float | None = None) -> FakeCall:
    return FakeCall(
        (("x-test-caller", name),),
        None if timeout_s is None else datetime.timedelta(seconds=timeout_s),
    )


def identify(metadata: Sequence[tuple[str, str]]) -> str:
    return dict(metadata).get("x-test-caller", "anonymous")


def build_service(
    outbox: Outbox | None = None,
    *,
    queue_size: int = 10,
    window_s: float = 86400.0,
    recipient_limit: str = "0",
    caller_limit: str = "0",
    suppress_s: float = 0.0,
    wall_clock: Callable[[], float] = trio.current_time,
    metrics: Metrics | None = None,
) -> MailerService:
    """A service whose clocks are the trio clock (so MockClock drives the windows)."""
    outbox = outbox if outbox is not None else MemoryOutbox()
    admission = AdmissionControl(
        window_s=window_s,
        recipient_limit=RateLimit.parse(recipient_limit),
        caller_limit=RateLimit.parse(caller_limit),
        suppress_s=suppress_s,
        wall_clock=wall_clock,
        outbox=outbox,
    )
    return mailer_service(
        MailQueue.open(queue_size, 100),
        composer=MailComposer(TEMPLATES, "noreply@example.com", "Acme"),
        outbox=outbox,
        admission=admission,
        metrics=metrics,
        identify=identify,
        wall_clock=wall_clock,
    )


async def send(
    service: MailerService,
    to: str = "user@example.com",
    code: str = "123456",
    key: str = "",
    *,
    kind: str = "SendPass",
    call: FakeCall | None = None,
) -> MsgReply:
    method = service.SendPass if kind == "SendPass" else service.SendRetrieve
    reply: MsgReply = await method(
        MsgRequest(to=to, code=code, idempotency_key=key), call or FakeCall()
    )
    return reply


async def refused_with(
    status: purerpc.StatusCode, service: MailerService, *args: object, **kwargs: object
) -> str:
    """The message of the gRPC error the call fails with (which must be ``status``)."""
    with pytest.raises(purerpc.RpcFailedError) as info:
        await send(service, *args, **kwargs)  # type: ignore[arg-type]
    assert info.value.status.status_code == status, info.value.status
    return str(info.value.status.status_message)


def queued(service: MailerService) -> int:
    return service.accept.queue.statistics().queued
