"""What every section shares: the run profile, the TLS material, child environments, CPU time."""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path

import attrs
import trustme

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PYTHON = sys.executable

MAIL_FROM = "noreply@example.com"
RCPT_TO = "user@example.com"
SERVICE_NAME = "Acme"

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark could not measure (a process died, a mail got lost): exit non-zero."""


@attrs.frozen
class Profile:
    """How much each section does. ``quick`` is sized for CI (well under a minute on 2 cores)."""

    repeat: int
    egress_mails: int  # mails per egress sample
    egress_near_mails: int  # the same, against the relay with 1 ms round trips
    overload_warmup_s: float
    overload_window_s: float
    ingress_levels: tuple[int, ...]
    ingress_warmup_s: float
    ingress_window_s: float
    e2e_burst_mails: int  # against the instant relay
    e2e_slow_burst_mails: int  # against the slow one
    e2e_paced_s: float  # how long the paced (latency) phase submits
    e2e_paced_fraction: float  # paced rate, as a fraction of one session's burst throughput
    attack_s: float = 4.0  # how long each attack (bench/attacks.py) floods
    attack_settle_s: float = 2.0  # after it, before RSS "after" is read
    attack_baseline_s: float = 5.0  # the unattacked probe
    memory_mails: int = 10_000  # unfinished mails in the outbox (bench/memory.py)
    memory_settle_s: float = 3.0  # how long RSS is watched after start-up
    compose_mails: int = 1000  # messages built per compose sample (the reference builds 1/10)

    @classmethod
    def quick(cls) -> Profile:
        return cls(
            repeat=2,
            egress_mails=300,
            egress_near_mails=60,
            # Long enough for the flood to fill the queue (100) before the window opens, also
            # on a loaded machine, now that a mail has two parts to build.
            overload_warmup_s=1.0,
            overload_window_s=1.0,
            ingress_levels=(1, 16, 64),
            ingress_warmup_s=0.15,
            ingress_window_s=0.5,
            e2e_burst_mails=300,
            e2e_slow_burst_mails=60,
            e2e_paced_s=0.8,
            e2e_paced_fraction=0.5,
            attack_s=0.8,
            attack_settle_s=0.3,
            attack_baseline_s=1.0,
            memory_mails=2000,
            memory_settle_s=1.0,
            compose_mails=300,
        )

    @classmethod
    def full(cls) -> Profile:
        return cls(
            repeat=5,
            egress_mails=1500,
            egress_near_mails=300,
            overload_warmup_s=0.5,
            overload_window_s=4.0,
            ingress_levels=(1, 16, 64),
            ingress_warmup_s=0.5,
            ingress_window_s=2.0,
            e2e_burst_mails=1000,
            e2e_slow_burst_mails=250,
            e2e_paced_s=3.0,
            e2e_paced_fraction=0.5,
        )


@attrs.frozen
class TlsFiles:
    """A throwaway CA and a certificate for 127.0.0.1, as PEM files the children can read."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        ca = trustme.CA(organization_name="trio-mailer bench (throwaway)")
        cert = ca.issue_cert("127.0.0.1", "localhost")
        files = cls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
        ca.cert_pem.write_to_path(str(files.ca_file))
        cert.private_key_pem.write_to_path(str(files.key_file))
        with files.cert_file.open("wb") as out:
            for blob in cert.cert_chain_pems:
                out.write(blob.bytes())
        return files

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context, as the service builds it (``make_relay_ssl_context``)."""
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=str(self.ca_file))
        return context


def child_env(**overrides: str) -> dict[str, str]:
    """Our environment without MAILER_* leftovers or proxies, plus ``overrides``.

    grpcio honours ``http_proxy``; a loopback benchmark must never go through one.
    """
    proxies = {"http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_") and k not in proxies}
    env["no_grpc_proxy"] = "*"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads), from /proc.

    Raises:
        BenchError: the process is gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the CPU time of process {pid}: {exc}") from exc
    # The command name (field 2) may hold spaces; the fields after its ")" are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLOCK_TICKS_PER_S
