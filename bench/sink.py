"""A fast SMTP sink over implicit TLS, run in its own process: the relay every benchmark talks to.

Why not ``trio_mailer.dev.capture_relay``: that server is written for capture and inspection
(and for the tests' fault-scripting subclass), on Trio, and would share the benchmark's GIL.
This one is plain ``selectors`` over non-blocking ``ssl`` sockets, stdlib only, so that it is
never the bottleneck and never the thing measured.

Theory of operation
-------------------
``SmtpConversation`` (pure: bytes in, reply bytes out) holds one connection's SMTP state. It
consumes every complete line it was given, in order, so several commands that arrive in one read
(a pipelining client, RFC 2920) each get their reply, and the replies go out together. In DATA
mode it looks for the end-of-data marker ``CRLF . CRLF``, dot-unstuffs the message, counts it
and records its Message-ID with the receipt time (``time.monotonic()``: CLOCK_MONOTONIC, shared
by every process on a Linux machine, so a client's timestamps compare with ours).

``serve`` is the event loop: accept, TLS handshake, read everything the socket has (decrypting
until ``SSLWantReadError``), feed it to the conversation, and write the replies as one batch.
Each batch written after a read is one **round trip**: a lockstep client needs one per command,
a pipelining client one per group of commands. With ``--reply-delay-ms`` every batch is held
back that long (on a timer; other connections go on meanwhile), like a relay across a network
or one that takes its time to queue a mail: the case where parallel sessions pay off.

The parent talks to the sink on stdin/stdout, one JSON line per request and per answer:
``{"op": "stats"}`` (the counters; with ``"reset_window": true`` the per-window ones start again
after this answer), ``{"op": "receipts"}`` (the recorded Message-IDs with their receipt times,
then forgotten), ``{"op": "quit"}``. End of stdin also ends the sink, so it never outlives the
benchmark. The first stdout line is ``{"port": N}``.

Bounded: connections (``MAX_CONNECTIONS``; more are closed at once), command line length,
message size, and the number of receipts kept.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import re
import selectors
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_CONNECTIONS = 64
MAX_LINE_BYTES = 8 * 1024  # a command line, without CRLF
MAX_MESSAGE_BYTES = 10 * 1024 * 1024  # advertised as SIZE
MAX_RECEIPTS = 500_000  # beyond this receipts are counted as dropped, not kept
RECV_BYTES = 256 * 1024
SELECT_TIMEOUT_S = 1.0  # only bounds how long a quiet loop takes to notice stdin closing

_END_OF_DATA = b"\r\n.\r\n"
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)")


@dataclass
class Counters:
    """What the parent reads; shared by every connection of one sink."""

    mails: int = 0
    round_trips: int = 0  # reply batches written in answer to something read
    connections: int = 0  # accepted, in total
    active: int = 0
    transactions: int = 0  # connections between MAIL and the end of their data, now
    # Per window (see reset_window):
    max_active: int = 0
    max_transactions: int = 0
    busy_connections: set[int] = field(default_factory=set)  # those that carried a mail
    refused_connections: int = 0
    protocol_errors: int = 0
    receipts_dropped: int = 0
    receipts: list[tuple[str, float]] = field(default_factory=list)

    def snapshot(self) -> dict[str, int]:
        return {
            "mails": self.mails,
            "round_trips": self.round_trips,
            "connections": self.connections,
            "active": self.active,
            "transactions": self.transactions,
            "max_active": self.max_active,
            "max_transactions": self.max_transactions,
            "busy_connections": len(self.busy_connections),
            "refused_connections": self.refused_connections,
            "protocol_errors": self.protocol_errors,
            "receipts_dropped": self.receipts_dropped,
        }

    def reset_window(self) -> None:
        """Start a new window for the "since the reset" counters."""
        self.max_active = self.active
        self.max_transactions = self.transactions
        self.busy_connections.clear()

    def record_mail(self, connection: int, message: bytes, clock: Callable[[], float]) -> None:
        self.mails += 1
        self.busy_connections.add(connection)
        headers = message[: message.find(b"\r\n\r\n") + 2]
        match = _MESSAGE_ID.search(headers)
        if match is None:
            return
        if len(self.receipts) >= MAX_RECEIPTS:
            self.receipts_dropped += 1
            return
        self.receipts.append((match.group(1).decode("ascii", "replace"), clock()))


class SmtpConversation:
    """The SMTP state of one connection: feed it bytes, send what it returns.

    ``closing`` becomes True after QUIT or a fatal error: write the replies, then close.
    """

    def __init__(
        self,
        counters: Counters,
        *,
        pipelining: bool,
        connection: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counters = counters
        self._pipelining = pipelining
        self._connection = connection
        self._clock = clock
        self._buffer = bytearray()
        self._data: bytearray | None = None  # in DATA mode: CRLF sentinel + the data so far
        self._scanned = 0  # how much of _data is known not to hold the end marker
        self._auth_steps = 0  # 334 prompts still to answer before 235
        self._has_sender = False
        self._recipients = 0
        self.closing = False

    @staticmethod
    def greeting() -> bytes:
        return b"220 sink.test ESMTP bench sink\r\n"

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return every reply it produced, in order."""
        if self.closing:
            return b""
        out = bytearray()
        if self._data is not None:
            self._data += data
        else:
            self._buffer += data
        while not self.closing:
            if self._data is not None:
                if not self._take_message(out):
                    break
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE_BYTES:
                    self._fatal(out, b"500 5.5.2 line too long\r\n")
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            if len(line) > MAX_LINE_BYTES:
                self._fatal(out, b"500 5.5.2 line too long\r\n")
                break
            out += self._command(line)
        return bytes(out)

    def end_transaction(self) -> None:
        """Forget the envelope (after the data, RSET, EHLO, or when the connection ends)."""
        if self._has_sender:
            self._counters.transactions -= 1
        self._has_sender = False
        self._recipients = 0

    def _fatal(self, out: bytearray, reply: bytes) -> None:
        self._counters.protocol_errors += 1
        out += reply
        self.closing = True

    def _take_message(self, out: bytearray) -> bool:
        """In DATA mode: finish the message if its end is here; False when more is needed."""
        data = self._data
        assert data is not None
        end = data.find(_END_OF_DATA, self._scanned)
        if end < 0:
            # The marker may straddle this chunk and the next: rescan its length minus one.
            self._scanned = max(0, len(data) - len(_END_OF_DATA) + 1)
            if len(data) > MAX_MESSAGE_BYTES + 2:
                self._data = None
                self._fatal(out, b"552 5.3.4 message too big\r\n")
            return False
        # data[:end + 2] is the sentinel CRLF plus the message with its last CRLF.
        message = bytes(data[: end + 2]).replace(b"\r\n..", b"\r\n.")[2:]
        self._buffer = bytearray(data[end + len(_END_OF_DATA) :])
        self._data = None
        self.end_transaction()
        self._counters.record_mail(self._connection, message, self._clock)
        out += b"250 2.0.0 Ok: queued\r\n"
        return True

    def _command(self, line: bytes) -> bytes:
        if self._auth_steps:  # a response to a 334 prompt: any credentials will do
            self._auth_steps -= 1
            if self._auth_steps:
                return b"334 UGFzc3dvcmQ6\r\n"  # LOGIN: "Password:"
            return b"235 2.7.0 Authentication successful\r\n"
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        if verb == b"NOOP":
            return b"250 2.0.0 Ok\r\n"
        if verb == b"MAIL":
            if self._has_sender:
                return b"503 5.5.1 nested MAIL\r\n"
            self._has_sender = True
            counters = self._counters
            counters.transactions += 1
            counters.max_transactions = max(counters.max_transactions, counters.transactions)
            return b"250 2.1.0 Ok\r\n"
        if verb == b"RCPT":
            if not self._has_sender:
                return b"503 5.5.1 need MAIL first\r\n"
            self._recipients += 1
            return b"250 2.1.5 Ok\r\n"
        if verb == b"DATA":
            if not self._recipients:
                return b"503 5.5.1 need RCPT first\r\n"
            # The sentinel CRLF lets the end marker and dot-stuffing match on the first line too.
            self._data = bytearray(b"\r\n") + self._buffer
            self._scanned = 0
            self._buffer = bytearray()
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"RSET":
            self.end_transaction()
            return b"250 2.0.0 Ok\r\n"
        if verb == b"EHLO":
            self.end_transaction()
            lines = [b"sink.test", b"8BITMIME", b"SIZE %d" % MAX_MESSAGE_BYTES]
            if self._pipelining:
                lines.append(b"PIPELINING")
            lines.append(b"AUTH PLAIN LOGIN")
            return b"".join(
                b"250" + (b" " if i == len(lines) - 1 else b"-") + text + b"\r\n"
                for i, text in enumerate(lines)
            )
        if verb == b"HELO":
            return b"250 sink.test\r\n"
        if verb == b"AUTH":
            mechanism, _, initial = argument.partition(b" ")
            mechanism = mechanism.upper()
            if mechanism == b"PLAIN":
                if initial:
                    return b"235 2.7.0 Authentication successful\r\n"
                self._auth_steps = 1
                return b"334 \r\n"
            if mechanism == b"LOGIN":
                self._auth_steps = 1 if initial else 2
                return b"334 UGFzc3dvcmQ6\r\n" if initial else b"334 VXNlcm5hbWU6\r\n"
            return b"504 5.5.4 mechanism not supported\r\n"
        if verb == b"QUIT":
            self.closing = True
            return b"221 2.0.0 Bye\r\n"
        self._counters.protocol_errors += 1
        return b"502 5.5.2 command not recognized\r\n"


class _Connection:
    """A socket, its conversation, and the reply bytes not yet written."""

    def __init__(self, sock: ssl.SSLSocket, conversation: SmtpConversation) -> None:
        self.sock = sock
        self.conversation = conversation
        self.handshaken = False
        self.pending = b""  # accepted by the sink, not yet by the socket
        self.open = True
        self.events = selectors.EVENT_READ  # what the selector watches for


class Sink:
    """The event loop: one listener, TLS connections, and the control pipe on stdin."""

    def __init__(
        self, context: ssl.SSLContext, *, pipelining: bool, reply_delay_s: float = 0.0
    ) -> None:
        self._context = context
        self._pipelining = pipelining
        self._reply_delay_s = reply_delay_s
        # Reply batches held back by the delay: (due, sequence, connection, replies).
        self._delayed: list[tuple[float, int, _Connection, bytes]] = []
        self._sequence = itertools.count()
        self.counters = Counters()
        self._selector = selectors.DefaultSelector()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._running = True

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def serve(self, control_in: int, answer: Callable[[dict[str, object]], None]) -> None:
        """Run until the control pipe says quit or closes."""
        control = _ControlReader(control_in)
        self._selector.register(control_in, selectors.EVENT_READ, control)
        try:
            while self._running:
                timeout = SELECT_TIMEOUT_S
                if self._delayed:
                    timeout = min(timeout, max(0.0, self._delayed[0][0] - time.monotonic()))
                for key, events in self._selector.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif isinstance(key.data, _ControlReader):
                        for request in key.data.read():
                            self._control(request, answer)
                        if key.data.closed:
                            self._running = False
                    else:
                        self._service(key.data, events)
                self._release_delayed()
        finally:
            for key in list(self._selector.get_map().values()):
                if isinstance(key.data, _Connection):
                    key.data.sock.close()
            self._listener.close()
            self._selector.close()

    def _control(
        self, request: dict[str, object], answer: Callable[[dict[str, object]], None]
    ) -> None:
        op = request.get("op")
        if op == "stats":
            answer(dict(self.counters.snapshot()))
            if request.get("reset_window"):
                self.counters.reset_window()
        elif op == "receipts":
            receipts, self.counters.receipts = self.counters.receipts, []
            answer({"receipts": receipts})
        elif op == "quit":
            answer({"ok": True})
            self._running = False
        else:
            answer({"error": f"unknown op {op!r}"})

    def _accept(self) -> None:
        try:
            raw, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self.counters.active >= MAX_CONNECTIONS:
            self.counters.refused_connections += 1
            raw.close()  # no TLS yet, so no 421 can be read by the client: just close
            return
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setblocking(False)
        sock = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        counters = self.counters
        counters.connections += 1
        counters.active += 1
        counters.max_active = max(counters.max_active, counters.active)
        conversation = SmtpConversation(
            counters, pipelining=self._pipelining, connection=counters.connections
        )
        conn = _Connection(sock, conversation)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._handshake(conn)

    def _handshake(self, conn: _Connection) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except (OSError, ValueError):
            self._close(conn)
            return
        conn.handshaken = True
        self._write(conn, SmtpConversation.greeting())

    def _service(self, conn: _Connection, events: int) -> None:
        if not conn.handshaken:
            self._handshake(conn)
            return
        if events & selectors.EVENT_WRITE and conn.pending:
            self._write(conn, b"")
        if conn.pending or not events & selectors.EVENT_READ:
            if conn.open:
                self._close_if_done(conn)
            return
        received = bytearray()
        eof = False
        while True:  # bounded: each recv consumes data the kernel or TLS layer already holds
            try:
                chunk = conn.sock.recv(RECV_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                break
            except (OSError, ValueError):
                eof = True
                break
            if not chunk:
                eof = True
                break
            received += chunk
        if received:
            replies = conn.conversation.feed(bytes(received))
            if replies:
                self.counters.round_trips += 1
                if self._reply_delay_s:
                    due = time.monotonic() + self._reply_delay_s
                    heapq.heappush(self._delayed, (due, next(self._sequence), conn, replies))
                else:
                    self._write(conn, replies)
        if eof:
            self._close(conn)
        else:
            self._close_if_done(conn)

    def _release_delayed(self) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, conn, replies = heapq.heappop(self._delayed)
            if conn.open:
                self._write(conn, replies)
                self._close_if_done(conn)

    def _close_if_done(self, conn: _Connection) -> None:
        """After QUIT or a fatal error, close once every reply is out."""
        if not conn.conversation.closing or conn.pending:
            return
        if any(c is conn for _, _, c, _ in self._delayed):
            return
        self._close(conn)

    def _write(self, conn: _Connection, data: bytes) -> None:
        conn.pending += data
        try:
            while conn.pending:
                sent = conn.sock.send(conn.pending)
                conn.pending = conn.pending[sent:]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            pass
        except (OSError, ValueError):
            self._close(conn)
            return
        # While replies wait for the socket, read nothing more: the client must take them first.
        self._watch(conn, selectors.EVENT_WRITE if conn.pending else selectors.EVENT_READ)

    def _watch(self, conn: _Connection, events: int) -> None:
        if conn.events != events:
            conn.events = events
            self._selector.modify(conn.sock, events, conn)

    def _close(self, conn: _Connection) -> None:
        if not conn.open:
            return
        conn.open = False
        self._selector.unregister(conn.sock)
        conn.conversation.end_transaction()
        self.counters.active -= 1
        conn.sock.close()


class _ControlReader:
    """Splits the control pipe into JSON requests; notices when the parent went away."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self.closed = False

    def read(self) -> list[dict[str, object]]:
        chunk = os.read(self._fd, 65536)
        if not chunk:
            self.closed = True
            return []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def _answer(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fast TLS SMTP sink for the benchmarks.")
    parser.add_argument("--cert", required=True, help="PEM file with the certificate chain")
    parser.add_argument("--key", required=True, help="PEM file with the private key")
    parser.add_argument("--pipelining", action="store_true", help="advertise PIPELINING")
    parser.add_argument(
        "--reply-delay-ms", type=float, default=0.0, help="hold every reply batch back this long"
    )
    args = parser.parse_args(argv)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    sink = Sink(context, pipelining=args.pipelining, reply_delay_s=args.reply_delay_ms / 1000)
    _answer({"port": sink.port})
    sink.serve(sys.stdin.fileno(), _answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
