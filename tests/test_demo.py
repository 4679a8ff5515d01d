"""The embedded demo (``rlhf-engine demo``), end to end, for three seeds.

The issue's bar: on a 2-core CPU within 5 minutes, the reward model reaches >= 75%
held-out accuracy and PPO and GRPO each close >= 30% of the gap between the SFT policy's
gold score and 1.0, for any seed. The three seeds run as concurrent ``rlhf-engine demo``
processes (one torch thread each), which also exercises the CLI. The 5 minutes are not
asserted here: ``benchmarks/demo_time.py`` measures them.
"""

import json
import os
import subprocess
import sys

import pytest

from rlhf_engine.models import PolicyModel, ScalarHeadModel
from rlhf_engine.runlog import read_runlog

SEEDS = (0, 1, 2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the demo never needs the interpreter
    procs = {
        seed: subprocess.Popen(
            [sys.executable, "-m", "rlhf_engine.cli", "demo", "--out", str(root / f"seed{seed}"), "--seed", str(seed), "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        for seed in SEEDS
    }
    outputs = {seed: proc.communicate(timeout=900)[0] for seed, proc in procs.items()}
    for seed, proc in procs.items():
        assert proc.returncode == 0, f"demo seed {seed} failed:\n{outputs[seed]}"
    return {seed: (root / f"seed{seed}", outputs[seed]) for seed in SEEDS}


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_demo_meets_the_bar(demo_runs, seed):
    out, stdout = demo_runs[seed]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == seed
    assert summary["rm_accuracy"] >= 0.75, summary
    sft = summary["gold"]["sft"]
    assert 0.0 <= sft < 1.0
    for algo in ("ppo", "grpo"):
        closed = (summary["gold"][algo] - sft) / (1.0 - sft)
        assert closed >= 0.30, f"{algo} closed {closed:.0%} of the gap (seed {seed}): {summary}"
        assert summary["gap_closed"][algo] == pytest.approx(closed)
        assert 0.0 < summary["kl"][algo] < 10.0, summary  # moved away from SFT, but not wildly
    assert summary["seconds"] > 0  # reported; how long it took is a benchmark's business, not a test's
    assert "gap closed" in stdout and "grpo" in stdout  # the final table is printed


@pytest.mark.slow
def test_demo_writes_its_artifacts(demo_runs):
    out, _ = demo_runs[SEEDS[0]]
    records = read_runlog(out / "metrics.jsonl")
    phases = {r["phase"] for r in records}
    assert {"sft", "reward_model", "ppo", "grpo"} <= phases
    ppo = [r for r in records if r["phase"] == "ppo"]
    for key in ("reward_mean", "reward_std", "gold", "kl", "entropy", "clipfrac", "approx_kl",
                "explained_variance", "logprob_gap_max", "tokens_per_s"):  # fmt: skip
        assert key in ppo[-1], key
    assert max(r["logprob_gap_max"] for r in ppo) <= 1e-5
    assert (out / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    for name in ("sft", "ppo", "grpo"):
        PolicyModel.load(out / "checkpoints" / name)
    ScalarHeadModel.load(out / "checkpoints" / "reward_model")
