"""What tests/test_interop_*.py share: the real clients (stock grpcio, @grpc/grpc-js, h2load),
a mail that stays unfinished for WatchStatus to follow, and the service's own counters.

A missing client tool skips its test on a developer's machine and fails it under CI
(``CI=true``), where ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import attrs
import grpc
import pytest
import trio

from trio_mailer.v1.mailer_pb2 import MailStatus, MsgReply, MsgRequest, StatusRequest

from ..fakes.fault_relay import Fault
from ..helpers import Harness, send_pass

INTEROP_DIR = Path(__file__).resolve().parent
GRPC_JS_CLIENT = INTEROP_DIR / "grpc_js_client.js"
MAILER = "/trio_mailer.v1.Mailer"

# The relay answers every RCPT "try later", and the retry waits a minute: the mail stays
# unfinished (RETRY_WAIT) for the whole test, so a WatchStatus on it stays open. The harness's
# shutdown then gives up on it at once.
RETRY_LATER = Fault("RCPT", reply="451 4.3.0 try again later", times=-1)
KEEP_WAITING = {
    "MAILER_RETRY_BASE_S": "60",
    "MAILER_RETRY_MAX_S": "60",
    "MAILER_SHUTDOWN_GRACE_S": "0",
}


def missing(what: str) -> NoReturn:
    """Skip, except under CI, where the tool must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}; under CI, .ci/run installs it")
    pytest.skip(what)


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (apt-get install {package})")
    return path


def require_grpc_js() -> str:
    """The node binary, once tests/interop has its node_modules."""
    node = require_tool("node", "nodejs")
    if not (INTEROP_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing("@grpc/grpc-js is not installed (npm ci --prefix tests/interop)")
    return node


async def run_grpc_js(*args: str | int, timeout_s: float) -> tuple[dict[str, Any], str]:
    """Run grpc_js_client.js with ``args``: its JSON result, and its stderr (the transport
    trace: every GOAWAY and connection close)."""
    node = require_grpc_js()
    env = {**os.environ, "GRPC_TRACE": "transport", "GRPC_VERBOSITY": "DEBUG"}
    with trio.fail_after(timeout_s):
        result = await trio.run_process(
            [node, str(GRPC_JS_CLIENT), *map(str, args)],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr[-4000:]
    return json.loads(result.stdout.decode().splitlines()[-1]), stderr


def transport_events(trace: str) -> list[str]:
    """grpc-js's trace lines that say a connection went away (GOAWAY or close), without
    their time stamp."""
    return [
        line.rpartition("| transport | ")[2]
        for line in trace.splitlines()
        if "GOAWAY" in line or "connection closed" in line or "session closed" in line
    ]


async def unfinished_mail(h: Harness) -> str:
    """A mail the relay keeps putting off (start the service with KEEP_WAITING); its id."""
    h.relay.add_fault(RETRY_LATER)
    return await send_pass(h)


def sample(h: Harness, name: str, **labels: str) -> float:
    """One series of the service's metrics registry (0 when it does not exist)."""
    return h.app.metrics.registry.get_sample_value(name, labels) or 0.0


def handled(h: Harness, method: str, code: str) -> float:
    grpc_type = "server_stream" if method == "WatchStatus" else "unary"
    return sample(
        h,
        "grpc_server_handled_total",
        grpc_type=grpc_type,
        grpc_service="trio_mailer.v1.Mailer",
        grpc_method=method,
        grpc_code=code,
    )


@attrs.frozen
class Answer:
    """What one grpcio call ended with."""

    code: str
    details: str
    reply: Any = None


@attrs.define
class StockChannel:
    """A stock grpcio channel of its own (one connection), and every connectivity state it
    entered after ``warm_up``: only READY means the connection was never closed.

    Retries are off (``grpc.enable_retries=0``), so a REFUSED_STREAM reaches the caller as
    UNAVAILABLE instead of being retried out of sight.
    """

    channel: grpc.Channel
    states: list[str] = attrs.Factory(list)
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            self.states.append(state.name)

    def warm_up(self, message_id: str = "<warm-up@example.com>") -> None:
        """One call (NOT_FOUND is an answer too), then watch the connection."""
        try:
            self.get_status(message_id).result()
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        self.channel.subscribe(self._on_state)

    def send_pass(self, to: str, code: str, timeout_s: float) -> grpc.Future:
        call = self.channel.unary_unary(
            f"{MAILER}/SendPass",
            request_serializer=MsgRequest.SerializeToString,
            response_deserializer=MsgReply.FromString,
        )
        return call.future(MsgRequest(to=to, code=code), timeout=timeout_s)

    def get_status(self, message_id: str, timeout_s: float = 10) -> grpc.Future:
        call = self.channel.unary_unary(
            f"{MAILER}/GetStatus",
            request_serializer=StatusRequest.SerializeToString,
            response_deserializer=MailStatus.FromString,
        )
        return call.future(StatusRequest(message_id=message_id), timeout=timeout_s)


def answer(future: grpc.Future) -> Answer:
    """Wait for one call's end."""
    try:
        reply = future.result()
    except grpc.RpcError as exc:
        return Answer(exc.code().name, exc.details() or "")
    return Answer("OK", "", reply)


@contextmanager
def stock_channel(port: int) -> Iterator[StockChannel]:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stock = StockChannel(channel)
        try:
            yield stock
        finally:
            channel.unsubscribe(stock._on_state)
