"""The composition root: build the parts from the config, run them in one nursery, drain.

``MailerApp.run`` opens the nursery that holds the sender pool (one task per SMTP session,
sharing the queue), the gRPC server (the Mailer, health checking, reflection), the task that
keeps the health status in step with the senders, and the metrics endpoint when configured.
It owns the shutdown sequence:

1. ``request_shutdown()`` (SIGINT/SIGTERM in the CLI): health turns NOT_SERVING, then the gRPC
   server drains as grpc-go's ``GracefulStop`` does (``GrpcServer.drain``): the listening
   socket closes, each connection gets GOAWAY and a PING, then GOAWAY with its last stream id;
   the calls in flight are served to the end (a mail they send is accepted as usual), streaming
   responses end with UNAVAILABLE "server is shutting down". Clients move to another replica.
2. Then the handlers would answer UNAVAILABLE and the queue is closed: nothing new is accepted.
   The senders deliver what is queued or waiting for a retry, then say QUIT; all of this
   within ``shutdown_grace_s`` from the request.
3. Past the grace period (or at a second ``request_shutdown(force=True)``) the senders are
   cancelled; a blocked socket call is unblocked from the Trio side. Every mail not delivered is
   logged by Message-ID at ERROR.
4. ``run`` returns the exit status: 0 when everything accepted was handled, 1 when mail was
   left behind.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import attrs
import purerpc
import trio

from trio_mailer.auth_events import AuthFailures
from trio_mailer.core.caller_auth import BAD_CLIENT_CERTIFICATE, is_loopback
from trio_mailer.core.config import Config, TlsMode
from trio_mailer.core.errors import InvalidRequest, MailNotFound, OutboxError, ShuttingDown
from trio_mailer.core.health_decision import SenderStatistics, is_serving
from trio_mailer.core.load_shedding import RefusalPacer
from trio_mailer.core.mail_lifecycle import MailRecord, MailState
from trio_mailer.core.message import MailComposer
from trio_mailer.core.rendering import MailTemplates, TemplateError
from trio_mailer.core.retry_policy import ReconnectBackoff, RetryPolicy
from trio_mailer.delivery.mail_queue import Delivery, MailQueue
from trio_mailer.delivery.relays import RelayChain, name_of
from trio_mailer.delivery.sender import FinishedMail, Sender, no_relay_chain
from trio_mailer.delivery.session_keeper import Connector, SmtpSession
from trio_mailer.delivery.smtp_session import (
    ConnectFailed,
    RelaySettings,
    ThreadedSmtpSession,
    make_relay_ssl_context,
)
from trio_mailer.grpc.admin_service import AdminService
from trio_mailer.grpc.health_service import FILE_DESCRIPTOR as HEALTH_FILE_DESCRIPTOR
from trio_mailer.grpc.health_service import SERVICE_NAME as HEALTH_SERVICE_NAME
from trio_mailer.grpc.health_service import HealthState, ServingStatus, health_service
from trio_mailer.grpc.listener import (
    PEER_IDENTITY,
    GrpcServer,
    Limits,
    bound_port,
    make_server_ssl_context,
    open_grpc_listener,
    serve_grpc,
)
from trio_mailer.grpc.mailer_service import ANONYMOUS_CALLER, MailerService
from trio_mailer.grpc.reflection_service import reflection_services
from trio_mailer.logs import printable
from trio_mailer.metrics import MAILER_SERVICE, Metrics, serve_metrics
from trio_mailer.service.accept_mail import AcceptMail
from trio_mailer.service.admission import AdmissionControl
from trio_mailer.service.mail_status import MailStatusLookup
from trio_mailer.store.outbox import Outbox, open_outbox
from trio_mailer.store.status_board import StatusBoard
from trio_mailer.v1 import mailer_pb2

log = logging.getLogger(__name__)

# Orchestrators and tools expect these open (MAILER_AUTH_ALL_SERVICES=1 closes them too).
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

PRUNE_INTERVAL_S = 600.0  # how often finished mails past the retention are dropped
HEALTH_POLL_S = 0.25  # how soon a Watch sees the relay go down or come back
# Scheduling rounds between health turning NOT_SERVING and the first GOAWAY of a drain: enough for
# each health Watch to hand its update to its connection, which sends it before the GOAWAY.
HEALTH_SETTLE_STEPS = 5
SUPPRESSION_FLUSH_S = 2.0  # how long shutdown may spend storing the last suppressions

EXIT_OK = 0
EXIT_MAIL_LEFT_BEHIND = 1


def relay_chain(config: Config, ssl_context: ssl.SSLContext | None) -> RelayChain:
    """Real smtplib sessions to the configured relays, tried in order."""
    first = RelaySettings.from_config(config)

    async def connect_one(settings: RelaySettings) -> SmtpSession:
        return await ThreadedSmtpSession.connect(settings, ssl_context)

    return RelayChain(
        [attrs.evolve(first, host=host, port=port) for host, port in config.relay_list],
        connect_one,
        ReconnectBackoff(base_s=config.retry_base_s, cap_s=config.retry_max_s),
    )


def relay_connector(config: Config, ssl_context: ssl.SSLContext | None) -> Connector:
    """Connect real smtplib sessions to the configured relays."""
    return relay_chain(config, ssl_context).connect


@attrs.define
class MailerApp:
    config: Config
    templates: MailTemplates
    connect: Connector
    grpc_ssl_context: ssl.SSLContext | None = None
    on_finished: Callable[[FinishedMail], None] | None = None
    outbox: Outbox | None = None  # given: used instead of the one the config names
    relays: RelayChain | None = None  # the relays behind ``connect``, told of each 421
    wall_clock: Callable[[], float] = time.time  # unix seconds: what the outbox stores
    queue: MailQueue = attrs.field(init=False)
    # The pool, built by ``run`` once the outbox is open (``build_senders``); empty before.
    senders: list[Sender] = attrs.field(init=False, factory=list)
    metrics: Metrics = attrs.field(init=False)
    auth_failures: AuthFailures = attrs.field(init=False)
    health: HealthState = attrs.field(init=False)
    board: StatusBoard = attrs.field(init=False)
    metrics_port: int | None = attrs.field(init=False, default=None)  # once serving
    # The use cases and their handlers, built by ``run`` once the outbox is open
    # (``build_use_cases``).
    service: MailerService = attrs.field(init=False)
    accept: AcceptMail = attrs.field(init=False)
    status: MailStatusLookup = attrs.field(init=False)
    admission: AdmissionControl = attrs.field(init=False)
    _finished_callback: Callable[[FinishedMail], None] | None = attrs.field(
        init=False, default=None
    )
    relay_verified: bool = attrs.field(init=False, default=False)  # a session succeeded
    # Every finished mail by its final state ("delivered", "failed", "expired"), as its log
    # line, its status and trio_mailer_mails_total name it: what the stop summary says.
    finished: dict[str, int] = attrs.field(
        init=False, factory=lambda: dict.fromkeys(("delivered", "failed", "expired"), 0)
    )
    relay_checked: trio.Event = attrs.field(init=False, factory=trio.Event)  # first check done
    _shutdown: trio.Event = attrs.field(init=False, factory=trio.Event)
    _force: trio.Event = attrs.field(init=False, factory=trio.Event)
    _stopping: bool = attrs.field(init=False, default=False)  # health NOT_SERVING from here

    def __attrs_post_init__(self) -> None:
        config = self.config
        self.queue = MailQueue.open(config.queue_size, config.retry_capacity)
        if self.on_finished is not None:
            self.watch_finished(self.on_finished)
        self.metrics = Metrics(
            ttl_s=config.message_ttl_s,
            relays=[name_of(host, port) for host, port in config.relay_list],
        )
        self.metrics.track(
            queue_depth=lambda: self.queue.statistics().queued,
            in_flight=lambda: self.queue.statistics().in_flight,
            retry_waiting=lambda: self.queue.statistics().retry_waiting,
            sessions_up=lambda: self.statistics().sessions_up,
        )
        self.auth_failures = AuthFailures(self.metrics, time.monotonic)
        self.board = StatusBoard()
        self.metrics.track_outbox(self.board.unfinished)
        self.health = HealthState([MAILER_SERVICE])
        self.metrics.track_health(lambda: self.health.get("") is ServingStatus.SERVING)

    def build_use_cases(self, outbox: Outbox) -> None:
        """The use cases and their gRPC handlers, on ``outbox`` (built by ``run`` once it is
        open; every part given at construction)."""
        config = self.config
        self.admission = AdmissionControl(
            outbox,
            window_s=config.idempotency_window_s,
            recipient_limit=config.recipient_limit,
            caller_limit=config.caller_limit,
            suppress_s=config.suppress_s,
            on_suppressed=self.metrics.suppressed_addresses.set,
            wall_clock=self.wall_clock,
        )
        composer = MailComposer(
            templates=self.templates,
            from_address=config.mail_from,
            service_name=config.service_name,
        )
        self.accept = AcceptMail(
            composer,
            self.queue,
            outbox,
            self.board,
            self.admission,
            self.metrics,
            RefusalPacer(config.refusals_per_s),
            config.refusal_wait_s,
            now=lambda: datetime.now(UTC),
            wall_clock=self.wall_clock,
        )
        self.status = MailStatusLookup(self.board, outbox, self.admission)
        self.service = MailerService(self.accept, self.status, self.caller_identity, self.metrics)

    def build_senders(self, outbox: Outbox) -> list[Sender]:
        """The pool: one sender task per SMTP session, all sharing the queue, the policies and
        ``outbox``; each is given every collaborator here, at construction."""
        config = self.config
        policy = RetryPolicy(
            base_s=config.retry_base_s,
            max_s=config.retry_max_s,
            max_attempts=config.max_attempts,
            ttl_s=config.message_ttl_s,
        )
        backoff = ReconnectBackoff(base_s=config.retry_base_s, cap_s=config.retry_max_s)
        return [
            Sender(
                connect=self.connect,
                outbox=outbox,
                board=self.board,
                metrics=self.metrics,
                on_finished=self._mail_finished,
                policy=policy,
                backoff=backoff,
                wall_clock=self.wall_clock,
                noop_idle_s=config.noop_idle_s,
                max_messages=config.session_max_messages,
                max_age_s=config.session_max_age_s,
                start_after=self.relay_checked,
                on_relay_closing=no_relay_chain if self.relays is None else self.relays.trouble,
            )
            for _ in range(config.smtp_sessions)
        ]

    @classmethod
    def from_config(cls, config: Config) -> MailerApp:
        """Load the templates and the relay's TLS context, and wire the real SMTP sessions.

        Raises:
            TemplateError: a template is missing or broken.
            TlsFileError: a certificate, key or CA file cannot be loaded (named).
        """
        templates = MailTemplates.load(config.templates_dir, config.default_locale)
        ssl_context = None
        if config.smtp_tls is TlsMode.NONE:
            log.warning(
                "MAILER_SMTP_TLS=none: mail and SMTP credentials travel in plaintext to %s:%d",
                config.relay_host,
                config.relay_port,
            )
        else:
            with _naming("MAILER_SMTP_CA_FILE", config.smtp_ca_file):
                ssl_context = make_relay_ssl_context(config.smtp_ca_file)
        grpc_ssl_context = None
        if config.tls_cert is not None and config.tls_key is not None:
            if config.tls_client_ca is not None:
                with _naming("MAILER_TLS_CLIENT_CA", config.tls_client_ca):
                    ssl.create_default_context().load_verify_locations(
                        cafile=str(config.tls_client_ca)
                    )
            with _naming("MAILER_TLS_CERT", config.tls_cert):
                ssl.create_default_context().load_verify_locations(cafile=str(config.tls_cert))
            with _naming(
                "MAILER_TLS_KEY", config.tls_key, f"or it does not match {config.tls_cert}"
            ):
                grpc_ssl_context = make_server_ssl_context(
                    config.tls_cert, config.tls_key, config.tls_client_ca
                )
        if config.allow_unauthenticated and not is_loopback(config.serve_host):
            log.warning(
                "MAILER_ALLOW_UNAUTHENTICATED=1: anyone who can reach %s:%d can send mail "
                "through this service",
                config.serve_host,
                config.serve_port,
            )
        chain = relay_chain(config, ssl_context)
        return cls(
            config,
            templates,
            chain.connect,
            grpc_ssl_context,
            relays=chain,
        )

    def reload_templates(self) -> bool:
        """Load and check the templates again (SIGHUP) and use them if they are all good.

        A broken set is refused: every problem is logged at ERROR and the running templates
        stay. Mails already accepted are unaffected either way (the outbox holds built messages).

        Returns:
            True when the new templates are in use.
        """
        try:
            templates = MailTemplates.load(self.config.templates_dir, self.config.default_locale)
        except TemplateError as exc:
            log.error("templates not reloaded, keeping the running ones: %s", exc)
            return False
        except OSError as exc:
            log.error("templates not reloaded, keeping the running ones: %s", exc)
            return False
        self.templates = templates
        if hasattr(self, "accept"):  # running: from the next request on
            self.accept.replace_templates(templates)
        log.info(
            "templates reloaded from %s: %s",
            self.config.templates_dir,
            ", ".join(f"{n} ({'/'.join(templates.locales(n))})" for n in templates.names()),
        )
        return True

    def authorize(
        self, service: str, method: str, metadata: Sequence[tuple[str, str]], peer: str = "?"
    ) -> bool:
        """Bearer-token check for a call from ``peer`` (when tokens are configured); health
        checks and reflection stay open unless ``MAILER_AUTH_ALL_SERVICES=1``. A refusal is
        counted and logged (``auth_events``)."""
        tokens = self.config.auth_tokens
        if tokens is None:
            return True
        if service in OPEN_SERVICES and not self.config.auth_all_services:
            return True
        reason = tokens.refusal(metadata)
        if reason is None:
            return True
        self.auth_failures.failed(reason, peer)
        self.metrics.unauthenticated(method)
        return False

    def caller_identity(self, metadata: Sequence[tuple[str, str]]) -> str:
        """Who is calling, for idempotency keys and the caller limit: the bearer token's
        identity (a digest prefix, never the token) when tokens are configured, else the client
        certificate's subject, else one shared "anonymous" space."""
        tokens = self.config.auth_tokens
        if tokens is not None:
            identity = tokens.identify(metadata)
            if identity is not None:
                return identity
        return PEER_IDENTITY.get() or ANONYMOUS_CALLER

    def grpc_services(self) -> list[purerpc.Service]:
        """The Mailer, its admin, health checking, and server reflection (v1 and v1alpha)."""
        mailer = self.service.service
        admin = AdminService(self.admission).service
        return [
            mailer,
            admin,
            health_service(self.health),
            *reflection_services(
                [mailer.name, admin.name, HEALTH_SERVICE_NAME],
                [mailer_pb2.DESCRIPTOR, HEALTH_FILE_DESCRIPTOR],
            ),
        ]

    def _update_health(self) -> None:
        self.relay_verified = self.relay_verified or any(s.ever_connected for s in self.senders)
        serving = is_serving(
            [sender.statistics() for sender in self.senders],
            draining=self._stopping,
            now_s=trio.current_time(),
            down_after_s=self.config.health_down_after_s,
            relay_verified=self.relay_verified,
            store_reachable=self.accept.outbox.reachable(),
        )
        self.health.set(ServingStatus.SERVING if serving else ServingStatus.NOT_SERVING)

    async def _check_relay(self) -> None:
        """One session at start-up (EHLO, TLS, AUTH, QUIT) before health says SERVING.

        A failure is logged at ERROR with the reason; the check is repeated with the reconnect
        backoff until a session (this one or a sender's) succeeds. Mail is accepted and stored
        meanwhile, and waits.
        """
        backoff = ReconnectBackoff(base_s=self.config.retry_base_s, cap_s=self.config.retry_max_s)
        failures = 0
        last_reason = None
        while not self.relay_verified:
            try:
                session = await self.connect()
            except ConnectFailed as exc:
                self.relay_checked.set()
                failures += 1
                if exc.reason != last_reason:
                    log.error(
                        "relay check failed: %s; health stays NOT_SERVING until a session "
                        "succeeds (mail is accepted and stored meanwhile)",
                        printable(exc.reason),
                    )
                    last_reason = exc.reason
                await trio.sleep(
                    backoff.delay_s(failures, random.random(), config_error=exc.config_error)
                )
                continue
            try:
                await session.close(quit=True)
            finally:
                self.relay_checked.set()
            self.relay_verified = True
            log.info("relay check passed: %s", getattr(session, "relay", "") or "the relay")
        self._update_health()

    async def _watch_health(self) -> None:
        """Keep the health status in step with the senders (checked every HEALTH_POLL_S)."""
        while True:
            self._update_health()
            await trio.sleep(HEALTH_POLL_S)

    def watch_finished(self, callback: Callable[[FinishedMail], None]) -> None:
        """Have ``callback`` told of every mail's outcome (delivered or failed)."""
        self._finished_callback = callback

    def _mail_finished(self, finished: FinishedMail) -> None:
        """Every mail's outcome: the senders' pace, the suppression list, then the watcher."""
        self.admission.pace.finished(trio.current_time())
        self.finished[finished.outcome] += 1
        if finished.outcome == "failed":
            delivery = finished.delivery
            self.admission.mail_failed(
                delivery.mail.envelope_to, delivery.last_reply, delivery.message_id
            )
        if self._finished_callback is not None:
            self._finished_callback(finished)

    # ---- a mail's status for the dev inbox (trio_mailer/dev/inbox.py), as GetStatus has it ----

    async def mail_status(self, message_id: str) -> MailRecord | None:
        """Where ``message_id`` stands: the live board, else the outbox; None when this service
        does not know it (never accepted, or past the retention). Only while ``run`` runs.

        Raises:
            OutboxError: the outbox cannot be read.
        """
        try:
            return await self.status.find(message_id)  # the use case GetStatus calls
        except (MailNotFound, InvalidRequest):
            return None

    async def wait_for_status_change(self, message_id: str) -> None:
        """Return at the next change of ``message_id``'s status in this process."""
        await self.board.wait_for_change(message_id)

    def statistics(self) -> SenderStatistics:
        """The pool's counters, summed."""
        stats = [sender.statistics() for sender in self.senders]
        in_flight = [s.in_flight for s in stats if s.in_flight]
        return SenderStatistics(
            delivered=sum(s.delivered for s in stats),
            failed=sum(s.failed for s in stats),
            retries=sum(s.retries for s in stats),
            connects=sum(s.connects for s in stats),
            sessions_up=sum(s.sessions_up for s in stats),
            in_flight=tuple(m for s in in_flight for m in s),
        )

    def _held(self) -> int:
        stats = self.queue.statistics()
        return stats.queued + stats.retry_waiting + stats.in_flight

    def request_shutdown(self, *, force: bool = False) -> None:
        """Begin the drain; with ``force``, give up on the grace period too."""
        self._shutdown.set()
        if force:
            self._force.set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> int:
        """Serve until ``request_shutdown``, then drain; returns the exit status.

        Reports the bound gRPC port through ``task_status.started(port)``.

        Raises:
            BindError: the gRPC port cannot be bound.
        """
        path = self.config.outbox_path
        url = self.config.outbox_url
        if self.outbox is None and path is None and url is None:
            log.warning(
                "MAILER_OUTBOX=memory: accepted mail lives only in memory and is lost if the "
                "process is killed"
            )
        async with open_outbox(
            url or path,
            use=self.outbox,
            lease_s=self.config.lease_s,
            pool_size=self.config.db_pool_size,
            timeout_s=self.config.db_timeout_s,
        ) as outbox:
            log.info("outbox: %s", outbox.describe())
            return await self._run_with(outbox, task_status)

    async def _claim(self, outbox: Outbox) -> None:
        """Queue the mail no running process holds, as room in the queue allows: at start-up
        what a previous run left unfinished; from a shared store, later, a dead replica's (once
        its lease lapsed) and a stopped one's (at once). Runs until cancelled."""
        while True:
            try:
                await self._recover(outbox)
            except OutboxError as exc:
                log.error("cannot claim mail: %s", exc)
            await outbox.wait_for_work()

    async def _recover(self, outbox: Outbox) -> None:
        """Queue what ``claim`` hands this process until it has nothing more (attempts and time
        to live carried over), each mail waiting for room like any other."""
        resumed = 0
        while page := await outbox.claim():
            resumed += len(page)
            try:
                await self._resume(page)
            except ShuttingDown:
                break  # the rest stays in the outbox for the next start
        if resumed:
            log.info("claimed %d unfinished mail(s) that no running process held", resumed)

    async def _resume(self, page: list[MailRecord]) -> None:
        # A page at a time, each mail waiting for room: memory stays within the queue's bound.
        for record in page:
            # Its age so far, in this process's clock, so the time to live carries over.
            age_s = max(0.0, self.wall_clock() - record.accepted_at_unix)
            self.board.track(record)
            await self.queue.put_recovered(
                Delivery(
                    record.to_mail(),
                    accepted_at_s=trio.current_time() - age_s,
                    attempts=record.attempts,
                    last_reply=record.last_reply_text,
                    last_reply_code=record.last_reply_code,
                    # Stopped mid-attempt: the relay may already have it.
                    possible_duplicate=record.possible_duplicate
                    or record.state is MailState.SENDING,
                    traceparent=record.traceparent,  # traced under the accepting call
                )
            )

    async def _prune(self, outbox: Outbox) -> None:
        """Drop finished mails older than the retention period, now and then."""
        retention = self.config.status_retention_s
        while True:
            try:
                pruned = await outbox.prune(self.wall_clock() - retention)
            except OutboxError as exc:
                log.error("cannot prune the outbox: %s", exc)
            else:
                if pruned:
                    log.info("pruned %d finished mail(s) older than %gs", pruned, retention)
            await trio.sleep(min(PRUNE_INTERVAL_S, retention))

    async def _run_with(self, outbox: Outbox, task_status: trio.TaskStatus[int]) -> int:
        config = self.config
        self.build_use_cases(outbox)
        await self.admission.load()  # the limits' counts and the suppression list, before serving
        self.senders = self.build_senders(outbox)
        senders_done = trio.Event()
        senders_scope = trio.CancelScope()

        async def run_senders() -> None:
            with senders_scope:
                async with trio.open_nursery() as pool:
                    for sender in self.senders:
                        pool.start_soon(sender.run, self.queue)
            senders_done.set()

        # Bound before anything starts, so a taken port fails plainly and early.
        listener = await open_grpc_listener(
            config.serve_host, config.serve_port, self.grpc_ssl_context
        )
        port = bound_port(listener)
        async with trio.open_nursery() as nursery:
            grpc_server: GrpcServer = await nursery.start(
                partial(
                    serve_grpc,
                    authorizer=self.authorize,
                    max_connections=config.max_connections,
                    limits=Limits(idle_timeout_s=config.grpc_idle_timeout_s),
                    observer=self.metrics,
                    on_bad_certificate=partial(self.auth_failures.failed, BAD_CLIENT_CERTIFICATE),
                ),
                listener,
                self.grpc_services(),
            )
            nursery.start_soon(run_senders)
            nursery.start_soon(self._watch_health)
            nursery.start_soon(self._check_relay)
            nursery.start_soon(self._prune, outbox)
            await nursery.start(self.admission.run)
            recovery_scope = trio.CancelScope()

            async def recover() -> None:
                with recovery_scope:
                    await nursery.start(outbox.run, self.board.changed_elsewhere)
                    await self._claim(outbox)

            nursery.start_soon(recover)
            if config.metrics_port is not None:
                self.metrics_port = await nursery.start(
                    serve_metrics, self.metrics, config.metrics_host, config.metrics_port
                )
                log.info(
                    "metrics on http://%s:%d/metrics",
                    _url_host(config.metrics_host),
                    self.metrics_port,
                )
            log.info("listening on %s:%d", config.serve_host, port)
            task_status.started(port)

            await self._shutdown.wait()
            log.info(
                "shutting down: draining %d queued mail(s), grace %gs",
                self._held(),
                config.shutdown_grace_s,
            )
            self._stopping = True
            self._update_health()  # NOT_SERVING from the first moment of the drain
            for _ in range(HEALTH_SETTLE_STEPS):  # the health watchers' updates go out first
                await trio.lowlevel.checkpoint()
            grace_ends = trio.current_time() + config.shutdown_grace_s
            await self._until_forced(grace_ends, grpc_server.drain(config.shutdown_grace_s))
            self.accept.draining = True
            recovery_scope.cancel()  # what is not queued yet stays in the outbox for next time
            self.queue.close()
            await self._until_forced(grace_ends, senders_done.wait())
            senders_scope.cancel()
            await senders_done.wait()
            with trio.move_on_after(SUPPRESSION_FLUSH_S):
                await self.admission.flush()  # the last failures' suppressions, if any
            nursery.cancel_scope.cancel()

        left_behind = self._left_behind()
        for mail in left_behind:
            log.error(
                "not delivered at shutdown: %s (attempts=%d, last reply: %s)%s",
                mail.message_id,
                mail.attempts,
                mail.last_reply or "none",
                "; kept in the outbox for the next start"
                if self.config.outbox_path is not None or self.config.outbox_url is not None
                else "; lost (in-memory outbox)",
                extra={"message_id": mail.message_id},
            )
        stored = outbox.statistics()
        refused = self.accept.refused_draining
        log.info(
            "stopped: %d delivered, %d failed, %d expired, %d left behind; outbox: %d changes in "
            "%d commits (largest %d)%s%s",
            self.finished["delivered"],
            self.finished["failed"],
            self.finished["expired"],
            len(left_behind),
            stored.rows_committed,
            stored.commits,
            stored.largest_batch,
            f"; {stored.round_trips} database round trips" if stored.round_trips else "",
            f"; {refused} send call(s) refused while shutting down" if refused else "",
        )
        return EXIT_MAIL_LEFT_BEHIND if left_behind else EXIT_OK

    async def _until_forced(self, deadline: float, step: Awaitable[object]) -> None:
        """Await ``step`` until ``deadline`` or a forced shutdown, whichever comes first."""
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as waiters:

                async def on_force() -> None:
                    await self._force.wait()
                    waiters.cancel_scope.cancel()

                waiters.start_soon(on_force)
                await step
                waiters.cancel_scope.cancel()

    def _left_behind(self) -> list[Delivery]:
        in_flight = [
            self._as_on_the_board(s.in_flight) for s in self.senders if s.in_flight is not None
        ]
        return in_flight + self.queue.take_leftovers()

    def _as_on_the_board(self, delivery: Delivery) -> Delivery:
        """An in-flight mail as GetStatus has it: an attempt stored as started counts (the
        sender's copy predates it), with its flag of a possible duplicate."""
        record = self.board.get(delivery.message_id)
        if record is None or record.attempts <= delivery.attempts:
            return delivery
        return delivery.replace(
            attempts=record.attempts,
            possible_duplicate=delivery.possible_duplicate or record.possible_duplicate,
        )


class TlsFileError(Exception):
    """A PEM file from the configuration cannot be loaded; the message names the file."""


@contextlib.contextmanager
def _naming(variable: str, path: Path | None, hint: str = "") -> Iterator[None]:
    try:
        yield
    except (ssl.SSLError, OSError) as exc:
        detail = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise TlsFileError(
            f"{variable}={path}: cannot load it as PEM ({detail}){' ' + hint if hint else ''}"
        ) from exc


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
