"""Line charts as inline SVG text (stdlib + numpy): what `edgelearn report` draws with.

No plotting library, no script: the SVG is plain markup any browser renders offline.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: chart size and margins (SVG user units = CSS px)
WIDTH, HEIGHT = 540, 310
LEFT, RIGHT, TOP, BOTTOM = 64, 26, 44, 44

#: data value -> SVG coordinate
Scale = Callable[[float], float]


@dataclass(frozen=True)
class Series:
    """One line of a chart.

    Args:
        label: legend text. colour: CSS colour.
        x, y: points (same length; non-finite y values break the line).
        faint: drawn thin and translucent (e.g. raw values under a smoothed line).
        markers: draw a dot at each point (sparse series such as held-out scores).
    """

    label: str
    colour: str
    x: np.ndarray
    y: np.ndarray
    faint: bool = False
    markers: bool = False


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0 if math.isfinite(lo) else 1.0
        lo = hi - 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    count = math.ceil((hi - first) / step - 1e-9) + 1
    return [round(first + i * step, 12) for i in range(count)]


def _fmt(v: float) -> str:
    """A tick label: short, no float noise."""
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or abs(v) < 0.001:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.6g}"


def decimate(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` evenly spaced points (first and last kept)."""
    if x.size <= max_points:
        return x, y
    idx = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
    return x[idx], y[idx]


def _bounds(series: list[Series]) -> tuple[float, float, float, float]:
    xs = np.concatenate([s.x for s in series]) if series else np.zeros(0)
    ys = np.concatenate([s.y for s in series]) if series else np.zeros(0)
    xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
    if xs.size == 0 or ys.size == 0:
        return 0.0, 1.0, 0.0, 1.0
    return float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())


def _path(s: Series, sx: Scale, sy: Scale) -> str:
    """An SVG path through the finite points (a gap where y is not finite)."""
    parts, pen = [], "M"
    for x, y in zip(s.x, s.y, strict=True):
        if not (math.isfinite(x) and math.isfinite(y)):
            pen = "M"
            continue
        parts.append(f"{pen}{sx(x):.1f},{sy(y):.1f}")
        pen = "L"
    return " ".join(parts)


def line_chart(series: list[Series], *, title: str, xlabel: str, ylabel: str) -> str:
    """An SVG line chart (axes, round ticks, grid, legend) of `series`, as markup."""
    x0, x1, y0, y1 = _bounds(series)
    xt, yt = nice_ticks(x0, x1), nice_ticks(y0, y1)
    xa, xb, ya, yb = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(v: float) -> float:
        return LEFT + (v - xa) / ((xb - xa) or 1.0) * pw

    def sy(v: float) -> float:
        return TOP + ph - (v - ya) / ((yb - ya) or 1.0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{LEFT}" y="18" class="t">{html.escape(title)}</text>']
    for v in yt:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" '
                   f'class="g"/><text x="{LEFT - 6}" y="{sy(v) + 4:.1f}" class="yl">'
                   f'{_fmt(v)}</text>')
    for v in xt:
        out.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{TOP}" y2="{TOP + ph}" '
                   f'class="g"/><text x="{sx(v):.1f}" y="{TOP + ph + 16}" class="xl">'
                   f'{_fmt(v)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="frame"/>')
    out.append(f'<text x="{LEFT + pw / 2:.1f}" y="{HEIGHT - 6}" class="xl">'
               f'{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {TOP + ph / 2:.1f}) rotate(-90)" class="xl">'
               f'{html.escape(ylabel)}</text>')
    out += [_draw(s, sx, sy) for s in series]
    out += _legend([s for s in series if not s.faint])
    out.append("</svg>")
    return "\n".join(out)


def _draw(s: Series, sx: Scale, sy: Scale) -> str:
    """One series: its path (and dots)."""
    width, opacity = (1.0, 0.25) if s.faint else (2.0, 1.0)
    d = _path(s, sx, sy)
    parts = [f'<path d="{d}" fill="none" stroke="{s.colour}" stroke-width="{width}" '
             f'stroke-opacity="{opacity}"/>'] if d else []
    if s.markers:
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{s.colour}"/>'
                  for x, y in zip(s.x, s.y, strict=True)
                  if math.isfinite(x) and math.isfinite(y)]
    return "\n".join(parts)


def _legend(series: list[Series]) -> list[str]:
    """Legend entries in a row under the title (outside the plot: they hide no data)."""
    out, x = [], float(LEFT)
    for s in series:
        label = html.escape(s.label[:24])
        out.append(f'<line x1="{x:.0f}" x2="{x + 18:.0f}" y1="32" y2="32" stroke="{s.colour}" '
                   f'stroke-width="3"/><text x="{x + 23:.0f}" y="36" class="lt">{label}</text>')
        x += 34 + 6.5 * len(s.label[:24])
    return out
