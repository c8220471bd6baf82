"""The test-suite's fake relay: the SMTP-server core, plus scripted faults and inspection.

``FaultRelay`` is ``trio_mailer.dev.smtp_server.SMTPServer`` (the core the dev capture relay is
built on too) with its hooks filled in (read that module's docstring first). It keeps mails in
memory only, records every command verb (``commands``), and answers from a script of ``Fault``
values, with an optional ``chaos`` function for the soak test's seeded random failures.

A fault fires when its command is next seen: first ``delay_s`` (trio.sleep), then ``drop``
(close without reply), otherwise ``reply`` replaces the normal reply, under the relay's rule
that a replaced reply never invents state. ``stall_mid_reply_s`` and ``trickle_s`` change how
the *next* reply written on that session goes out (for AUTH, that is the first 334 prompt).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio

from trio_mailer.dev.smtp_server import (
    REPLY_COMMANDS,
    EndSession,
    ReceivedMail,
    Session,
    SMTPServer,
)

__all__ = ["FAULT_COMMANDS", "Fault", "FaultRelay"]

FAULT_COMMANDS = REPLY_COMMANDS


def _upper(value: str) -> str:
    return value.upper()


def _check_times(_instance: object, _attribute: object, value: int) -> None:
    if value != -1 and value < 1:
        raise ValueError(f"times: expected -1 (forever) or a count >= 1, got {value}")


def _check_delay(_instance: object, _attribute: object, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"delay_s: expected a number of seconds >= 0, got {value}")


@attrs.frozen
class Fault:
    """One scripted misbehaviour, fired when `command` is next seen (then `times` decremented).

    Commands: "GREETING", "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA" (the reply
    to the DATA command itself), "DOT" (the reply after the final "."), "NOOP", "RSET", "QUIT".
    """

    command: str = attrs.field(converter=_upper, validator=attrs.validators.in_(FAULT_COMMANDS))
    reply: str | None = None
    """Sent instead of the normal reply; lines separated by "\\n", written as given."""
    delay_s: float = attrs.field(default=0.0, validator=_check_delay)
    drop: bool = False
    """Close the connection instead of replying (after `delay_s`)."""
    times: int = attrs.field(default=1, validator=_check_times)
    """How many times it fires; -1 means forever."""
    stall_mid_reply_s: float = attrs.field(default=0.0, validator=_check_delay)
    """Write the first half of the reply, wait this long, then the rest (a relay that stalls
    mid-line)."""
    trickle_s: float = attrs.field(default=0.0, validator=_check_delay)
    """Write the reply one byte at a time, this long apart (a relay that is never quite
    silent, yet never done)."""


class FaultRelay(SMTPServer):
    """An SMTP server that can be told to fail, and that remembers every command.

    Args:
        chaos: asked for a fault for every command that no scripted fault matches; None means
            no fault.
        **settings: as for ``SMTPServer``. `history_limit` also trims `commands`.
    """

    def __init__(
        self, *, chaos: Callable[[str], Fault | None] | None = None, **settings: Any
    ) -> None:
        super().__init__(**settings)
        self._chaos = chaos
        self.faults: list[Fault] = []
        self.commands: list[tuple[int, str]] = []
        """(session id, verb) of every command line, in order."""
        self.pipelined_commands = 0
        """Commands that arrived with the next one already buffered behind them."""
        self._command_arrived = trio.lowlevel.ParkingLot()
        self._verbs_seen: set[str] = set()
        # Per session: (stall_mid_reply_s, trickle_s) for the next reply written.
        self._next_write: dict[int, tuple[float, float]] = {}

    def add_fault(self, fault: Fault) -> None:
        """Appends `fault` to the script (same as ``faults.append``)."""
        self.faults.append(fault)

    async def wait_for_command(self, verb: str) -> None:
        """Returns once a client has sent `verb` (e.g. "DATA"), at any time since the start."""
        verb = verb.upper()
        while verb not in self._verbs_seen:
            await self._command_arrived.park()
        await trio.lowlevel.checkpoint()

    async def drop_sessions(self) -> None:
        """Closes every open connection abruptly (no reply, no TLS close_notify).

        Returns once they are all closed, so the client's next command is certain to fail.
        """
        sessions = self.open_sessions()
        for session in sessions:
            session.drop()
        for session in sessions:
            await session.finished.wait()

    # ---- the hooks ----

    def command_received(self, session: Session, verb: str) -> None:
        if session.has_pipelined_line():
            self.pipelined_commands += 1
        self.commands.append((session.session_id, verb))
        self._verbs_seen.add(verb)
        self._command_arrived.unpark_all()
        # Trimming in halves keeps the cost per command constant.
        if self.history_limit is not None and len(self.commands) > 2 * self.history_limit:
            del self.commands[: -self.history_limit]

    async def before_reply(self, session: Session, command: str) -> str | None:
        fault = self._take_fault(command)
        if fault is None:
            return None
        self._next_write[session.session_id] = (fault.stall_mid_reply_s, fault.trickle_s)
        if fault.delay_s > 0:
            await trio.sleep(fault.delay_s)
        if fault.drop:
            del self._next_write[session.session_id]
            raise EndSession(f"fault dropped the connection at {fault.command}")
        return fault.reply

    async def write_reply(self, session: Session, payload: bytes) -> None:
        stall_s, trickle_s = self._next_write.pop(session.session_id, (0.0, 0.0))
        if stall_s > 0:
            half = len(payload) // 2
            await session.write(payload[:half])
            await trio.sleep(stall_s)
            payload = payload[half:]
        if trickle_s > 0:
            for byte in payload[:-1]:
                await session.write(bytes([byte]))
                await trio.sleep(trickle_s)
            payload = payload[-1:]
        await session.write(payload)

    async def keep_mail(self, mail: ReceivedMail, number: int) -> ReceivedMail:
        return mail  # in memory only: `received`

    def _take_fault(self, command: str) -> Fault | None:
        for index, fault in enumerate(self.faults):
            if fault.command == command:
                if fault.times == 1:
                    del self.faults[index]
                elif fault.times > 1:
                    self.faults[index] = attrs.evolve(fault, times=fault.times - 1)
                return fault
        return self._chaos(command) if self._chaos is not None else None
