"""Plots the console draws itself, as inline SVG: no charting library, no script, readable in light and dark (the
strokes take the page's colours through CSS classes)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from html import escape

from markupsafe import Markup

from feedback.dataset import THUMB_RATING
from feedback.schemas import CuratedExample

Series = dict[str, list[tuple[date, float, int]]]  # version -> (day, mean rating, ratings that day), by day
WIDTH, HEIGHT, PAD, RIGHT = 720, 220, 36, 110  # RIGHT: room for the legend


def daily_ratings(rows: Iterable[CuratedExample]) -> Series:
    """Mean rating (1-5; a thumb up counts 5, down 1) per version per day."""
    sums: dict[tuple[str, date], list[float]] = defaultdict(list)
    for row in rows:
        value = row.rating if row.rating is not None else THUMB_RATING.get(row.thumb or "")
        if value is not None:
            sums[(row.adapter_version, row.feedback_ts.date())].append(float(value))
    series: Series = defaultdict(list)
    for (version, day), values in sorted(sums.items(), key=lambda item: item[0][1]):
        series[version].append((day, sum(values) / len(values), len(values)))
    return dict(series)


def rating_chart(series: Series, title: str) -> Markup:
    """A line per version: mean rating by day, on a 1-5 scale."""
    days = sorted({day for points in series.values() for day, _, _ in points})
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
        path = " ".join(f"{x(day):.1f},{y(mean):.1f}" for day, mean, _ in points)
        parts.append(f'<g class="series s{i % 6}"><polyline points="{path}"/>')
        parts += [f'<circle cx="{x(day):.1f}" cy="{y(mean):.1f}" r="3.5"><title>{escape(version)} {day}: '
                  f'{mean:.2f} from {n} ratings</title></circle>' for day, mean, n in points]
        parts.append(f'<text x="{WIDTH - RIGHT + 10}" y="{PAD + 16 * i}">{escape(version)}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def heat(value: int, row: list[int]) -> int:
    """A confusion matrix cell's shade, 0-5: its share of its row (of the expected label's examples)."""
    total = sum(row)
    return min(5, round(5 * value / total)) if total else 0
