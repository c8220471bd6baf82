"""Mutation testing of the pure core: does a small wrong change to the code make a test fail?

Run by hand, not in CI (a full run takes some minutes on two cores):

    .venv/bin/python tools/mutate.py                 # every module of trio_mailer/core/
    .venv/bin/python tools/mutate.py caller_auth     # one module (or several)
    .venv/bin/python tools/mutate.py --list config   # only list the mutants

How it works
------------
For one module at a time, the source is parsed and every *mutant* is enumerated: one small change
at one place (operators below). Each mutant runs in a forked child of a process that has already
imported pytest and the third-party libraries but no ``trio_mailer`` module: the child compiles the
mutated source in place of the module (same file name, so tracebacks read normally), then runs
the module's test files (``TESTS``) with ``pytest -x``. A failing test *kills* the mutant; a child
that runs past ``--timeout-s`` (a mutated loop bound) counts as killed too. A mutant every test
survives is a gap: either a missing test, or an *equivalent* mutant (one that behaves exactly
like the original). The equivalent ones found so far are listed in ``EQUIVALENT`` with the reason,
matched by module, source line text and change (so they survive unrelated edits that move lines);
they are left out of the score and printed at the end.

The score per module is killed / (mutants - equivalent). The house rule: at least 90%.

Operators: if/while/ternary conditions negated; comparisons flipped and boundaries moved (<
to <= and >=, == to !=, in to not in, is to is not); and/or swapped; + - * / // % | & swapped;
unary not and minus removed; integer constants +1 and -1; True/False swapped; string constants
replaced (non-empty to "", empty to "XX"); ``return x`` to ``return None``; statements deleted
(calls, assignments, raise, continue, break). Not mutated: docstrings, annotations, imports,
``__all__``, f-strings, and ``assert`` statements (they narrow types).

Why not a maintained tool (tried for issue 23 on this machine, two cores under load)
------------------------------------------------------------------------------------
- mutmut 3.8.1 runs (``[tool.mutmut]`` with ``only_mutate``, ``also_copy`` for templates/,
  README.md, protos/ and client/, ``--noconftest``) and is fast: grpc_deadline 20 mutants in
  11 s (this tool: 31 in 50 s), the whole core 2949 in 17 min. But it mutates only inside
  functions, so module-level tables and limits (config's SETTINGS, the regexes, MAX_* constants:
  13 of grpc_deadline's 31 mutants here) are never tested; and its mutants are switched at call
  time, so a function run at import (config's converter factories, ``_seconds(...)`` and the
  like, called while SETTINGS is built) keeps its original behaviour: about 60 false survivors,
  config at 74%. Equivalents can only be excluded a whole line at a time (``# pragma: no
  mutate`` or a regex), not as the (module, line, change) entries of ``EQUIVALENT``.
- cosmic-ray 8.7.0 runs a fresh pytest per mutant: grpc_deadline 79 mutants in 196 s (hours for
  the core), and it mutates annotations (``X | None`` to ``X + None``: 33 of its 34 survivors,
  all equivalent under ``from __future__ import annotations``); exclusions are per line or per
  operator, as with mutmut.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import importlib.util
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "trio_mailer" / "core"

# The test files that exercise each module: plain tests of the core, run without conftest.py
# (so each takes a fraction of a second). A module missing here runs tests/test_<module>.py.
TESTS: dict[str, list[str]] = {
    "addresses": ["tests/test_admission_rules.py"],
    "call_policy": ["tests/test_call_policy.py"],
    "caller_auth": ["tests/test_caller_auth.py"],
    "config": [
        "tests/test_config_checks.py",
        "tests/test_config.py",
        "tests/test_postgres_extra.py",
    ],
    "errors": ["tests/test_errors.py"],
    "grpc_deadline": ["tests/test_mail_lifecycle.py"],
    "health_decision": ["tests/test_health_decision.py"],
    "http2_limits": ["tests/test_http2_limits.py"],
    "idempotency": ["tests/test_admission_rules.py"],
    "load_shedding": ["tests/test_refusal_pacer.py"],
    "mail_lifecycle": [
        "tests/test_mail_lifecycle.py",
        "tests/test_mail_records.py",
        "tests/test_stored_states.py",
    ],
    "message": ["tests/test_message.py"],
    "rate_limits": ["tests/test_admission_rules.py"],
    "rendering": ["tests/test_rendering.py"],
    "retry_policy": ["tests/test_retry_policy.py"],
    "session_policy": ["tests/test_mail_lifecycle.py"],
    "smtp_replies": ["tests/test_smtp_replies.py"],
    "suppression": ["tests/test_admission_rules.py"],
    "validation": ["tests/test_validation.py"],
}
# What a test file in TESTS may not load (checked before a run, in a fresh interpreter): the
# I/O libraries and the service's shell. Such a file belongs to the shell's tests, and under
# --noconftest it would be slow or fail for reasons that have nothing to do with the mutant.
IMPURE = (
    "trio",
    "anyio",
    "purerpc",
    "h2",
    "grpc",
    "smtplib",
    "sqlite3",
    "prometheus_client",
    "trustme",
    "psycopg",
    "trio_mailer.grpc",
    "trio_mailer.store",
    "trio_mailer.delivery",
    "trio_mailer.app",
)

# (module, the source line stripped, the change as printed) -> why the mutant is equivalent.
_DOMAIN_UNREACHABLE = (
    "an address is at most 254 characters, so its domain is at most 252: a domain limit of "
    "252 or more is never what refuses one"
)
EQUIVALENT: dict[tuple[str, str, str], str] = {
    (
        "tls_hello",
        "if len(body) < record_length or len(body) < 4 or body[0] != _CLIENT_HELLO:",
        "4 -> 3",
    ): (
        "a 3-byte body passes on to a hello of at most 2 bytes, whose legacy_session_id "
        "read (hello[34]) raises IndexError: None all the same"
    ),
    ("validation", "MAX_DOMAIN_CHARS = 253", "253 -> 254"): _DOMAIN_UNREACHABLE,
    ("validation", "MAX_DOMAIN_CHARS = 253", "253 -> 252"): _DOMAIN_UNREACHABLE,
    (
        "validation",
        "if len(domain) > MAX_DOMAIN_CHARS or not _DOMAIN.fullmatch(domain):",
        "> -> >=",
    ): _DOMAIN_UNREACHABLE,
    ("smtp_replies", "if 500 <= code < 600:", "500 -> 499"): (
        "code 500 is already past the 4yz branch above; 499 never reaches this line"
    ),
    (
        "call_policy",
        "step = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2.0 ** min(retry, 30))",
        "30 -> 31",
    ): (
        "the exponent's clamp only keeps 2.0 ** retry finite: the cap (1 s from 0.05 s) is "
        "reached by retry 5"
    ),
    (
        "call_policy",
        "step = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2.0 ** min(retry, 30))",
        "30 -> 29",
    ): "as above",
    ("rendering", "plain: jinja2.Template = attrs.field(repr=False)", "False -> True"): (
        "repr only: a variant's repr would show the compiled template; no behaviour reads it"
    ),
    (
        "rendering",
        "escaped: jinja2.Template | None = attrs.field(repr=False)",
        "False -> True",
    ): "repr only, as above",
    (
        "rendering",
        "_variants: Mapping[str, Mapping[str, _Variant]] = attrs.field(repr=False)",
        "False -> True",
    ): "repr only, as above",
    (
        "rendering",
        'common = {"undefined": jinja2.StrictUndefined, "keep_trailing_newline": True}',
        "True -> False",
    ): (
        "only blocks are rendered, and the newline Jinja would strip ends the file, after the "
        "last {% endblock %}: no block's text changes"
    ),
    ("rendering", 'named.add(path.name.split(".", 1)[0])', "1 -> 2"): (
        "the first piece of a split is the same whatever the maximum number of splits"
    ),
    (
        "rendering",
        'problems.append(f"{path}: the same locale as {existing[key].path.name}") / continue',
        "continue statement deleted",
    ): (
        "without it the clashing variant replaces the first, but a problem was recorded, so "
        "load raises TemplateError either way"
    ),
    ("rendering", 'return self._variant(name, "")', "'' -> 'XX'"): (
        "in resolve, for a name with no variants: _variant raises for the unknown name before "
        "it reads the key"
    ),
    ("rendering", 'locale: str = "",', "'' -> 'XX'"): (
        "an unknown locale falls back to the default, so the default argument 'XX' renders the "
        "same mail as ''"
    ),
    ("message", "@functools.lru_cache(maxsize=16)", "16 -> 17"): (
        "the cache of From lines: its size changes only how often one is built again"
    ),
    ("message", "@functools.lru_cache(maxsize=16)", "16 -> 15"): "as above",
    ("message", 'try: / validate_address("to", to)', "'to' -> ''"): (
        "in _is_one_address, the field name goes only into an error that is caught and dropped "
        "(the same line in compose_template is killed)"
    ),
    (
        "http2_limits",
        "last_s: float | None = attrs.field(init=False, default=None)",
        "False -> True",
    ): "only adds an optional constructor argument that no caller passes",
    ("http2_limits", "_continuations: int = 0", "0 -> 1"): (
        "set when a header block starts and read only while one is open"
    ),
    ("http2_limits", "_continuations: int = 0", "0 -> -1"): "as above",
    ("http2_limits", "_block_bytes: int = 0", "0 -> 1"): "as above",
    ("http2_limits", "_block_bytes: int = 0", "0 -> -1"): "as above",
    (
        "http2_limits",
        "view = view[step:] / continue",
        "continue statement deleted",
    ): (
        "without it the loop body goes on to read a frame header from what is left, which is "
        "what the next pass of the loop does (and an empty rest returns None either way)"
    ),
    (
        "http2_limits",
        'wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS',
        "16 -> 15",
    ): (
        "a 16 KiB gzip window instead of 32 KiB: a message inflates to at most 4 KiB, so no "
        "back-reference reaches past 16 KiB (gzip has no window field to check)"
    ),
    ("http2_limits", "out = inflater.decompress(frame.payload, limit_bytes + 1)", "1 -> 2"): (
        "one byte past the limit or two: either is over it"
    ),
    ("http2_limits", "out = inflater.decompress(frame.payload, limit_bytes + 1)", "1 -> 0"): (
        "stopped at the limit, a longer message always leaves input unread (at least its "
        "checksum trailer), which the unconsumed_tail test catches"
    ),
    ("http2_limits", "super().__init__(message)", "expr statement deleted"): (
        "BaseException.__new__ already keeps the arguments, so str() and args are the same "
        "without Exception.__init__"
    ),
    ("smtp_replies", "if 200 <= code < 400:", "200 -> 199"): (
        "a 199 to DATA that passes this test is a protocol error by the last line anyway"
    ),
    ("smtp_replies", "if 200 <= code < 400:", "400 -> 399"): (
        "a 399 to DATA that skips this test is a protocol error by the last line anyway"
    ),
    (
        "rendering",
        'problems.append(f"{path}: does not render with sample values: {exc}") / continue',
        "continue statement deleted",
    ): (
        "the last `continue` of the loop in MailTemplates.load: without it the broken template "
        "is kept too, but a problem was recorded, so load raises TemplateError either way"
    ),
    (
        "message",
        "data: bytes = attrs.field(repr=False)  # the serialized message, CRLF line ends",
        "False -> True",
    ): "repr only: OutgoingMail's repr shows the bytes too; no behaviour reads it",
    (
        "message",
        'self, kind: MailKind, to: str, code: str, now: datetime, *, locale: str = ""',
        "'' -> 'XX'",
    ): "an unknown locale falls back to the default, so the default argument 'XX' "
    "builds the same mail as ''",
    ("message", 'locale: str = "",', "'' -> 'XX'"): "as above, for compose_template's default",
    ("mail_lifecycle", 'state_home = env.get("XDG_STATE_HOME", "")', "'' -> 'XX'"): (
        "a missing variable read as the relative path 'XX' is ignored exactly as '' is"
    ),
    ("mail_lifecycle", 'home = env.get("HOME", "")', "'' -> 'XX'"): (
        "a missing HOME read as the relative path 'XX' is refused exactly as '' is"
    ),
    (
        "rate_limits",
        "if times and times[-1] > at:  # out of order (loaded from the store): keep it sorted",
        "> -> >=",
    ): (
        "a time equal to the newest takes the sorting path instead of a plain append: the "
        "deque comes out the same, already sorted"
    ),
}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int
    line: int
    change: str
    source_line: str
    previous_line: str = ""

    def keys(self) -> list[tuple[str, str, str]]:
        """How EQUIVALENT may name it: by its line, or (for a line as plain as "continue") by
        the line before and its line, joined by " / "."""
        return [
            (self.module, self.source_line, self.change),
            (self.module, f"{self.previous_line} / {self.source_line}", self.change),
        ]

    def equivalence(self) -> str | None:
        """Why it is equivalent, when EQUIVALENT lists it."""
        for key in self.keys():
            if key in EQUIVALENT:
                return EQUIVALENT[key]
        return None


_COMPARE_SWAPS: dict[type[ast.cmpop], list[type[ast.cmpop]]] = {
    ast.Lt: [ast.LtE, ast.GtE],
    ast.LtE: [ast.Lt, ast.Gt],
    ast.Gt: [ast.GtE, ast.LtE],
    ast.GtE: [ast.Gt, ast.Lt],
    ast.Eq: [ast.NotEq],
    ast.NotEq: [ast.Eq],
    ast.In: [ast.NotIn],
    ast.NotIn: [ast.In],
    ast.Is: [ast.IsNot],
    ast.IsNot: [ast.Is],
}
_BINOP_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
}
_DELETABLE = (
    ast.Expr,
    ast.Assign,
    ast.AugAssign,
    ast.AnnAssign,
    ast.Raise,
    ast.Continue,
    ast.Break,
)
_SYMBOLS = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.BitOr: "|",
    ast.BitAnd: "&",
    ast.And: "and",
    ast.Or: "or",
}


def _is_docstring(node: ast.stmt, body: list[ast.stmt]) -> bool:
    return (
        body
        and body[0] is node
        and isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ) or False


def _skipped_subtrees(tree: ast.AST) -> set[int]:
    """ids of nodes (and all below them) that are never mutated."""
    skipped: set[int] = set()

    def skip(node: ast.AST | None) -> None:
        if node is not None:
            skipped.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Assert)):
            skip(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            skip(node.returns)
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
                skip(arg.annotation)
            if node.args.vararg:
                skip(node.args.vararg.annotation)
            if node.args.kwarg:
                skip(node.args.kwarg.annotation)
        elif isinstance(node, ast.AnnAssign):
            skip(node.annotation)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            skip(node)
        elif isinstance(node, ast.JoinedStr):
            # f-string pieces: mutating them only garbles messages, which the string
            # operator already covers through the plain literals.
            skip(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in {"TypeVar", "cast"}:
                skip(node)
        if hasattr(node, "body") and isinstance(node.body, list):
            for stmt in node.body:
                if _is_docstring(stmt, node.body):
                    skip(stmt)
                # A string expression after an attribute is its docstring (attrs style).
                elif (
                    isinstance(stmt, ast.Expr)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    skip(stmt)
    return skipped


class _Mutator(ast.NodeTransformer):
    """Walks the tree; counts mutation sites; applies the one numbered ``target``."""

    def __init__(self, target: int, skipped: set[int]) -> None:
        self.target = target
        self.skipped = skipped
        self.count = 0
        self.found: list[tuple[int, str]] = []  # (line, change) per site, in order
        self.in_function = 0

    def _offer(self, node: ast.AST, change: str, make: object) -> ast.AST | None:
        """Registers one mutation; returns the replacement when it is the target."""
        index = self.count
        self.count += 1
        self.found.append((getattr(node, "lineno", 0), change))
        if index == self.target:
            return make() if callable(make) else None  # type: ignore[no-any-return]
        return None

    def visit(self, node: ast.AST) -> ast.AST | list[ast.AST] | None:
        if id(node) in self.skipped:
            return node
        replacement = self._mutations(node)
        if replacement is not None:
            return replacement
        is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        self.in_function += is_function
        try:
            return self.generic_visit(node)
        finally:
            self.in_function -= is_function

    def _mutations(self, node: ast.AST) -> ast.AST | None:
        result: ast.AST | None = None

        def offer(change: str, make: object) -> None:
            nonlocal result
            made = self._offer(node, change, make)
            if made is not None:
                result = made

        if isinstance(node, ast.Compare):
            # Each operator of a chain on its own: `200 <= code < 300` has two boundaries.
            for position, old in enumerate(node.ops):
                op = type(old)
                for new in _COMPARE_SWAPS.get(op, []):

                    def swapped(new: type[ast.cmpop] = new, position: int = position) -> ast.AST:
                        ops = list(node.ops)
                        ops[position] = new()
                        return ast.Compare(node.left, ops, node.comparators)

                    where = f" (operator {position + 1})" if len(node.ops) > 1 else ""
                    offer(f"{_SYMBOLS[op]} -> {_SYMBOLS[new]}{where}", swapped)
        elif isinstance(node, ast.BoolOp):
            op = type(node.op)
            new_op = ast.Or if op is ast.And else ast.And
            offer(
                f"{_SYMBOLS[op]} -> {_SYMBOLS[new_op]}",
                lambda: ast.BoolOp(new_op(), node.values),
            )
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
            op = type(node.op)
            new_bin = _BINOP_SWAPS[op]
            offer(
                f"{_SYMBOLS[op]} -> {_SYMBOLS[new_bin]}",
                lambda: ast.BinOp(node.left, new_bin(), node.right),
            )
        elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAPS:
            op = type(node.op)
            new_aug = _BINOP_SWAPS[op]
            offer(
                f"{_SYMBOLS[op]}= -> {_SYMBOLS[new_aug]}=",
                lambda: ast.AugAssign(node.target, new_aug(), node.value),
            )
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            name = "not" if isinstance(node.op, ast.Not) else "-"
            offer(f"{name} removed", lambda: node.operand)
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool):
                offer(f"{value} -> {not value}", lambda: ast.Constant(not value))
            elif isinstance(value, int):
                offer(f"{value} -> {value + 1}", lambda: ast.Constant(value + 1))
                offer(f"{value} -> {value - 1}", lambda: ast.Constant(value - 1))
            elif isinstance(value, float):
                offer(f"{value} -> {value + 1}", lambda: ast.Constant(value + 1))
            elif isinstance(value, str):
                new_text = "" if value else "XX"
                offer(f"{value!r} -> {new_text!r}", lambda: ast.Constant(new_text))
        if isinstance(node, (ast.If, ast.While, ast.IfExp)) and not (
            isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)
        ):
            # (A "not" condition is covered by the "not removed" operator.)
            def negated() -> ast.AST:
                new = copy.copy(node)
                new.test = ast.UnaryOp(ast.Not(), node.test)
                return new

            offer("condition negated", negated)
        if self.in_function and isinstance(node, ast.stmt):
            if isinstance(node, ast.Return) and node.value is not None:
                # `return True` -> `return None` is only the True/False swap, weaker.
                if not (
                    isinstance(node.value, ast.Constant)
                    and (node.value.value is None or isinstance(node.value.value, bool))
                ):
                    offer("return value -> return None", lambda: ast.Return(ast.Constant(None)))
            elif isinstance(
                node,
                _DELETABLE,
            ):
                kind = type(node).__name__.lower()
                offer(f"{kind} statement deleted", lambda: ast.Pass())
        if result is not None:
            return ast.copy_location(result, node)
        return None


def enumerate_mutants(module: str) -> tuple[str, list[Mutant]]:
    path = CORE / f"{module}.py"
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    mutator = _Mutator(-1, _skipped_subtrees(tree))
    mutator.visit(tree)
    lines = source.splitlines()
    mutants = [
        Mutant(
            module,
            index,
            line,
            change,
            lines[line - 1].strip() if line else "",
            next((t.strip() for t in reversed(lines[: line - 1]) if t.strip()), ""),
        )
        for index, (line, change) in enumerate(mutator.found)
    ]
    return source, mutants


def mutated_source(source: str, index: int) -> ast.Module:
    tree = ast.parse(source)
    mutator = _Mutator(index, _skipped_subtrees(tree))
    new_tree = mutator.visit(tree)
    assert isinstance(new_tree, ast.Module)
    return ast.fix_missing_locations(new_tree)


def _start_tests(module: str, tree: ast.Module | None, tests: list[str]) -> int:
    """Forks a child that runs `tests` with `module` replaced by `tree`; returns its pid.

    The child exits 0 when every test passed (the mutant survived)."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 2
    try:
        if not os.environ.get("MUTATE_VERBOSE"):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        if tree is not None:
            name = f"trio_mailer.core.{module}"
            importlib.import_module("trio_mailer.core")
            path = str(CORE / f"{module}.py")
            compiled = compile(tree, path, "exec")
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            setattr(sys.modules["trio_mailer.core"], module, mod)
            exec(compiled, mod.__dict__)
        import pytest

        code = pytest.main(
            [
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                "-o",
                "addopts=--strict-markers",
                # The parent imported the plugins' packages (to fork warm): harmless here.
                "-W",
                "ignore::pytest.PytestAssertRewriteWarning",
                # The core's tests need none of conftest's fixtures (relay, CA, harness), and
                # importing it would load the whole service into every mutant's run.
                "--noconftest",
                *tests,
            ]
        )
    except BaseException:
        code = 3  # the mutant does not even import: killed
        if os.environ.get("MUTATE_VERBOSE"):
            import traceback

            traceback.print_exc()
    finally:
        os._exit(int(code))


def _run_all(
    module: str,
    trees: list[tuple[object, ast.Module | None]],
    tests: list[str],
    timeout_s: float,
    jobs: int,
) -> dict[object, str]:
    """Runs one child per (key, tree), `jobs` at a time; key -> "killed"/"survived"/"timeout"."""
    outcomes: dict[object, str] = {}
    pending = list(trees)
    running: dict[int, tuple[object, float]] = {}
    while pending or running:
        while pending and len(running) < jobs:
            key, tree = pending.pop(0)
            running[_start_tests(module, tree, tests)] = (key, time.monotonic() + timeout_s)
        for pid, (key, deadline) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                outcomes[key] = "survived" if code == 0 else "killed"
                del running[pid]
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                outcomes[key] = "timeout"
                del running[pid]
        time.sleep(0.02)
    return outcomes


def _package_imports() -> dict[str, set[str]]:
    """trio_mailer module -> the trio_mailer modules it imports (statically, from its source)."""
    graph: dict[str, set[str]] = {}
    package = ROOT / "trio_mailer"
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {n for n in found if n.startswith("trio_mailer")}
    return graph


def _independent_of(target: str, graph: dict[str, set[str]]) -> list[str]:
    """The package's modules that do not import `target`, even indirectly (safe to preload)."""
    depends: dict[str, bool] = {}

    def uses(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name == target:
            return True
        if name not in depends:
            depends[name] = any(
                uses(dep, seen | {name}) for dep in graph.get(name, ()) if dep not in seen
            )
        return depends[name]

    return sorted(n for n in graph if not uses(n) and "__main__" not in n)


# (Hypothesis itself loads trio, to seed its random: what counts is what the file adds.)
_PURITY_PROBE = """
import importlib, json, sys
import pytest, hypothesis, hypothesis.strategies
before = set(sys.modules)
importlib.import_module(sys.argv[1])
added = set(sys.modules) - before
bad = [m for m in sys.argv[2:] if any(a == m or a.startswith(m + ".") for a in added)]
print(json.dumps(bad))
"""


def impure_tests(tests: list[str]) -> dict[str, list[str]]:
    """test file -> the IMPURE modules importing it loads (only the files that load some)."""
    import subprocess

    found: dict[str, list[str]] = {}
    for test in tests:
        name = test.removesuffix(".py").replace("/", ".")
        result = subprocess.run(
            [sys.executable, "-c", _PURITY_PROBE, name, *IMPURE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            found[test] = [f"does not import: {result.stderr.strip().splitlines()[-1:]}"]
        elif bad := json.loads(result.stdout):
            found[test] = bad
    return found


def _preload() -> None:
    """Imports what every child needs except trio_mailer, so each fork starts warm."""
    names = ["pytest", "_pytest.python", "_pytest.terminal", "pytest_trio", "hypothesis"]
    names += ["trio", "trio.testing", "anyio", "purerpc", "h2", "grpc", "google.protobuf"]
    names += ["jinja2", "attrs", "trustme", "prometheus_client", "email.utils", "sqlite3"]
    names += ["smtplib", "ssl", "hypothesis.strategies", "trio_mailer"]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _run_module(module: str, tests: list[str], args: argparse.Namespace) -> dict[str, object]:
    """Runs every non-equivalent mutant of `module`: the indexes that survived, and the counts."""
    source, mutants = enumerate_mutants(module)
    baseline = _run_all(module, [(None, None)], tests, args.timeout_s * 5, 1)[None]
    if baseline != "survived":
        return {"error": f"the tests fail without any mutation ({baseline}): {tests}"}
    candidates = [m for m in mutants if m.equivalence() is None]
    if args.sample and args.sample < len(candidates):
        # A quick estimate on a slow machine: a seeded random sample of the mutants.
        candidates = random.Random(args.seed).sample(candidates, args.sample)
    to_run: list[tuple[object, ast.Module | None]] = [
        (m.index, mutated_source(source, m.index)) for m in candidates
    ]
    outcomes = _run_all(module, to_run, tests, args.timeout_s, args.jobs)
    return {
        "survived": sorted(k for k, v in outcomes.items() if v == "survived"),  # type: ignore[type-var]
        "killed": sum(1 for v in outcomes.values() if v != "survived"),
        "counted": len(to_run),
    }


def _run_module_warm(module: str, tests: list[str], args: argparse.Namespace) -> dict[str, object]:
    """``_run_module`` in a child that first imports every module not depending on `module`
    (so each mutant's pytest starts warm); the result comes back as JSON through a pipe."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        code = 0
        try:
            for name in _independent_of(f"trio_mailer.core.{module}", _package_imports()):
                try:
                    importlib.import_module(name)
                except Exception:  # a module that cannot load on its own: the child will
                    pass
            result = _run_module(module, tests, args)
            with open(writer, "w", encoding="utf-8") as pipe:
                json.dump(result, pipe)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(writer)
    with open(reader, encoding="utf-8") as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return dict(json.loads(text)) if text else {"error": "the module runner crashed"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help="core modules (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per mutant")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    parser.add_argument(
        "--sample", type=int, default=0, help="run only this many mutants per module (an estimate)"
    )
    parser.add_argument("--seed", type=int, default=1, help="for --sample")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    modules = args.modules or sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
    if args.list:
        for module in modules:
            for m in enumerate_mutants(module)[1]:
                print(f"{module}.py:{m.line}: {m.change}    [{m.source_line}]")
        return 0
    wanted = sorted({t for m in modules for t in TESTS.get(m) or [f"tests/test_{m}.py"]})
    impure = impure_tests([t for t in wanted if (ROOT / t).exists()])
    for test, loaded in impure.items():
        print(f"{test}: not a pure test file (loads {', '.join(loaded)}); fix TESTS")
    if impure:
        return 2
    _preload()
    scores: list[tuple[str, int, int, int]] = []
    excluded: list[tuple[Mutant, str]] = []
    survivors: list[Mutant] = []
    for module in modules:
        mutants = enumerate_mutants(module)[1]
        tests = TESTS.get(module) or [f"tests/test_{module}.py"]
        tests = [t for t in tests if (ROOT / t).exists()]
        excluded += [(m, reason) for m in mutants if (reason := m.equivalence()) is not None]
        n_equivalent = sum(1 for m in mutants if m.equivalence() is not None)
        if not tests:
            print(f"{module}: no test files", flush=True)
            scores.append((module, 0, len(mutants), len(mutants)))
            continue
        started = time.monotonic()
        result = _run_module_warm(module, tests, args)
        if "error" in result:
            print(f"{module}: {result['error']}", flush=True)
            return 2
        killed, counted = int(result["killed"]), int(result["counted"])  # type: ignore[call-overload]
        survived = set(result["survived"])  # type: ignore[call-overload]
        survivors += [m for m in mutants if m.index in survived]
        scores.append((module, killed, counted, len(mutants)))
        sampled = f" (a sample of {counted})" if counted < len(mutants) - n_equivalent else ""
        print(
            f"{module}{sampled}: {killed}/{counted} killed"
            f" ({100 * killed / counted if counted else 100:.1f}%),"
            f" {n_equivalent} equivalent excluded, {time.monotonic() - started:.0f} s",
            flush=True,
        )
        for m in mutants:
            if m.index in survived:
                print(f"    survived: {m.module}.py:{m.line}: {m.change}    [{m.source_line}]")
    print("\nSurviving mutants (each a missing test, or an equivalent to list in EQUIVALENT):")
    for m in survivors:
        print(f"  trio_mailer/core/{m.module}.py:{m.line}: {m.change}    [{m.source_line}]")
    if not survivors:
        print("  none")
    print("\nEquivalent mutants excluded:")
    for m, reason in excluded:
        print(f"  trio_mailer/core/{m.module}.py:{m.line}: {m.change}    [{m.source_line}]")
        print(f"      why: {reason}")
    if not excluded:
        print("  none")
    print("\nScore per module (killed / non-equivalent):")
    failing = False
    for module, killed, counted, total in scores:
        percent = 100 * killed / counted if counted else 0.0
        flag = "" if percent >= 90 else "   < 90%"
        failing |= percent < 90
        print(f"  {module:16} {killed:4}/{counted:<4} {percent:5.1f}%  ({total} mutants){flag}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
