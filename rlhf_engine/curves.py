"""``curves.png`` of a run from its ``metrics.jsonl``: one chart per metric, one line per phase.

``rlhf-engine train`` writes it after the run (rank 0) from the whole log, the steps of
earlier resumed runs included. Every phase in the log is drawn (the algorithm's, and any
other a run logs, such as an evaluation phase): a metric logged by several phases is one
chart with a line per phase, on the same axis. The charts come in this order:

1. the reward (``reward_mean``), with the hidden ``gold`` score on a second y axis when the
   log has one (another scale), and each phase's reward at step 0 as a dashed baseline (the
   starting policy's score, e.g. the SFT model's);
2. the losses (every metric named ``loss`` or ``*_loss``);
3. ``kl``, then every other metric in the order the log first shows it.

A phase has one colour on every chart (its step-0 baseline too), in the order the log first
shows the phases; the gold score takes the next. A metric with no finite value gets no chart.
"""

from __future__ import annotations

import math
from pathlib import Path

from rlhf_engine.plot import Panel, write_line_plot_png
from rlhf_engine.runlog import read_runlog

_NOT_METRICS = ("phase", "step", "time")
REWARD, GOLD = "reward_mean", "gold"
CURVE_COLUMNS, CURVE_WIDTH, CURVE_HEIGHT = 2, 700, 260


def _series(records: list[dict], metric: str) -> dict[str, list[tuple[float, float]]]:
    """``{phase: [(step, value), ...]}`` of the finite values of ``metric``."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        value = r.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.setdefault(r["phase"], []).append((r["step"], value))
    return out


def _metric_order(records: list[dict]) -> list[str]:
    """The log's metrics (first-seen order) arranged as the module docstring says; ``gold``
    is left out when it goes on the reward chart's right axis."""
    seen = list(dict.fromkeys(k for r in records for k in r if k not in _NOT_METRICS))
    losses = [m for m in seen if m == "loss" or m.endswith("_loss")]
    first = [REWARD] if REWARD in seen else []
    first += losses + (["kl"] if "kl" in seen else [])
    skip = set(first) | ({GOLD} if REWARD in seen else set())
    return first + [m for m in seen if m not in skip]


def curve_panels(records: list[dict]) -> list[Panel]:
    """The charts of a RunLog's ``records`` (``read_runlog``), as the module docstring says."""
    phases = {phase: i for i, phase in enumerate(dict.fromkeys(r["phase"] for r in records))}
    panels = []
    for metric in _metric_order(records):
        series = _series(records, metric)
        if not series:
            continue
        if metric != REWARD:
            panels.append(Panel(metric, series, y_label=metric, colors=phases))
            continue
        gold = _series(records, GOLD)
        starts = {f"{phase} step 0": points[0][1] for phase, points in series.items() if points[0][0] == 0}
        colors = {**phases, **{f"{phase} step 0": i for phase, i in phases.items()}}
        colors.update({f"{phase} (R)": len(phases) + i for i, phase in enumerate(gold)})
        panels.append(Panel(
            "reward" + (" (left) and gold score (right)" if gold else ""), series, y_label="reward",
            right=gold, right_label="gold score" if gold else "", baselines=starts, colors=colors,
        ))  # fmt: skip
    return panels


def write_curves(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Write ``png_path`` from the RunLog at ``metrics_path`` (:func:`curve_panels`, in
    ``CURVE_COLUMNS`` columns); False, writing nothing, when the log holds no metric to draw
    (a run of 0 steps)."""
    panels = curve_panels(read_runlog(metrics_path))
    if not panels:
        return False
    write_line_plot_png(png_path, panels, width=CURVE_WIDTH, height=CURVE_HEIGHT, columns=CURVE_COLUMNS)
    return True
