"""Latency you can alert on: accepted-to-finished by final state, queue wait, and each SMTP
attempt by relay and reply class, with buckets from 10 ms to the time to live (issue 25)."""

from __future__ import annotations

import trio

from trio_mailer.metrics import Metrics, life_buckets_s

from .fakes.fault_relay import Fault
from .helpers import scrape, send_pass, value

FINISHED = "trio_mailer_accepted_to_finished_seconds"
QUEUE_WAIT = "trio_mailer_queue_wait_seconds"
ATTEMPT = "trio_mailer_smtp_attempt_seconds"


def test_the_buckets_run_from_10_ms_to_the_time_to_live() -> None:
    """The first bound is 10 ms, the last finite one the time to live, in order."""
    assert life_buckets_s(600) == (
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
    )  # fmt: skip
    assert life_buckets_s(90)[-3:] == (30, 60, 90)
    assert life_buckets_s(86400)[-2:] == (43200, 86400)
    assert life_buckets_s(0.005) == (0.005,)


async def test_histograms_by_final_state_queue_wait_and_attempt(start_harness) -> None:
    """Before traffic every label value is there at 0; then one mail delivered after a 451
    at RCPT: two attempts to the relay (4xx, then 2xx), one queue wait, one accepted-to-finished
    under "delivered"; the largest finite bucket is the configured time to live."""
    env = {
        "MAILER_METRICS_PORT": "0",
        "MAILER_RETRY_BASE_S": "0.05",
        "MAILER_RETRY_MAX_S": "0.1",
        "MAILER_MESSAGE_TTL_S": "120",
    }
    with trio.fail_after(20):
        async with start_harness(env=env) as h:
            relay = f"127.0.0.1:{h.relay_port}"
            before = await scrape(h)
            h.relay.add_fault(Fault("RCPT", reply="451 4.7.1 later"))
            await send_pass(h)
            await h.wait_finished(1)
            after = await scrape(h)
    for outcome in ("delivered", "failed", "expired"):
        assert (FINISHED + "_count", (("outcome", outcome),)) in before
        assert value(before, FINISHED + "_bucket", outcome=outcome, le="120.0") == 0
    for code_class in ("2xx", "4xx", "5xx", "none"):
        assert value(before, ATTEMPT + "_count", relay=relay, code_class=code_class) == 0
        assert (ATTEMPT + "_count", (("code_class", code_class), ("relay", relay))) in before
    assert (QUEUE_WAIT + "_count", ()) in before
    assert value(after, FINISHED + "_count", outcome="delivered") == 1
    assert value(after, FINISHED + "_count", outcome="expired") == 0
    assert value(after, FINISHED + "_bucket", outcome="delivered", le="0.01") == 0  # a retry
    assert value(after, FINISHED + "_bucket", outcome="delivered", le="120.0") == 1
    assert not [key for key in after if key[0] == FINISHED + "_bucket" and key[1][0][1] == "300.0"]
    assert value(after, QUEUE_WAIT + "_count") == 1
    assert value(after, ATTEMPT + "_count", relay=relay, code_class="4xx") == 1
    assert value(after, ATTEMPT + "_count", relay=relay, code_class="2xx") == 1
    assert value(after, ATTEMPT + "_bucket", relay=relay, code_class="2xx", le="+Inf") == 1


async def test_an_expired_mail_is_observed_under_expired(start_harness, free_port: int) -> None:
    """The relay is down past the time to live: accepted-to-finished under "expired", no
    queue wait (it never had an attempt)."""
    env = {
        "MAILER_METRICS_PORT": "0",
        "MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}",
        "MAILER_RETRY_BASE_S": "0.05",
        "MAILER_RETRY_MAX_S": "0.1",
        "MAILER_MESSAGE_TTL_S": "0.3",
        "MAILER_SHUTDOWN_GRACE_S": "0",
    }
    with trio.fail_after(20):
        async with start_harness(env=env) as h:
            await send_pass(h)
            await h.wait_finished(1)
            after = await scrape(h)
    assert value(after, FINISHED + "_count", outcome="expired") == 1
    assert value(after, FINISHED + "_bucket", outcome="expired", le="+Inf") == 1
    assert value(after, QUEUE_WAIT + "_count") == 0


def test_metrics_without_configuration_use_the_default_time_to_live() -> None:
    """``Metrics()`` (tests, tools): buckets up to the default 600 s, no relay pre-created."""
    text = Metrics().render().decode()
    assert f'{FINISHED}_bucket{{le="600.0",outcome="delivered"}} 0.0' in text
