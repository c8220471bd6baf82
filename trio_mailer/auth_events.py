"""Failed authentication: each one counted, and logged at WARNING without flooding the log.

A refused caller (no token, an unknown token, another scheme than Bearer, a client certificate
refused in the TLS handshake) is counted in ``trio_mailer_auth_failures_total{reason}`` every
time, and logged with its peer address and the reason, never the token. The log line comes at
most once per peer host per ``PER_PEER_INTERVAL_S`` (a credential-stuffing caller opens many
connections, each from a new port): the next line from that host says how many were not logged
since. At most ``MAX_PEERS`` hosts are remembered; past that, the ones whose minute is over are
forgotten (and, if that is not enough, all of them: a flood from many hosts still logs, at most
once per host per minute as far as memory allows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from trio_mailer.core.caller_auth import (
    BAD_CLIENT_CERTIFICATE,
    BAD_SCHEME,
    MISSING,
    UNKNOWN_TOKEN,
)
from trio_mailer.metrics import Metrics

log = logging.getLogger(__name__)

PER_PEER_INTERVAL_S = 60.0  # at most one line per peer host this often
MAX_PEERS = 10_000  # peer hosts remembered at once
_EXPLAINED = {
    MISSING: "no authorization header",
    BAD_SCHEME: "authorization is not 'Bearer <token>'",
    UNKNOWN_TOKEN: "unknown bearer token",
    BAD_CLIENT_CERTIFICATE: "client certificate refused in the TLS handshake",
}


def peer_host(peer: str) -> str:
    """``10.0.0.7`` of ``10.0.0.7:51234`` (the port changes with each connection)."""
    host, colon, _port = peer.rpartition(":")
    return host if colon else peer


@attrs.define
class _Peer:
    logged_at: float
    unlogged: int = 0


@attrs.define
class AuthFailures:
    """Counts and logs failed authentication (see the module's docstring)."""

    metrics: Metrics
    clock: Callable[[], float]  # seconds, monotonic (time.monotonic in the service)
    _peers: dict[str, _Peer] = attrs.field(init=False, factory=dict)

    def failed(self, reason: str, peer: str) -> None:
        """A caller at ``peer`` ("host:port") was refused for ``reason`` (a caller_auth
        reason)."""
        self.metrics.auth_failed(reason)
        host = peer_host(peer)
        now = self.clock()
        known = self._peers.get(host)
        if known is not None and now - known.logged_at < PER_PEER_INTERVAL_S:
            known.unlogged += 1
            return
        rest = known.unlogged if known is not None else 0
        log.warning(
            "failed authentication from %s: %s%s",
            peer,
            _EXPLAINED.get(reason, reason),
            f" (and {rest} more from {host} not logged since the last line)" if rest else "",
        )
        if known is None and len(self._peers) >= MAX_PEERS:
            self._forget_before(now - PER_PEER_INTERVAL_S)
        self._peers[host] = _Peer(now)

    def _forget_before(self, time: float) -> None:
        self._peers = {host: p for host, p in self._peers.items() if p.logged_at >= time}
        if len(self._peers) >= MAX_PEERS:
            self._peers.clear()
