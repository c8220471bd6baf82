"""The ``trio_mailer.v1.MailerAdmin`` handlers: the suppression list, for ``trio-mailer
suppressed list`` and ``trio-mailer suppressed remove``.

They read and change the running service's own view (``AdmissionControl``), which writes
through to the outbox: the SQLite file is held under an exclusive lock by the service, so the
CLI never opens it. Calls need the same credentials as the Mailer service.
"""

from __future__ import annotations

import logging

import purerpc
from google.protobuf.timestamp_pb2 import Timestamp

from trio_mailer.core.addresses import mask
from trio_mailer.core.errors import InvalidRequest, OutboxError
from trio_mailer.core.validation import validate_address
from trio_mailer.service.admission import AdmissionControl
from trio_mailer.store.admission_tables import Suppression
from trio_mailer.v1.mailer_grpc import MailerAdminServicer
from trio_mailer.v1.mailer_pb2 import (
    ListSuppressedReply,
    ListSuppressedRequest,
    RemoveSuppressedReply,
    RemoveSuppressedRequest,
    SuppressedAddress,
)

log = logging.getLogger(__name__)

MAX_LISTED = 10_000  # one reply stays well within a client's default message size


def _timestamp(unix: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(unix * 1e9))
    return stamp


def _entry(entry: Suppression) -> SuppressedAddress:
    return SuppressedAddress(
        address=entry.address,
        since=_timestamp(entry.since_unix),
        until=_timestamp(entry.until_unix),
        reply_code=entry.reply_code,
        reply_text=entry.reply_text,
        message_id=entry.message_id,
    )


class AdminService(MailerAdminServicer):  # type: ignore[misc]  # generated, untyped base
    def __init__(self, admission: AdmissionControl) -> None:
        self._admission = admission

    async def ListSuppressed(self, message: ListSuppressedRequest) -> ListSuppressedReply:
        entries = self._admission.suppressed()[:MAX_LISTED]
        return ListSuppressedReply(addresses=[_entry(entry) for entry in entries])

    async def RemoveSuppressed(self, message: RemoveSuppressedRequest) -> RemoveSuppressedReply:
        try:
            validate_address("address", message.address)
        except InvalidRequest as exc:
            raise purerpc.RpcFailedError(
                purerpc.Status(purerpc.StatusCode.INVALID_ARGUMENT, exc.message)
            ) from None
        try:
            removed = await self._admission.unsuppress(message.address)
        except OutboxError as exc:
            log.error("cannot remove a suppression: %s", exc)
            raise purerpc.RpcFailedError(
                purerpc.Status(purerpc.StatusCode.UNAVAILABLE, "cannot change the list right now")
            ) from None
        if removed:
            log.info("removed %s from the suppression list", mask(message.address))
        return RemoveSuppressedReply(removed=removed)
