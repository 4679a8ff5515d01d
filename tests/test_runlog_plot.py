"""RunLog / read_runlog and the dependency-free PNG line plot."""

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from rlhf_engine.plot import series_color, write_line_plot_png
from rlhf_engine.runlog import RunLog, read_runlog

# ---- RunLog --------------------------------------------------------------------------


def test_runlog_writes_one_flushed_line_per_call(tmp_path):
    path = tmp_path / "sub" / "run.jsonl"
    log = RunLog(path, total=3, desc="test", quiet=True)
    log.log("sft", 1, {"loss": 2.5, "lr": torch.tensor(0.001)})
    # Flushed before close: a killed run keeps what it logged.
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["phase"] == "sft" and record["step"] == 1 and record["loss"] == 2.5
    assert record["lr"] == pytest.approx(0.001) and record["time"] >= 0
    log.log("ppo", 2, {"kl": float("nan"), "reward": 1})
    log.close()
    records = read_runlog(path)
    assert [r["phase"] for r in records] == ["sft", "ppo"]
    assert records[1]["kl"] is None and records[1]["reward"] == 1  # NaN is written as null
    # Reopening appends (a resumed run continues its log).
    with RunLog(path, total=1, desc="test", quiet=True) as log:
        log.log("ppo", 3, {"reward": 2.0})
    assert [r["step"] for r in read_runlog(path)] == [1, 2, 3]


def test_runlog_progress_bar_and_quiet(tmp_path, capsys):
    with RunLog(None, total=2, desc="demo-bar", quiet=False) as log:
        log.log("grpo", 1, {"reward": 0.25, "gold": 0.5})
    err = capsys.readouterr().err
    assert "demo-bar" in err and "reward" in err
    with RunLog(tmp_path / "q.jsonl", total=2, desc="quiet-bar", quiet=True) as log:
        log.log("grpo", 1, {"reward": 0.25})
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize(
    "args, error, name",
    [
        (("sft", 1, {"step": 1.0}), ValueError, "reserved key 'step'"),
        (("sft", 1.5, {}), TypeError, "step"),
        (("", 1, {}), TypeError, "phase"),
        (("sft", 1, {"loss": "high"}), TypeError, "metrics\\['loss'\\]"),
        (("sft", 1, {"loss": torch.ones(2)}), ValueError, "metrics\\['loss'\\]"),
        (("sft", 1, [("loss", 1.0)]), TypeError, "metrics"),
    ],
)
def test_runlog_validation(tmp_path, args, error, name):
    with RunLog(tmp_path / "v.jsonl", total=1, desc="v", quiet=True) as log:
        with pytest.raises(error, match=name):
            log.log(*args)


def test_runlog_constructor_validation(tmp_path):
    with pytest.raises(TypeError, match="total"):
        RunLog(None, total=1.0, desc="x", quiet=True)
    with pytest.raises(TypeError, match="path"):
        RunLog(3, total=1, desc="x", quiet=True)


def test_read_runlog_torn_last_line_and_bad_middle_line(tmp_path):
    path = tmp_path / "run.jsonl"
    good = json.dumps({"phase": "sft", "step": 1, "time": 0.1})
    path.write_text(good + "\n" + '{"phase": "sft", "st')
    assert read_runlog(path) == [json.loads(good)]
    path.write_text(good + "\n{oops\n" + good + "\n")
    with pytest.raises(ValueError, match=f"{path}:2:"):
        read_runlog(path)
    path.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="not a RunLog record"):
        read_runlog(path)


# ---- PNG -------------------------------------------------------------------------------


def decode_png(data: bytes) -> np.ndarray:
    """A strict little decoder for what the writer promises: 8-bit RGB, filter 0, valid CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, color_type, compression, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color_type, compression, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()  # filter type None on every row
    return rows[:, 1:].reshape(h, w, 3)


def color_pixels(img, color):
    return np.argwhere((img == np.array(color, dtype=np.uint8)).all(-1))


def test_png_decodes_with_panels_and_series(tmp_path):
    xs = list(range(0, 101, 5))
    panels = {
        "gold": {"ppo": [(x, 0.7 + 0.003 * x) for x in xs], "grpo": [(x, 0.7 + 0.002 * x) for x in xs]},
        "kl": {"ppo": [(x, 1e-3 * x) for x in xs]},
    }
    path = tmp_path / "plots" / "curves.png"
    write_line_plot_png(path, panels, width=400, height=200)
    img = decode_png(path.read_bytes())
    assert img.shape == (400, 400, 3)
    for panel, top in (("gold", 0), ("kl", 200)):
        ink = color_pixels(img[top:top + 200], (0, 0, 0))
        assert len(ink) > 200, panel  # axes, ticks and labels
    ppo = color_pixels(img[:200], series_color(0))
    grpo = color_pixels(img[:200], series_color(1))
    assert len(ppo) > 300 and len(grpo) > 300
    # Rising lines: pixels on the right sit higher (smaller row) than on the left.
    plot_ppo = ppo[ppo[:, 0] > 40]  # below the legend swatch
    left = plot_ppo[plot_ppo[:, 1] < 150][:, 0].mean()
    right = plot_ppo[plot_ppo[:, 1] > 300][:, 0].mean()
    assert right < left - 50
    # The second panel has only one series: no second colour there.
    assert len(color_pixels(img[200:], series_color(1))) == 0
    assert len(color_pixels(img[200:], series_color(0))) > 300


def test_png_edge_cases(tmp_path):
    # Constant series, a NaN gap, an empty series: still a valid image.
    panels = {"flat": {"a": [(0, 1.0), (1, 1.0), (2, math.nan), (3, 1.0)], "empty": []}}
    path = tmp_path / "edge.png"
    write_line_plot_png(path, panels)
    img = decode_png(path.read_bytes())
    assert img.shape == (300, 900, 3)
    assert len(color_pixels(img, series_color(0))) > 100


@pytest.mark.parametrize(
    "panels, kwargs, error, name",
    [
        ({}, {}, ValueError, "panels"),
        ({"a": [(0, 1)]}, {}, TypeError, r"panels\['a'\]"),
        ({"a": {"s": [(0, 1, 2)]}}, {}, TypeError, r"panels\['a'\]\['s'\]\[0\]"),
        ({"a": {"s": [(0, "1")]}}, {}, TypeError, r"panels\['a'\]\['s'\]\[0\]"),
        ({"a": {"s": [(0, 1)]}}, {"width": 10}, ValueError, "width"),
        ({"a": {"s": [(0, 1)]}}, {"height": 100.0}, TypeError, "height"),
    ],
)
def test_plot_validation(tmp_path, panels, kwargs, error, name):
    with pytest.raises(error, match=name):
        write_line_plot_png(tmp_path / "x.png", panels, **kwargs)
