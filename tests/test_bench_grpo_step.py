"""The GRPO-step benchmark against TRL (``benchmarks/bench_grpo_step.py``) on its tiny
workload: the rows are well formed, the phases add up to the step, and without TRL the TRL
rows carry the reason. Timings are never asserted."""

import json

import pytest
import torch

from rlhf_engine.benchmarks import bench_grpo_step as bench
from rlhf_engine.benchmarks.common import write_json

CPU = torch.device("cpu")


def rows_by_impl(results) -> dict:
    return {r.impl: r for r in results}


def check_timed_side(rows: dict, side: str) -> None:
    for phase in bench.PHASES:
        row = rows[f"{side}: {phase}"]
        assert row.error is None, row.error
        assert row.ms > 0 and row.tokens_per_s > 0 and row.peak_mem_bytes > 0 and row.rss_before_bytes > 0
        assert row.phase == phase and row.flops > 0
    # One timed step in one run: the medians are that step's phases, which split the step.
    parts = sum(rows[f"{side}: {phase}"].ms for phase in ("generate", "score", "update"))
    assert parts == pytest.approx(rows[f"{side}: step"].ms, rel=1e-9)


def test_tiny_step_rows_against_trl(tmp_path):
    pytest.importorskip("trl")
    results = bench.run_workload(CPU, bench.TINY, isolate=False)
    rows = rows_by_impl(results)
    assert sorted(rows) == sorted(f"{side}: {phase}" for side in ("ours", "TRL") for phase in bench.PHASES)
    check_timed_side(rows, "ours")
    check_timed_side(rows, "TRL")
    for phase in bench.PHASES:
        ours, trl = rows[f"ours: {phase}"], rows[f"TRL: {phase}"]
        assert ours.vs_trl_min <= ours.vs_trl <= ours.vs_trl_max
        assert ours.vs_trl == pytest.approx(ours.ms / trl.ms)  # one pair of runs: the ratio of the two
        assert trl.vs_trl is None
    write_json(results, str(tmp_path / "grpo.json"), CPU, quick=True)
    saved = json.loads((tmp_path / "grpo.json").read_text())["results"]
    assert {row["impl"] for row in saved} == set(rows) and all("vs_trl" in row for row in saved)


def test_without_trl_the_trl_rows_say_why_and_ours_run_in_a_child_process(monkeypatch):
    monkeypatch.setattr(bench, "trl_installed", lambda: False)
    rows = rows_by_impl(bench.run_workload(CPU, bench.TINY, isolate=True))
    check_timed_side(rows, "ours")
    for phase in bench.PHASES:
        assert rows[f"TRL: {phase}"].ms is None and "TRL is not installed" in rows[f"TRL: {phase}"].error
        assert rows[f"ours: {phase}"].vs_trl is None
