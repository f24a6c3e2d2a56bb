"""Line and bar charts written as PNG with Pillow (matplotlib is not a dependency).

Enough for the demo report: axes with a few labelled ticks, one colour per series, a legend.
Deterministic: the same data gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
          (140, 86, 75))
_W, _H, _L, _R, _T, _B = 640, 400, 60, 20, 40, 50


def _font():
    return ImageFont.load_default()


def _frame(title: str, xlabel: str, ylabel: str):
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    f = _font()
    d.text((_L, 10), title, fill="black", font=f)
    d.text((_W // 2 - 3 * len(xlabel), _H - 18), xlabel, fill="black", font=f)
    d.text((4, _T - 16), ylabel, fill="black", font=f)
    d.rectangle((_L, _T, _W - _R, _H - _B), outline="black")
    return img, d, f


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def line_chart(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
               title: str, xlabel: str, ylabel: str, ylim: tuple[float, float] | None = None
               ) -> None:
    """``series``: ``{name: (xs, ys)}``; None ys are skipped. Writes ``path``."""
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None]
    img, d, f = _frame(title, xlabel, ylabel)
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = ylim if ylim else (min(p[1] for p in pts), max(p[1] for p in pts))
        x1 = x1 if x1 > x0 else x0 + 1
        y1 = y1 if y1 > y0 else y0 + 1

        def px(x, y):
            return (_L + (x - x0) / (x1 - x0) * (_W - _L - _R),
                    _H - _B - (y - y0) / (y1 - y0) * (_H - _T - _B))

        for t in _ticks(y0, y1):
            _, yy = px(x0, t)
            d.line((_L - 4, yy, _L, yy), fill="black")
            d.text((4, yy - 6), f"{t:.2f}", fill="black", font=f)
        for t in _ticks(x0, x1):
            xx, _ = px(t, y0)
            d.line((xx, _H - _B, xx, _H - _B + 4), fill="black")
            d.text((xx - 8, _H - _B + 6), f"{t:g}", fill="black", font=f)
        for k, (name, (xs, ys)) in enumerate(series.items()):
            c = COLORS[k % len(COLORS)]
            p = [px(x, y) for x, y in zip(xs, ys) if y is not None]
            if len(p) > 1:
                d.line(p, fill=c, width=2)
            for q in p:
                d.ellipse((q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2), fill=c)
            d.rectangle((_W - _R - 150, _T + 8 + 14 * k, _W - _R - 140, _T + 18 + 14 * k), fill=c)
            d.text((_W - _R - 134, _T + 6 + 14 * k), name, fill="black", font=f)
    img.save(path, format="PNG")


def bar_chart(path: str | Path, bars: dict[str, float], *, title: str, ylabel: str,
              ylim: tuple[float, float] = (0.0, 1.0)) -> None:
    """One bar per ``{label: value}``, value printed above it. Writes ``path``."""
    img, d, f = _frame(title, "", ylabel)
    y0, y1 = ylim
    n = max(len(bars), 1)
    slot = (_W - _L - _R) / n
    for t in _ticks(y0, y1):
        yy = _H - _B - (t - y0) / (y1 - y0) * (_H - _T - _B)
        d.line((_L - 4, yy, _L, yy), fill="black")
        d.text((4, yy - 6), f"{t:.2f}", fill="black", font=f)
    for k, (label, v) in enumerate(bars.items()):
        xa = _L + slot * k + slot * 0.2
        xb = _L + slot * (k + 1) - slot * 0.2
        yy = _H - _B - (min(max(v, y0), y1) - y0) / (y1 - y0) * (_H - _T - _B)
        d.rectangle((xa, yy, xb, _H - _B), fill=COLORS[k % len(COLORS)])
        d.text((xa, yy - 14), f"{v:.3f}", fill="black", font=f)
        d.text((xa, _H - _B + 6), label, fill="black", font=f)
    img.save(path, format="PNG")
