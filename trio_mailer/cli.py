"""The ``trio-mailer`` command: ``serve``, ``dev``, ``send``, ``status``, ``health`` and
``render``.

The only place that exits the process: ``main(argv)`` returns the exit status.
0 success; 1 mail left behind at shutdown (serve, dev), a refused/failed call (send, status), or
a service that is not serving (health); 2 bad configuration or start-up failure (every problem
listed, no traceback).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from trio_mailer.app import MailerApp, TlsFileError
from trio_mailer.client import (
    CALL_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    SendFailed,
    Target,
    check_health,
    client_ssl_context,
    list_suppressed,
    remove_suppressed,
    send,
    send_template,
)
from trio_mailer.client import status as fetch_status
from trio_mailer.core.call_policy import new_idempotency_key, normalise_message_id
from trio_mailer.core.config import (
    SETTINGS,
    ConfigError,
    load_config,
    parse_host_port,
    shipped_templates_dir,
    unknown_variables,
)
from trio_mailer.core.errors import (
    InvalidRequest,
    MessageBuildError,
    OutboxError,
    exception_leaves,
)
from trio_mailer.core.message import MailComposer
from trio_mailer.core.rendering import (
    DEFAULT_LOCALE,
    SAMPLE_VALUE,
    MailKind,
    MailTemplates,
    RenderError,
    TemplateError,
    sample_variables,
)
from trio_mailer.dev import environment as dev
from trio_mailer.dev.dev_mode import run_dev
from trio_mailer.grpc.listener import BindError
from trio_mailer.logs import configure_logging
from trio_mailer.tracing import TracingError, describe_tracing, start_tracing
from trio_mailer.v1.mailer_pb2 import MailStatus

log = logging.getLogger("trio_mailer")

EXIT_START_FAILED = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


async def run_until_signalled(app: MailerApp) -> int:
    """Run ``app``; the first SIGINT/SIGTERM starts the drain, a second one cuts it short;
    SIGHUP reloads the templates (a broken set is refused and the running one kept)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                received = 0
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP: reloading the templates")
                        app.reload_templates()
                        continue
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
        for exc in exception_leaves(group):
            print(f"trio-mailer: {exc}", file=sys.stderr)
    return status


def build_app(env: Mapping[str, str]) -> MailerApp | None:
    """Config, templates and TLS context from ``env``; prints every problem and returns None.
    A ``MAILER_*`` variable that nothing reads is warned about first (a typo, most likely)."""
    for warning in unknown_variables(env):
        print(f"trio-mailer: warning: {warning}", file=sys.stderr)
    try:
        config = load_config(env)
        configure_logging(log_format=config.log_format)
        app = MailerApp.from_config(config)
    except (ConfigError, TemplateError, TlsFileError) as exc:
        print(f"trio-mailer: {exc}", file=sys.stderr)
        return None
    except (ssl.SSLError, OSError) as exc:
        print(f"trio-mailer: cannot load TLS certificates or keys: {exc}", file=sys.stderr)
        return None
    log.info("starting trio-mailer: %s", config.describe())
    log.info("traces: %s", describe_tracing())
    return app


@contextmanager
def _traces(env: Mapping[str, str]) -> Iterator[bool]:
    """Traces as the ``OTEL_*`` variables ask (``trio_mailer.tracing``), exported until the
    end; False (after saying why) when they ask for what cannot be done."""
    try:
        traces = start_tracing(env)
    except TracingError as exc:
        print(f"trio-mailer: {exc}", file=sys.stderr)
        yield False
        return
    try:
        yield True
    finally:
        traces.shutdown()


def _serve(args: argparse.Namespace) -> int:
    configure_logging()
    with _traces(os.environ) as traced:
        app = build_app(dict(os.environ)) if traced else None
        if app is None:
            return EXIT_START_FAILED
        return run_trio(run_until_signalled, app)


def _dev(args: argparse.Namespace) -> int:
    configure_logging()
    options = dev.DevOptions(args.outbox.resolve(), args.inbox_port, args.port, args.metrics_port)
    with _traces(os.environ) as traced:
        if not traced:
            return EXIT_START_FAILED
        with dev.throwaway_tls() as tls:
            return run_trio(run_dev, options, tls, build_app, run_until_signalled)


T = TypeVar("T")


def _run_call(
    fn: Callable[..., Awaitable[T]], target: Target, *args: object, **options: object
) -> T:
    """Run the client call ``fn(target, *args, **options)`` to its end.

    Raises:
        SendFailed: what the call raised.
    """
    return trio.run(partial(fn, target, *args, **options))


def _call_failed(exc: SendFailed, target: Target) -> int:
    """Print why a client call failed, with what to do where that is clear; exit status 1."""
    hint = ""
    if exc.status == "UNAUTHENTICATED" and target.token is None:
        hint = " (this service needs a token: pass --token TOKEN or set MAILER_TOKEN)"
    elif exc.status == "UNAUTHENTICATED":
        hint = " (the service refused the token given by --token or MAILER_TOKEN)"
    print(f"error: {exc.status}: {exc.detail}{hint}", file=sys.stderr)
    return 1


def _target(command: str, args: argparse.Namespace) -> Target | None:
    """The --server, TLS and token options, or None after printing what is wrong."""
    try:
        host, port = parse_host_port(args.server, None)
    except ValueError as exc:
        print(f"trio-mailer {command}: --server: {exc}, got {args.server!r}", file=sys.stderr)
        return None
    if (args.cert is None) != (args.key is None):
        print(f"trio-mailer {command}: --cert and --key go together", file=sys.stderr)
        return None
    ssl_context = None
    if args.ca or args.cert or args.tls:
        try:
            ssl_context = client_ssl_context(args.ca, args.cert, args.key)
        except (ssl.SSLError, OSError) as exc:
            print(f"trio-mailer {command}: cannot load TLS files: {exc}", file=sys.stderr)
            return None
    token = args.token or os.environ.get("MAILER_TOKEN") or None
    return Target(host, port, token, ssl_context, args.connect_timeout_s, args.timeout_s)


def _parse_vars(command: str, pairs: Sequence[str]) -> dict[str, str] | None:
    """``["k=v", ...]`` as a dict, or None after printing what is wrong."""
    variables: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            print(
                f"trio-mailer {command}: --var: expected NAME=VALUE, got {pair!r}", file=sys.stderr
            )
            return None
        variables[name] = value
    return variables


def _send(args: argparse.Namespace) -> int:
    target = _target("send", args)
    if target is None:
        return EXIT_START_FAILED
    # Chosen here, not by the call, so that an interrupted send can name it (see ``main``).
    args.idempotency_key = args.idempotency_key or new_idempotency_key()
    variables = _parse_vars("send", args.var)
    if variables is None:
        return EXIT_START_FAILED
    try:
        if args.template is not None:
            if args.code is not None:
                variables.setdefault("code", args.code)
            reply = _run_call(
                send_template,
                target,
                args.template,
                args.to,
                variables,
                locale=args.locale,
                idempotency_key=args.idempotency_key,
            )
        else:
            if args.code is None or variables:
                print(
                    "trio-mailer send: --code is required (or --template with --var NAME=VALUE)",
                    file=sys.stderr,
                )
                return EXIT_START_FAILED
            kind = MailKind.PASSWORD if args.kind == "pass" else MailKind.RETRIEVE
            reply = _run_call(
                send,
                target,
                kind,
                args.to,
                args.code,
                locale=args.locale,
                idempotency_key=args.idempotency_key,
            )
    except SendFailed as exc:
        return _call_failed(exc, target)
    if reply.sent:
        print(f"sent=true message_id={reply.message_id}")
        return 0
    retry = f" retry_after_s={_seconds(reply.retry_after_ms)}" if reply.retry_after_ms else ""
    print(f"sent=false reason={reply.reason}{retry}")
    return 1


def _seconds(ms: int) -> str:
    """Milliseconds as seconds, without trailing zeros: 597154 -> "597.154", 2000 -> "2"."""
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".")


def _print_status(reply: MailStatus) -> None:
    parts = [
        f"state={MailStatus.State.Name(reply.state)}",
        f"attempts={reply.attempts}",
    ]
    if reply.last_reply_code or reply.last_reply_text:
        parts.append(f"last_reply={reply.last_reply_code} {reply.last_reply_text!r}")
    if reply.possible_duplicate:
        parts.append("possible_duplicate=true")
    for name in ("accepted_at", "last_attempt_at", "finished_at"):
        if reply.HasField(name):
            stamp = getattr(reply, name).ToDatetime(tzinfo=UTC)
            parts.append(f"{name}={stamp.isoformat(timespec='milliseconds')}")
    print(" ".join(parts), flush=True)


def _status(args: argparse.Namespace) -> int:
    target = _target("status", args)
    if target is None:
        return EXIT_START_FAILED
    try:
        message_id = normalise_message_id(args.message_id)
    except ValueError as exc:
        print(f"trio-mailer status: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    shown: list[MailStatus] = []

    def on_status(reply: MailStatus) -> None:
        _print_status(reply)
        shown.append(reply)

    try:
        _run_call(fetch_status, target, message_id, on_status, watch=args.watch)
    except SendFailed as exc:
        return _call_failed(exc, target)
    if not args.watch:
        return 0
    # A watch ends at the final state: its exit status says how the mail ended.
    final = shown[-1].state if shown else None
    if final not in (MailStatus.DELIVERED, MailStatus.FAILED, MailStatus.EXPIRED):
        print("trio-mailer status: the watch ended before a final state", file=sys.stderr)
    return 0 if final == MailStatus.DELIVERED else 1


def _health(args: argparse.Namespace) -> int:
    target = _target("health", args)
    if target is None:
        return EXIT_START_FAILED
    try:
        serving = _run_call(check_health, target, args.service)
    except SendFailed as exc:
        return _call_failed(exc, target)
    print(serving)
    return 0 if serving == "SERVING" else 1


def _suppressed(args: argparse.Namespace) -> int:
    target = _target("suppressed", args)
    if target is None:
        return EXIT_START_FAILED
    try:
        if args.action == "remove":
            removed = _run_call(remove_suppressed, target, args.address)
            print(f"removed {args.address}" if removed else f"not suppressed: {args.address}")
            return 0 if removed else 1
        entries = _run_call(list_suppressed, target)
    except SendFailed as exc:
        return _call_failed(exc, target)
    for entry in entries:
        until = entry.until.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
        print(f"{entry.address}\tuntil={until}\t{entry.reply_code} {entry.reply_text}")
    return 0


def _settings_help() -> str:
    """The ``MAILER_*`` variables with their defaults, from the settings table."""
    width = max(len(setting.env) for setting in SETTINGS)
    lines = ["environment variables (default in brackets):"]
    for setting in SETTINGS:
        lines.append(f"  {setting.env:<{width}}  [{setting.default_text}] {setting.meaning}")
    return "\n".join(lines)


def _client_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--server", default="127.0.0.1:20100", help="the service's HOST:PORT (127.0.0.1:20100)"
    )
    command.add_argument(
        "--token", help="bearer token (default: $MAILER_TOKEN); prefer the variable: argv is public"
    )
    command.add_argument("--tls", action="store_true", help="use TLS (implied by --ca, --cert)")
    command.add_argument("--ca", type=Path, help="CA file to verify the service with")
    command.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    command.add_argument("--key", type=Path, help="client certificate's key (mTLS)")
    command.add_argument(
        "--connect-timeout-s",
        type=_positive_seconds,
        default=CONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up each connection attempt after this long ({CONNECT_TIMEOUT_S:g})",
    )
    command.add_argument(
        "--timeout-s",
        "--timeout",
        dest="timeout_s",
        type=_positive_seconds,
        default=CALL_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up after this long, retries included ({CALL_TIMEOUT_S:g}; "
        "for --watch: until the first status)",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (0 < value <= 3600):
        raise argparse.ArgumentTypeError(f"expected more than 0 and at most 3600, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-mailer", description="Transactional e-mail over gRPC, on Trio."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('trio-mailer')}",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the service, configured from MAILER_* variables",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.set_defaults(run=_serve)
    dev_cmd = commands.add_parser(
        "dev", help="run the service against an embedded capture relay (no configuration needed)"
    )
    dev_cmd.add_argument(
        "--outbox", type=Path, default=Path("outbox"), help="where captured mails go (./outbox)"
    )
    dev_cmd.add_argument(
        "--inbox-port",
        type=_port_or_off,
        default=dev.DEFAULT_INBOX_PORT,
        help=f"the web inbox's port on 127.0.0.1 ({dev.DEFAULT_INBOX_PORT}; 0: any free port; "
        "off: no inbox)",
    )
    dev_cmd.add_argument(
        "--port",
        type=_port,
        default=dev.FROM_ENV,
        help="the gRPC port (default: MAILER_SERVE_PORT, else 20100; 0: any free port)",
    )
    dev_cmd.add_argument(
        "--metrics-port",
        type=_port_or_off,
        default=dev.FROM_ENV,
        help=f"the metrics port (default: MAILER_METRICS_PORT, else {dev.DEV_METRICS_PORT}; "
        "0: any free port; off: no metrics)",
    )
    dev_cmd.set_defaults(run=_dev)
    send_cmd = commands.add_parser("send", help="ask a running service to send a mail")
    send_cmd.add_argument("--to", required=True, help="recipient address")
    send_cmd.add_argument("--code", help="the code the mail carries (SendPass/SendRetrieve)")
    send_cmd.add_argument("--kind", choices=["pass", "retrieve"], default="pass")
    send_cmd.add_argument(
        "--idempotency-key",
        help="the key of this send (default: a fresh one, reused by its retries)",
    )
    send_cmd.add_argument("--template", help="send this template with Send (instead of --kind)")
    send_cmd.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="a template variable"
    )
    send_cmd.add_argument("--locale", default="", help="the mail's language, e.g. ru or pt-BR")
    _client_options(send_cmd)
    send_cmd.set_defaults(run=_send)
    status_cmd = commands.add_parser("status", help="where a mail stands, by its Message-ID")
    status_cmd.add_argument("message_id", help="as send printed it, with or without <>")
    status_cmd.add_argument(
        "--watch", action="store_true", help="print every change until the final state"
    )
    _client_options(status_cmd)
    status_cmd.set_defaults(run=_status)
    health_cmd = commands.add_parser(
        "health",
        help="ask the gRPC health service; exit 0 when SERVING, 1 otherwise (for health checks)",
    )
    health_cmd.add_argument(
        "--service", default="", help='the service to check ("" for the whole server)'
    )
    _client_options(health_cmd)
    health_cmd.set_defaults(run=_health)
    suppressed_cmd = commands.add_parser(
        "suppressed", help="the running service's list of dead addresses (list, remove ADDR)"
    )
    actions = suppressed_cmd.add_subparsers(dest="action", required=True)
    list_cmd = actions.add_parser(
        "list", help="every address on the list, with the reply that put it there"
    )
    remove_cmd = actions.add_parser("remove", help="take an address off the list")
    remove_cmd.add_argument("address")
    for action in (list_cmd, remove_cmd):
        _client_options(action)
    suppressed_cmd.set_defaults(run=_suppressed)
    render_cmd = commands.add_parser(
        "render", help="print a rendered mail without sending it (templates from MAILER_*)"
    )
    render_cmd.add_argument("template", help="the template's name, e.g. password")
    render_cmd.add_argument("--locale", default="", help="e.g. ru or pt-BR (falls back)")
    render_cmd.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable; those not given get sample values",
    )
    render_cmd.add_argument("--to", default="user@example.com", help="the recipient shown")
    shown = render_cmd.add_mutually_exclusive_group()
    shown.add_argument("--text", dest="part", action="store_const", const="text", help="text part")
    shown.add_argument("--html", dest="part", action="store_const", const="html", help="html part")
    shown.add_argument(
        "--eml", dest="part", action="store_const", const="eml", help="the whole message (.eml)"
    )
    render_cmd.set_defaults(run=_render, part="summary")
    return parser


def _port(text: str, *, also: str = "") -> int:
    port = int(text) if text.isdigit() and len(text) <= 5 else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535{also}, got {text!r}")
    return port


def _port_or_off(text: str) -> int | None:
    return None if text == "off" else _port(text, also=" or off")


def _render(args: argparse.Namespace) -> int:
    """Render a template as the service would, from the same MAILER_* settings."""
    env = dict(os.environ)
    try:
        templates = MailTemplates.load(
            Path(env.get("MAILER_TEMPLATES_DIR") or shipped_templates_dir()),
            env.get("MAILER_DEFAULT_LOCALE") or DEFAULT_LOCALE,
        )
    except TemplateError as exc:
        print(f"trio-mailer: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    variables = _parse_vars("render", args.var)
    if variables is None:
        return EXIT_START_FAILED
    service_name = env.get("MAILER_SERVICENAME") or "trio-mailer"
    try:
        required = templates.requires(args.template)
        for name in sorted(required - variables.keys()):
            print(f"trio-mailer render: {name} not given, using {SAMPLE_VALUE!r}", file=sys.stderr)
        variables = {**sample_variables(required), **variables}
        composer = MailComposer(templates, env.get("MAILER_FROM") or dev.DEV_FROM, service_name)
        mail = composer.compose_template(
            args.template, args.to, variables, datetime.now(UTC), locale=args.locale
        )
        rendered = templates.render(
            args.template,
            variables,
            locale=args.locale,
            builtins={"to": args.to, "service_name": service_name},
        )
    except InvalidRequest as exc:
        print(f"trio-mailer render: {exc.message}", file=sys.stderr)
        return 1
    except (RenderError, MessageBuildError) as exc:
        print(f"trio-mailer render: cannot render: {exc}", file=sys.stderr)
        return 1
    if args.part == "eml":
        sys.stdout.buffer.write(mail.data)
    elif args.part == "html":
        if rendered.html is None:
            print(f"trio-mailer render: {args.template} has no html part", file=sys.stderr)
            return 1
        sys.stdout.write(rendered.html)
    elif args.part == "text":
        sys.stdout.write(rendered.text)
    else:
        sys.stdout.write(
            f"Template: {args.template} (locale {rendered.locale})\n"
            f"Subject: {rendered.subject}\n"
            f"Parts: text{' + html' if rendered.html is not None else ''}\n\n{rendered.text}"
        )
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except BaseException as exc:
        if not _is_ctrl_c(exc):
            raise
    else:
        return status
    # Ctrl-C: one line, no traceback. (``serve`` and ``dev`` drain on SIGINT instead, once
    # they run: this is Ctrl-C while they start, and in every other command.)
    note = ""
    if args.command == "send":
        note = (
            "; the mail may have been accepted: to send it at most once, repeat the command "
            f"with --idempotency-key {args.idempotency_key}"
        )
    print(f"trio-mailer {args.command}: interrupted{note}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _is_ctrl_c(exc: BaseException) -> bool:
    """``KeyboardInterrupt``, alone or as every leaf of a group (Trio's and purerpc's task
    groups wrap it)."""
    leaves = exception_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves)


def main_entry() -> None:
    sys.exit(main())
