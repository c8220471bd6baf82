"""Several relays: tried in order, a failing one skipped for a while.

Theory of operation
-------------------
``MAILER_REMOTE_HOST`` may list several relays, comma-separated. ``RelayChain.connect`` (the
senders' connector) tries them in that order and returns the first session that comes up. A
relay that fails to connect (refused, unresolvable, TLS or AUTH refused, a 421 greeting) or
that closes a session with 421 is *skipped* for a backoff period (``ReconnectBackoff``, per
relay: it grows while the relay keeps failing, and a configuration error waits the full cap),
so mail goes to the next relay at once instead of waiting for the first one's connect. A success
clears the relay's record. The session carries ``relay`` ("host:port"), which the logs and the
``trio_mailer_delivered_by_relay`` metric show.

**One backoff per relay.** Every connect goes through the chain (the start-up relay check and
every sender), so a relay's backoff is the one its callers share: while every relay is being
skipped, ``connect`` fails at once with each relay's last reason, and the relay hears nothing (a
relay refusing our credentials sees one login per ``MAILER_RETRY_MAX_S``, not one per caller).
A relay that failed is tried by one caller at a time: the others wait for that trial's outcome
(then the relay is skipped again, or up). Each caller still waits its own reconnect backoff
between calls; the chain only keeps them from reaching the relay early.
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
    return name_of(settings.host, settings.port)


def name_of(host: str, port: int) -> str:
    """A relay as the logs and the metrics name it: ``host:port``, ``[v6addr]:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.define
class _Record:
    failures: int = 0
    skip_until: float = -math.inf
    reason: str = ""  # the last failure's, told to the callers while it is skipped
    config_error: bool = False
    trial: trio.Event | None = None  # set when the connect under way to it ends


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
        record.reason = reason
        record.config_error = config_error
        if len(self.relays) > 1:
            log.warning("relay %s skipped for %.1fs: %s", name, delay, reason)

    async def connect(self) -> SmtpSession:
        """A session to the first relay that is not skipped and comes up.

        Raises:
            ConnectFailed: every relay tried failed (the reasons of each, in order).
        """
        # (reason, config error) of the relays tried, and of those skipped (their last ones).
        failed: list[tuple[str, bool]] = []
        skipped: list[tuple[str, bool]] = []
        for relay in self.relays:
            name = relay_name(relay)
            record = self._records.get(name)
            while record is not None and record.trial is not None:
                await record.trial.wait()  # another caller is trying it: its outcome counts
                record = self._records.get(name)
            prefix = "" if len(self.relays) == 1 else f"{name}: "
            if record is not None and record.skip_until > trio.current_time():
                skipped.append((prefix + record.reason, record.config_error))
                continue
            try:
                return await self._try(relay, name, record)
            except ConnectFailed as exc:
                failed.append((prefix + exc.reason, exc.config_error))
        told = failed or skipped  # the relays tried, else why none was
        raise ConnectFailed(
            "; ".join(reason for reason, _ in told),
            config_error=all(config_error for _, config_error in told),
        )

    async def _try(self, relay: RelaySettings, name: str, record: _Record | None) -> SmtpSession:
        """Connect to ``relay``; one caller at a time while it has a record of failures."""
        trial = None
        if record is not None:
            record.trial = trial = trio.Event()
        try:
            session = await self.connect_one(relay)
        except ConnectFailed as exc:
            self.trouble(name, exc.reason, config_error=exc.config_error)
            raise
        finally:
            if record is not None and trial is not None:
                record.trial = None
                trial.set()
        self._records.pop(name, None)
        return session
