"""Configuration: the ``MAILER_*`` environment variables, parsed into one frozen object.

Pure. ``SETTINGS`` is the one table of every variable: its name, the ``Config`` field it fills,
its default, the converter that checks it (and says what was expected), and what it means. A
default lives only there: ``Config``'s attribute defaults, ``trio-mailer serve --help`` and the
README's table (checked by a test) all read it. ``load_config`` walks the table in order, runs
each row's cross-field check right after the row, collects every problem, and raises one
``ConfigError`` that lists them all, so an operator fixes a bad deployment in one go.
"""

from __future__ import annotations

import difflib
import enum
import importlib.util
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from trio_mailer.core.caller_auth import TokenSet, is_loopback
from trio_mailer.core.errors import InvalidRequest
from trio_mailer.core.load_shedding import REFUSAL_WAIT_S, REFUSALS_PER_S
from trio_mailer.core.mail_lifecycle import default_outbox_path
from trio_mailer.core.rate_limits import RateLimit
from trio_mailer.core.rendering import DEFAULT_LOCALE, validate_locale
from trio_mailer.core.validation import reject_unsafe_header_text, validate_address

T = TypeVar("T")

MAX_SERVICE_NAME_CHARS = 64
MAX_QUEUE_SIZE = 100_000
MAX_SMTP_SESSIONS = 64


class TlsMode(enum.Enum):
    """How the SMTP session is protected."""

    IMPLICIT = "implicit"  # TLS from the first byte (port 465, RFC 8314)
    STARTTLS = "starttls"  # plaintext greeting, then STARTTLS is required (port 587)
    NONE = "none"  # plaintext: only when the operator sets it explicitly

    @property
    def default_port(self) -> int:
        return {TlsMode.IMPLICIT: 465, TlsMode.STARTTLS: 587, TlsMode.NONE: 25}[self]


class ConfigError(Exception):
    """Start-up configuration is unusable; ``problems`` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {problem}" for problem in problems)
        )
        self.problems = problems


def shipped_templates_dir(package_dir: Path | None = None) -> Path:
    """The templates shipped with the package, wherever it was installed from.

    A wheel carries them as ``trio_mailer/templates`` (hatchling ``force-include``); a source
    checkout (editable install, or running from the tree) has them at the top level.

    Args:
        package_dir: the ``trio_mailer`` directory (default: this package's).
    """
    if package_dir is None:
        package_dir = Path(__file__).resolve().parent.parent  # trio_mailer/
    installed = package_dir / "templates"
    if installed.is_dir():
        return installed
    return package_dir.parent / "templates"


# --- converters: each raises ValueError saying what was expected -------------------------------


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}") from None
        if not low <= number <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return number

    return convert


def _seconds(low: float, high: float, *, low_inclusive: bool) -> Callable[[str], float]:
    bound = f"{'at least' if low_inclusive else 'more than'} {low:g} and at most {high:g}"

    def convert(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"expected a number of seconds, {bound}") from None
        too_low = number < low if low_inclusive else number <= low
        if not math.isfinite(number) or too_low or number > high:
            raise ValueError(f"expected a number of seconds, {bound}")
        return number

    return convert


def _per_second(high: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0 or number > high:
            raise ValueError(f"expected a number per second, at least 0 and at most {high:g}")
        return number

    return convert


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0")


def _one_of(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text.lower()

    return convert


def _tls_mode(text: str) -> TlsMode:
    try:
        return TlsMode(text.lower())
    except ValueError:
        raise ValueError("expected one of implicit, starttls, none") from None


def parse_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host[:port]`` or ``[v6addr][:port]``.

    Raises:
        ValueError: with a message saying what was expected.
    """
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError("expected [IPv6]:port, the ']' is missing")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected [IPv6]:port")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError("expected host:port (write an IPv6 address as [addr]:port)")
    if not host or any(c.isspace() for c in host) or "/" in host or "@" in host:
        raise ValueError("expected host:port with a host name or address")
    if port_text is None:
        if default_port is None:
            raise ValueError("expected host:port, the port is missing")
        return host, default_port
    try:
        return host, _int_in(1, 65535)(port_text)
    except ValueError:
        raise ValueError("expected host:port, the port a whole number from 1 to 65535") from None


def _readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError("expected a readable file")
    return path


def _directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise ValueError("expected a directory")
    return path


def _text(text: str) -> str:
    return text


def _locale(text: str) -> str:
    try:
        return validate_locale("MAILER_DEFAULT_LOCALE", text)
    except InvalidRequest as exc:
        raise _Refused(exc.message) from None


def _service_name(text: str) -> str:
    try:
        reject_unsafe_header_text("MAILER_SERVICENAME", text)
    except InvalidRequest as exc:
        raise _Refused(exc.message) from None
    if len(text) > MAX_SERVICE_NAME_CHARS:
        raise _Refused(
            f"MAILER_SERVICENAME: expected at most {MAX_SERVICE_NAME_CHARS} characters, "
            f"got {len(text)}"
        )
    return text


def _mail_from(text: str) -> str:
    try:
        validate_address("MAILER_FROM", text)
    except InvalidRequest as exc:
        raise _Refused(exc.message) from None
    return text


def _token_file(text: str) -> TokenSet:
    path = Path(text)
    try:
        return TokenSet.parse(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _Refused(
            f"MAILER_AUTH_TOKENS_FILE: cannot read {str(path)!r}: {exc.strerror}"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Refused(f"MAILER_AUTH_TOKENS_FILE: {exc}") from None


@attrs.frozen
class DatabaseUrl:
    """A libpq connection URI (``postgresql://`` or ``postgres://``): the shared outbox."""

    url: str = attrs.field(repr=False)

    def masked(self) -> str:
        """The URI with its password as ``***`` (for logs)."""
        masked = re.sub(r"^(postgres(?:ql)?://[^:/@?#]*):[^@/?#]*@", r"\1:***@", self.url)
        return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", masked)

    def __str__(self) -> str:
        return self.masked()


POSTGRES_EXTRA_MODULES = ("psycopg", "psycopg_pool")
"""What ``pip install 'trio-mailer[postgres]'`` adds (found, not imported: the core stays pure)."""


def postgres_extra_installed() -> bool:
    try:
        return all(importlib.util.find_spec(name) for name in POSTGRES_EXTRA_MODULES)
    except ImportError:  # a finder that refuses the name
        return False


def _outbox(text: str) -> Path | DatabaseUrl | None:
    if text.lower() == "memory":
        return None
    if text.startswith(("postgresql://", "postgres://")):
        if not postgres_extra_installed():
            scheme = text.partition("://")[0]
            raise _Refused(
                f"MAILER_OUTBOX={scheme}://...: needs the PostgreSQL extra: "
                "pip install 'trio-mailer[postgres]'"
            )
        return DatabaseUrl(text)
    path = Path(text)
    if path.exists() and not path.is_file():
        raise ValueError("expected a file")
    return path


class _Refused(ValueError):
    """A converter's complete problem line (it names the variable itself, without "got")."""


_UNSET: Any = object()  # a default computed by the row's check (it depends on other values)


@attrs.frozen
class Setting:
    """One row of the table: a ``MAILER_*`` variable."""

    env: str
    field: str  # the Config attribute it fills ("" when a check derives the attributes)
    default: Any  # used when the variable is unset or blank
    convert: Callable[[str], Any]
    meaning: str
    required: str | None = None  # what to ask for when it is missing; None: optional
    strip: bool = True  # passwords are taken verbatim: a space may belong to them
    check: Callable[[dict[str, Any], Mapping[str, str]], str | None] | None = None

    @property
    def default_text(self) -> str:
        """The default as the README and ``--help`` show it."""
        if self.required is not None:
            return "required"
        if self.default is None or self.default is _UNSET:
            return "unset"
        if isinstance(self.default, bool):
            return "1" if self.default else "0"
        if isinstance(self.default, enum.Enum):
            return str(self.default.value)
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


# --- cross-field checks: each runs right after its row, sees the values read so far -------------


def _check_remote(values: dict[str, Any], _env: Mapping[str, str]) -> str | None:
    tls: TlsMode = values["smtp_tls"]
    remote = values.pop("remote_host")
    if remote is None:
        return None  # reported as required
    relays = []
    for part in remote.split(","):
        try:
            relays.append(parse_host_port(part.strip(), tls.default_port))
        except ValueError as exc:
            return f"MAILER_REMOTE_HOST: {exc}, got {part.strip()!r}"
    values["relays"] = tuple(relays)
    values["relay_host"], values["relay_port"] = relays[0]
    return None


def _check_credentials(values: dict[str, Any], _env: Mapping[str, str]) -> str | None:
    user, password = values["smtp_user"], values["smtp_password"]
    if (user is None) != (password is None):
        return (
            "MAILER_USER and MAILER_PASSWORD: set both (AUTH) or neither (no AUTH), "
            f"got only {'MAILER_USER' if user else 'MAILER_PASSWORD'}"
        )
    return None


def _check_retry_max(values: dict[str, Any], _env: Mapping[str, str]) -> str | None:
    if values["retry_max_s"] < values["retry_base_s"]:
        return (
            f"MAILER_RETRY_MAX_S: expected at least MAILER_RETRY_BASE_S "
            f"({values['retry_base_s']:g}), got {values['retry_max_s']:g}"
        )
    return None


def _check_sessions(values: dict[str, Any], _env: Mapping[str, str]) -> str | None:
    if values["smtp_sessions"] > values["retry_capacity"]:
        return (
            "MAILER_SMTP_SESSIONS: expected at most MAILER_RETRY_CAPACITY "
            f"({values['retry_capacity']}), since every session holds one mail in flight, "
            f"got {values['smtp_sessions']}"
        )
    return None


def _check_grpc_tls(values: dict[str, Any], _env: Mapping[str, str]) -> str | None:
    cert, key = values["tls_cert"], values["tls_key"]
    if (cert is None) != (key is None):
        return (
            "MAILER_TLS_CERT and MAILER_TLS_KEY: set both (TLS on the gRPC port) or neither, "
            f"got only {'MAILER_TLS_CERT' if cert else 'MAILER_TLS_KEY'}"
        )
    return None


def _check_client_ca(values: dict[str, Any], _env: Mapping[str, str]) -> str | None:
    if values["tls_client_ca"] is not None and values["tls_cert"] is None:
        return "MAILER_TLS_CLIENT_CA: needs MAILER_TLS_CERT and MAILER_TLS_KEY"
    return None


def _check_exposure(values: dict[str, Any], env: Mapping[str, str]) -> str | None:
    host = values["serve_host"]
    tokens_set = (env.get("MAILER_AUTH_TOKENS_FILE") or "").strip() != ""
    if (
        not is_loopback(host)
        and values["tls_client_ca"] is None
        and not tokens_set
        and not values["allow_unauthenticated"]
    ):
        return (
            f"MAILER_SERVE_HOST: {host} is reachable from other machines, but no caller "
            "authentication is set up: set MAILER_AUTH_TOKENS_FILE or MAILER_TLS_CLIENT_CA, or "
            "MAILER_ALLOW_UNAUTHENTICATED=1 if you mean it"
        )
    return None


def _check_outbox(values: dict[str, Any], env: Mapping[str, str]) -> str | None:
    if isinstance(values["outbox_path"], DatabaseUrl):
        values["outbox_url"], values["outbox_path"] = values["outbox_path"], None
    if values["outbox_path"] is not _UNSET:
        return None
    try:
        values["outbox_path"] = default_outbox_path(env)
    except ValueError as exc:
        return f"MAILER_OUTBOX: no default location: {exc}"
    return None


def _seconds_between(low: float, high: float) -> Callable[[str], float]:
    return _seconds(low, high, low_inclusive=False)


def _seconds_from(low: float, high: float) -> Callable[[str], float]:
    return _seconds(low, high, low_inclusive=True)


DAY_S = 86400.0

SETTINGS: tuple[Setting, ...] = (
    Setting("MAILER_SMTP_TLS", "smtp_tls", TlsMode.IMPLICIT, _tls_mode,
            "implicit (TLS from the first byte), starttls (required), or none (plaintext)"),
    Setting("MAILER_REMOTE_HOST", "remote_host", None, _text,
            "the SMTP relay, host:port ([v6addr]:port); without a port: 465, 587 or 25 by TLS "
            "mode; several, comma-separated, are tried in order",
            required="the SMTP relay as host:port", check=_check_remote),
    Setting("MAILER_FROM", "mail_from", None, _mail_from,
            "the sender address (envelope and From:)",
            required="the sender address, e.g. noreply@example.com"),
    Setting("MAILER_SERVICENAME", "service_name", "trio-mailer", _service_name,
            "display name in From:, and service_name in templates"),
    Setting("MAILER_USER", "smtp_user", None, _text, "SMTP AUTH user (with MAILER_PASSWORD)",
            strip=False),
    Setting("MAILER_PASSWORD", "smtp_password", None, _text,
            "SMTP AUTH password (with MAILER_USER); never logged", strip=False,
            check=_check_credentials),
    Setting("MAILER_SMTP_CA_FILE", "smtp_ca_file", None, _readable_file,
            "an extra CA bundle (PEM) to trust for the relay's certificate"),
    Setting("MAILER_TEMPLATES_DIR", "templates_dir", _UNSET, _directory,
            "a directory with the mail templates (default: the shipped ones)"),
    Setting("MAILER_DEFAULT_LOCALE", "default_locale", DEFAULT_LOCALE, _locale,
            "the language of mail/<name>.msg, and the last locale fallback"),
    Setting("MAILER_SMTP_TIMEOUT_S", "smtp_timeout_s", 30.0, _seconds_between(0, 3600),
            "timeout of each SMTP socket operation"),
    Setting("MAILER_SERVE_HOST", "serve_host", "127.0.0.1", _text,
            "the address the gRPC listener binds"),
    Setting("MAILER_SERVE_PORT", "serve_port", 20100, _int_in(0, 65535),
            "the gRPC port (0: any free port)"),
    Setting("MAILER_QUEUE_SIZE", "queue_size", 10, _int_in(1, MAX_QUEUE_SIZE),
            "accepted mails that may wait for the sender"),
    Setting("MAILER_SHUTDOWN_GRACE_S", "shutdown_grace_s", 10.0, _seconds_from(0, 3600),
            "how long shutdown waits for queued mail"),
    Setting("MAILER_RETRY_BASE_S", "retry_base_s", 1.0, _seconds_between(0, 3600),
            "first retry and reconnect delay"),
    Setting("MAILER_RETRY_MAX_S", "retry_max_s", 60.0, _seconds_between(0, DAY_S),
            "cap on retry and reconnect delays", check=_check_retry_max),
    Setting("MAILER_MAX_ATTEMPTS", "max_attempts", 1000, _int_in(1, 1_000_000),
            "upper bound on attempts per mail; the time to live decides first"),
    Setting("MAILER_MESSAGE_TTL_S", "message_ttl_s", 600.0, _seconds_between(0, 7 * DAY_S),
            "a mail not delivered this long after acceptance is reported failed"),
    Setting("MAILER_RETRY_CAPACITY", "retry_capacity", 100, _int_in(1, MAX_QUEUE_SIZE),
            "mails that may wait for a retry or be in flight"),
    Setting("MAILER_SMTP_SESSIONS", "smtp_sessions", 1, _int_in(1, MAX_SMTP_SESSIONS),
            "SMTP sessions in the pool", check=_check_sessions),
    Setting("MAILER_NOOP_IDLE_S", "noop_idle_s", 1.0, _seconds_from(0, 3600),
            "probe a session with NOOP when it sat idle this long (0: before every mail)"),
    Setting("MAILER_SESSION_MAX_MESSAGES", "session_max_messages", 100, _int_in(1, 1_000_000),
            "recycle a session after this many mails"),
    Setting("MAILER_SESSION_MAX_AGE_S", "session_max_age_s", 300.0, _seconds_between(0, DAY_S),
            "recycle a session after this long"),
    Setting("MAILER_TLS_CERT", "tls_cert", None, _readable_file,
            "serve gRPC over TLS with this certificate (with MAILER_TLS_KEY)"),
    Setting("MAILER_TLS_KEY", "tls_key", None, _readable_file,
            "the private key for MAILER_TLS_CERT", check=_check_grpc_tls),
    Setting("MAILER_TLS_CLIENT_CA", "tls_client_ca", None, _readable_file,
            "require client certificates signed by this CA", check=_check_client_ca),
    Setting("MAILER_AUTH_TOKENS_FILE", "auth_tokens", None, _token_file,
            "require authorization: Bearer <token>; one token or sha256:<hex> per line"),
    Setting("MAILER_AUTH_ALL_SERVICES", "auth_all_services", False, _flag,
            "1: health checks and reflection need a token too"),
    Setting("MAILER_ALLOW_UNAUTHENTICATED", "allow_unauthenticated", False, _flag,
            "1: allow binding beyond loopback without caller authentication",
            check=_check_exposure),
    Setting("MAILER_METRICS_PORT", "metrics_port", None, _int_in(0, 65535),
            "serve Prometheus metrics on this port"),
    Setting("MAILER_METRICS_HOST", "metrics_host", "127.0.0.1", _text,
            "the metrics listener's address"),
    Setting("MAILER_LOG_FORMAT", "log_format", "text", _one_of("text", "json"),
            "text or json (one object per line)"),
    Setting("MAILER_HEALTH_DOWN_AFTER_S", "health_down_after_s", 30.0, _seconds_from(0, DAY_S),
            "how long the relay may be unreachable before health turns NOT_SERVING"),
    Setting("MAILER_OUTBOX", "outbox_path", _UNSET, _outbox,
            "the durable outbox file, memory, or postgresql://... (shared by replicas)",
            check=_check_outbox),
    Setting("MAILER_LEASE_S", "lease_s", 30.0, _seconds_between(0, 3600),
            "PostgreSQL outbox: how long a replica's claim on its mail stands unrenewed"),
    Setting("MAILER_DB_POOL_SIZE", "db_pool_size", 10, _int_in(2, 1000),
            "PostgreSQL outbox: connections per replica"),
    Setting("MAILER_DB_TIMEOUT_S", "db_timeout_s", 5.0, _seconds_between(0, 600),
            "PostgreSQL outbox: statement, connect and pool-wait timeout; no answer 1 s after it "
            "is a stalled network (the call fails, the connection is dropped)"),
    Setting("MAILER_STATUS_RETENTION_S", "status_retention_s", DAY_S,
            _seconds_between(0, 365 * DAY_S), "how long a finished mail's status stays queryable"),
    Setting("MAILER_MAX_CONNECTIONS", "max_connections", 500, _int_in(1, 100_000),
            "gRPC connections served at once; one beyond it is closed when accepted"),
    Setting("MAILER_GRPC_IDLE_TIMEOUT_S", "grpc_idle_timeout_s", 300.0,
            _seconds_between(0, DAY_S), "a gRPC connection without a call is closed after this"),
    Setting("MAILER_REFUSALS_PER_S", "refusals_per_s", REFUSALS_PER_S, _per_second(1e6),
            "queue full: send calls refused per second at most; the others wait their turn "
            "(0: refuse at once)"),
    Setting("MAILER_REFUSAL_WAIT_S", "refusal_wait_s", REFUSAL_WAIT_S, _seconds_from(0, 60),
            "queue full: the longest a send call waits for its turn to be refused"),
    Setting("MAILER_IDEMPOTENCY_WINDOW_S", "idempotency_window_s", DAY_S,
            _seconds_between(0, 30 * DAY_S),
            "how long an idempotency_key answers a repeat with the first reply"),
    Setting("MAILER_RECIPIENT_LIMIT", "recipient_limit", RateLimit(5, 600.0), RateLimit.parse,
            "at most COUNT accepted mails per recipient in SECONDS (COUNT/SECONDS; 0: off)"),
    Setting("MAILER_CALLER_LIMIT", "caller_limit", None, RateLimit.parse,
            "at most COUNT accepted mails per caller identity in SECONDS (e.g. 100/1; 0: off)"),
    Setting("MAILER_SUPPRESS_S", "suppress_s", 7 * DAY_S, _seconds_from(0, 365 * DAY_S),
            "how long an address the relay called dead is refused (0: off)"),
)  # fmt: skip

_BY_FIELD = {setting.field: setting for setting in SETTINGS}


def default(field: str) -> Any:
    """The default of the ``Config`` field ``field``: the one place defaults are written."""
    return _BY_FIELD[field].default


@attrs.frozen
class Config:
    relay_host: str  # the first relay
    relay_port: int
    mail_from: str
    relays: tuple[tuple[str, int], ...] = ()  # every relay, in order; () means just the first
    smtp_tls: TlsMode = default("smtp_tls")
    service_name: str = default("service_name")
    smtp_user: str | None = default("smtp_user")
    smtp_password: str | None = attrs.field(default=default("smtp_password"), repr=False)
    smtp_ca_file: Path | None = default("smtp_ca_file")
    smtp_timeout_s: float = default("smtp_timeout_s")
    serve_host: str = default("serve_host")
    serve_port: int = default("serve_port")
    queue_size: int = default("queue_size")
    templates_dir: Path = attrs.field(factory=shipped_templates_dir)
    default_locale: str = default("default_locale")
    shutdown_grace_s: float = default("shutdown_grace_s")
    retry_base_s: float = default("retry_base_s")
    retry_max_s: float = default("retry_max_s")
    max_attempts: int = default("max_attempts")
    message_ttl_s: float = default("message_ttl_s")
    retry_capacity: int = default("retry_capacity")
    smtp_sessions: int = default("smtp_sessions")
    noop_idle_s: float = default("noop_idle_s")
    session_max_messages: int = default("session_max_messages")
    session_max_age_s: float = default("session_max_age_s")
    tls_cert: Path | None = default("tls_cert")
    tls_key: Path | None = default("tls_key")
    tls_client_ca: Path | None = default("tls_client_ca")
    auth_tokens: TokenSet | None = default("auth_tokens")
    auth_all_services: bool = default("auth_all_services")
    allow_unauthenticated: bool = default("allow_unauthenticated")
    metrics_port: int | None = default("metrics_port")
    metrics_host: str = default("metrics_host")
    log_format: str = default("log_format")
    health_down_after_s: float = default("health_down_after_s")
    outbox_path: Path | None = None  # None: the in-memory outbox (MAILER_OUTBOX=memory)
    outbox_url: DatabaseUrl | None = None  # set: the shared PostgreSQL outbox (not the file)
    lease_s: float = default("lease_s")
    db_pool_size: int = default("db_pool_size")
    db_timeout_s: float = default("db_timeout_s")
    status_retention_s: float = default("status_retention_s")
    max_connections: int = default("max_connections")
    grpc_idle_timeout_s: float = default("grpc_idle_timeout_s")
    refusals_per_s: float = default("refusals_per_s")
    refusal_wait_s: float = default("refusal_wait_s")
    idempotency_window_s: float = default("idempotency_window_s")
    recipient_limit: RateLimit | None = default("recipient_limit")
    caller_limit: RateLimit | None = default("caller_limit")
    suppress_s: float = default("suppress_s")

    @property
    def relay_list(self) -> tuple[tuple[str, int], ...]:
        """Every relay as (host, port), in the order they are tried."""
        return self.relays or ((self.relay_host, self.relay_port),)

    def describe(self) -> str:
        """The effective configuration for the start-up log line, without secrets."""
        auth = f"user={self.smtp_user!r} password=***" if self.smtp_user else "no AUTH"
        relays = ",".join(f"{host}:{port}" for host, port in self.relay_list)
        return (
            f"relay={relays} tls={self.smtp_tls.value} {auth} "
            f"ca_file={self.smtp_ca_file or 'system store'} from={self.mail_from} "
            f"service_name={self.service_name!r} listen={self.serve_host}:{self.serve_port} "
            f"queue_size={self.queue_size} smtp_timeout_s={self.smtp_timeout_s:g} "
            f"shutdown_grace_s={self.shutdown_grace_s:g} templates={self.templates_dir} "
            f"default_locale={self.default_locale} "
            f"retry_base_s={self.retry_base_s:g} retry_max_s={self.retry_max_s:g} "
            f"max_attempts={self.max_attempts} message_ttl_s={self.message_ttl_s:g} "
            f"retry_capacity={self.retry_capacity} smtp_sessions={self.smtp_sessions} "
            f"noop_idle_s={self.noop_idle_s:g} session_max_messages={self.session_max_messages} "
            f"session_max_age_s={self.session_max_age_s:g} "
            f"grpc_tls={'mTLS' if self.tls_client_ca else 'on' if self.tls_cert else 'off'} "
            f"tokens={len(self.auth_tokens.digests) if self.auth_tokens else 0} "
            f"metrics_port={self.metrics_port or 'off'} log_format={self.log_format} "
            f"outbox={self.outbox_url or self.outbox_path or 'memory'} "
            f"{self._database()}status_retention_s={self.status_retention_s:g} "
            f"max_connections={self.max_connections} "
            f"grpc_idle_timeout_s={self.grpc_idle_timeout_s:g} "
            f"refusals_per_s={self.refusals_per_s:g} refusal_wait_s={self.refusal_wait_s:g} "
            f"idempotency_window_s={self.idempotency_window_s:g} "
            f"recipient_limit={self.recipient_limit or 'off'} "
            f"caller_limit={self.caller_limit or 'off'} suppress_s={self.suppress_s:g}"
        )

    def _database(self) -> str:
        if self.outbox_url is None:
            return ""
        return (
            f"lease_s={self.lease_s:g} db_pool_size={self.db_pool_size} "
            f"db_timeout_s={self.db_timeout_s:g} "
        )


def _read(setting: Setting, env: Mapping[str, str]) -> str | None:
    value = env.get(setting.env)
    if value is None or value.strip() == "":
        return None
    return value.strip() if setting.strip else value


def load_config(env: Mapping[str, str]) -> Config:
    """Build the ``Config`` from environment variables, following ``SETTINGS``.

    Raises:
        ConfigError: listing every missing or invalid variable, in the table's order.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = _read(setting, env)
        value = setting.default
        if text is None and setting.required is not None:
            problems.append(f"{setting.env}: required ({setting.required}), but not set")
        elif text is not None:
            try:
                value = setting.convert(text)
            except _Refused as exc:
                problems.append(str(exc))
            except ValueError as exc:
                problems.append(f"{setting.env}: {exc}, got {text!r}")
        values[setting.field] = value
        if setting.check is not None:
            problem = setting.check(values, env)
            if problem is not None:
                problems.append(problem)
    if values["templates_dir"] is _UNSET:
        values["templates_dir"] = shipped_templates_dir()
    if problems:
        raise ConfigError(problems)
    return Config(**values)


# Read by the client commands (``send``, ``status``, ...), not by the service.
CLIENT_VARIABLES = ("MAILER_TOKEN",)
_PREFIX = "MAILER_"


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each ``MAILER_*`` variable in ``env`` that nothing reads, naming the
    closest known name (difflib, on the part after ``MAILER_``): a misspelt ``MAILER_FORM``
    would otherwise pass in silence."""
    known = [setting.env for setting in SETTINGS] + list(CLIENT_VARIABLES)
    suffixes = {name.removeprefix(_PREFIX): name for name in known}
    warnings = []
    for name in sorted(env):
        if not name.startswith(_PREFIX) or name in known:
            continue
        close = next(iter(difflib.get_close_matches(name.removeprefix(_PREFIX), suffixes)), None)
        hint = "" if close is None else f" (did you mean {suffixes[close]}?)"
        tail = " (trio-mailer serve --help lists them all)" if close is None else ""
        warnings.append(f"{name} is not a trio-mailer setting{hint}; it is ignored{tail}")
    return warnings
