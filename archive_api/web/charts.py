"""Server-rendered SVG charts for the dashboard: no JavaScript, nothing loaded from elsewhere.

Each function takes plain figures and returns the SVG markup as `markupsafe.Markup`; every
piece of text that reaches the markup (domain names, rule ids, day labels) is escaped here,
so a hostile remote domain cannot inject markup into the dashboard. Colours are SVG
presentation attributes, not `style=` attributes, so the page's Content-Security-Policy
(`style-src 'self'`) does not block them. Each chart carries a `<title>` and `<desc>` for
screen readers; the dashboard also shows the same figures as a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from html import escape
from typing import Final

from markupsafe import Markup

SERIES_COLOURS: Final = {
    "messages": "#0a5bd3",
    "blocked": "#b42318",
    "quarantined": "#d08700",
}
BAR_COLOUR: Final = "#0a5bd3"
AXIS_COLOUR: Final = "#57606a"
GRID_COLOUR: Final = "#d0d7de"
MAX_LABEL_CHARS: Final = 48


@dataclass(frozen=True, slots=True)
class DaySeries:
    """One line of the per-day chart: a name (a key of SERIES_COLOURS) and a count per day."""

    name: str
    counts: Sequence[int]


def _attr(value: str) -> str:
    return escape(value, quote=True)


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (at least 1)."""
    if value <= 1:
        return 1
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def _svg_open(width: int, height: int, title: str, desc: str, chart_id: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-labelledby="{chart_id}-title {chart_id}-desc" '
        f'font-family="system-ui, DejaVu Sans, sans-serif" font-size="11">'
        f'<title id="{chart_id}-title">{escape(title)}</title>'
        f'<desc id="{chart_id}-desc">{escape(desc)}</desc>'
    )


def day_chart(
    days: Sequence[date],
    series: Sequence[DaySeries],
    *,
    title: str,
    chart_id: str = "days",
    width: int = 960,
    height: int = 280,
) -> Markup:
    """Lines of counts per day (one per series) over a shared y axis from zero."""
    for line in series:
        if len(line.counts) != len(days):
            raise ValueError(
                f"series {line.name!r} has {len(line.counts)} counts for {len(days)} days"
            )
    left, right, top, bottom = 48, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = nice_ceiling(max((max(s.counts, default=0) for s in series), default=0))
    totals = ", ".join(f"{s.name} {sum(s.counts)}" for s in series)
    span = f"{days[0].isoformat()} to {days[-1].isoformat()}" if days else "no days"
    parts = [_svg_open(width, height, title, f"Per day, {span}: {totals}.", chart_id)]
    intervals = min(5, peak)  # peak is 1, 2 or 5 times a power of ten: whole-number ticks
    for step in range(intervals + 1):
        value = peak * step // intervals
        y = top + plot_h - plot_h * step / intervals
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
            f'stroke="{GRID_COLOUR}" stroke-width="1"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{AXIS_COLOUR}">'
            f"{value}</text>"
        )

    def x_of(index: int) -> float:
        if len(days) <= 1:
            return left + plot_w / 2
        return left + plot_w * index / (len(days) - 1)

    def y_of(count: int) -> float:
        return top + plot_h - plot_h * count / peak

    if days:
        label_at = sorted({0, len(days) // 2, len(days) - 1})
        for index in label_at:
            anchor = "start" if index == 0 else "end" if index == len(days) - 1 else "middle"
            if len(days) == 1:
                anchor = "middle"
            parts.append(
                f'<text x="{x_of(index):.1f}" y="{height - 8}" text-anchor="{anchor}" '
                f'fill="{AXIS_COLOUR}">{escape(days[index].isoformat())}</text>'
            )
    for line in series:
        colour = SERIES_COLOURS.get(line.name, BAR_COLOUR)
        points = " ".join(f"{x_of(i):.1f},{y_of(c):.1f}" for i, c in enumerate(line.counts))
        if len(line.counts) == 1:
            parts.append(
                f'<circle cx="{x_of(0):.1f}" cy="{y_of(line.counts[0]):.1f}" r="4" '
                f'fill="{colour}"/>'
            )
        elif line.counts:
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour}" '
                f'stroke-width="2" stroke-linejoin="round" data-series="{_attr(line.name)}"/>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every text above is escaped)


def bar_chart(
    rows: Sequence[tuple[str, int]],
    *,
    title: str,
    chart_id: str,
    width: int = 560,
    bar_height: int = 22,
) -> Markup:
    """Horizontal bars, biggest first as given, each labelled with its name and count."""
    label_w, gap, top = 200, 6, 4
    plot_w = width - label_w - 60
    height = max(top * 2 + len(rows) * (bar_height + gap), 30)
    peak = max((count for _, count in rows), default=0) or 1
    desc = "; ".join(f"{name}: {count}" for name, count in rows) or "nothing to show"
    parts = [_svg_open(width, height, title, desc, chart_id)]
    if not rows:
        parts.append(f'<text x="8" y="20" fill="{AXIS_COLOUR}">Nothing in this period.</text>')
    for index, (name, count) in enumerate(rows):
        y = top + index * (bar_height + gap)
        bar_w = max(plot_w * count / peak, 1.0) if count else 0.0
        parts.append(
            f'<text x="{label_w - 8}" y="{y + bar_height * 0.7:.1f}" text-anchor="end" '
            f'fill="#1b1f24">{escape(_short(name))}</text>'
            f'<rect x="{label_w}" y="{y}" width="{bar_w:.1f}" height="{bar_height}" '
            f'fill="{BAR_COLOUR}"/>'
            f'<text x="{label_w + bar_w + 6:.1f}" y="{y + bar_height * 0.7:.1f}" '
            f'fill="{AXIS_COLOUR}">{count}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every text above is escaped)
