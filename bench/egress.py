"""Egress: mails per second over one SMTP session, ours against two baselines, side by side.

Each repetition runs every variant once, in an order that rotates from one repetition to the
next (so no variant always goes first or last, after a warm cache or a busy neighbour):

- ``raw``: the fastest lockstep client Python can be, a plain ``ssl`` socket that writes one
  command and reads its reply (NOOP, MAIL, RCPT, DATA, the data and "."; 5 round trips a mail,
  like ours). Its rate is what the sink and the TLS layer allow; ours/raw is what our sender's
  machinery costs.
- ``smtplib``: ``smtplib.SMTP_SSL`` with a verifying context, ``noop()`` then ``sendmail()``.
- ``ours``: ``trio_mailer.delivery.sender.Sender`` fed through ``MailQueue``, connecting with
  ``app.relay_connector`` (``ThreadedSmtpSession``), configured by ``load_config`` as the
  service is, in ``trio.run``. Three ways: doing the baselines' exact work (NOOP before every
  mail, no session recycling, a relay without PIPELINING: the lockstep ours/raw comparison),
  and with the service's defaults against a relay without and one with PIPELINING.

Every variant opens its session and sends one warm-up mail before the clock starts, so a sample
is pure steady state: N mails over one session. The sink counts the round trips.
The baselines run in this process's main thread, ours in trio with its worker thread: that
thread hop is part of what is measured. Ours reports to a status board, a (memory) outbox and
the metrics, as in the service; its per-mail INFO log lines are not emitted here (logging is
not configured); overload and e2e run the real service, which does log them.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import attrs
import trio

from trio_mailer.app import relay_connector
from trio_mailer.core.config import Config, load_config, shipped_templates_dir
from trio_mailer.core.message import MailComposer, OutgoingMail
from trio_mailer.core.rendering import MailKind, MailTemplates
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.delivery.sender import FinishedMail, Sender
from trio_mailer.delivery.smtp_session import make_relay_ssl_context
from trio_mailer.metrics import Metrics
from trio_mailer.store.outbox import MailRecord, MemoryOutbox
from trio_mailer.store.status_board import StatusBoard

from .common import MAIL_FROM, RCPT_TO, SERVICE_NAME, BenchError, Profile, TlsFiles
from .procs import SinkProcess, SinkStats
from .stats import Section, Target

MAIL_BYTES = 1300  # a typical transactional mail with its headers
SMTP_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 120.0  # one sample, whatever its size: a stuck sender fails the run
_PADDING = b"This line pads the benchmark mail to the size of a typical transactional message.\r\n"
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def build_mails(count: int) -> list[OutgoingMail]:
    """``count`` mails of about ``MAIL_BYTES``, each with its own Message-ID.

    One is built by our composer (which costs about a millisecond: too slow to build tens of
    thousands), the others are copies under new Message-IDs. The body is padded (the shipped
    template makes ~470 bytes), and one line starts with a dot, so that every client pays for
    dot-stuffing.
    """
    composer = MailComposer(
        templates=MailTemplates.load(shipped_templates_dir()),
        from_address=MAIL_FROM,
        service_name=SERVICE_NAME,
    )
    model = composer.compose(MailKind.PASSWORD, RCPT_TO, "123456", datetime.now(UTC))
    data = model.data + b".a line that starts with a dot\r\n"
    while len(data) < MAIL_BYTES:
        data += _PADDING
    domain = MAIL_FROM.rpartition("@")[2]
    mails = []
    for _ in range(count):
        message_id = f"<{uuid.uuid4().hex}@{domain}>"
        copy = data.replace(model.message_id.encode(), message_id.encode())
        mails.append(attrs.evolve(model, message_id=message_id, data=copy))
    return mails


@attrs.frozen
class EgressSample:
    mails: int
    elapsed_s: float
    round_trips: int
    cpu_s: float  # this process's CPU (all its threads) while sending the sample

    @property
    def cpu_ms_per_mail(self) -> float:
        return 1000 * self.cpu_s / self.mails

    @property
    def mails_per_s(self) -> float:
        return self.mails / self.elapsed_s

    @property
    def round_trips_per_mail(self) -> float:
        return self.round_trips / self.mails


def _sample(
    mails: int, elapsed_s: float, cpu_s: float, before: SinkStats, after: SinkStats
) -> EgressSample:
    if after.mails - before.mails != mails:
        raise BenchError(f"the sink received {after.mails - before.mails} mails, expected {mails}")
    return EgressSample(mails, elapsed_s, after.round_trips - before.round_trips, cpu_s)


Runner = Callable[[SinkProcess, TlsFiles, OutgoingMail, list[OutgoingMail]], EgressSample]


class LockstepClient:
    """The ``raw`` baseline: one command, one reply, over a verified TLS socket."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=SMTP_TIMEOUT_S)
        self._sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self._buffer = b""
        self._expect(220)
        self._command(b"EHLO bench.test", 250)

    def _expect(self, code: int) -> None:
        """Read one reply (all its lines) and check its code."""
        while True:
            end = self._buffer.find(b"\r\n")
            while end < 0:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise BenchError("raw client: the sink closed the connection")
                self._buffer += chunk
                end = self._buffer.find(b"\r\n")
            line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            if line[3:4] != b"-":  # the last line of a (multi-line) reply
                break
        if int(line[:3]) != code:
            raise BenchError(f"raw client: expected {code}, got {line!r}")

    def _command(self, line: bytes, code: int) -> None:
        self._sock.sendall(line + b"\r\n")
        self._expect(code)

    def send(self, mail: OutgoingMail) -> None:
        self._command(b"NOOP", 250)
        self._command(b"MAIL FROM:<" + mail.envelope_from.encode() + b">", 250)
        self._command(b"RCPT TO:<" + mail.envelope_to.encode() + b">", 250)
        self._command(b"DATA", 354)
        self._command(_LEADING_DOT.sub(b"..", mail.data) + b".", 250)

    def close(self) -> None:
        self._command(b"QUIT", 221)
        self._sock.close()


def run_raw(
    sink: SinkProcess, tls: TlsFiles, warmup: OutgoingMail, mails: list[OutgoingMail]
) -> EgressSample:
    client = LockstepClient(sink.port, tls.client_context())
    try:
        client.send(warmup)
        before = sink.stats()
        start, cpu = time.perf_counter(), time.process_time()
        for mail in mails:
            client.send(mail)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = sink.stats()
    finally:
        client.close()
    return _sample(len(mails), elapsed, cpu, before, after)


def run_smtplib(
    sink: SinkProcess, tls: TlsFiles, warmup: OutgoingMail, mails: list[OutgoingMail]
) -> EgressSample:
    with smtplib.SMTP_SSL(
        "127.0.0.1", sink.port, context=tls.client_context(), timeout=SMTP_TIMEOUT_S
    ) as smtp:
        smtp.ehlo()
        smtp.noop()
        smtp.sendmail(warmup.envelope_from, [warmup.envelope_to], warmup.data)
        before = sink.stats()
        start, cpu = time.perf_counter(), time.process_time()
        for mail in mails:
            smtp.noop()
            smtp.sendmail(mail.envelope_from, [mail.envelope_to], mail.data)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = sink.stats()
    return _sample(len(mails), elapsed, cpu, before, after)


def ours_runner(**env: str) -> Runner:
    """Our sender, built as the service builds it from ``MAILER_*`` variables (plus ``env``)."""

    def run(
        sink: SinkProcess, tls: TlsFiles, warmup: OutgoingMail, mails: list[OutgoingMail]
    ) -> EgressSample:
        config = load_config(
            {
                "MAILER_REMOTE_HOST": f"127.0.0.1:{sink.port}",
                "MAILER_FROM": MAIL_FROM,
                "MAILER_SMTP_CA_FILE": str(tls.ca_file),
                "MAILER_SMTP_TIMEOUT_S": str(SMTP_TIMEOUT_S),
                "MAILER_OUTBOX": "memory",  # the sender alone is measured here
                **env,
            }
        )
        try:
            return trio.run(_run_ours, config, sink, warmup, mails)
        except trio.TooSlowError:
            raise BenchError(
                f"our sender did not deliver {len(mails)} mails within {RUN_TIMEOUT_S:g}s"
            ) from None

    return run


async def _run_ours(
    config: Config, sink: SinkProcess, warmup: OutgoingMail, mails: list[OutgoingMail]
) -> EgressSample:
    finished: list[FinishedMail] = []
    lot = trio.lowlevel.ParkingLot()

    def on_finished(mail: FinishedMail) -> None:
        finished.append(mail)
        lot.unpark_all()

    async def wait_finished(count: int) -> None:
        while len(finished) < count:
            await lot.park()

    queue = MailQueue.open(capacity=len(mails) + 1, retry_capacity=config.retry_capacity)
    board, outbox = StatusBoard(), MemoryOutbox()
    sender = Sender(  # as MailerApp builds each sender of its pool
        connect=relay_connector(config, make_relay_ssl_context(config.smtp_ca_file)),
        noop_idle_s=config.noop_idle_s,
        max_messages=config.session_max_messages,
        max_age_s=config.session_max_age_s,
        on_finished=on_finished,
        metrics=Metrics(),
        board=board,
        outbox=outbox,
    )
    # Accepted as the gRPC handler accepts them (before the clock starts): stored and on the
    # board, so the sender reports every change to both, as in the service.
    now = time.time()
    for mail in [warmup, *mails]:
        record = MailRecord.accepted(mail, now)
        await outbox.add(record)
        board.track(record)
    with trio.fail_after(RUN_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.run, queue)
            queue.put_nowait(warmup)
            await wait_finished(1)
            before = await trio.to_thread.run_sync(sink.stats)
            start, cpu = time.perf_counter(), time.process_time()
            for mail in mails:
                queue.put_nowait(mail)
            await wait_finished(len(mails) + 1)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            after = await trio.to_thread.run_sync(sink.stats)
            queue.close()  # the sender says QUIT and returns
    failed = [f for f in finished if not f.delivered]
    if failed:
        raise BenchError(f"our sender failed {len(failed)} mail(s), first: {failed[0].reason}")
    return _sample(len(mails), elapsed, cpu, before, after)


# Our sender doing exactly what the baselines do: NOOP before every mail, one session throughout.
SAME_WORK = {"MAILER_NOOP_IDLE_S": "0", "MAILER_SESSION_MAX_MESSAGES": "1000000"}
NEAR_RELAY_DELAY_MS = 1.0  # a relay in the same data centre: a round trip costs about this


@attrs.frozen
class Variant:
    key: str
    label: str
    run: Runner
    sink: SinkProcess
    mails: int  # per sample


def run_section(
    profile: Profile,
    tls: TlsFiles,
    lockstep: SinkProcess,
    pipelining: SinkProcess,
    near: SinkProcess,
) -> Section:
    """``lockstep`` and ``pipelining`` answer at once; ``near`` offers PIPELINING and holds its
    replies back ``NEAR_RELAY_DELAY_MS``, where round trips, not CPU, set the pace."""
    n, n_near = profile.egress_mails, profile.egress_near_mails
    variants = [
        Variant("raw", "raw ssl socket (NOOP each mail)", run_raw, lockstep, n),
        Variant("smtplib", "smtplib loop (NOOP each mail)", run_smtplib, lockstep, n),
        Variant(
            "ours_same_work",
            "ours, NOOP each mail, no recycling",
            ours_runner(**SAME_WORK),
            lockstep,
            n,
        ),
        Variant("ours", "ours, defaults, relay w/o PIPELINING", ours_runner(), lockstep, n),
        Variant(
            "ours_pipelining", "ours, defaults, relay w/ PIPELINING", ours_runner(), pipelining, n
        ),
        Variant("near_smtplib", "1 ms relay: smtplib loop", run_smtplib, near, n_near),
        Variant("near_ours", "1 ms relay: ours, defaults, PIPELINING", ours_runner(), near, n_near),
    ]
    mails = build_mails(sum(v.mails for v in variants) * profile.repeat + 1)
    warmup, pool = mails[0], iter(mails[1:])
    samples: dict[str, list[EgressSample]] = {v.key: [] for v in variants}
    for rep in range(profile.repeat):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            batch = [next(pool) for _ in range(v.mails)]
            samples[v.key].append(v.run(v.sink, tls, warmup, batch))

    section = Section(
        "egress",
        f"mails/s over one SMTP session to the sink ({n} mails a sample, {n_near} with the 1 ms "
        f"relay; {profile.repeat} interleaved repetitions)",
    )
    rates = {key: [s.mails_per_s for s in samples[key]] for key in samples}
    for v in variants:
        section.add(v.label, "mails/s", rates[v.key])
    for v in variants:
        section.add(v.label, "round trips/mail", [s.round_trips_per_mail for s in samples[v.key]])
    for key in ("raw", "smtplib", "ours_same_work", "ours_pipelining"):
        label = next(v.label for v in variants if v.key == key)
        section.add(label, "CPU ms/mail", [s.cpu_ms_per_mail for s in samples[key]])
    section.ratio(
        "egress lockstep ours/raw (same commands)",
        rates["ours_same_work"],
        rates["raw"],
        Target(">=", 0.95),
    )
    section.ratio("egress ours (defaults)/raw", rates["ours"], rates["raw"])
    section.ratio("egress ours (defaults)/smtplib", rates["ours"], rates["smtplib"])
    section.ratio("egress ours with/without PIPELINING", rates["ours_pipelining"], rates["ours"])
    section.ratio(
        "egress ours with PIPELINING/smtplib, instant relay",
        rates["ours_pipelining"],
        rates["smtplib"],
        Target(">=", 1.5),
    )
    section.ratio(
        "egress ours with PIPELINING/smtplib, 1 ms relay",
        rates["near_ours"],
        rates["near_smtplib"],
        Target(">=", 2.0),
    )
    section.notes.append(
        "defaults: MAILER_NOOP_IDLE_S=1 (NOOP only after 1 s idle) and a new session every "
        "MAILER_SESSION_MAX_MESSAGES=100 mails; the baselines NOOP before every mail"
    )
    section.raw = {key: [attrs.asdict(s) for s in samples[key]] for key in samples}
    return section
