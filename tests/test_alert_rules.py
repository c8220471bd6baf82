"""deploy/alerts.yml: promtool accepts the rules and their unit tests (deploy/alerts_test.yml,
each alert firing and not firing), and every metric, label and label value the rules and their
test series name is in a real scrape of the service, so a renamed metric fails here instead of
silencing an alert in production."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import attrs
import purerpc
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_mailer.v1.mailer_pb2 import MsgRequest

from .helpers import http_get

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "alerts.yml"
RULE_TESTS = DEPLOY / "alerts_test.yml"
TOKEN = "alert-rules-test-token-123456"

PROMTOOL = shutil.which("promtool")
REQUIRE_PROMTOOL = bool(
    os.environ.get("TRIO_MAILER_TEST_REQUIRE_PROMTOOL") or os.environ.get("CI") == "true"
)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not REQUIRE_PROMTOOL,
    reason="promtool not installed (Debian: apt-get install prometheus; .ci/run does)",
)

# Series Prometheus makes itself, not the service.
SYNTHETIC = frozenset({"up"})
# Target labels Prometheus adds at scrape time, and the histogram's bucket label.
ADDED_LABELS = frozenset({"job", "instance", "le"})
PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "without", "by", "on", "ignoring"}
)

Scrape = dict[str, list[dict[str, str]]]  # sample name -> the label sets it has


@attrs.frozen
class Alert:
    name: str
    expr: str
    wait: str  # its for:
    severity: str
    summary: str
    description: str


def field(block: str, key: str) -> str:
    """``key``'s value in a block of YAML: a plain or quoted scalar on its line, or a folded
    one (``>-``) on the more indented lines below it, joined by spaces. (The test extra has no
    YAML library; this reads the shapes alerts.yml and alerts_test.yml use.)"""
    match = re.search(rf"^( *){key}: *(.*)$", block, re.MULTILINE)
    assert match is not None, f"no {key}: in {block[:60]!r}"
    indent, value = len(match.group(1)), match.group(2).strip()
    if value not in (">-", ">", "|", "|-"):
        return value.strip("\"'")
    lines = []
    for line in block[match.end() + 1 :].splitlines():
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        lines.append(line.strip())
    return " ".join(line for line in lines if line)


def alerts() -> list[Alert]:
    blocks = re.split(r"^ *- alert: ", RULES.read_text(), flags=re.MULTILINE)[1:]
    return [
        Alert(
            name=block.partition("\n")[0].strip(),
            expr=field(block, "expr"),
            wait=field(block, "for"),
            severity=field(block, "severity"),
            summary=field(block, "summary"),
            description=field(block, "description"),
        )
        for block in blocks
    ]


def input_series() -> list[str]:
    """The input series of alerts_test.yml."""
    return re.findall(r"^ *- series: '([^']*)'$", RULE_TESTS.read_text(), re.MULTILINE)


def alert_checks() -> list[tuple[str, bool]]:
    """Each check of alerts_test.yml: the alert's name, and whether alerts are expected."""
    checks = re.findall(
        r"^ *alertname: (\w+)\n *exp_alerts:(.*)$", RULE_TESTS.read_text(), re.MULTILINE
    )
    return [(name, rest.strip() != "[]") for name, rest in checks]


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Each metric an expression selects, with its matchers ``(label, op, value)``.

    A small reader of PromQL for the shapes in alerts.yml: grouping and matching clauses'
    label lists, range durations, strings and function names are left out."""
    expr = re.sub(r"\b(without|by|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, braces, call = match.groups()
        if call or name.lower() in PROMQL_WORDS:
            continue
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces or "")
        found.append((name, matchers))
    return found


def test_the_selector_reader_finds_names_and_matchers() -> None:
    expr = (
        'sum without(reason) (rate(a_total{x="1", y=~"p|q"}[5m])) / on(job) b == 0 '
        "and ignoring(result) histogram_quantile(0.9, c_bucket) > 5"
    )
    assert selectors(expr) == [
        ("a_total", [("x", "=", "1"), ("y", "=~", "p|q")]),
        ("b", []),
        ("c_bucket", []),
    ]


def test_the_readers_of_the_two_files_find_everything() -> None:
    rules = alerts()
    assert len(rules) == RULES.read_text().count("- alert: ") >= 6
    assert all(rule.expr and rule.wait for rule in rules)
    assert len(input_series()) == RULE_TESTS.read_text().count("- series: ")
    assert len(alert_checks()) == RULE_TESTS.read_text().count("alertname: ")


def test_every_alert_pages_with_a_severity_a_wait_and_what_to_do() -> None:
    rules = alerts()
    names = [rule.name for rule in rules]
    assert len(set(names)) == len(names)
    readme = (ROOT / "README.md").read_text()
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule.wait), rule.name
        assert rule.severity in {"critical", "warning"}, rule.name
        assert rule.summary and len(rule.description) > 80, rule.name
        assert f"`{rule.name}`" in readme, f"the README's Alerts table lacks {rule.name}"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """alerts_test.yml expects each alert at some time, and no alert of that name at another."""
    checks = alert_checks()
    fired = {name for name, expected in checks if expected}
    silent = {name for name, expected in checks if not expected}
    names = {rule.name for rule in alerts()}
    assert (fired, silent) == (names, names)


def test_prometheus_loads_the_rules() -> None:
    config = (DEPLOY / "prometheus.yml").read_text()
    files = re.search(r"^rule_files:\n((?: +- .*\n)+)", config, re.MULTILINE)
    assert files is not None
    paths = [line.strip().removeprefix("- ") for line in files.group(1).splitlines()]
    assert [(DEPLOY / path).resolve() for path in paths] == [RULES]


def run_promtool(*args: str) -> None:
    assert PROMTOOL is not None, "promtool is required here (CI) but missing"
    result = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    run_promtool("check", "rules", str(RULES))


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    run_promtool("test", "rules", str(RULE_TESTS))


async def scrape_a_busy_service(start_harness, tmp_path: Path) -> Scrape:
    """A scrape after a delivered mail and a refused call, so the labelled histograms that
    have no series before their first observation have one."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    env = {"MAILER_METRICS_PORT": "0", "MAILER_AUTH_TOKENS_FILE": str(tokens)}
    with trio.fail_after(30):
        async with start_harness(env=env) as h:
            auth = [("authorization", f"Bearer {TOKEN}")]
            await h.stub.SendPass(MsgRequest(to="user@example.com", code="1"), metadata=auth)
            with pytest.raises(purerpc.RpcFailedError):
                await h.stub.SendPass(MsgRequest(to="user@example.com", code="2"))
            await h.wait_finished(1)
            assert h.app.metrics_port is not None
            status, _headers, body = await http_get(h.app.metrics_port, "/metrics")
    assert status == "HTTP/1.1 200 OK"
    samples: Scrape = defaultdict(list)
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[sample.name].append(sample.labels)
    return samples


async def test_every_metric_label_and_value_the_rules_use_is_served(
    start_harness, tmp_path: Path
) -> None:
    samples = await scrape_a_busy_service(start_harness, tmp_path)
    used = [
        (rule.name, name, matchers) for rule in alerts() for name, matchers in selectors(rule.expr)
    ]
    assert {name for _alert, name, _matchers in used} >= {"trio_mailer_health_serving"}
    for alert, name, matchers in used:
        if name in SYNTHETIC:
            continue
        assert name in samples, f"{alert}: no {name} in the scrape"
        for label, op, value in matchers:
            if label in ADDED_LABELS:
                continue
            values = {labels[label] for labels in samples[name] if label in labels}
            assert values, f"{alert}: {name} has no label {label}"
            if op == "=":
                assert value in values, f"{alert}: {name} never has {label}={value!r}"
            elif op == "=~":
                assert any(re.fullmatch(value, v) for v in values), (alert, name, label, value)


async def test_the_unit_tests_series_are_the_services_metrics_and_labels(
    start_harness, tmp_path: Path
) -> None:
    """alerts_test.yml feeds series with the names and label names the service serves (values
    like a relay's host:port are the test's own)."""
    samples = await scrape_a_busy_service(start_harness, tmp_path)
    for series in input_series():
        [(name, matchers)] = selectors(series)
        if name in SYNTHETIC:
            continue
        assert name in samples, f"alerts_test.yml feeds {name}, which the service lacks"
        served = {label for labels in samples[name] for label in labels}
        fed = {label for label, _op, _value in matchers} - ADDED_LABELS
        assert fed <= served, (name, fed - served)


async def test_the_health_gauge_follows_the_health_status(start_harness, free_port: int) -> None:
    """``trio_mailer_health_serving`` (the NOT_SERVING alert's input) is 1 once the relay check
    passed, 0 while the relay has never been reached."""

    async def health_serving(relay_env: dict[str, str]) -> float:
        env = {"MAILER_METRICS_PORT": "0", "MAILER_SHUTDOWN_GRACE_S": "0", **relay_env}
        async with start_harness(env=env) as h:
            assert h.app.metrics_port is not None
            _status, _headers, body = await http_get(h.app.metrics_port, "/metrics")
        [family] = [
            f
            for f in text_string_to_metric_families(body)
            if f.name == "trio_mailer_health_serving"
        ]
        [sample] = family.samples
        return sample.value

    with trio.fail_after(30):
        assert await health_serving({}) == 1.0
        assert await health_serving({"MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}"}) == 0.0
