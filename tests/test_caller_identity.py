"""The caller identity that scopes idempotency keys and the caller limit: a bearer token's
digest prefix (never the token), or the client certificate's subject."""

from __future__ import annotations

from pathlib import Path

import trio

from trio_mailer.client import client_ssl_context
from trio_mailer.v1.mailer_pb2 import MsgRequest

from .helpers import HASHED_TOKEN, TOKEN, Pki, bearer, tls_env


async def test_each_token_is_its_own_caller(start_harness, tokens_file: Path) -> None:
    env = {"MAILER_AUTH_TOKENS_FILE": str(tokens_file), "MAILER_CALLER_LIMIT": "1/600"}
    with trio.fail_after(30):
        async with start_harness(env=env) as h:
            a1 = await h.stub.SendPass(
                MsgRequest(to="a@example.com", code="1", idempotency_key="k"),
                metadata=bearer(TOKEN),
            )
            a2 = await h.stub.SendPass(
                MsgRequest(to="b@example.com", code="1"), metadata=bearer(TOKEN)
            )
            # The other token: its own allowance and its own key space.
            b1 = await h.stub.SendPass(
                MsgRequest(to="c@example.com", code="1", idempotency_key="k"),
                metadata=bearer(HASHED_TOKEN),
            )
            rows = await h.app.accept.outbox.accepted_since(0.0)
    assert a1.sent and b1.sent and a1.message_id != b1.message_id
    assert (a2.sent, a2.reason) == (False, "caller rate limited")
    callers = [row.caller for row in rows]
    assert len(set(callers)) == 2 and all(c.startswith("token:") for c in callers)
    assert not any(TOKEN in c or HASHED_TOKEN in c for c in callers)


async def test_a_client_certificate_is_its_subject(start_harness, pki: Pki) -> None:
    with trio.fail_after(30):
        async with start_harness(
            env={**tls_env(pki, mutual=True), "MAILER_CALLER_LIMIT": "1/600"},
            client_ssl=client_ssl_context(pki.server_ca, pki.client_cert),
        ) as h:
            first = await h.stub.SendPass(MsgRequest(to="a@example.com", code="1"))
            second = await h.stub.SendPass(MsgRequest(to="b@example.com", code="1"))
            rows = await h.app.accept.outbox.accepted_since(0.0)
    assert first.sent and (second.sent, second.reason) == (False, "caller rate limited")
    (row,) = rows
    assert row.caller.startswith("cert:") and "O=trustme" in row.caller
