"""Plots the console draws itself, as inline SVG: no charting library, no script, readable in light and dark (the
strokes take the page's colours through CSS classes)."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from html import escape

from markupsafe import Markup

from feedback.dataset import DailyRatings, DayRating
from services.console.views import LossPoint

WIDTH, HEIGHT, PAD, RIGHT = 720, 220, 36, 110  # RIGHT: room for the legend
SPARK_WIDTH, SPARK_HEIGHT, SPARK_PAD = 140, 30, 4


def rating_chart(series: DailyRatings, title: str) -> Markup:
    """A line per version: mean rating by day, on a 1-5 scale."""
    days = sorted({point.day for points in series.values() for point in points})
    if not days:
        return Markup("")
    first, span = days[0], max(1, (days[-1] - days[0]).days)

    def x(day: date) -> float:
        return PAD + (WIDTH - PAD - RIGHT) * ((day - first).days / span if len(days) > 1 else 0.5)

    def y(value: float) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * (value - 1) / 4

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title">',
             f'<title id="chart-title">{escape(title)}</title>']
    for value in range(1, 6):
        parts.append(f'<line class="grid" x1="{PAD}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
                     f'<text class="axis" x="{PAD - 8}" y="{y(value) + 4:.1f}" text-anchor="end">{value}</text>')
    parts.append(f'<text class="axis" x="{PAD}" y="{HEIGHT - 8}">{days[0]}</text>'
                 f'<text class="axis" x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end">{days[-1]}</text>')
    for i, (version, points) in enumerate(sorted(series.items())):
        path = " ".join(f"{x(p.day):.1f},{y(p.mean):.1f}" for p in points)
        parts.append(f'<g class="series s{i % 6}"><polyline points="{path}"/>')
        parts += [f'<circle cx="{x(p.day):.1f}" cy="{y(p.mean):.1f}" r="3.5"><title>{escape(version)} {p.day}: '
                  f'{p.mean:.2f} from {p.ratings} ratings</title></circle>' for p in points]
        parts.append(f'<text x="{WIDTH - RIGHT + 10}" y="{PAD + 16 * i}">{escape(version)}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def loss_chart(curve: list[LossPoint], label: str) -> Markup:
    """Train and eval loss by step: a line each (a point without that loss is skipped, so eval's line joins its own
    evaluations), scaled to the losses seen."""
    lines = {"train": [(p.step, p.train_loss) for p in curve if _finite(p.train_loss)],
             "eval": [(p.step, p.eval_loss) for p in curve if _finite(p.eval_loss)]}
    steps = [step for line in lines.values() for step, _ in line]
    losses = [loss for line in lines.values() for _, loss in line]
    if not steps:
        return Markup("")
    first, step_span = min(steps), max(1, max(steps) - min(steps))
    low, loss_span = min(losses), (max(losses) - min(losses)) or 1.0
    width, height, pad, right = 260, 70, 4, 44  # right: room for the legend

    def xy(step: int, loss: float) -> str:
        return (f"{pad + (width - pad - right) * (step - first) / step_span:.1f},"
                f"{height - pad - (height - 2 * pad) * (loss - low) / loss_span:.1f}")

    parts = [f'<svg class="chart loss" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">']
    for i, (name, line) in enumerate(lines.items()):
        if line:
            parts.append(f'<g class="series s{i}"><polyline points="{" ".join(xy(*p) for p in line)}"/>'
                         f'<text x="{width - right + 6}" y="{pad + 12 + 16 * i}">{name}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def sparkline(points: list[DayRating], days: int, label: str, last_day: date | None = None) -> Markup:
    """One version's mean rating per day over the `days` up to `last_day` (today, UTC), small enough for a table
    cell (1-5 scale, its ends drawn; a day without ratings has no dot, not a zero)."""
    last_day = last_day or datetime.now(UTC).date()
    first = last_day - timedelta(days=days - 1)
    points = [p for p in points if first <= p.day <= last_day]
    if not points:
        return Markup("")

    def x(day: date) -> float:
        return SPARK_PAD + (SPARK_WIDTH - 2 * SPARK_PAD) * (day - first).days / max(1, days - 1)

    def y(value: float) -> float:
        return SPARK_HEIGHT - SPARK_PAD - (SPARK_HEIGHT - 2 * SPARK_PAD) * (value - 1) / 4

    path = " ".join(f"{x(p.day):.1f},{y(p.mean):.1f}" for p in points)
    dots = "".join(f'<circle cx="{x(p.day):.1f}" cy="{y(p.mean):.1f}" r="2"><title>{p.day}: {p.mean:.2f} from '
                   f'{p.ratings} ratings</title></circle>' for p in points)
    scale = "".join(f'<line class="grid" x1="0" x2="{SPARK_WIDTH}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>' for v in (1, 5))
    return Markup(f'<svg class="chart spark" viewBox="0 0 {SPARK_WIDTH} {SPARK_HEIGHT}" role="img" '
                  f'aria-label="{escape(label)}">{scale}<g class="series s0"><polyline points="{path}"/>{dots}</g>'
                  '</svg>')


def heat(value: int, row: list[int]) -> int:
    """A confusion matrix cell's shade, 0-5: its share of its row (of the expected label's examples)."""
    total = sum(row)
    return min(5, round(5 * value / total)) if total else 0
