"""Memory: the service's RSS idle, and with a large backlog of unfinished mail in its outbox.

A SQLite outbox file is filled with ``memory_mails`` unfinished mails (queued, about
``egress.MAIL_BYTES`` each, written here through ``SqliteOutbox`` in a few group commits), as a
service that accepted them while its relay was down would leave it. Then, in each repetition,
in an order that rotates:

- **idle**: a service on an empty outbox file;
- **backlog**: a service on a copy of the full file;

both with the relay down (a closed port, an hour's backoff), so nothing is delivered and every
mail stays unfinished. For each: **start-up**, from the spawn to the log line that says it is
listening (the outbox checked, opened and the admission tables loaded), and **RSS**, the
highest VmRSS seen over ``memory_settle_s`` after that (while the recovery task reads the
backlog into the queue as far as the queue's bound lets it). Targets (issue 16): RSS with the
backlog <= 2 x idle, start-up with it < 2 s.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import attrs
import trio

from trio_mailer.core.mail_lifecycle import MailRecord
from trio_mailer.store.outbox import SqliteOutbox

from .attacks import rss_bytes
from .common import Profile, TlsFiles
from .egress import build_mails
from .procs import mailer_service, service_env
from .stats import Section, Target

ADD_BATCH = 1000  # adds in flight at once while filling the file (one group commit each)
SAMPLE_INTERVAL_S = 0.05
MB = 1024 * 1024


@attrs.frozen
class MemorySample:
    phase: str  # "idle" or "backlog"
    startup_s: float
    rss_peak_mb: float
    rss_end_mb: float


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _fill(path: Path, mails: int) -> None:
    outbox = await SqliteOutbox.open(path)
    try:
        accepted = time.time() - 60.0
        built = build_mails(mails)
        for start in range(0, mails, ADD_BATCH):
            async with trio.open_nursery() as nursery:
                for i, mail in enumerate(built[start : start + ADD_BATCH], start):
                    nursery.start_soon(outbox.add, MailRecord.accepted(mail, accepted + i * 1e-3))
    finally:
        await outbox.aclose()


def _measure(
    phase: str, outbox: Path, profile: Profile, tls: TlsFiles, log_dir: Path, rep: int
) -> MemorySample:
    env = service_env(
        _closed_port(),
        tls,
        MAILER_OUTBOX=str(outbox),
        MAILER_RETRY_BASE_S="3600",
        MAILER_RETRY_MAX_S="3600",
        MAILER_SHUTDOWN_GRACE_S="0",
    )
    started = time.monotonic()
    with mailer_service(f"memory-{phase}-{rep}", env, log_dir) as service:
        _ = service.port  # waits for "listening on"
        startup = time.monotonic() - started
        peak = 0
        rss = 0
        deadline = time.monotonic() + profile.memory_settle_s
        while time.monotonic() < deadline:
            service.check_alive()
            rss = rss_bytes(service.pid)
            peak = max(peak, rss)
            time.sleep(SAMPLE_INTERVAL_S)
    return MemorySample(phase, startup, peak / MB, rss / MB)


def run_section(profile: Profile, tls: TlsFiles, log_dir: Path) -> Section:
    n = profile.memory_mails
    work = log_dir / "memory"
    work.mkdir(exist_ok=True)
    full = work / "backlog.sqlite"
    trio.run(_fill, full, n)
    samples: dict[str, list[MemorySample]] = {"idle": [], "backlog": []}
    for rep in range(profile.repeat):
        # Fresh copies: a run changes its file (an attempt noted, the WAL checkpointed).
        empty = work / f"idle-{rep}.sqlite"
        copy = work / f"backlog-{rep}.sqlite"
        shutil.copyfile(full, copy)
        order = [("idle", empty), ("backlog", copy)]
        if rep % 2:
            order.reverse()
        for phase, path in order:
            samples[phase].append(_measure(phase, path, profile, tls, log_dir, rep))
        copy.unlink()
        empty.unlink(missing_ok=True)

    section = Section(
        "memory",
        f"RSS and start-up idle and with {n} unfinished mails in the SQLite outbox, relay down "
        f"({profile.repeat} interleaved repetitions, RSS peak over {profile.memory_settle_s:g} s)",
    )
    idle, backlog = samples["idle"], samples["backlog"]
    section.add("idle: start-up", "s", [s.startup_s for s in idle])
    section.add("idle: RSS peak", "MB", [s.rss_peak_mb for s in idle])
    section.add(f"{n} unfinished: start-up", "s", [s.startup_s for s in backlog])
    section.add(f"{n} unfinished: RSS peak", "MB", [s.rss_peak_mb for s in backlog])
    section.ratio(
        f"memory RSS with {n} unfinished mails/idle",
        [s.rss_peak_mb for s in backlog],
        [s.rss_peak_mb for s in idle],
        Target("<=", 2.0),
    )
    section.ratio(
        f"memory start-up with {n} unfinished mails / 2 s",
        [s.startup_s for s in backlog],
        [2.0] * len(backlog),
        Target("<=", 1.0),
    )
    section.ratio(
        f"memory start-up with {n} unfinished mails/idle",
        [s.startup_s for s in backlog],
        [s.startup_s for s in idle],
    )
    section.notes.append(
        "start-up is mostly Python's imports: on a loaded machine both start-ups grow, the "
        "ratio to idle shows what the backlog itself adds"
    )
    section.notes.append(
        f"outbox file: {full.stat().st_size / MB:.1f} MB; start-up ends when the service "
        "listens; the recovery task then queues what the queue's bound lets in"
    )
    section.raw = {phase: [attrs.asdict(s) for s in samples[phase]] for phase in samples}
    return section
