"""Line plots as PNG files with no plotting library: numpy rasterizer + zlib/struct encoder.

``write_line_plot_png(path, {"gold": {"ppo": [(step, value), ...], "grpo": [...]}, "kl": {...}})``
draws one panel per key, stacked vertically, each with a title, a legend, grid lines,
axes and tick labels in a 3x5 bitmap font (text is drawn upper-case).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

# 3x5 glyphs: five rows of three dots, top to bottom, "#" = ink. Unknown characters draw as "?".
_GLYPHS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# ### ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# ..# ..# ..#", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.",
    "C": "### #.. #.. #.. ###", "D": "##. #.# #.# #.# ##.", "E": "### #.. ### #.. ###",
    "F": "### #.. ### #.. #..", "G": "### #.. #.# #.# ###", "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# ###", "K": "#.# #.# ##. #.# #.#",
    "L": "#.. #.. #.. #.. ###", "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#",
    "O": ".#. #.# #.# #.# .#.", "P": "### #.# ### #.. #..", "Q": "### #.# #.# ### ..#",
    "R": "##. #.# ##. #.# #.#", "S": "### #.. ### ..# ###", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#",
    "X": "#.# #.# .#. #.# #.#", "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    ".": "... ... ... ... .#.", "-": "... ... ### ... ...", "+": "... .#. ### .#. ...",
    "_": "... ... ... ... ###", ":": "... .#. ... .#. ...", "/": "..# ..# .#. #.. #..",
    "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.", "%": "#.# ..# .#. #.. #.#",
    "=": "... ### ... ### ...", " ": "... ... ... ... ...", "?": "### ..# .#. ... .#.",
}
_SCALE = 2  # pixels per font dot
_ADVANCE = 4 * _SCALE  # glyph width + one dot of spacing
_TEXT_H = 5 * _SCALE

_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_GRID = (225, 225, 225)
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (23, 190, 207)]  # tab10-like, one per series


def series_color(index: int) -> tuple[int, int, int]:
    """RGB colour of the ``index``-th series of a panel (the palette cycles after 8)."""
    return _PALETTE[index % len(_PALETTE)]


def _glyph(ch: str) -> np.ndarray:
    rows = _GLYPHS.get(ch, _GLYPHS["?"]).split()
    dots = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    return dots.repeat(_SCALE, 0).repeat(_SCALE, 1)


def _text_width(text: str) -> int:
    return len(text) * _ADVANCE - _SCALE if text else 0


def _draw_text(img: np.ndarray, x: int, y: int, text: str, color) -> None:
    """Draw ``text`` with its top-left corner at (x, y), clipped to the image."""
    h, w, _ = img.shape
    for i, ch in enumerate(text.upper()):
        gx = x + i * _ADVANCE
        mask = _glyph(ch)
        y0, y1, x0, x1 = max(y, 0), min(y + mask.shape[0], h), max(gx, 0), min(gx + mask.shape[1], w)
        if y0 < y1 and x0 < x1:
            sub = mask[y0 - y:y1 - y, x0 - gx:x1 - gx]
            img[y0:y1, x0:x1][sub] = color


def _draw_segment(img, x0, y0, x1, y1, color, clip) -> None:
    """A 2-pixel-thick line from (x0, y0) to (x1, y1), clipped to ``clip = (left, top, right, bottom)``."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(np.int64)
    ys = np.rint(np.linspace(y0, y1, n)).astype(np.int64)
    left, top, right, bottom = clip
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        px, py = xs + dx, ys + dy
        keep = (px >= left) & (px <= right) & (py >= top) & (py <= bottom)
        img[py[keep], px[keep]] = color


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = [(first + i) * step for i in range(count * 3)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks if t <= hi + step * 1e-9]


def _label(v: float) -> str:
    return f"{v:.4g}"


def _value_range(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _check_panels(panels) -> dict[str, dict[str, list[tuple[float, float]]]]:
    if not isinstance(panels, dict) or not panels:
        raise ValueError("panels must be a non-empty dict {panel title: {series name: [(x, y), ...]}}")
    out = {}
    for title, series in panels.items():
        if not isinstance(title, str):
            raise TypeError(f"panels keys must be str, got {title!r}")
        if not isinstance(series, dict):
            raise TypeError(f"panels[{title!r}] must be a dict {{series name: [(x, y), ...]}}, got {type(series).__name__}")
        out[title] = {}
        for name, points in series.items():
            if not isinstance(name, str):
                raise TypeError(f"panels[{title!r}] keys must be str, got {name!r}")
            clean = []
            for i, point in enumerate(points):
                if (not isinstance(point, (tuple, list)) or len(point) != 2
                        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in point)):
                    raise TypeError(f"panels[{title!r}][{name!r}][{i}] must be an (x, y) pair of numbers, got {point!r}")
                clean.append((float(point[0]), float(point[1])))
            out[title][name] = clean
    return out


def _draw_panel(img: np.ndarray, top: int, height: int, title: str, series: dict) -> None:
    width = img.shape[1]
    finite = [(x, y) for pts in series.values() for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    x_lo, x_hi = _value_range([x for x, _ in finite])
    y_lo, y_hi = _value_range([y for _, y in finite])
    x_ticks, y_ticks = _nice_ticks(x_lo, x_hi), _nice_ticks(y_lo, y_hi)
    left = 12 + max(_text_width(_label(t)) for t in y_ticks)
    right = width - 16
    plot_top = top + 2 * _TEXT_H + 12
    bottom = top + height - _TEXT_H - 14

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - plot_top))

    for t in y_ticks:
        _, py = to_px(x_lo, t)
        py = int(round(py))
        img[py, left:right + 1] = _GRID
        img[py, left - 4:left] = _INK
        _draw_text(img, left - 6 - _text_width(_label(t)), py - _TEXT_H // 2, _label(t), _INK)
    for t in x_ticks:
        px, _ = to_px(t, y_lo)
        px = int(round(px))
        img[plot_top:bottom + 1, px] = _GRID
        img[bottom + 1:bottom + 5, px] = _INK
        _draw_text(img, px - _text_width(_label(t)) // 2, bottom + 7, _label(t), _INK)
    img[plot_top:bottom + 1, left] = _INK
    img[bottom, left:right + 1] = _INK

    _draw_text(img, left, top + 6, title, _INK)
    legend_x = right
    for i, name in reversed(list(enumerate(series))):
        legend_x -= _text_width(name) + 26
        img[top + 6:top + 6 + _TEXT_H, legend_x:legend_x + 12] = series_color(i)
        _draw_text(img, legend_x + 16, top + 6, name, _INK)

    clip = (left + 1, plot_top, right, bottom - 1)
    for i, points in enumerate(series.values()):
        prev = None
        for x, y in sorted(points):
            if not (math.isfinite(x) and math.isfinite(y)):
                prev = None  # a gap in the line
                continue
            cur = to_px(x, y)
            _draw_segment(img, *(prev or cur), *cur, series_color(i), clip)
            prev = cur


def _png_bytes(img: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 ``[H, W, 3]`` array (8-bit truecolour, filter 0)."""
    h, w, _ = img.shape
    rows = np.concatenate([np.zeros((h, 1), dtype=np.uint8), img.reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def write_line_plot_png(path, panels: dict[str, dict[str, list[tuple[float, float]]]], *,
                        width: int = 900, height: int = 300) -> None:
    """Write a PNG of ``len(panels)`` stacked line charts, each ``width x height`` pixels.

    ``panels[title][series] = [(x, y), ...]``: one panel per title, one line per series
    (points sorted by x; non-finite points leave a gap), colours from ``series_color`` in
    the series' order. Axes span the finite data of each panel. Image: RGB uint8,
    ``width x (height * len(panels))``.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    for name, value, least in (("width", width, 200), ("height", height, 100)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    panels = _check_panels(panels)
    img = np.empty((height * len(panels), width, 3), dtype=np.uint8)
    img[:] = _BACKGROUND
    for i, (title, series) in enumerate(panels.items()):
        _draw_panel(img, i * height, height, title, series)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(_png_bytes(img))
