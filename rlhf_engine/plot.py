"""Line plots as PNG files with no plotting library: numpy rasterizer + zlib/struct encoder.

``write_line_plot_png(path, [Panel("gold", {"ppo": [(step, value), ...]}, y_label="gold"), ...])``
draws one chart per :class:`Panel` in a grid (``columns``), each with a title, a legend, grid
lines, labelled axes (x label, y label; optionally a second y axis on the right for series on
another scale) and tick labels in a 3x5 bitmap font (text is drawn upper-case), series as
lines and baselines as dashed horizontal lines. ``panel_layout`` says where a panel's chart
and data map to in pixels. The older form ``{"gold": {"ppo": [...], "grpo": [...]}, ...}``
is one left-axis panel per key.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
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

_AXIS_GAP = 6  # pixels between an axis label, its tick labels and the axis
_DASH, _GAP = 8, 5  # a baseline's dash pattern, pixels on / off


def series_color(index: int) -> tuple[int, int, int]:
    """RGB colour of the ``index``-th entry of a panel (the palette cycles after 8): its
    series, then its right-axis series, then its baselines (see :func:`panel_entries`)."""
    return _PALETTE[index % len(_PALETTE)]


@dataclass
class Panel:
    """One line chart.

    ``series[name] = [(x, y), ...]`` are drawn against the left y axis, ``right[name]`` against
    a second y axis on the right with its own range (a metric on another scale, e.g. the gold
    score beside a reward model's score), ``baselines[name] = y`` (``right_baselines`` on the
    right axis) as dashed horizontal lines across the chart (e.g. the starting model's score).
    ``x_label`` / ``y_label`` / ``right_label`` name the axes. ``colors[label]`` is the palette
    index (``series_color``) of the entry whose legend reads ``label`` (its name; a right-axis
    one's ends in ``" (R)"``); an entry not in it takes its position in ``panel_entries`` (so
    charts that share names can share colours).
    """

    title: str
    series: dict[str, list[tuple[float, float]]]
    y_label: str = ""
    x_label: str = "step"
    right: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    right_label: str = ""
    baselines: dict[str, float] = field(default_factory=dict)
    right_baselines: dict[str, float] = field(default_factory=dict)
    colors: dict[str, int] = field(default_factory=dict)


def panel_entries(panel: Panel) -> list[tuple[str, str, object]]:
    """What a panel draws, in order, as ``(kind, name, data)``: kind ``"left"`` / ``"right"``
    (data: the points) then ``"baseline"`` / ``"right_baseline"`` (data: the y value). Entry
    ``i`` has a legend item (:func:`legend_label`) and colour ``series_color(i)``, unless
    ``panel.colors`` names another for its label (:func:`entry_colors`)."""
    return ([("left", n, p) for n, p in panel.series.items()] + [("right", n, p) for n, p in panel.right.items()]
            + [("baseline", n, v) for n, v in panel.baselines.items()]
            + [("right_baseline", n, v) for n, v in panel.right_baselines.items()])  # fmt: skip


def entry_colors(panel: Panel) -> list[int]:
    """The palette index of each of ``panel_entries(panel)``."""
    return [panel.colors.get(legend_label(kind, name), i) for i, (kind, name, _) in enumerate(panel_entries(panel))]


def legend_label(kind: str, name: str) -> str:
    """An entry's legend text: its name, marked ``(R)`` on the right axis."""
    return f"{name} (R)" if kind.startswith("right") else name


def _glyph(ch: str) -> np.ndarray:
    rows = _GLYPHS.get(ch, _GLYPHS["?"]).split()
    dots = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    return dots.repeat(_SCALE, 0).repeat(_SCALE, 1)


def _text_width(text: str) -> int:
    return len(text) * _ADVANCE - _SCALE if text else 0


def _text_mask(text: str) -> np.ndarray:
    """bool ``[_TEXT_H, width]``: the ink of ``text`` (upper-case) in the bitmap font."""
    mask = np.zeros((_TEXT_H, max(_text_width(text), 0)), dtype=bool)
    for i, ch in enumerate(text.upper()):
        glyph = _glyph(ch)
        mask[:, i * _ADVANCE:i * _ADVANCE + glyph.shape[1]] = glyph
    return mask


def _paint(img: np.ndarray, x: int, y: int, mask: np.ndarray, color) -> None:
    """Colour the True pixels of ``mask`` with its top-left corner at (x, y), clipped to the image."""
    h, w, _ = img.shape
    y0, y1, x0, x1 = max(y, 0), min(y + mask.shape[0], h), max(x, 0), min(x + mask.shape[1], w)
    if y0 < y1 and x0 < x1:
        img[y0:y1, x0:x1][mask[y0 - y:y1 - y, x0 - x:x1 - x]] = color


def _draw_text(img: np.ndarray, x: int, y: int, text: str, color, vertical: bool = False) -> None:
    """``text`` with its top-left corner at (x, y); ``vertical``: turned a quarter left (read
    bottom to top, as a y axis label)."""
    mask = _text_mask(text)
    _paint(img, x, y, np.rot90(mask) if vertical else mask, color)


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


def _nice_ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]; ``whole``:
    at least 1 apart (steps are whole numbers)."""
    raw = max((hi - lo) / count, 1.0) if whole else (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = [(first + i) * step for i in range(count * 3)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks if t <= hi + step * 1e-9]


def _tick_labels(ticks: list[float]) -> list[str]:
    """The ticks as text, with as many digits as their spacing needs (ticks 0.0002 apart near
    5.5 read 5.5414, 5.5416, ...): fixed decimals for everyday magnitudes, else exponents."""
    spacing = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(spacing)))
    labels = []
    for t in ticks:
        if t == 0 or 1e-3 <= abs(t) < 1e6 and decimals <= 4:
            labels.append(f"{t:.{decimals}f}")
        else:
            digits = max(1, math.floor(math.log10(abs(t))) - math.floor(math.log10(spacing)) + 1)
            labels.append(f"{t:.{digits}g}")
    return labels


def _value_range(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _check_points(where: str, points) -> list[tuple[float, float]]:
    clean = []
    for i, point in enumerate(points):
        if not isinstance(point, (tuple, list)) or len(point) != 2 or not all(_is_number(v) for v in point):
            raise TypeError(f"{where}[{i}] must be an (x, y) pair of numbers, got {point!r}")
        clean.append((float(point[0]), float(point[1])))
    return clean


def _check_named(where: str, named, check) -> dict:
    if not isinstance(named, dict):
        raise TypeError(f"{where} must be a dict by name, got {type(named).__name__}")
    for name in named:
        if not isinstance(name, str):
            raise TypeError(f"{where} keys must be str, got {name!r}")
    return {name: check(f"{where}[{name!r}]", value) for name, value in named.items()}


def _check_color(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{where} must be a palette index >= 0 (series_color), got {value!r}")
    return value


def _check_baseline(where: str, value) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise TypeError(f"{where} must be a finite number (the baseline's y), got {value!r}")
    return float(value)


def _check_panels(panels) -> list[Panel]:
    """``panels`` as a list of checked ``Panel``s (a dict {title: {series: points}} is one
    left-axis panel per title)."""
    if isinstance(panels, dict):
        if not panels:
            raise ValueError("panels must be a non-empty dict {panel title: {series name: [(x, y), ...]}} or list of Panel")
        for title, series in panels.items():
            if not isinstance(title, str):
                raise TypeError(f"panels keys must be str, got {title!r}")
            if not isinstance(series, dict):
                raise TypeError(f"panels[{title!r}] must be a dict {{series name: [(x, y), ...]}}, got {type(series).__name__}")
        panels = [Panel(title, series, y_label="") for title, series in panels.items()]
    if not isinstance(panels, (list, tuple)) or not panels:
        raise ValueError("panels must be a non-empty dict {panel title: {series name: [(x, y), ...]}} or list of Panel")
    out = []
    for i, panel in enumerate(panels):
        if not isinstance(panel, Panel):
            raise TypeError(f"panels[{i}] must be a Panel, got {type(panel).__name__}")
        where = f"panels[{panel.title!r}]" if isinstance(panel.title, str) else f"panels[{i}]"
        for name in ("title", "x_label", "y_label", "right_label"):
            if not isinstance(getattr(panel, name), str):
                raise TypeError(f"{where}.{name} must be a str, got {getattr(panel, name)!r}")
        out.append(Panel(
            panel.title, _check_named(where, panel.series, _check_points), panel.y_label, panel.x_label,
            _check_named(f"{where}.right", panel.right, _check_points), panel.right_label,
            _check_named(f"{where}.baselines", panel.baselines, _check_baseline),
            _check_named(f"{where}.right_baselines", panel.right_baselines, _check_baseline),
            _check_named(f"{where}.colors", panel.colors, _check_color),
        ))  # fmt: skip
    return out


def _finite(points) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


@dataclass
class PanelLayout:
    """Where a panel's chart lies in the image: the plot box ``left..right`` x ``top..bottom``
    (pixels; the axes are its left, bottom and, with a right axis, right edges) and the data
    ranges it maps, ``x_range`` and ``y_range`` (the left axis), ``right_range`` (None without
    a right axis), with their ticks."""

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    right_range: tuple[float, float] | None
    x_ticks: list[float]
    y_ticks: list[float]
    right_ticks: list[float]

    def x_px(self, x: float) -> float:
        lo, hi = self.x_range
        return self.left + (x - lo) / (hi - lo) * (self.right - self.left)

    def y_px(self, y: float, right_axis: bool = False) -> float:
        """The pixel row of ``y`` on the left axis (or the right one)."""
        lo, hi = self.right_range if right_axis else self.y_range
        return self.bottom - (y - lo) / (hi - lo) * (self.bottom - self.top)


def panel_layout(panel: Panel, x0: int, y0: int, width: int, height: int) -> PanelLayout:
    """The layout of ``panel`` drawn in the ``width x height`` cell whose top-left corner is
    pixel ``(x0, y0)``: two text rows on top (title; legend), then the chart; below it the x
    tick labels and the x label; on the left the y label (vertical) and tick labels, on the
    right the same for a right axis. Ranges span the finite points and the baselines."""
    entries = panel_entries(panel)
    points = [p for kind, _, pts in entries if kind in ("left", "right") for p in _finite(pts)]
    x_range = _value_range([x for x, _ in points])

    def axis_range(kinds):
        values = [y for kind, _, data in entries if kind == kinds[0] for _, y in _finite(data)]
        return _value_range(values + [v for kind, _, v in entries if kind == kinds[1]])

    y_range = axis_range(("left", "baseline"))
    has_right = any(kind in ("right", "right_baseline") for kind, _, _ in entries)
    right_range = axis_range(("right", "right_baseline")) if has_right else None
    x_ticks, y_ticks = _nice_ticks(*x_range, whole=panel.x_label == "step"), _nice_ticks(*y_range)
    right_ticks = _nice_ticks(*right_range) if has_right else []
    margin = 8 + _TEXT_H + _AXIS_GAP  # the outer edge, an axis label, its gap
    left = x0 + margin + max(map(_text_width, _tick_labels(y_ticks))) + _AXIS_GAP
    right = x0 + width - (margin + max(map(_text_width, _tick_labels(right_ticks))) + _AXIS_GAP if has_right else 16)
    top = y0 + 2 * _TEXT_H + 16
    bottom = y0 + height - 2 * _TEXT_H - 3 * _AXIS_GAP - 4
    return PanelLayout(left, top, right, bottom, x_range, y_range, right_range, x_ticks, y_ticks, right_ticks)


def _draw_y_axis(img, layout: PanelLayout, x0: int, width: int, label: str, right_axis: bool) -> None:
    ticks = layout.right_ticks if right_axis else layout.y_ticks
    edge = layout.right if right_axis else layout.left
    labels = _tick_labels(ticks)
    widest = max(map(_text_width, labels))
    for t, text in zip(ticks, labels):
        py = int(round(layout.y_px(t, right_axis)))
        if not right_axis:
            img[py, layout.left:layout.right + 1] = _GRID
            img[py, edge - 4:edge] = _INK
            _draw_text(img, edge - _AXIS_GAP - _text_width(text), py - _TEXT_H // 2, text, _INK)
        else:
            img[py, edge + 1:edge + 5] = _INK
            _draw_text(img, edge + _AXIS_GAP, py - _TEXT_H // 2, text, _INK)
    img[layout.top:layout.bottom + 1, edge] = _INK
    if label:
        middle = (layout.top + layout.bottom) // 2 + _text_width(label) // 2
        x = x0 + 8 if not right_axis else edge + 2 * _AXIS_GAP + widest
        _draw_text(img, x, middle - _text_width(label), label, _INK, vertical=True)


def _draw_panel(img: np.ndarray, panel: Panel, x0: int, y0: int, width: int, height: int) -> None:
    layout = panel_layout(panel, x0, y0, width, height)
    for t, text in zip(layout.x_ticks, _tick_labels(layout.x_ticks)):
        px = int(round(layout.x_px(t)))
        img[layout.top:layout.bottom + 1, px] = _GRID
        img[layout.bottom + 1:layout.bottom + 5, px] = _INK
        _draw_text(img, px - _text_width(text) // 2, layout.bottom + 7, text, _INK)
    _draw_y_axis(img, layout, x0, width, panel.y_label, right_axis=False)
    if layout.right_range is not None:
        _draw_y_axis(img, layout, x0, width, panel.right_label, right_axis=True)
    img[layout.bottom, layout.left:layout.right + 1] = _INK
    if panel.x_label:
        middle = (layout.left + layout.right) // 2
        _draw_text(img, middle - _text_width(panel.x_label) // 2, layout.bottom + 7 + _TEXT_H + _AXIS_GAP, panel.x_label, _INK)
    _draw_text(img, layout.left, y0 + 6, panel.title, _INK)

    entries = panel_entries(panel)
    legend_x, legend_y = layout.right, y0 + 6 + _TEXT_H + 4
    colors = [series_color(c) for c in entry_colors(panel)]
    for i, (kind, name, _) in reversed(list(enumerate(entries))):
        text = legend_label(kind, name)
        legend_x -= _text_width(text) + 26
        img[legend_y:legend_y + _TEXT_H, legend_x:legend_x + 12] = colors[i]
        if kind.endswith("baseline"):  # a dashed swatch, like its line
            img[legend_y:legend_y + _TEXT_H, legend_x + 4:legend_x + 7] = _BACKGROUND
        _draw_text(img, legend_x + 16, legend_y, text, _INK)

    clip = (layout.left + 1, layout.top, layout.right - 1, layout.bottom - 1)
    for i, (kind, _, data) in enumerate(entries):
        right_axis = kind.startswith("right")
        if kind.endswith("baseline"):
            py = layout.y_px(data, right_axis)
            for start in range(layout.left + 1, layout.right, _DASH + _GAP):
                _draw_segment(img, start, py, min(start + _DASH - 1, layout.right - 1), py, colors[i], clip)
            continue
        prev = None
        for x, y in sorted(data):
            if not (math.isfinite(x) and math.isfinite(y)):
                prev = None  # a gap in the line
                continue
            cur = (layout.x_px(x), layout.y_px(y, right_axis))
            _draw_segment(img, *(prev or cur), *cur, colors[i], clip)
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


def panel_origins(count: int, columns: int, width: int, height: int) -> list[tuple[int, int]]:
    """Top-left pixel ``(x, y)`` of each of ``count`` ``width x height`` cells, row by row in
    ``columns`` columns."""
    return [((i % columns) * width, (i // columns) * height) for i in range(count)]


def write_line_plot_png(path, panels: dict[str, dict[str, list[tuple[float, float]]]] | list[Panel], *,
                        width: int = 900, height: int = 300, columns: int = 1) -> None:  # fmt: skip
    """Write a PNG of line charts, each ``width x height`` pixels, in ``columns`` columns.

    ``panels``: a list of :class:`Panel`, or ``{title: {series: [(x, y), ...]}}`` (one
    left-axis panel per title, x label ``step``). Lines are points sorted by x (non-finite
    points leave a gap), colours from ``series_color`` in the order of ``panel_entries``; each
    axis spans its finite data and baselines. Image: RGB uint8, ``(width * columns) x (height *
    rows)``, cells placed by :func:`panel_origins`.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    for name, value, least in (("width", width, 200), ("height", height, 100), ("columns", columns, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    panels = _check_panels(panels)
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    img = np.empty((height * rows, width * columns, 3), dtype=np.uint8)
    img[:] = _BACKGROUND
    for panel, (x0, y0) in zip(panels, panel_origins(len(panels), columns, width, height)):
        _draw_panel(img, panel, x0, y0, width, height)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(_png_bytes(img))
