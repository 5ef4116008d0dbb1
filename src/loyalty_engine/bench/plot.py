"""The bench's pictures as one SVG file, written without a plotting library (two line charts do not
justify a dependency): throughput against batch size, ledger beside the SQLite peer, and latency
percentiles per call, one line per durability mode. Both axes of values are logarithmic, since the
figures span several orders of magnitude."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

W, H = 560, 380                       # one panel
LEFT, RIGHT, TOP, BOTTOM = 78, 150, 40, 52
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten (and 2 and 5 between them when the range is narrow) covering [lo, hi]."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = (1, 2, 5) if b - a <= 2 else (1,)
    return [m * 10.0**e for e in range(a, b + 1) for m in steps if lo <= m * 10.0**e <= hi] or [lo, hi]


def _label(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def panel(x0: float, title: str, xlabel: str, ylabel: str, xs: list[str] | list[float],
          series: dict[str, list[float]], log_x: bool) -> str:
    """One chart at horizontal offset ``x0``. ``xs`` are numbers (log_x) or category names."""
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    values = [v for ys in series.values() for v in ys if v and v > 0]
    lo, hi = min(values), max(values)
    lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
    if lo == hi:
        hi = lo * 10

    def py(v: float) -> float:
        return TOP + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    if log_x:
        fx = [float(x) for x in xs]
        a, b = math.log10(min(fx)), math.log10(max(fx))
        pos = [LEFT + (0.5 if a == b else (math.log10(x) - a) / (b - a)) * pw for x in fx]
        xlabels = [_label(x) for x in fx]
    else:
        pos = [LEFT + (i + 0.5) / len(xs) * pw for i in range(len(xs))]
        xlabels = [str(x) for x in xs]
    out = [f'<g transform="translate({x0},0)">',
           f'<text x="{LEFT + pw / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>']
    for t in _ticks(lo, hi):
        y = py(t)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_label(t)}</text>')
    for p, lab in zip(pos, xlabels, strict=True):
        out.append(f'<text x="{p:.1f}" y="{TOP + ph + 16}" text-anchor="middle" font-size="11">{escape(lab)}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 12}" text-anchor="middle" font-size="12">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(16,{TOP + ph / 2}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{escape(ylabel)}</text>')
    for k, (name, ys) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        pts = [(p, py(v)) for p, v in zip(pos, ys, strict=True) if v and v > 0]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(f'<polyline class="series" data-name="{escape(name)}" points="{path}" fill="none" '
                   f'stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts]
        ly = TOP + 14 + 18 * k
        out.append(f'<line x1="{LEFT + pw + 10}" x2="{LEFT + pw + 28}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{LEFT + pw + 32}" y="{ly}" font-size="11">{escape(name)}</text>')
    out.append("</g>")
    return "\n".join(out)


def bench_svg(result: dict[str, Any]) -> str:
    """Both panels of a bench result side by side."""
    curve = result["batch_curve"]
    panels = [panel(0, "Durable postings by batch size", "transfers per commit (sync=full)", "transfers/s",
                    curve["batch_size"], {"loyalty_engine": curve["ledger"], "SQLite peer": curve["peer"]},
                    log_x=True)]
    lat = result["latency"]
    names = [n for n in lat if n.startswith(("purchase", "SQLite peer checkout"))]
    short = {n: n.replace("SQLite peer checkout, synchronous=", "SQLite ").replace("purchase, ", "engine ")
             for n in names}
    panels.append(panel(W, "Latency per checkout", "percentile", "microseconds", ["p50", "p90", "p99", "p99.9"],
                        {short[n]: [lat[n][k] for k in ("p50", "p90", "p99", "p999")] for n in names},
                        log_x=False))
    m = result["machine"]
    foot = (f"{m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; disk {m['disk']['device']} "
            f"({m['disk']['filesystem']}); loyalty_engine {m['versions']['loyalty_engine']}; {result['when']}")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 24}" '
            f'viewBox="0 0 {2 * W} {H + 24}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(panels) +
            f'\n<text x="{W}" y="{H + 16}" text-anchor="middle" font-size="11" fill="#555">{escape(foot)}</text>'
            "\n</svg>\n")


def write_svg(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(bench_svg(result), encoding="utf-8")
    return path
