"""The admission rules in the stores' commits: every store answers like one model of the rules.

An ``add`` with an ``Acceptance`` is refused for a live idempotency key, a suppressed recipient
or a rate limit the acceptance names. The memory and SQLite outboxes ask
``admission_tables.refusal`` (the Python rules, on ``core.rate_limits``); the PostgreSQL outbox
runs the same rules in PL/pgSQL, inside the database, so that replicas count each other's mail.
Hypothesis draws request sequences on a mock clock (times on a grid of quarter seconds, never
going back: each replica's wall clock) with a rule set per example (the key's window, the limits,
suppression on or off), and drives them through each store and ``Model``, the rules written out
plainly; every answer must be the same: stored, the key's first mail, or refused with the same
reason and the same wait. So must the prune counts and what the tables hold at the end.

The PostgreSQL leg needs a server: ``.ci/postgres .venv/bin/python -m pytest
tests/test_admission_stores.py`` (it skips without one, and fails in CI).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_mailer.core.errors import OutboxConflict
from trio_mailer.store.admission_tables import (
    Acceptance,
    AcceptedAt,
    IdempotencyHit,
    KeyEntry,
    StoreRefusal,
    Suppression,
)
from trio_mailer.store.outbox import Outbox

from .helpers import T0, queued
from .postgres_helpers import fresh_database
from .store_helpers import STORE_KINDS, opened_store

EXAMPLES = int(os.environ.get("MAILER_ADMISSION_EXAMPLES", "40"))
TIMEOUT_S = 30
CALLERS = ("token:a", "token:b")
RECIPIENTS = ("a@y.example", "b@y.example")
KEYS = ("k1", "k2")
FINGERPRINTS = ("f1", "f2")

Answer = tuple[object, ...]


@attrs.frozen
class Rules:
    """What one configuration asks of the store (as ``AdmissionControl`` fills an
    ``Acceptance`` for a store shared by replicas)."""

    key_window_s: float
    recipient_limit: tuple[int, float] | None
    caller_limit: tuple[int, float] | None
    check_suppressed: bool

    @property
    def limits_on(self) -> bool:
        return self.recipient_limit is not None or self.caller_limit is not None


@attrs.frozen
class Send:
    caller: str
    recipient: str
    key: str | None
    fingerprint: str


@attrs.frozen
class Suppress:
    recipient: str
    for_s: float


@attrs.frozen
class Unsuppress:
    recipient: str


@attrs.frozen
class Prune:
    pass


@attrs.frozen
class Step:
    after_s: float  # the clock moves this far first
    action: Send | Suppress | Unsuppress | Prune


LIMITS = st.sampled_from([None, (1, 5.0), (2, 10.0), (3, 2.5)])
rules_strategy = st.builds(
    Rules,
    key_window_s=st.sampled_from([1.0, 5.0, 30.0]),
    recipient_limit=LIMITS,
    caller_limit=LIMITS,
    check_suppressed=st.booleans(),
)
send_strategy = st.builds(
    Send,
    st.sampled_from(CALLERS),
    st.sampled_from(RECIPIENTS),
    st.none() | st.sampled_from(KEYS),
    st.sampled_from(FINGERPRINTS),
)
action_strategy = st.one_of(
    send_strategy,
    send_strategy,
    send_strategy,
    st.builds(Suppress, st.sampled_from(RECIPIENTS), st.sampled_from([0.25, 2.5, 20.0])),
    st.builds(Unsuppress, st.sampled_from(RECIPIENTS)),
    st.just(Prune()),
)
steps_strategy = st.lists(
    st.builds(
        Step,
        # Mostly the windows and periods themselves, so that the edges of each come up often;
        # every time a multiple of a quarter second (exact in binary: no rounding anywhere).
        st.sampled_from([0.0, 0.0, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0])
        | st.integers(0, 40).map(lambda quarters: quarters / 4),
        action_strategy,
    ),
    min_size=20,  # long enough to fill a limit and outlast a window
    max_size=60,
)


@attrs.define
class Model:
    """The rules written out plainly: the tables as lists and dicts, each answer recomputed."""

    keys: dict[tuple[str, str], KeyEntry] = attrs.Factory(dict)
    log: list[tuple[str, AcceptedAt]] = attrs.Factory(list)  # (message_id, row)
    suppressed: dict[str, Suppression] = attrs.Factory(dict)

    def add(self, a: Acceptance) -> Answer:
        now = a.accepted_at_unix
        entry = None if a.key is None else self.keys.get((a.caller, a.key))
        if entry is not None and entry.created_at_unix > now - a.key_window_s:
            return ("hit", entry)
        listed = self.suppressed.get(a.recipient)
        if a.check_suppressed and listed is not None and listed.until_unix > now:
            return ("suppressed", 0.0)
        for reason, limit in (("recipient", a.recipient_limit), ("caller", a.caller_limit)):
            if limit is None:
                continue
            count, period_s = limit
            subject = a.recipient if reason == "recipient" else a.caller
            times = sorted(
                row.accepted_at_unix
                for _, row in self.log
                if (row.recipient if reason == "recipient" else row.caller) == subject
                and row.accepted_at_unix > now - period_s
            )
            if len(times) >= count:  # the count-th newest must leave the period first
                return (reason, times[-count] + period_s - now)
        if a.key is not None:
            self.keys[(a.caller, a.key)] = KeyEntry(
                a.caller, a.key, a.fingerprint, a.message_id, now
            )
        if a.log_for_limits:
            self.log.append((a.message_id, AcceptedAt(a.recipient, a.caller, now)))
        return ("stored",)

    def prune(self, *, keys_before: float, log_before: float, now_unix: float) -> int:
        keys = {k: e for k, e in self.keys.items() if e.created_at_unix > keys_before}
        log = [(m, row) for m, row in self.log if row.accepted_at_unix > log_before]
        suppressed = {a: s for a, s in self.suppressed.items() if s.until_unix > now_unix}
        removed = (
            len(self.keys) - len(keys)
            + len(self.log) - len(log)
            + len(self.suppressed) - len(suppressed)
        )  # fmt: skip
        self.keys, self.log, self.suppressed = keys, log, suppressed
        return removed


async def store_answer(store: Outbox, n: int, acceptance: Acceptance) -> Answer:
    try:
        await store.add(queued(n, accepted_at_unix=acceptance.accepted_at_unix), acceptance)
    except IdempotencyHit as hit:
        return ("hit", hit.entry)
    except StoreRefusal as refused:
        return (refused.reason, refused.retry_after_s)
    except OutboxConflict as exc:  # pragma: no cover - a failure's message
        raise AssertionError(f"unexpected conflict: {exc}") from exc
    return ("stored",)


async def check_store(store: Outbox, rules: Rules, steps: list[Step]) -> None:
    """Every step through ``store`` and the model, the same answers; then the same tables."""
    model = Model()
    now = T0
    for n, step in enumerate(steps):
        now += step.after_s
        action = step.action
        if isinstance(action, Send):
            acceptance = Acceptance(
                message_id=queued(n).message_id,
                caller=action.caller,
                recipient=action.recipient,
                accepted_at_unix=now,
                key=action.key,
                fingerprint=action.fingerprint,
                key_window_s=rules.key_window_s,
                log_for_limits=rules.limits_on,
                recipient_limit=rules.recipient_limit,
                caller_limit=rules.caller_limit,
                check_suppressed=rules.check_suppressed,
            )
            expected = model.add(acceptance)
            assert await store_answer(store, n, acceptance) == expected, (n, action)
        elif isinstance(action, Suppress):
            entry = Suppression(action.recipient, now, now + action.for_s, 550, "5.1.1", f"<s{n}>")
            model.suppressed[action.recipient] = entry
            await store.suppress(entry)
        elif isinstance(action, Unsuppress):
            listed = model.suppressed.pop(action.recipient, None) is not None
            assert await store.unsuppress(action.recipient) == listed, (n, action)
        else:
            periods = [limit[1] for limit in (rules.recipient_limit, rules.caller_limit) if limit]
            bounds = {
                "keys_before": now - rules.key_window_s,
                "log_before": now - max(periods, default=0.0),
                "now_unix": now,
            }
            assert await store.prune_admission(**bounds) == model.prune(**bounds), (n, action)
    assert await store.list_suppressed(now) == sorted(
        (s for s in model.suppressed.values() if s.until_unix > now), key=lambda s: s.address
    )
    stored_log = await store.accepted_since(-math.inf)
    assert sorted(attrs.astuple(row) for row in stored_log) == sorted(
        attrs.astuple(row) for _, row in model.log
    )
    for caller in CALLERS:
        for key in KEYS:
            assert await store.find_key(caller, key, -math.inf) == model.keys.get((caller, key))


async def run_examples_on(kind: str, url: str | None, rules: Rules, steps: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        async with opened_store(kind, Path(directory), url) as store:
            with trio.fail_after(TIMEOUT_S):
                await check_store(store, rules, steps)


def empty_tables(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE mail, idempotency_key, accept_log, suppressed")


keyed = Send(CALLERS[0], RECIPIENTS[0], KEYS[0], FINGERPRINTS[0])
plain = Send(CALLERS[0], RECIPIENTS[0], None, FINGERPRINTS[0])
other = Send(CALLERS[0], RECIPIENTS[1], None, FINGERPRINTS[0])  # the same caller


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_every_store_answers_admission_like_the_model(kind: str) -> None:
    """Same requests, same clock: the same answers from each store as from the model."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database()) if kind == "postgres" else None

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(rules=rules_strategy, steps=steps_strategy)
        @example(  # a key used again exactly one window later is free again
            rules=Rules(5.0, None, None, check_suppressed=False),
            steps=[Step(0.0, keyed), Step(4.75, keyed), Step(0.25, keyed), Step(0.0, keyed)],
        )
        @example(  # a limit's slot frees exactly one period after the mail that held it
            rules=Rules(30.0, (2, 10.0), (3, 10.0), check_suppressed=False),
            steps=[Step(t, plain) for t in (0.0, 2.5, 2.5, 5.0, 2.5, 0.0)]
            + [Step(t, other) for t in (0.0, 0.0, 0.25)],
        )
        @example(  # a suppression ends exactly at its end
            rules=Rules(30.0, None, None, check_suppressed=True),
            steps=[
                Step(0.0, Suppress(RECIPIENTS[0], 2.5)),
                Step(2.25, plain),
                Step(0.25, plain),
                Step(0.0, Suppress(RECIPIENTS[0], 20.0)),
                Step(0.0, plain),
                Step(0.0, Unsuppress(RECIPIENTS[0])),
                Step(0.0, plain),
                Step(0.0, Prune()),
            ],
        )
        def check(rules: Rules, steps: list[Step]) -> None:
            try:
                trio.run(run_examples_on, kind, url, rules, steps)
            finally:
                if url is not None:
                    empty_tables(url)

        check()
