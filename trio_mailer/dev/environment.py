"""``trio-mailer dev``: the pieces that stand in for a real relay.

A throwaway CA (``trustme``) signs a certificate for 127.0.0.1/localhost; the embedded capture
relay (``capture_relay.CaptureSMTPServer``) serves implicit TLS with it and accepts AUTH with a
random password; the service is configured exactly as in production, through ``MAILER_*``
variables, with the CA given as ``MAILER_SMTP_CA_FILE``, so the dev run exercises the same
verified-TLS path.
"""

from __future__ import annotations

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
from trio_mailer.dev.capture_relay import CaptureSMTPServer, ReceivedMail

DEV_USER = "dev"
DEV_FROM = "noreply@example.com"
DEV_METRICS_PORT = 20101


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
    tls: DevTls, outbox: Path, on_mail: Callable[[ReceivedMail], None] | None = None
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
    )


def relay_env(env: Mapping[str, str], port: int, tls: DevTls, outbox: Path) -> dict[str, str]:
    """``env`` with the relay variables pointed at the capture relay on ``port``."""
    return {
        **env,
        "MAILER_REMOTE_HOST": f"127.0.0.1:{port}",
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
    }
