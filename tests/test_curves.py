"""The plot's panels (axis labels, a second y axis, dashed baselines, the grid), the train
run's curves from metrics.jsonl (rlhf_engine.curves) and the demo's charts: the PNG decoded
with the stdlib and its pixels checked against what ``panel_layout`` says is drawn where."""

import json
import math

import numpy as np
import pytest

from rlhf_engine.curves import CURVE_HEIGHT, CURVE_WIDTH, curve_panels, write_curves
from rlhf_engine.demo import demo_panels
from rlhf_engine.plot import Panel, entry_colors, panel_entries, panel_layout, series_color, write_line_plot_png
from tests.test_runlog_plot import color_pixels, decode_png

W, H = 600, 260
INK = (0, 0, 0)


def render(tmp_path, panels, **kwargs) -> np.ndarray:
    path = tmp_path / "p.png"
    write_line_plot_png(path, panels, width=W, height=H, **kwargs)
    return decode_png(path.read_bytes())


def rising(n=20, lo=0.0, hi=1.0):
    return [(x, lo + (hi - lo) * x / (n - 1)) for x in range(n)]


def test_a_baseline_is_a_dashed_line_at_its_value(tmp_path):
    panel = Panel("score", {"ppo": rising()}, y_label="score", baselines={"sft": 0.25})
    img = render(tmp_path, [panel])
    layout = panel_layout(panel, 0, 0, W, H)
    row = int(round(layout.y_px(0.25)))
    color = series_color(1)  # the entry after the one series
    on_line = color_pixels(img[row - 1:row + 3, layout.left:layout.right + 1], color)
    columns = np.unique(on_line[:, 1])
    span = layout.right - layout.left
    assert 0.5 * span < len(columns) < 0.8 * span  # across the chart, with gaps: dashed
    everywhere = color_pixels(img, color)
    chart = everywhere[everywhere[:, 0] > layout.top]  # the legend swatch sits above the chart
    assert np.abs(chart[:, 0] - row).max() <= 2  # nowhere else in the chart
    # Moving the baseline moves the line: the drawing follows the value.
    moved = render(tmp_path, [Panel("score", {"ppo": rising()}, baselines={"sft": 0.75})])
    assert len(color_pixels(moved[row - 1:row + 3, layout.left:layout.right + 1], color)) == 0


def test_a_right_axis_series_is_drawn_on_its_own_scale(tmp_path):
    # A reward-model score in [0, 400] and a gold score in [0.5, 0.9]: on one axis the gold
    # line would lie flat on the bottom; on its own it spans the chart.
    panel = Panel("ppo", {"rm score": rising(lo=0, hi=400)}, y_label="rm score", right={"gold": rising(lo=0.5, hi=0.9)},
                  right_label="gold", right_baselines={"sft gold": 0.6})  # fmt: skip
    img = render(tmp_path, [panel])
    layout = panel_layout(panel, 0, 0, W, H)
    assert layout.right_range is not None and layout.right_range[0] < 0.5 and layout.right_range[1] > 0.9
    gold = color_pixels(img, series_color(1))
    x = int(round(layout.x_px(15)))
    rows = gold[np.abs(gold[:, 1] - x) <= 1][:, 0]
    expected = layout.y_px(0.5 + 0.4 * 15 / 19, right_axis=True)
    assert abs(rows.mean() - expected) < 3
    assert abs(expected - layout.y_px(0.5 + 0.4 * 15 / 19)) > 80  # the left axis would put it elsewhere
    # The right axis is drawn: a vertical line of ink at its edge, tick labels right of it.
    assert (img[layout.top:layout.bottom, layout.right] == INK).all()
    assert len(color_pixels(img[layout.top:layout.bottom, layout.right + 4:], INK)) > 100
    # The right-axis baseline is on the right axis's scale.
    row = int(round(layout.y_px(0.6, right_axis=True)))
    assert len(color_pixels(img[row - 1:row + 3, layout.left:layout.right], series_color(2))) > 100
    assert [kind for kind, _, _ in panel_entries(panel)] == ["left", "right", "right_baseline"]


def test_axis_labels_are_drawn(tmp_path):
    labelled = Panel("loss", {"sft": rising()}, y_label="token nll", x_label="step")
    bare = Panel("loss", {"sft": rising()}, y_label="", x_label="")
    with_labels, without = render(tmp_path, [labelled]), render(tmp_path, [bare])
    layout = panel_layout(labelled, 0, 0, W, H)
    y_label_column = (slice(layout.top, layout.bottom), slice(0, 20))  # left of the tick labels
    x_label_rows = (slice(layout.bottom + 20, H), slice(layout.left, layout.right))  # under the tick labels
    for region in (y_label_column, x_label_rows):
        assert len(color_pixels(with_labels[region], INK)) > 20
        assert len(color_pixels(without[region], INK)) == 0
    # The y label reads bottom to top: taller than wide.
    ink = color_pixels(with_labels[y_label_column], INK)
    assert np.ptp(ink[:, 0]) > 3 * np.ptp(ink[:, 1])


def test_panels_fill_a_grid_row_by_row(tmp_path):
    panels = [Panel(f"p{i}", {"s": rising()}) for i in range(3)]
    img = render(tmp_path, panels, columns=2)
    assert img.shape == (2 * H, 2 * W, 3)
    for top, left in ((0, 0), (0, W), (H, 0)):
        assert len(color_pixels(img[top:top + H, left:left + W], series_color(0))) > 200
    assert (img[H:, W:] == 255).all()  # no fourth panel: the cell stays blank


def test_tick_labels_resolve_a_narrow_range(tmp_path):
    from rlhf_engine.plot import _nice_ticks, _tick_labels

    labels = _tick_labels(_nice_ticks(5.541, 5.5425))
    assert len(set(labels)) == len(labels) and labels[0].startswith("5.541")
    assert _tick_labels(_nice_ticks(0, 2.1, whole=True)) == ["0", "1", "2"]  # whole steps


@pytest.mark.parametrize(
    "panel, name",
    [
        (Panel("t", {"s": [(0, 1)]}, baselines={"b": "high"}), r"panels\['t'\].baselines\['b'\]"),
        (Panel("t", {"s": [(0, 1)]}, right={"g": [(0,)]}), r"panels\['t'\].right\['g'\]\[0\]"),
        (Panel("t", {"s": [(0, 1)]}, y_label=3), r"panels\['t'\].y_label"),
        (Panel("t", {"s": [(0, 1)]}, colors={"s": -1}), r"panels\['t'\].colors\['s'\]"),
        ("not a panel", r"panels\[0\]"),
    ],
)
def test_panel_validation(tmp_path, panel, name):
    with pytest.raises(TypeError, match=name):
        write_line_plot_png(tmp_path / "x.png", [panel])


# -- curves.png of a train run --------------------------------------------------------------


def records(phase, steps, **metrics):
    return [{"phase": phase, "step": k, "time": 0.1 * k, **{m: f(k) for m, f in metrics.items()}} for k in steps]


def test_curves_group_each_metric_across_phases():
    log = (records("grpo", range(4), reward_mean=lambda k: 0.1 * k, policy_loss=lambda k: -k, kl=lambda k: 0.01 * k,
                   entropy=lambda k: 5.0, gold=lambda k: 0.5 + 0.1 * k, lost=lambda k: None)
           + records("eval", (0, 2), reward_mean=lambda k: 0.2 * k, loss=lambda k: 1.0))  # fmt: skip
    panels = curve_panels(log)
    assert [p.title for p in panels] == ["reward (left) and gold score (right)", "policy_loss", "loss", "kl", "entropy"]
    reward = panels[0]
    assert reward.series == {"grpo": [(k, 0.1 * k) for k in range(4)], "eval": [(0, 0.0), (2, 0.4)]}
    assert reward.right == {"grpo": [(k, 0.5 + 0.1 * k) for k in range(4)]} and reward.right_label == "gold score"
    assert reward.baselines == {"grpo step 0": 0.0, "eval step 0": 0.0}  # each phase's starting policy
    assert panels[1].series == {"grpo": [(k, -k) for k in range(4)]} and panels[1].y_label == "policy_loss"
    # A resumed log that starts later has no step-0 baseline; no gold: no right axis.
    later = curve_panels(records("ppo", (3, 4), reward_mean=lambda k: float(k)))
    assert later[0].title == "reward" and later[0].baselines == {} and later[0].right == {}


def test_a_phase_keeps_its_colour_on_every_chart(tmp_path):
    # The evaluation phase is logged first (step -1), and only some metrics have it: a chart
    # numbering its own lines would swap the two phases' colours between charts.
    log = (records("grpo_eval", (-1,), reward_mean=lambda k: 0.0, kl=lambda k: 0.0)
           + records("grpo", range(3), reward_mean=lambda k: 0.1 * k, policy_loss=lambda k: -k, kl=lambda k: 0.01 * k,
                     gold=lambda k: 0.2 * k))  # fmt: skip
    colors = {}
    for panel in curve_panels(log):
        for (kind, name, _), color in zip(panel_entries(panel), entry_colors(panel)):
            colors.setdefault((name.removesuffix(" step 0"), kind == "right"), set()).add(color)
    assert colors == {("grpo_eval", False): {0}, ("grpo", False): {1}, ("grpo", True): {2}}
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in log))
    write_curves(path, tmp_path / "curves.png")
    img = decode_png((tmp_path / "curves.png").read_bytes())
    loss_chart = img[:CURVE_HEIGHT, CURVE_WIDTH:]  # policy_loss, right of the reward chart
    assert len(color_pixels(loss_chart, series_color(1))) > 200 and len(color_pixels(loss_chart, series_color(0))) == 0


def test_write_curves_draws_the_log_or_nothing(tmp_path):
    import json

    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    assert write_curves(path, tmp_path / "curves.png") is False and not (tmp_path / "curves.png").exists()
    path.write_text("".join(json.dumps(r) + "\n" for r in records("sft", range(5), loss=lambda k: 2.0 / (k + 1))))
    assert write_curves(path, tmp_path / "curves.png") is True
    img = decode_png((tmp_path / "curves.png").read_bytes())
    assert img.shape == (260, 700, 3)  # one panel
    assert len(color_pixels(img, series_color(0))) > 300


# -- the demo's charts --------------------------------------------------------------------


def test_demo_panels_put_rm_and_gold_scores_on_two_axes_with_the_sft_baseline(tmp_path):
    def history(n, **metrics):
        return [{m: f(k) for m, f in metrics.items()} for k in range(n)]

    histories = {
        "sft": history(10, loss=lambda k: 3.0 - 0.2 * k),
        "reward_model": history(10, loss=lambda k: 0.7 - 0.03 * k, accuracy=lambda k: 0.5 + 0.04 * k),
        "ppo": history(8, reward_mean=lambda k: -2.0 + k, gold=lambda k: 0.6 + 0.03 * k, kl=lambda k: 0.1 * k,
                       policy_loss=lambda k: -0.01 * k, value_loss=lambda k: 1.0 / (k + 1)),
        "grpo": history(8, reward_mean=lambda k: 0.6 + 0.04 * k, gold=lambda k: 0.6 + 0.04 * k, kl=lambda k: 0.05 * k,
                        policy_loss=lambda k: 0.0),
    }  # fmt: skip
    panels = demo_panels(histories, sft_gold=0.62)
    ppo = panels[0]
    assert ppo.series == {"reward model": [(k, -2.0 + k) for k in range(8)]}
    assert ppo.right == {"gold": [(k, 0.6 + 0.03 * k) for k in range(8)]} and ppo.right_baselines == {"sft gold": 0.62}
    gold = panels[1]
    assert set(gold.series) == {"ppo", "grpo"} and gold.baselines == {"sft": 0.62}
    titles = [p.title for p in panels]
    assert {"policy loss", "ppo critic: value loss", "sft loss", "reward model: loss and pair accuracy"} <= set(titles)
    assert all(p.y_label and p.x_label == "step" for p in panels)
    img = render(tmp_path, panels, columns=2)
    layout = panel_layout(gold, W, 0, W, H)  # the second cell of the first row
    row = int(round(layout.y_px(0.62)))
    assert len(color_pixels(img[row - 1:row + 3, layout.left:layout.right], series_color(2))) > 100
    assert math.isclose(layout.y_range[0], min(0.6, 0.62) - 0.05 * (0.88 - 0.6), rel_tol=1e-9)
