"""``trio-mailer dev``: the pieces that stand in for a real relay.

A throwaway CA (``trustme``) signs a certificate for 127.0.0.1/localhost; the embedded capture
relay (``capture_relay.CaptureSMTPServer``) serves implicit TLS with it and accepts AUTH with a
random password; the service is configured exactly as in production, through ``MAILER_*``
variables, with the CA given as ``MAILER_SMTP_CA_FILE``, so the dev run exercises the same
verified-TLS path. Where ``MAILER_*`` says nothing, dev has its own defaults (``dev_env``):
metrics on 20101, the outbox file beside the ``.eml`` directory, and no recipient rate limit.

The capture relay answers with relay faults on demand (``chaos.py``), set from the web inbox.
"""

from __future__ import annotations

import enum
import logging
import secrets
import ssl
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import attrs
import trustme

from trio_mailer import tls
from trio_mailer.core.config import Config
from trio_mailer.dev.capture_relay import CaptureSMTPServer, ReceivedMail
from trio_mailer.dev.chaos import Chaos

DEV_USER = "dev"
DEV_FROM = "noreply@example.com"
DEV_METRICS_PORT = 20101
DEFAULT_INBOX_PORT = 20102


@attrs.frozen
class DevTls:
    server_context: ssl.SSLContext
    ca_file: Path
    password: str = attrs.field(repr=False)


@contextmanager
def throwaway_tls() -> Iterator[DevTls]:
    """A fresh CA and relay certificate; the CA file lives as long as the context."""
    ca = trustme.CA(organization_name="trio-mailer dev (throwaway)")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = tls.server_context()
    cert.configure_cert(server_context)
    with tempfile.TemporaryDirectory(prefix="trio-mailer-dev-") as tmp:
        ca_file = Path(tmp) / "dev-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        yield DevTls(server_context, ca_file, secrets.token_urlsafe(16))


def capture_relay(
    tls: DevTls,
    outbox: Path,
    on_mail: Callable[[ReceivedMail], None] | None,
    on_chaos: Callable[[Chaos], None],
) -> CaptureSMTPServer:
    return CaptureSMTPServer(
        ssl_context=tls.server_context,
        tls_mode="implicit",
        credentials=(DEV_USER, tls.password),
        require_auth=True,
        outbox_dir=outbox,
        log=logging.getLogger("trio_mailer.dev.relay"),
        history_limit=1000,  # the dev relay may run for days: keep memory bounded
        on_mail=on_mail,  # the web inbox
        on_chaos=on_chaos,  # the web inbox too
    )


class FromEnv(enum.Enum):
    """An option left out: the ``MAILER_*`` variable decides, else the dev default."""

    FROM_ENV = "from MAILER_*"


FROM_ENV = FromEnv.FROM_ENV


@attrs.frozen
class DevOptions:
    """``trio-mailer dev``'s options."""

    outbox: Path  # the .eml directory
    inbox_port: int | None = DEFAULT_INBOX_PORT  # None: no inbox
    port: int | FromEnv = FROM_ENV  # the gRPC port (MAILER_SERVE_PORT)
    metrics_port: int | FromEnv | None = FROM_ENV  # MAILER_METRICS_PORT; None: no metrics


def dev_env(
    env: Mapping[str, str], relay_port: int, tls: DevTls, options: DevOptions
) -> dict[str, str]:
    """``env`` with the relay variables pointed at the capture relay on ``relay_port``, the
    options applied, and the dev defaults where ``env`` sets nothing."""
    outbox = options.outbox
    result = {
        **env,
        "MAILER_REMOTE_HOST": f"127.0.0.1:{relay_port}",
        "MAILER_SMTP_TLS": "implicit",
        "MAILER_SMTP_CA_FILE": str(tls.ca_file),
        "MAILER_USER": DEV_USER,
        "MAILER_PASSWORD": tls.password,
        "MAILER_FROM": env.get("MAILER_FROM") or DEV_FROM,
        # Metrics on by default in dev, so the dashboard side can be tried too.
        "MAILER_METRICS_PORT": env.get("MAILER_METRICS_PORT") or str(DEV_METRICS_PORT),
        # The outbox file lives beside the folder of captured mails.
        "MAILER_OUTBOX": env.get("MAILER_OUTBOX")
        or str(outbox.with_name(outbox.name + ".sqlite3")),
        # A developer sends to one test address again and again: no limit unless asked for.
        "MAILER_RECIPIENT_LIMIT": env.get("MAILER_RECIPIENT_LIMIT") or "0",
    }
    if options.port is not FROM_ENV:
        result["MAILER_SERVE_PORT"] = str(options.port)
    if options.metrics_port is None:
        del result["MAILER_METRICS_PORT"]
    elif options.metrics_port is not FROM_ENV:
        result["MAILER_METRICS_PORT"] = str(options.metrics_port)
    return result


def rate_limits_line(config: Config) -> str:
    """What the start-up log says of the rate limits (off in dev unless ``MAILER_*`` sets one)."""
    if config.recipient_limit is None and config.caller_limit is None:
        return (
            "no recipient or caller rate limit "
            "(MAILER_RECIPIENT_LIMIT or MAILER_CALLER_LIMIT sets one)"
        )
    return (
        f"rate limits from MAILER_*: recipient {config.recipient_limit or 'off'}, "
        f"caller {config.caller_limit or 'off'}"
    )
