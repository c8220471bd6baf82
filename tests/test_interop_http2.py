"""Issue 22 at the HTTP/2 and TLS layer: nghttp2's h2load, content-type, ALPN.

h2load (Debian ``nghttp2-client``) drives unary GetStatus calls with a prepared request body
over 4 connections, 50 streams each; the service's own counters tell that every response was a
gRPC answer with status OK.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest
import trio

from trio_mailer.client import client_ssl_context
from trio_mailer.grpc_std.health.v1 import health_pb2
from trio_mailer.v1.mailer_pb2 import StatusRequest

from .helpers import Pki, send_pass, tls_env
from .interop.support import MAILER, handled, require_tool
from .raw_h2 import HEALTH_CHECK, RawClient, grpc_headers, grpc_message

H2LOAD_REQUESTS = 2000
OK = 0


@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc+proto"])
async def test_the_response_content_type_echoes_the_request(
    start_harness, content_type: str
) -> None:
    """A call sent as ``application/grpc+proto`` is answered as ``application/grpc+proto``."""
    headers = [
        (name, content_type if name == "content-type" else value)
        for name, value in grpc_headers(HEALTH_CHECK)
    ]
    check = grpc_message(health_pb2.HealthCheckRequest(service="").SerializeToString())
    with trio.fail_after(20):
        async with start_harness() as h:
            client = await RawClient.connect(h.grpc_port)
            try:
                result = await client.wait_status(await client.call(check, headers))
            finally:
                await client.aclose()
    assert (result.grpc_status, result.header("content-type")) == (OK, content_type)


async def _handshake(port: int, context: ssl.SSLContext) -> str:
    """A TLS handshake: the protocol ALPN chose, or the error that ended it."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:  # trio's wrapping of the ssl.SSLError
        return f"failed: {exc.__cause__}"
    else:
        return f"chose {tls.selected_alpn_protocol()}"
    finally:
        await tls.aclose()


async def test_a_tls_client_offering_only_http_1_1_gets_no_application_protocol(
    start_harness, pki: Pki
) -> None:
    """ALPN ``http/1.1`` only: the handshake fails with the no_application_protocol alert;
    ``h2`` is chosen when offered beside it."""

    def client_context(*protocols: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(pki.server_ca))
        context.set_alpn_protocols(list(protocols))
        return context

    with trio.fail_after(20):
        async with start_harness(
            env=tls_env(pki, mutual=False), client_ssl=client_ssl_context(pki.server_ca)
        ) as h:
            both = await _handshake(h.grpc_port, client_context("h2", "http/1.1"))
            http_1_1 = await _handshake(h.grpc_port, client_context("http/1.1"))
    # OpenSSL 3 names the alert in the message only (the error's ``reason`` is None).
    alert = "tlsv1 alert no application protocol"
    observed = {"h2 and http/1.1": both, "http/1.1 only": alert in http_1_1}
    assert observed == {"h2 and http/1.1": "chose h2", "http/1.1 only": True}, http_1_1


def _h2load_counts(output: str) -> dict[str, int]:
    """h2load's summary: requests started, done, succeeded, failed, errored, timed out, and
    the responses by status class."""
    requests = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        output,
    )
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    assert requests is not None and statuses is not None, output
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    counts = dict(zip(names, map(int, requests.groups()), strict=True))
    counts.update(zip(("2xx", "3xx", "4xx", "5xx"), map(int, statuses.groups()), strict=True))
    return counts


async def test_h2load_unary_calls_all_get_a_grpc_answer(start_harness, tmp_path: Path) -> None:
    """``h2load -n 2000 -c 4 -m 50`` of GetStatus: no failed, errored or timed-out request,
    all 2xx, and the service answered every one OK."""
    h2load = require_tool("h2load", "nghttp2-client")
    body = tmp_path / "get-status.bin"
    with trio.fail_after(60):
        async with start_harness() as h:
            message_id = await send_pass(h)
            body.write_bytes(grpc_message(StatusRequest(message_id=message_id).SerializeToString()))
            before = handled(h, "GetStatus", "OK")
            result = await trio.run_process(
                [
                    h2load,
                    *("-n", str(H2LOAD_REQUESTS), "-c", "4", "-m", "50"),
                    *("-d", str(body)),
                    *("-H", "content-type: application/grpc", "-H", "te: trailers"),
                    f"http://127.0.0.1:{h.grpc_port}{MAILER}/GetStatus",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            answered_ok = handled(h, "GetStatus", "OK") - before
    output = result.stdout.decode() + result.stderr.decode()
    n = H2LOAD_REQUESTS
    observed = {**_h2load_counts(output), "exit": result.returncode, "answered_ok": answered_ok}
    assert observed == {
        **dict(total=n, started=n, done=n, succeeded=n, failed=0, errored=0, timeout=0),
        **{"2xx": n, "3xx": 0, "4xx": 0, "5xx": 0},
        "exit": 0,
        "answered_ok": n,
    }, output
