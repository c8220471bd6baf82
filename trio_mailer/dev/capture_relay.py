"""The capture relay of `trio-mailer dev`: the SMTP-server core, keeping what it receives.

``CaptureSMTPServer`` is ``smtp_server.SMTPServer`` (read that module's docstring first) with
its hooks filled in for `dev`: each accepted mail is written to ``outbox_dir`` as an .eml file
(the inbox's directory) before its "250", and the relay answers normally unless told otherwise
with ``set_chaos`` (relay faults on demand, ``chaos.py``, from ``PUT /api/chaos``): then the
next mails get the chaos reply at its stage, under the core's rule that a replaced reply never
invents state.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Callable
from typing import Any

import attrs
import trio

from trio_mailer.dev.chaos import OFF, Chaos
from trio_mailer.dev.smtp_server import ReceivedMail, ServerStatistics, Session, SMTPServer

__all__ = ["CaptureSMTPServer", "ReceivedMail", "ServerStatistics"]


def _write_eml(directory: pathlib.Path, stem: str, data: bytes) -> str:
    """Writes `data` to a new file in `directory`; returns its name. Runs in a worker thread."""
    directory.mkdir(parents=True, exist_ok=True)
    # The counter in `stem` restarts with the process, so a quick restart of `dev` can meet its
    # own older file in the same second: exclusive creation never overwrites a captured mail.
    for attempt in range(100):
        name = f"{stem}.eml" if attempt == 0 else f"{stem}-{attempt}.eml"
        try:
            with open(directory / name, "xb") as file:
                file.write(data)
        except FileExistsError:
            continue
        return name
    raise FileExistsError(f"outbox_dir: no free file name for {stem}.eml in {directory}")


def _ignore(chaos: Chaos) -> None:
    pass


class CaptureSMTPServer(SMTPServer):
    """The dev relay: every mail it accepts kept, as an .eml file too when `outbox_dir` is set.

    Args:
        outbox_dir: if set, each accepted mail is also written there as an .eml file (the
            directory is created when needed); a write that fails answers "451".
        on_chaos: told of every change of the chaos: set, one used up, off.
        **settings: as for ``SMTPServer``.
    """

    def __init__(
        self,
        *,
        outbox_dir: pathlib.Path | None = None,
        on_chaos: Callable[[Chaos], None] = _ignore,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        self._outbox_dir = outbox_dir
        self._chaos = OFF
        self._on_chaos = on_chaos

    @property
    def chaos(self) -> Chaos:
        return self._chaos

    def set_chaos(self, chaos: Chaos) -> None:
        """Answer the next mails as ``chaos`` says (``OFF``: normally again)."""
        self._chaos = chaos
        self._on_chaos(chaos)
        if chaos.stage == "connect":
            # The service keeps its session open between mails: close it, or the next mail
            # would never meet a greeting.
            for session in self.open_sessions():
                session.drop()

    # ---- the hooks ----

    def command_received(self, session: Session, verb: str) -> None:
        pass

    async def before_reply(self, session: Session, command: str) -> str | None:
        reply, rest = self._chaos.take(command)
        if reply is not None:
            self.log.info("chaos: answered %s with %r (%d more to go)", command, reply, rest.count)
            self._chaos = rest
            self._on_chaos(rest)
        return reply

    async def write_reply(self, session: Session, payload: bytes) -> None:
        await session.write(payload)

    async def keep_mail(self, mail: ReceivedMail, number: int) -> ReceivedMail:
        if self._outbox_dir is None:
            return mail
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        file_name = await trio.to_thread.run_sync(
            _write_eml, self._outbox_dir, f"{stamp}-{number:06d}", mail.data
        )
        return attrs.evolve(mail, file_name=file_name)
