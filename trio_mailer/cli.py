"""The ``trio-mailer`` command: ``serve``, ``dev`` and ``send``.

The only place that exits the process: ``main(argv)`` returns the exit status.
0 success; 1 mail left behind at shutdown (serve, dev) or a refused/failed call (send);
2 bad configuration or start-up failure (every problem listed, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import trio

from . import dev
from .app import MailerApp
from .client import SendFailed, client_ssl_context, send
from .config import ConfigError, load_config, parse_host_port
from .grpc_server import BindError
from .logs import configure_logging
from .mail_status import OutboxError
from .rendering import MailKind, TemplateError

log = logging.getLogger("trio_mailer")

EXIT_START_FAILED = 2


async def run_until_signalled(app: MailerApp) -> int:
    """Run ``app``; the first SIGINT/SIGTERM starts the drain, a second one cuts it short."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                received = 0
                async for signum in signals:
                    received += 1
                    log.info(
                        "received %s%s",
                        signal.Signals(signum).name,
                        " again: skipping the rest of the grace period" if received > 1 else "",
                    )
                    app.request_shutdown(force=received > 1)

            nursery.start_soon(watch_signals)
            status = await app.run()
            nursery.cancel_scope.cancel()
    return status


def run_trio(async_fn: Callable[..., Awaitable[int]], *args: object) -> int:
    """``trio.run`` a service; a port that cannot be bound is a start-up failure."""
    status = EXIT_START_FAILED
    try:
        status = trio.run(async_fn, *args)
    except* (BindError, OutboxError) as group:
        for exc in _leaves(group):
            print(f"trio-mailer: {exc}", file=sys.stderr)
    return status


def _leaves(group: BaseExceptionGroup[Exception]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def build_app(env: Mapping[str, str]) -> MailerApp | None:
    """Config, templates and TLS context from ``env``; prints every problem and returns None."""
    try:
        config = load_config(env)
        configure_logging(log_format=config.log_format)
        app = MailerApp.from_config(config)
    except (ConfigError, TemplateError) as exc:
        print(f"trio-mailer: {exc}", file=sys.stderr)
        return None
    except (ssl.SSLError, OSError) as exc:
        print(f"trio-mailer: cannot load TLS certificates or keys: {exc}", file=sys.stderr)
        return None
    log.info("starting trio-mailer: %s", config.describe())
    return app


def _serve(args: argparse.Namespace) -> int:
    configure_logging()
    app = build_app(dict(os.environ))
    if app is None:
        return EXIT_START_FAILED
    return run_trio(run_until_signalled, app)


def _dev(args: argparse.Namespace) -> int:
    configure_logging()
    with dev.throwaway_tls() as tls:
        return run_trio(_run_dev, tls, args.outbox.resolve())


async def _run_dev(tls: dev.DevTls, outbox: Path) -> int:
    relay = dev.capture_relay(tls, outbox)
    async with trio.open_nursery() as nursery:
        relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
        app = build_app(dev.relay_env(os.environ, relay_port, tls, outbox))
        if app is None:
            nursery.cancel_scope.cancel()
            return EXIT_START_FAILED
        log.info(
            "dev: capture relay on 127.0.0.1:%d (implicit TLS, throwaway CA, AUTH); "
            "mails are written to %s",
            relay_port,
            outbox,
        )
        log.info(
            "dev: try  trio-mailer send --server %s:%d --to user@example.com --code 123456",
            app.config.serve_host,
            app.config.serve_port,
        )
        status = await run_until_signalled(app)
        nursery.cancel_scope.cancel()
    return status


def _send(args: argparse.Namespace) -> int:
    try:
        host, port = parse_host_port(args.server, None)
    except ValueError as exc:
        print(f"trio-mailer send: --server: {exc}, got {args.server!r}", file=sys.stderr)
        return EXIT_START_FAILED
    kind = MailKind.PASSWORD if args.kind == "pass" else MailKind.RETRIEVE
    if (args.cert is None) != (args.key is None):
        print("trio-mailer send: --cert and --key go together", file=sys.stderr)
        return EXIT_START_FAILED
    ssl_context = None
    if args.ca or args.cert or args.tls:
        try:
            ssl_context = client_ssl_context(args.ca, args.cert, args.key)
        except (ssl.SSLError, OSError) as exc:
            print(f"trio-mailer send: cannot load TLS files: {exc}", file=sys.stderr)
            return EXIT_START_FAILED
    token = args.token or os.environ.get("MAILER_TOKEN") or None
    try:
        reply = trio.run(
            partial(send, token=token, ssl_context=ssl_context),
            host,
            port,
            kind,
            args.to,
            args.code,
        )
    except SendFailed as exc:
        print(f"error: {exc.status}: {exc.detail}", file=sys.stderr)
        return 1
    if reply.sent:
        print(f"sent=true message_id={reply.message_id}")
        return 0
    print(f"sent=false reason={reply.reason}")
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-mailer", description="Transactional e-mail over gRPC, on Trio."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service, configured from MAILER_* variables")
    serve.set_defaults(run=_serve)
    dev_cmd = commands.add_parser(
        "dev", help="run the service against an embedded capture relay (no configuration needed)"
    )
    dev_cmd.add_argument(
        "--outbox", type=Path, default=Path("outbox"), help="where captured mails go (./outbox)"
    )
    dev_cmd.set_defaults(run=_dev)
    send_cmd = commands.add_parser("send", help="ask a running service to send a mail")
    send_cmd.add_argument("--to", required=True, help="recipient address")
    send_cmd.add_argument("--code", required=True, help="the code the mail carries")
    send_cmd.add_argument("--kind", choices=["pass", "retrieve"], default="pass")
    send_cmd.add_argument(
        "--server", default="127.0.0.1:20100", help="the service's HOST:PORT (127.0.0.1:20100)"
    )
    send_cmd.add_argument(
        "--token", help="bearer token (default: $MAILER_TOKEN); prefer the variable: argv is public"
    )
    send_cmd.add_argument("--tls", action="store_true", help="use TLS (implied by --ca, --cert)")
    send_cmd.add_argument("--ca", type=Path, help="CA file to verify the service with")
    send_cmd.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    send_cmd.add_argument("--key", type=Path, help="client certificate's key (mTLS)")
    send_cmd.set_defaults(run=_send)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


def main_entry() -> None:
    sys.exit(main())
