"""Several relays: tried in order, a failing one skipped for a while.

Theory of operation
-------------------
``MAILER_REMOTE_HOST`` may list several relays, comma-separated. ``RelayChain.connect`` (the
senders' connector) tries them in that order and returns the first session that comes up. A
relay that fails to connect (refused, unresolvable, TLS or AUTH refused, a 421 greeting) or
that closes a session with 421 is *skipped* for a backoff period (``ReconnectBackoff``, per
relay: it grows while the relay keeps failing, and a configuration error waits the full cap),
so mail goes to the next relay at once instead of waiting for the first one's connect. When
every relay is being skipped, all are tried again in order (the sender's own reconnect backoff
paces that). A success clears the relay's record. The session carries ``relay`` ("host:port"),
which the logs and the ``trio_mailer_delivered_by_relay`` metric show.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from trio_mailer.core.retry_policy import ReconnectBackoff
from trio_mailer.delivery.session_keeper import SmtpSession
from trio_mailer.delivery.smtp_session import ConnectFailed, RelaySettings

log = logging.getLogger(__name__)


def relay_name(settings: RelaySettings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.port}"


@attrs.define
class _Record:
    failures: int = 0
    skip_until: float = -math.inf


@attrs.define
class RelayChain:
    relays: Sequence[RelaySettings]
    connect_one: Callable[[RelaySettings], Awaitable[SmtpSession]]
    backoff: ReconnectBackoff = attrs.Factory(ReconnectBackoff)
    random: Callable[[], float] = random.random
    _records: dict[str, _Record] = attrs.Factory(dict)

    def _record(self, name: str) -> _Record:
        return self._records.setdefault(name, _Record())

    def trouble(self, name: str, reason: str, *, config_error: bool = False) -> None:
        """``name`` failed (a connect, or a 421): skip it for its backoff period."""
        record = self._record(name)
        record.failures += 1
        delay = self.backoff.delay_s(record.failures, self.random(), config_error=config_error)
        record.skip_until = trio.current_time() + delay
        if len(self.relays) > 1:
            log.warning("relay %s skipped for %.1fs: %s", name, delay, reason)

    async def connect(self) -> SmtpSession:
        """A session to the first relay that is not skipped and comes up.

        Raises:
            ConnectFailed: every relay tried failed (the reasons of each, in order).
        """
        now = trio.current_time()
        names = [relay_name(r) for r in self.relays]
        candidates = [
            (relay, name)
            for relay, name in zip(self.relays, names, strict=True)
            if self._record(name).skip_until <= now
        ] or list(zip(self.relays, names, strict=True))
        reasons = []
        config_errors = True
        for relay, name in candidates:
            try:
                session = await self.connect_one(relay)
            except ConnectFailed as exc:
                self.trouble(name, exc.reason, config_error=exc.config_error)
                reasons.append(exc.reason if len(self.relays) == 1 else f"{name}: {exc.reason}")
                config_errors = config_errors and exc.config_error
                continue
            self._records.pop(name, None)
            return session
        raise ConnectFailed("; ".join(reasons), config_error=config_errors)
