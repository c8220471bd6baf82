"""``trio-mailer dev``: the capture relay, the web inbox and the service in one nursery.

Start-up, in order: the inbox reads its ``.eml`` directory; the relay binds a free port; the
service's configuration is built (``MAILER_*``, the relay's variables, the options and the dev
defaults, ``environment.dev_env``); every fixed port (the inbox's, gRPC's, the metrics') is
tried before anything serves, so all the taken ones are reported at once, each with the option
that moves it; the inbox serves; the service runs until signalled, and the inbox follows each
mail's status on its side (``inbox.track_statuses``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping

import trio

from trio_mailer.app import MailerApp
from trio_mailer.core.errors import exception_leaves
from trio_mailer.dev import environment as dev
from trio_mailer.dev.inbox import Inbox, track_statuses
from trio_mailer.dev.inbox_app import InboxApp
from trio_mailer.grpc.listener import BindError
from trio_mailer.http_server import serve_http

log = logging.getLogger("trio_mailer")

EXIT_START_FAILED = 2  # the CLI's status for a start-up failure
LOOPBACK = "127.0.0.1"


async def port_problem(option: str, host: str, port: int | None) -> str | None:
    """Why ``host:port`` cannot be listened on, naming ``option``; None when it can (or the port
    is 0, any free one, or None, not used)."""
    if not port:
        return None
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        return (
            f"cannot listen on {host}:{port}: {exc.strerror or exc} "
            f"(choose another with {option}, or {option} 0 for any free port)"
        )
    for listener in listeners:
        await listener.aclose()
    return None


def _fail(*problems: str) -> int:
    for problem in problems:
        print(f"trio-mailer: {problem}", file=sys.stderr)
    return EXIT_START_FAILED


async def run_dev(
    options: dev.DevOptions,
    tls: dev.DevTls,
    build_app: Callable[[Mapping[str, str]], MailerApp | None],
    run_app: Callable[[MailerApp], Awaitable[int]],
) -> int:
    """Run ``trio-mailer dev`` until ``run_app`` returns; its exit status.

    Args:
        build_app: the service from its variables (None after printing what is wrong).
        run_app: runs the service until it is told to stop (the CLI's signal handling).
    """
    inbox = Inbox(options.outbox)
    if options.inbox_port is not None:
        loaded = await inbox.load()
        if loaded:
            log.info("dev: %d mail(s) already in %s", loaded, options.outbox)
    relay = dev.capture_relay(
        tls,
        options.outbox,
        on_mail=None if options.inbox_port is None else inbox.add,
        on_chaos=inbox.chaos_changed,
    )
    async with trio.open_nursery() as nursery:
        relay_port = await nursery.start(relay.serve, LOOPBACK, 0)
        app = build_app(dev.dev_env(os.environ, relay_port, tls, options))
        if app is None:
            nursery.cancel_scope.cancel()
            return EXIT_START_FAILED
        config = app.config
        problems = []
        for option, host, port in (
            ("--inbox-port", LOOPBACK, options.inbox_port),
            ("--port", config.serve_host, config.serve_port),
            ("--metrics-port", config.metrics_host, config.metrics_port),
        ):
            problem = await port_problem(option, host, port)
            if problem is not None:
                problems.append(problem)
        if problems:
            nursery.cancel_scope.cancel()
            return _fail(*problems)
        if options.inbox_port is not None:
            web = InboxApp(inbox, relay)
            try:
                web.port = await nursery.start(serve_http, web, LOOPBACK, options.inbox_port)
            except OSError as exc:  # taken since the check
                nursery.cancel_scope.cancel()
                return _fail(
                    f"cannot serve the dev inbox on {LOOPBACK}:{options.inbox_port}: {exc} "
                    "(choose another with --inbox-port)"
                )
            log.info("dev: web inbox on http://%s:%d/", LOOPBACK, web.port)
            nursery.start_soon(_follow_statuses, inbox, app)
        log.info(
            "dev: capture relay on %s:%d (implicit TLS, throwaway CA, AUTH); "
            "mails are written to %s",
            LOOPBACK,
            relay_port,
            options.outbox,
        )
        log.info("dev: %s", dev.rate_limits_line(config))
        log.info(
            "dev: try  trio-mailer send --server %s:%d --to user@example.com --code 123456",
            config.serve_host,
            config.serve_port,
        )
        status = EXIT_START_FAILED
        bind_errors: list[BindError] = []
        try:
            status = await run_app(app)
        except* BindError as group:  # a port taken since the check
            bind_errors = exception_leaves(group)
        nursery.cancel_scope.cancel()
    if bind_errors:
        return _fail(
            *(f"{exc} (--port and --metrics-port move the dev ports)" for exc in bind_errors)
        )
    return status


async def _follow_statuses(inbox: Inbox, app: MailerApp) -> None:
    # The statuses come from the outbox, which the app opens as it starts; the relay check
    # comes just after that.
    await app.relay_checked.wait()
    await track_statuses(inbox, app)
