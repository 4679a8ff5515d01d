"""The TRL GRPO loss-step benchmark (``benchmarks/bench_trl_grpo.py``) on its tiny workload:
the rows are well formed, ours carries its ratios to TRL, the JSON keeps them, and without
TRL both rows carry the reason. Timings are never asserted."""

import json

import pytest
import torch

from rlhf_engine.benchmarks import bench_trl_grpo as bench
from rlhf_engine.benchmarks.common import write_json

CPU = torch.device("cpu")


def test_tiny_loss_step_rows(tmp_path, one_torch_thread):
    pytest.importorskip("trl")
    results = bench.run_workload(CPU, bench.TINY, quick=True)
    rows = {r.impl: r for r in results}
    assert sorted(rows) == ["TRL", "ours"]
    for row in results:
        assert row.error is None, row.error
        assert row.ms > 0 and row.peak_mem_bytes > 0 and row.flops > 0 and "V=512" in row.shape
    ours, trl = rows["ours"], rows["TRL"]
    assert ours.time_vs_trl == pytest.approx(ours.ms / trl.ms)
    assert ours.peak_vs_trl == pytest.approx(ours.peak_mem_bytes / trl.peak_mem_bytes)
    assert trl.time_vs_trl is None and trl.peak_vs_trl is None
    write_json(results, str(tmp_path / "trl_grpo.json"), CPU, quick=True)
    saved = {row["impl"]: row for row in json.loads((tmp_path / "trl_grpo.json").read_text())["results"]}
    assert saved["ours"]["time_vs_trl"] == pytest.approx(ours.time_vs_trl)


def test_without_trl_both_rows_say_why(monkeypatch):
    monkeypatch.setattr(bench, "trl_installed", lambda: False)
    rows = bench.run_workload(CPU, bench.TINY, quick=True)
    assert [r.impl for r in rows] == ["TRL", "ours"]
    assert all(r.ms is None and "TRL is not installed" in r.error for r in rows)
