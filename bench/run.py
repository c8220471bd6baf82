"""trio-mailer's benchmark: ``python bench/run.py [--quick] [--repeat N] [--json P] [--only ...]``.

Every figure is set against a baseline measured in the same run, in interleaved repetitions, so
the ratios hold on a noisy machine where the absolute numbers do not. See bench/README.md for
what each section measures and how to read the output.

Exit status: 0 when every section measured (targets met or not: they are reported, not
enforced), 1 when a measurement failed (a process died, a mail got lost), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the project root importable, for ``bench.*``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs

from bench import admission, attacks, compose, e2e, egress, ingress, memory, overload, replicas
from bench.common import BenchError, Profile, TlsFiles
from bench.peers import compare as peers
from bench.procs import SinkProcess
from bench.stats import Section, Target

SECTIONS = ("egress", "overload", "ingress", "e2e", "attacks", "admission", "memory", "compose")
# Run only when named in --only: replicas needs a PostgreSQL server (run under .ci/postgres);
# peers needs Node.js and the bench extra (aiosmtplib), and runs `npm ci` on first use.
OPTIONAL_SECTIONS = ("replicas", "peers")
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@attrs.define
class Fixtures:
    """What several sections share, started on first use and stopped at the end."""

    profile: Profile
    tls: TlsFiles
    log_dir: Path
    stack: ExitStack
    _sinks: dict[tuple[bool, float], SinkProcess] = attrs.Factory(dict)

    def sink(self, *, pipelining: bool, reply_delay_ms: float = 0.0) -> SinkProcess:
        key = (pipelining, reply_delay_ms)
        if key not in self._sinks:
            self._sinks[key] = self.stack.enter_context(
                SinkProcess(
                    self.tls,
                    pipelining=pipelining,
                    log_dir=self.log_dir,
                    reply_delay_ms=reply_delay_ms,
                )
            )
        return self._sinks[key]


RUNNERS: dict[str, Callable[[Fixtures], Section]] = {
    "egress": lambda f: egress.run_section(
        f.profile,
        f.tls,
        f.sink(pipelining=False),
        f.sink(pipelining=True),
        f.sink(pipelining=True, reply_delay_ms=egress.NEAR_RELAY_DELAY_MS),
    ),
    "overload": lambda f: overload.run_section(
        f.profile, f.tls, f.sink(pipelining=True), f.log_dir
    ),
    "ingress": lambda f: ingress.run_section(f.profile, f.tls, f.log_dir),
    "attacks": lambda f: attacks.run_section(f.profile, f.tls, f.log_dir),
    "admission": lambda f: admission.run_section(f.profile, f.tls, f.log_dir),
    "memory": lambda f: memory.run_section(f.profile, f.tls, f.log_dir),
    "compose": lambda f: compose.run_section(f.profile),
    "replicas": lambda f: replicas.run_section(
        f.profile, f.tls, f.sink(pipelining=True), f.log_dir
    ),
    "peers": lambda f: peers.run_section(f.profile, f.tls, f.sink(pipelining=True), f.log_dir),
    "e2e": lambda f: e2e.run_section(
        f.profile,
        f.tls,
        f.sink(pipelining=True),
        f.sink(pipelining=True, reply_delay_ms=e2e.SLOW_RELAY_DELAY_MS),
        f.log_dir,
    ),
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark trio-mailer against baselines measured side by side.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run (CI: well under a minute on 2 cores)"
    )
    parser.add_argument("--repeat", type=int, help="interleaved repetitions per measurement")
    parser.add_argument("--json", type=Path, help="also write every sample and summary here")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
    known = SECTIONS + OPTIONAL_SECTIONS
    unknown = [name for name in args.sections if name not in known]
    if unknown or not args.sections:
        parser.error(f"--only: expected some of {','.join(known)}, got {args.only!r}")
    if args.repeat is not None and not 1 <= args.repeat <= 100:
        parser.error(f"--repeat: expected 1 to 100, got {args.repeat}")
    return args


# The parts of the CPU-per-mail ratio (issue 16), by section and row.
CPU_PARTS = {
    "service": ("e2e", "instant relay, 1 session: service CPU"),
    "grpcio": ("ingress", "grpcio, 64 in flight: refused (queue full), server CPU"),
    "raw": ("egress", "raw ssl socket (NOOP each mail)"),
}


def cpu_per_mail(sections: list[Section]) -> Section | None:
    """The CPU-per-delivered-mail ratio, from three sections of this run (None without them).

    Our service's CPU per mail end to end (e2e, one session, instant relay) against the stack's
    own floor: grpcio's server CPU per refused call (ingress: a gRPC call that builds nothing)
    plus the raw TLS client's CPU per mail (egress: the SMTP commands and TLS alone). The
    samples of the three sections are paired by repetition.
    """
    by_name = {section.name: section for section in sections}
    parts: dict[str, tuple[float, ...]] = {}
    for part, (name, what) in CPU_PARTS.items():
        section = by_name.get(name)
        if section is None:
            return None
        unit_rows = [
            row.summary.samples
            for row in section.rows
            if row.what == what and row.unit in ("ms/mail", "ms/call", "CPU ms/mail")
        ]
        if not unit_rows:
            return None
        parts[part] = unit_rows[0]
    count = min(len(samples) for samples in parts.values())
    floor = [parts["grpcio"][i] + parts["raw"][i] for i in range(count)]
    section = Section(
        "cpu",
        "CPU per delivered mail, ours against the stack's floor (from egress, ingress and e2e)",
    )
    section.add(
        "ours: service CPU per mail (e2e, 1 session, instant relay)", "ms/mail", parts["service"]
    )
    section.add("grpcio: server CPU per refused call (ingress)", "ms/call", parts["grpcio"])
    section.add("raw TLS client: CPU per mail (egress)", "ms/mail", parts["raw"])
    section.ratio(
        "CPU per delivered mail ours/(grpcio refused call + raw TLS client mail)",
        parts["service"][:count],
        floor,
        Target("<=", 1.5),
    )
    return section


def _targets(sections: list[Section]) -> list[str]:
    return [
        ratio.line() for section in sections for ratio in section.ratios if ratio.target is not None
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    profile = Profile.quick() if args.quick else Profile.full()
    if args.repeat is not None:
        profile = attrs.evolve(profile, repeat=args.repeat)
    started = time.time()
    print(
        f"trio-mailer bench: {'quick' if args.quick else 'full'} run, {profile.repeat} "
        f"repetitions, sections {','.join(args.sections)}; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        flush=True,
    )
    sections: list[Section] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="trio-mailer-bench-") as tmp,
            ExitStack() as stack,
        ):
            fixtures = Fixtures(profile, TlsFiles.create(Path(tmp)), Path(tmp), stack)
            for name in args.sections:
                section_started = time.monotonic()
                section = RUNNERS[name](fixtures)
                print(
                    f"\n{section.render()}\n  ({time.monotonic() - section_started:.1f} s)",
                    flush=True,
                )
                sections.append(section)
    except BenchError as exc:
        print(f"\nbench: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    combined = cpu_per_mail(sections)
    if combined is not None:
        print(f"\n{combined.render()}", flush=True)
        sections.append(combined)
    print("\n== targets (from the issue; judged on the median of the paired ratios) ==")
    for line in _targets(sections):
        print(f"  {line}")
    elapsed = time.time() - started
    print(f"\ndone in {elapsed:.0f} s")
    if args.json is not None:
        report = {
            "meta": {
                "quick": args.quick,
                "profile": attrs.asdict(profile),
                "started_unix_s": started,
                "elapsed_s": elapsed,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "sections": {section.name: section.to_json() for section in sections},
            "targets": [
                ratio.to_json()
                for section in sections
                for ratio in section.ratios
                if ratio.target is not None
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
