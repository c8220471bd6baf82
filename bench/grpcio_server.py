"""The ingress baseline: the Mailer API on a grpcio asyncio server, doing our handler's work.

The ingress section compares our server's CPU per call with this one's, so the work per call is
kept the same and only the gRPC stack differs: validate and build the message with our
``MailComposer``, put it into a bounded queue without waiting (``asyncio.Queue``, drained by a
consumer that drops it, as our sender would take it), log as our handler does, and answer. Like
ours, it refuses a call at once when the queue is full, before building anything, and logs that
at most once a second. The same 4 KiB request limit as ours.

Prints "listening on 127.0.0.1:PORT" (as our service logs it) and runs until SIGTERM or SIGINT.
Configured from the same variables as the service: ``MAILER_FROM``, ``MAILER_SERVICENAME``,
``MAILER_QUEUE_SIZE``; ``BENCH_DRAIN=0`` leaves the queue undrained, so that it stays full.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime

import grpc
import grpc.aio

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.errors import MailerError
from trio_mailer.core.message import MailComposer, OutgoingMail
from trio_mailer.core.rendering import MailKind, MailTemplates, RenderError
from trio_mailer.grpc.listener import MAX_MESSAGE_BYTES
from trio_mailer.logs import configure_logging
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

log = logging.getLogger("trio_mailer.grpc.mailer_service")  # the same logger name as our handler's


class Handlers:
    def __init__(self, composer: MailComposer, queue: asyncio.Queue[OutgoingMail]) -> None:
        self._composer = composer
        self._queue = queue
        self._refused = 0
        self._last_full_log = -1e9

    async def send_pass(self, request: MsgRequest, context: grpc.aio.ServicerContext) -> MsgReply:
        return await self._submit(MailKind.PASSWORD, request, context)

    async def send_retrieve(
        self, request: MsgRequest, context: grpc.aio.ServicerContext
    ) -> MsgReply:
        return await self._submit(MailKind.RETRIEVE, request, context)

    def _queue_full(self, kind: MailKind) -> MsgReply:
        self._refused += 1
        now = time.monotonic()
        if now - self._last_full_log >= 1.0:
            log.warning("refusing %s mail: queue full (%d so far)", kind.value, self._refused)
            self._last_full_log = now
        return MsgReply(sent=False, reason="queue full")

    async def _submit(
        self, kind: MailKind, request: MsgRequest, context: grpc.aio.ServicerContext
    ) -> MsgReply:
        if self._queue.full():
            return self._queue_full(kind)
        try:
            mail = self._composer.compose(kind, request.to, request.code, datetime.now(UTC))
        except MailerError as exc:
            await context.abort(grpc.StatusCode(exc.grpc_status.value), exc.message)
            raise  # abort raises; this line is for the type checker
        except RenderError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: cannot be rendered")
            raise
        try:
            self._queue.put_nowait(mail)
        except asyncio.QueueFull:
            return self._queue_full(kind)
        log.debug("accepted %s mail %s", kind.value, mail.message_id)
        return MsgReply(sent=True, message_id=mail.message_id)


async def _drain(queue: asyncio.Queue[OutgoingMail]) -> None:
    while True:
        await queue.get()


async def serve() -> None:
    composer = MailComposer(
        templates=MailTemplates.load(shipped_templates_dir()),
        from_address=os.environ.get("MAILER_FROM", "noreply@example.com"),
        service_name=os.environ.get("MAILER_SERVICENAME", "trio-mailer"),
    )
    queue: asyncio.Queue[OutgoingMail] = asyncio.Queue(
        int(os.environ.get("MAILER_QUEUE_SIZE", "10"))
    )
    handlers = Handlers(composer, queue)
    method = {
        "SendPass": handlers.send_pass,
        "SendRetrieve": handlers.send_retrieve,
    }
    generic = grpc.method_handlers_generic_handler(
        "trio_mailer.v1.Mailer",
        {
            name: grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=MsgRequest.FromString,
                response_serializer=MsgReply.SerializeToString,
            )
            for name, fn in method.items()
        },
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    drainer = asyncio.create_task(_drain(queue)) if os.environ.get("BENCH_DRAIN") != "0" else None
    await server.start()
    log.info("listening on 127.0.0.1:%d", port)
    await stop.wait()
    await server.stop(grace=1.0)
    if drainer is not None:
        drainer.cancel()


def main() -> int:
    configure_logging()
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
