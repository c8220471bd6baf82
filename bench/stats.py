"""Summaries, paired ratios, targets and the printed tables. Pure: no I/O, no clocks.

Why paired ratios: every section runs the candidate and its baseline in the same repetition, one
right after the other, and the ratio is taken per repetition before the median. Noise from the
machine (another tenant, a frequency change) hits both halves of a pair alike and mostly
cancels, which a ratio of two medians taken far apart would not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Literal

import attrs

DASH = "\u2013"  # an en dash, between a min and a max


@attrs.frozen
class Summary:
    """The median and the range of one measurement's repetitions."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "samples": list(self.samples),
        }


def summarize(values: Iterable[float]) -> Summary:
    """Median, min and max.

    Raises:
        ValueError: no values.
    """
    samples = tuple(float(v) for v in values)
    if not samples:
        raise ValueError("summarize: expected at least one value, got none")
    return Summary(statistics.median(samples), min(samples), max(samples), samples)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest-rank: always one of the observed values.

    Raises:
        ValueError: no values, or ``q`` outside 0..100.
    """
    if not values:
        raise ValueError("percentile: expected at least one value, got none")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: expected q in 0..100, got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repetition ratios of two measurements taken side by side.

    Raises:
        ValueError: the sequences differ in length, or a denominator is not positive.
    """
    if len(numerators) != len(denominators):
        raise ValueError(
            f"paired_ratios: expected equal lengths, got {len(numerators)} and {len(denominators)}"
        )
    if any(d <= 0 for d in denominators):
        raise ValueError(f"paired_ratios: expected positive denominators, got {denominators}")
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


@attrs.frozen
class Target:
    """A goal from the issue, such as "ours/raw >= 0.95"."""

    op: Literal[">=", "<="]
    threshold: float

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


@attrs.frozen
class Row:
    """One line of a section's table."""

    what: str
    unit: str
    summary: Summary


@attrs.frozen
class Ratio:
    """A paired ratio, judged on its median when it has a target."""

    name: str
    summary: Summary
    target: Target | None = None

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.summary.median)

    def line(self) -> str:
        s = self.summary
        text = f"{self.name} = {fmt(s.median)} ({fmt(s.low)}{DASH}{fmt(s.high)})"
        if self.target is not None:
            text += f"  (target {self.target}: {'met' if self.met else 'NOT MET'})"
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            **self.summary.to_json(),
            "target": None if self.target is None else str(self.target),
            "met": self.met,
        }


@attrs.define
class Section:
    """What one benchmark section found: its table, its ratios and its raw samples."""

    name: str
    title: str
    rows: list[Row] = attrs.Factory(list)
    ratios: list[Ratio] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)
    raw: dict[str, object] = attrs.Factory(dict)

    def add(self, what: str, unit: str, values: Iterable[float]) -> Summary:
        summary = summarize(values)
        self.rows.append(Row(what, unit, summary))
        return summary

    def ratio(
        self,
        name: str,
        numerators: Sequence[float],
        denominators: Sequence[float],
        target: Target | None = None,
    ) -> Ratio:
        ratio = Ratio(name, summarize(paired_ratios(numerators, denominators)), target)
        self.ratios.append(ratio)
        return ratio

    def render(self) -> str:
        """The human-readable table, ratio lines and notes."""
        width = max([len(r.what) for r in self.rows] + [4])
        unit_width = max([len(r.unit) for r in self.rows] + [4])
        lines = [f"== {self.name}: {self.title} =="]
        header = f"min{DASH}max"
        lines.append(f"  {'what':<{width}}  {'unit':<{unit_width}}  {'median':>9}  {header:>19}")
        for row in self.rows:
            s = row.summary
            spread = f"{fmt(s.low)}{DASH}{fmt(s.high)}"
            lines.append(
                f"  {row.what:<{width}}  {row.unit:<{unit_width}}  {fmt(s.median):>9}  {spread:>19}"
            )
        lines.extend(f"  {ratio.line()}" for ratio in self.ratios)
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "title": self.title,
            "rows": [{"what": r.what, "unit": r.unit, **r.summary.to_json()} for r in self.rows],
            "ratios": [r.to_json() for r in self.ratios],
            "notes": list(self.notes),
            "raw": self.raw,
        }


def fmt(value: float) -> str:
    """Three significant figures or so, never in exponent notation."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"
