"""Plots the console draws itself, as inline SVG: no charting library, no script, readable in light and dark (the
strokes take the page's colours through CSS classes)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from html import escape

from markupsafe import Markup

from feedback.dataset import DailyRatings, DayRating

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


def sparkline(points: list[DayRating], days: int, label: str, last_day: date | None = None) -> Markup:
    """One version's mean rating per day over the `days` up to `last_day` (today, UTC), small enough for a table
    cell (1-5 scale; a day without ratings has no dot, not a zero)."""
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
    return Markup(f'<svg class="chart spark" viewBox="0 0 {SPARK_WIDTH} {SPARK_HEIGHT}" role="img" '
                  f'aria-label="{escape(label)}"><g class="series s0"><polyline points="{path}"/>{dots}</g></svg>')


def heat(value: int, row: list[int]) -> int:
    """A confusion matrix cell's shade, 0-5: its share of its row (of the expected label's examples)."""
    total = sum(row)
    return min(5, round(5 * value / total)) if total else 0
