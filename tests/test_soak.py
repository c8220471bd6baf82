"""Soak: thousands of mails through a relay that fails at random, nothing lost.

Short by default (``--soak-mails 300``); ``pytest tests/test_soak.py --soak-mails 5000`` for a long
run, ``--soak-seed N`` for another random script. The relay disconnects, defers with 4xx and
stalls past our timeout at random (seeded), at every command, the final "." included.
"""

from __future__ import annotations

import collections
import random

import pytest
import trio

from trio_mailer.v1.mailer_pb2 import MsgRequest

from .fakes.fault_relay import Fault
from .helpers import message_ids


def chaos(seed: int):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)

    def fault_for(command: str) -> Fault | None:
        if command not in ("GREETING", "MAIL", "RCPT", "DATA", "DOT", "NOOP", "RSET"):
            return None
        roll = rng.random()
        if roll < 0.03:
            return Fault(command, drop=True)
        if roll < 0.06 and command != "GREETING":
            return Fault(
                command,
                reply=rng.choice(
                    ["451 4.7.1 later", "421 4.3.2 bye", "452 4.3.1 full", "454 4.7.0 busy"]
                ),
            )
        if roll < 0.065:
            return Fault(command, delay_s=0.5)  # past the 0.3 s timeout
        return None

    return fault_for


@pytest.mark.soak
async def test_every_accepted_mail_ends_delivered_or_failed_exactly_once(
    start_harness, request: pytest.FixtureRequest
) -> None:
    """Every accepted Message-ID: one outcome; delivered ones arrived; duplicates explained."""
    count: int = request.config.getoption("--soak-mails")
    seed: int = request.config.getoption("--soak-seed")
    env = {
        "MAILER_QUEUE_SIZE": "50",
        "MAILER_SMTP_TIMEOUT_S": "0.3",
        "MAILER_RETRY_BASE_S": "0.01",
        "MAILER_RETRY_MAX_S": "0.05",
        "MAILER_MAX_ATTEMPTS": "8",
        "MAILER_MESSAGE_TTL_S": "120",
        "MAILER_SHUTDOWN_GRACE_S": "30",
    }
    accepted: list[str] = []
    refused = 0
    with trio.fail_after(60 + count * 0.2):
        async with start_harness(env=env, chaos=chaos(seed)) as h:
            for n in range(count):
                while True:
                    reply = await h.stub.SendPass(MsgRequest(to=f"u{n}@example.com", code=str(n)))
                    if reply.sent:
                        accepted.append(reply.message_id)
                        break
                    assert reply.reason == "queue full"
                    refused += 1
                    await trio.sleep(0.005)  # a real client backs off, then tries again
            finished = await h.wait_finished(count)
            assert await h.shutdown() == 0

    outcomes = collections.Counter(f.delivery.message_id for f in finished)
    assert sorted(outcomes) == sorted(accepted)  # every accepted mail has an outcome...
    assert set(outcomes.values()) == {1}  # ...exactly one
    arrived = collections.Counter(message_ids(h.relay))
    assert set(arrived) <= set(accepted)  # nothing else was delivered
    by_id = {f.delivery.message_id: f for f in finished}
    for message_id, f in by_id.items():
        if f.delivered:
            assert arrived[message_id] >= 1, f"{message_id} reported delivered, never arrived"
        if arrived[message_id] > 1 or (not f.delivered and arrived[message_id]):
            # More than one copy, or a copy of a mail reported failed: only where an attempt's
            # outcome was unknown (the session broke after the final ".").
            assert f.delivery.possible_duplicate, f"{message_id}: unexplained copy"
    delivered = sum(f.delivered for f in finished)
    print(
        f"soak: {count} mails, {delivered} delivered, {count - delivered} failed, "
        f"{sum(arrived.values()) - len(arrived)} duplicates, {refused} queue-full refusals, "
        f"{h.relay.sessions_opened} sessions"
    )
    assert delivered >= count * 0.95  # 8 attempts at a few % failure each: almost all arrive
