"""The one place that builds TLS contexts: the relay client, the gRPC server and client, dev.

Every context starts from ``ssl.create_default_context`` (certificate and host-name checks on,
the standard library's protocol and cipher floor), so the four uses cannot drift apart.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

__all__ = ["client_context", "server_context"]


def client_context(
    ca_file: Path | None = None,
    *,
    system_store_too: bool = False,
    alpn: Sequence[str] = (),
    cert: Path | None = None,
    key: Path | None = None,
) -> ssl.SSLContext:
    """A context that verifies the server's certificate and host name.

    Args:
        ca_file: PEM certificates to trust. Without it, the system store.
        system_store_too: trust the system store as well as `ca_file`.
        alpn: protocols to offer (gRPC needs ["h2"]).
        cert, key: a client certificate to present (key may sit in the cert file).

    Raises:
        ssl.SSLError, OSError: a file cannot be loaded.
    """
    if system_store_too:
        context = ssl.create_default_context()
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
    else:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def server_context(
    cert: Path | None = None,
    key: Path | None = None,
    *,
    alpn: Sequence[str] = (),
    client_ca: Path | None = None,
) -> ssl.SSLContext:
    """A server-side context.

    Args:
        cert, key: the server's certificate chain and key; None leaves loading them to the
            caller (``trustme`` configures its own).
        alpn: protocols to accept.
        client_ca: when given, client certificates are required and verified against it.

    Raises:
        ssl.SSLError, OSError: a file cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
    return context
