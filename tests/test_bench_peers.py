"""The benchmark's peers (bench/peers/) render trio-mailer's mail, deliver and refuse.

No timing is asserted: only that each peer does the job the ``peers`` section measures, so that
its figures compare like with like. The Node peer's packages are installed with ``npm ci`` on
first use (compiling SQLite: about 1.5 min); the Python peer needs the bench extra (aiosmtplib).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from bench.common import TlsFiles
from bench.ingress import _closed_port
from bench.peers import launch
from bench.procs import ServerProcess, SinkProcess, service_env
from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.rendering import MailTemplates
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

MAILS = 5
DELIVERY_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 10.0
HAS_AIOSMTPLIB = importlib.util.find_spec("aiosmtplib") is not None


def _node_ready() -> None:
    if shutil.which("node") is None:
        pytest.fail("the Node peer needs node on the PATH")
    launch.ensure_node_modules()


def _python_ready() -> None:
    if not HAS_AIOSMTPLIB:
        pytest.skip("the Python peer needs the bench extra: pip install -e '.[bench]'")


PEERS: dict[str, tuple[Callable[[], None], Callable[..., ServerProcess]]] = {
    "python": (_python_ready, launch.python_peer),
    "node": (_node_ready, launch.node_peer),
}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def sink(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    with SinkProcess(tls, pipelining=True, log_dir=tmp_path_factory.mktemp("sink")) as sink:
        yield sink


def _send_pass(port: int, count: int) -> list[MsgReply]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/trio_mailer.v1.Mailer/SendPass",
            request_serializer=MsgRequest.SerializeToString,
            response_deserializer=MsgReply.FromString,
        )
        return [
            call(MsgRequest(to="user@example.com", code=f"{n:06d}"), timeout=CALL_TIMEOUT_S)
            for n in range(count)
        ]


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_commits_then_delivers_each_mail_over_verified_tls(
    peer: str, tls: TlsFiles, sink: SinkProcess, tmp_path: Path
) -> None:
    """Every accepted mail reaches the sink under its Message-ID, and its outbox row says
    delivered."""
    ready, start = PEERS[peer]
    ready()
    outbox = tmp_path / "outbox.sqlite3"
    env = service_env(sink.port, tls, MAILER_OUTBOX=str(outbox), MAILER_QUEUE_SIZE="100")
    before = sink.stats().mails
    sink.receipts()
    with start(f"{peer}-peer", env, tmp_path) as server:
        replies = _send_pass(server.port, MAILS)
        assert all(r.sent for r in replies), replies
        sink.wait_for_mails(before + MAILS, DELIVERY_TIMEOUT_S)
        assert set(sink.receipts()) == {r.message_id for r in replies}
        assert server.stop() == 0
    with sqlite3.connect(outbox) as db:
        rows = dict(db.execute("SELECT message_id, state FROM mail").fetchall())
    assert rows == {r.message_id: "delivered" for r in replies}


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_refuses_at_once_when_its_queue_is_full(
    peer: str, tls: TlsFiles, tmp_path: Path
) -> None:
    """With a queue of one and a relay that refuses connections, calls beyond the queue hear
    sent=false "queue full"."""
    ready, start = PEERS[peer]
    ready()
    env = service_env(
        _closed_port(),
        tls,
        MAILER_OUTBOX=str(tmp_path / "outbox.sqlite3"),
        MAILER_QUEUE_SIZE="1",
        MAILER_RETRY_BASE_S="3600",
        MAILER_RETRY_MAX_S="3600",
    )
    with start(f"{peer}-peer-full", env, tmp_path) as server:
        replies = _send_pass(server.port, 5)
    # One mail waits in the sender (for its backoff), one in the queue: at most two accepted.
    assert replies[0].sent
    assert sum(r.sent for r in replies) <= 2, replies
    assert (replies[-1].sent, replies[-1].reason) == (False, "queue full")


@pytest.mark.parametrize(("to", "code"), [("user@example.com", "123456"), ("a.b@x.org", "<&'\">")])
def test_peers_render_the_mail_trio_mailer_renders(to: str, code: str) -> None:
    """Subject, text and html are trio-mailer's, character for character (html escaped alike)."""
    templates = MailTemplates.load(shipped_templates_dir())
    ours = templates.render("password", {"code": code}, builtins={"to": to, "service_name": "Acme"})
    expected = {"subject": ours.subject, "text": ours.text, "html": ours.html}
    node = subprocess.run(
        ["node", str(launch.NODE_DIR / "peer.js"), "--render", to, code],
        env={"MAILER_SERVICENAME": "Acme"},
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=True,
    )
    assert json.loads(node.stdout) == expected
    if HAS_AIOSMTPLIB:
        from bench.peers.aio_server import Composer

        composer = Composer(shipped_templates_dir(), "noreply@example.com", "Acme")
        assert dict(zip(expected, composer.render(to, code), strict=True)) == expected
