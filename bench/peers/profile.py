"""Where trio-mailer's CPU goes per call, under the peers section's loads (yappi, every thread).

``python bench/peers/profile.py [--mails N] [--refused-s S]`` starts the service as the peers
section does (SQLite outbox file, one session to the pipelining sink; and a second one with a
queue of one, a closed relay port and ``MAILER_REFUSALS_PER_S=0``), each inside this file's
``--serve`` mode: yappi with the CPU clock, every thread (the outbox's and the SMTP session's
worker threads too), the time of C functions counted in their Python callers. Start-up is left
out: the profile runs only between SIGUSR1 and SIGUSR2, around a burst of ``--mails`` delivered
mails after a warm-up, and around a ``--refused-s`` window of 64 calls in flight that are all
refused. For each, it prints CPU per call by part of the stack (``PARTS``, by file) and the
costliest functions.

yappi's hooks cost CPU of their own, on Python calls more than on C ones: read the shares, and
set the absolute figures against the section's (the service's /proc CPU is printed beside).
Needs ``pip install yappi`` (not in the bench extra: a profiling tool, not a benchmark part).
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import PYTHON, BenchError, TlsFiles, child_env
from bench.e2e import BURST_CONCURRENCY, _deliver
from bench.peers import compare
from bench.procs import LoadgenWorker, ServerProcess, SinkProcess

# (part, pattern on "file:function"), first match wins; the order matters (trio_mailer's gRPC
# before trio_mailer, h2 before the rest of site-packages).
PARTS: tuple[tuple[str, str], ...] = (
    (
        "TLS and sockets (ssl, socket, selectors, trio's socket wrappers)",
        r"_ssl\.|[/\\]ssl\.py|socket|selectors\.py",
    ),
    ("SQLite (sqlite3 calls)", r"sqlite3"),
    ("trio-mailer gRPC front (grpc/)", r"trio_mailer[/\\]grpc[/\\]"),
    # h2's state enums are hashed on every frame (their __hash__ is enum.py's).
    (
        "h2, hpack, hyperframe",
        r"[/\\](h2|hpack|hyperframe)[/\\]|(Connection|Stream)(State|Inputs)\.",
    ),
    ("purerpc, anyio", r"[/\\](purerpc|anyio)[/\\]"),
    ("protobuf", r"google[/\\]protobuf|_message\.|upb"),
    ("message building (core/message.py)", r"trio_mailer[/\\]core[/\\]message\.py"),
    ("rendering (core/rendering.py, jinja2)", r"rendering\.py|[/\\]jinja2[/\\]|markupsafe|\.msg:"),
    ("email package, smtplib", r"[/\\]email[/\\]|smtplib"),
    ("delivery (delivery/)", r"trio_mailer[/\\]delivery[/\\]"),
    ("store (store/)", r"trio_mailer[/\\]store[/\\]"),
    ("logging", r"[/\\]logging[/\\]|trio_mailer[/\\]logs\.py"),
    ("metrics (metrics.py, prometheus_client)", r"metrics\.py|prometheus_client"),
    # attrs-generated __init__s are named after their class's module.
    ("trio-mailer core, app (the rest)", r"trio_mailer[/\\]|methods trio_mailer\."),
    (
        "trio (scheduler, threads, sockets)",
        r"[/\\](trio|outcome|sniffio)[/\\]|methods (trio|outcome)\.|Instruments\.",
    ),
    ("threading, queue", r"threading\.py|[/\\]queue\.py|_thread"),
)
OTHER = "other (contextlib, enum, abc, uuid: helpers shared by all of the above)"
TOP_FUNCTIONS = 15


def _serve(out: Path) -> int:
    """The service under yappi, profiling between SIGUSR1 and SIGUSR2 (then written to ``out``)."""
    import yappi  # type: ignore[import-untyped, import-not-found, unused-ignore]

    from trio_mailer.cli import main

    yappi.set_clock_type("cpu")

    def start(signum: int, frame: FrameType | None) -> None:
        yappi.clear_stats()
        yappi.start(builtins=False, profile_threads=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        yappi.stop()
        partial = out.with_suffix(".partial")
        yappi.get_func_stats().save(str(partial), type="pstat")
        partial.rename(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(["serve"])


def _profiled(name: str, env: dict[str, str], log_dir: Path) -> tuple[ServerProcess, Path]:
    out = log_dir / f"{name}.pstat"
    argv = [PYTHON, str(Path(__file__).resolve()), "--serve", str(out)]
    return ServerProcess(name, argv, env, log_dir / f"{name}.log"), out


def _collect(server: ServerProcess, out: Path) -> pstats.Stats:
    os.kill(server.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not out.exists():
        server.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name} wrote no profile within 60 s")
        time.sleep(0.05)
    return pstats.Stats(str(out))


def _part(filename: str, function: str) -> str:
    key = f"{filename}:{function}"
    for part, pattern in PARTS:
        if re.search(pattern, key):
            return part
    return OTHER


def report(title: str, stats: pstats.Stats, calls: int, proc_cpu_s: float) -> str:
    """CPU per call by part and the costliest functions (self time)."""
    by_part: dict[str, float] = {}
    functions: list[tuple[float, str]] = []
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, line, function), (_, _, tottime, _, _) in raw.items():
        part = _part(filename, function)
        by_part[part] = by_part.get(part, 0.0) + tottime
        functions.append((tottime, f"{Path(filename).name}:{line} {function}"))
    total = sum(by_part.values())
    lines = [
        f"== {title}: {calls} calls; yappi CPU {total * 1000 / calls:.3f} ms/call "
        f"(the process's /proc CPU {proc_cpu_s * 1000 / calls:.3f} ms/call) =="
    ]
    for part, seconds in sorted(by_part.items(), key=lambda kv: -kv[1]):
        lines.append(
            f"  {seconds / total * 100:5.1f} %  {seconds * 1000 / calls:7.3f} ms/call  {part}"
        )
    lines.append("  costliest functions (self time):")
    for seconds, where in sorted(functions, reverse=True)[:TOP_FUNCTIONS]:
        lines.append(f"  {seconds / total * 100:5.1f} %  {where}")
    return "\n".join(lines)


def _drive(mails: int, refused_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="trio-mailer-profile-") as tmp, ExitStack() as stack:
        log_dir = Path(tmp)
        tls = TlsFiles.create(log_dir)
        sink = stack.enter_context(SinkProcess(tls, pipelining=True, log_dir=log_dir))
        load = stack.enter_context(LoadgenWorker("profile-load", child_env(), log_dir))
        env = compare.delivering_env("trio-mailer", sink, tls, log_dir)
        server, out = _profiled("profile-delivering", env, log_dir)
        stack.enter_context(server)
        warmup: dict[str, object] = {"concurrency": BURST_CONCURRENCY, "count": 100}
        _deliver("warm-up", 1, warmup, server, sink, load)
        os.kill(server.pid, signal.SIGUSR1)
        time.sleep(0.2)
        job: dict[str, object] = {"concurrency": BURST_CONCURRENCY, "count": mails}
        sample = _deliver("burst", 1, job, server, sink, load)
        stats = _collect(server, out)
        cpu_s = sample.service_cpu_ms_per_mail * sample.mails / 1000
        print(report("delivered mails (burst)", stats, sample.mails, cpu_s), flush=True)

        env = compare.refusing_env("trio-mailer", tls, log_dir)
        server, out = _profiled("profile-refusing", env, log_dir)
        stack.enter_context(server)
        flood: dict[str, object] = {
            "target": f"127.0.0.1:{server.port}",
            "concurrency": compare.REFUSED_CONCURRENCY,
            "window_s": refused_s,
            "server_pid": server.pid,
        }
        os.kill(server.pid, signal.SIGUSR1)
        time.sleep(0.2)
        result = load.run(flood, refused_s + 30)
        stats = _collect(server, out)
        if result["accepted_total"] > 2:  # one in the queue, one held by the sender
            raise BenchError(f"the refusing service accepted {result['accepted_total']} calls")
        title = "refused calls (queue full, pacer off)"
        print(report(title, stats, result["calls_total"], result["server_cpu_s"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=1000, help="mails in the profiled burst")
    parser.add_argument("--refused-s", type=float, default=3.0, help="the refused window")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        return _serve(args.serve)
    try:
        _drive(args.mails, args.refused_s)
    except BenchError as exc:
        print(f"profile: failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
