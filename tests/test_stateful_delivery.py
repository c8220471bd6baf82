"""A Hypothesis state machine of queue + sender pool + outbox + status board (issue 10).

The real parts (``MailerApp``'s wiring: ``MailQueue``, two ``Sender`` tasks, ``MemoryOutbox``,
``StatusBoard``, ``MailerService``) run in one ``trio.run`` on a ``MockClock`` in a worker
thread; each rule hands that run a command and waits until every task is blocked again. The
relay is an in-trio fake scripted by the rules. Time moves only in the ``advance_clock`` rule,
on the autojump clock (its threshold is lowered just for that rule, so waiting for the next
command never moves time).

Rules: accept mail; script the relay's answer to the next attempt (2xx, 4xx, a 4.5.3 session cap,
5xx, 421, a drop before or after the final "."); refuse or allow connections; cap connections;
make connects slow; advance the clock; restart the process (kill -9: every task cancelled, only
the outbox kept).

Invariants: the senders never raise; every status change follows the lifecycle table (no
"refused status change" is logged); memory stays within the queue's bounds; no attempt starts
after the mail's time to live; a mail the relay took twice is flagged possible_duplicate; at the
end every accepted mail is DELIVERED, FAILED or EXPIRED, exactly once.

Examples: ``MAILER_STATEFUL_EXAMPLES`` (default 20) and ``MAILER_STATEFUL_STEPS`` (default 30);
e.g. ``MAILER_STATEFUL_EXAMPLES=500 pytest tests/test_stateful_delivery.py`` for a long run.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_mailer.app import MailerApp
from trio_mailer.core.config import Config, shipped_templates_dir
from trio_mailer.core.mail_lifecycle import TERMINAL_STATES, MailState
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rendering import MailTemplates
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.delivery.sender import Sender
from trio_mailer.delivery.smtp_session import (
    ConnectFailed,
    Delivered,
    Rejected,
    Reply,
    SessionLost,
)
from trio_mailer.store.outbox import MemoryOutbox
from trio_mailer.v1.mailer_pb2 import MsgRequest

EXAMPLES = int(os.environ.get("MAILER_STATEFUL_EXAMPLES", "20"))
STEPS = int(os.environ.get("MAILER_STATEFUL_STEPS", "30"))
TEMPLATES = MailTemplates.load(shipped_templates_dir())
TTL_S = 60.0
EPOCH = 1.7e9  # wall-clock seconds at mock time 0: the outbox's timestamps follow the mock clock

ANSWERS = ["250", "451", "452-cap", "550", "421", "drop-before-dot", "drop-after-dot"]


@attrs.define
class ScriptedRelay:
    """The in-trio fake relay the rules script."""

    up: bool = True
    max_connections: int = 100
    connect_delay_s: float = 0.0  # greeting, TLS and AUTH taking their time
    open_sessions: int = 0
    script: list[str] = attrs.Factory(list)  # answers to the next attempts, in order
    received: list[tuple[str, float]] = attrs.Factory(list)  # (message id, mock time)
    attempts: list[tuple[str, float]] = attrs.Factory(list)

    async def connect(self) -> ScriptedSession:
        await trio.sleep(self.connect_delay_s)
        if not self.up:
            raise ConnectFailed("connection refused")
        if self.open_sessions >= self.max_connections:
            raise ConnectFailed("421 4.7.0 too many connections")
        self.open_sessions += 1
        return ScriptedSession(self)


@attrs.define
class ScriptedSession:
    relay: ScriptedRelay
    closed: bool = False
    relay_name: str = "fake:25"

    @property
    def relay_label(self) -> str:
        return self.relay_name

    async def probe(self) -> bool:
        await trio.lowlevel.checkpoint()
        return self.relay.up

    async def send(self, mail: OutgoingMail) -> Delivered | Rejected:
        self.relay.attempts.append((mail.message_id, trio.current_time()))
        await trio.sleep(0.01)
        answer = self.relay.script.pop(0) if self.relay.script else "250"
        if answer == "250":
            self.relay.received.append((mail.message_id, trio.current_time()))
            return Delivered(Reply(250, "ok"))
        if answer == "451":
            return Rejected("RCPT", Reply(451, "4.7.1 greylisted"))
        if answer == "452-cap":
            return Rejected("MAIL", Reply(452, "4.5.3 Too many messages sent"))
        if answer == "550":
            return Rejected("RCPT", Reply(550, "5.1.1 no such user"))
        await self.close(quit=False)
        if answer == "421":
            raise SessionLost("MAIL: 421 closing", after_data_end=False, closing=True)
        if answer == "drop-before-dot":
            raise SessionLost("DATA: connection closed", after_data_end=False)
        self.relay.received.append((mail.message_id, trio.current_time()))
        raise SessionLost("DOT: connection closed", after_data_end=True)

    async def reset(self) -> bool:
        await trio.lowlevel.checkpoint()
        return not self.closed

    async def close(self, *, quit: bool) -> None:
        await trio.lowlevel.checkpoint()
        if not self.closed:
            self.closed = True
            self.relay.open_sessions -= 1


class RefusedChanges(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "refused status change" in record.getMessage():
            self.messages.append(record.getMessage())


class TrioThread:
    """One ``trio.run`` in a worker thread that runs the commands it is handed, one at a time."""

    def __init__(self) -> None:
        self.clock = trio.testing.MockClock(autojump_threshold=math.inf)
        self._commands: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.nursery: trio.Nursery | None = None
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(30)

    def _main(self) -> None:
        trio.run(self._serve, clock=self.clock)

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._started.set()
            while True:
                item = await trio.to_thread.run_sync(self._commands.get)
                if item is None:
                    nursery.cancel_scope.cancel()
                    return
                fn, done = item
                try:
                    result = await fn()
                    await trio.testing.wait_all_tasks_blocked()
                except BaseException as exc:  # handed back to the rule's thread
                    done.put((False, exc))
                else:
                    done.put((True, result))

    def run(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        done: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._commands.put((fn, done))
        ok, value = done.get(timeout=120)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._commands.put(None)
        self._thread.join(30)


def wall() -> float:
    return EPOCH + trio.current_time()


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.trio = TrioThread()
        self.relay = ScriptedRelay()
        self.outbox = MemoryOutbox()
        self.accepted: dict[str, float] = {}  # message id -> accepted at (mock time)
        self.finished: list[str] = []
        self.crashes: list[BaseException] = []
        self.refused = RefusedChanges()
        logging.getLogger("trio_mailer").addHandler(self.refused)
        self.count = 0
        self.app: MailerApp
        self.scope: trio.CancelScope
        self.trio.run(self._start)

    async def _start(self) -> None:
        config = Config(
            relay_host="fake",
            relay_port=25,
            mail_from="noreply@example.com",
            queue_size=4,
            retry_capacity=8,
            smtp_sessions=2,
            message_ttl_s=TTL_S,
            retry_base_s=1.0,
            retry_max_s=10.0,
            session_max_messages=5,
            noop_idle_s=1.0,
            # Queue full: refused at once. Paced refusals wait for the clock, which moves only
            # in advance_clock here (the pacing has its own tests: test_load_shedding.py).
            refusals_per_s=0.0,
        )
        self.app = app = MailerApp(
            config,
            TEMPLATES,
            self.relay.connect,  # type: ignore[arg-type]
            on_finished=lambda f: self.finished.append(f.delivery.message_id),
            wall_clock=wall,
        )
        app.build_use_cases(self.outbox)
        app.relay_checked.set()
        senders = app.build_senders(self.outbox)
        self.scope = trio.CancelScope()
        assert self.trio.nursery is not None
        self.trio.nursery.start_soon(self._run_pool, senders, app.queue, self.scope)
        await app._recover(self.outbox)

    async def _run_pool(
        self, senders: list[Sender], queue: MailQueue, scope: trio.CancelScope
    ) -> None:
        try:
            with scope:
                async with trio.open_nursery() as pool:
                    for sender in senders:
                        pool.start_soon(sender.run, queue)
        except BaseException as exc:
            self.crashes.append(exc)

    # ---- rules ----

    @rule()
    def accept_mail(self) -> None:
        self.count += 1
        n = self.count

        async def accept() -> None:
            reply = await self.app.service.SendPass(
                MsgRequest(to=f"user{n}@example.com", code="123456")
            )
            if reply.sent:
                self.accepted[reply.message_id] = trio.current_time()

        self.trio.run(accept)

    @rule(answer=st.sampled_from(ANSWERS))
    def script_next_answer(self, answer: str) -> None:
        self.relay.script.append(answer)

    @rule(up=st.booleans())
    def refuse_connections(self, up: bool) -> None:
        self.relay.up = up

    @rule(delay=st.sampled_from([0.0, 2.0, 45.0, 75.0]))
    def slow_connects(self, delay: float) -> None:
        self.relay.connect_delay_s = delay

    @rule(limit=st.sampled_from([1, 100]))
    def cap_connections(self, limit: int) -> None:
        self.relay.max_connections = limit

    @rule(seconds=st.sampled_from([0.005, 0.5, 3.0, 20.0, 70.0]))
    def advance_clock(self, seconds: float) -> None:
        async def advance() -> None:
            self.trio.clock.autojump_threshold = 0
            try:
                await trio.sleep(seconds)
            finally:
                self.trio.clock.autojump_threshold = math.inf

        self.trio.run(advance)

    @precondition(lambda self: not self.crashes)
    @rule()
    def restart_from_the_outbox(self) -> None:
        """kill -9: every task stops where it is; only the outbox survives."""

        async def restart() -> None:
            self.scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            self.relay.open_sessions = 0
            await self._start()

        self.trio.run(restart)

    # ---- invariants ----

    @invariant()
    def the_service_never_dies(self) -> None:
        assert self.crashes == []

    @invariant()
    def every_status_change_follows_the_table(self) -> None:
        assert self.refused.messages == []

    @invariant()
    def memory_stays_within_bounds(self) -> None:
        stats = self.app.queue.statistics()
        assert stats.queued <= stats.capacity
        assert stats.retry_waiting + stats.in_flight <= stats.retry_capacity

    @invariant()
    def no_attempt_starts_after_the_ttl(self) -> None:
        for message_id, at in self.relay.attempts:
            assert at < self.accepted[message_id] + TTL_S, message_id

    @invariant()
    def a_mail_sent_twice_is_flagged(self) -> None:
        counts: dict[str, int] = {}
        for message_id, _ in self.relay.received:
            counts[message_id] = counts.get(message_id, 0) + 1
        for message_id, count in counts.items():
            if count > 1:
                record = self.trio.run(lambda m=message_id: self.outbox.get(m))
                live = self.app.board.get(message_id)
                flagged = (record is not None and record.possible_duplicate) or (
                    live is not None and live.possible_duplicate
                )
                assert flagged, message_id

    def teardown(self) -> None:
        try:
            if not self.crashes:
                # Heal the relay and let every mail reach its outcome.
                self.relay.up = True
                self.relay.max_connections = 100
                self.relay.connect_delay_s = 0.0
                self.relay.script.clear()
                self.advance_clock(70.0)
                self.advance_clock(70.0)
                for message_id in self.accepted:
                    record = self.trio.run(lambda m=message_id: self.outbox.get(m))
                    assert record is not None and record.state in TERMINAL_STATES, (
                        message_id,
                        record,
                    )
                    assert record.state is not MailState.SENDING
                # Each outcome reported once (a restart may resume a mail, never re-finish it).
                assert len(self.finished) == len(set(self.finished))
                self.the_service_never_dies()
                self.every_status_change_follows_the_table()
        finally:
            logging.getLogger("trio_mailer").removeHandler(self.refused)
            self.trio.stop()


DeliveryMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDeliveryMachine = DeliveryMachine.TestCase
