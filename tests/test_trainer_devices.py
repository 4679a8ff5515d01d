"""The trainers run where their models are: batches are built on the model's device.

The CUDA run is marked ``gpu`` (run ``pytest -m gpu`` on a GPU machine); the CPU checks
here cover the device plumbing that can fail without one (bad ``--device`` names).
"""

import copy

import pytest
import torch

from rlhf_engine import cli
from rlhf_engine.algos.common import check_device
from rlhf_engine.algos.dpo import DPOConfig, DPOTrainer
from rlhf_engine.algos.grpo import grpo_config
from rlhf_engine.algos.loop import run_steps
from rlhf_engine.algos.ppo import ppo_config
from rlhf_engine.algos.reward_model import RewardModelConfig, RewardModelTrainer, evaluate_reward_model
from rlhf_engine.algos.rl import RLTrainer
from rlhf_engine.algos.sft import SFTConfig, SFTTrainer
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.tasks.sorting import SortingTask


def test_check_device_names_the_problem(monkeypatch):
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device must be a torch device"):
        check_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_device("cuda")


@pytest.mark.parametrize("command", [["demo"], ["train", "--algo", "sft", "--model", "tiny", "--data", "unused.jsonl"]])
def test_cli_rejects_an_unusable_device(command, tmp_path, capsys):
    assert cli.main(command + ["--out", str(tmp_path), "--device", "not-a-device"]) == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.gpu
def test_every_phase_runs_on_cuda():
    task = SortingTask()
    data = torch.Generator().manual_seed(0)
    policy = PolicyModel.from_config(llama_config("tiny", task.vocab_size), seed=0).to("cuda")
    sft = run_steps(SFTTrainer(policy, task.demonstrations(256, data), SFTConfig(steps=5, batch_size=16), pad_id=0),
                    steps=5, phase="sft")  # fmt: skip
    pairs = task.preference_pairs(128, data)
    reward_model = ScalarHeadModel.from_policy(policy)
    run_steps(RewardModelTrainer(reward_model, pairs, RewardModelConfig(steps=5, batch_size=16), pad_id=0), steps=5, phase="rm")
    assert 0.0 <= evaluate_reward_model(reward_model, pairs[:32], pad_id=0)["accuracy"] <= 1.0
    dpo = run_steps(DPOTrainer(copy.deepcopy(policy), copy.deepcopy(policy), pairs, DPOConfig(steps=3, batch_size=8), pad_id=0),
                    steps=3, phase="dpo")  # fmt: skip
    runs = {}
    for name, config, extra in (
        ("ppo", ppo_config(steps=3, prompts_per_step=8, max_new_tokens=6), {"reward_model": reward_model, "critic": copy.deepcopy(reward_model)}),
        ("grpo", grpo_config(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=6), {"reward_fn": task.gold_scores}),
    ):  # fmt: skip
        trained = copy.deepcopy(policy)
        trainer = RLTrainer(config, policy=trained, reference=copy.deepcopy(policy), prompts=task.sample_prompts,
                            pad_token_id=0, eos_token_id=2, gold_fn=task.gold_scores, **extra)  # fmt: skip
        runs[name] = run_steps(trainer, steps=3, phase=name)
        assert all(p.device.type == "cuda" for p in trained.parameters())
    for history in (sft, dpo, *runs.values()):
        assert all(torch.isfinite(torch.tensor(list(step.values()), dtype=torch.float64)).all() for step in history)
    assert max(step["logprob_gap_max"] for run in runs.values() for step in run) <= 1e-4
