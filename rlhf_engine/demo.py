"""The embedded demo (``rlhf-engine demo``): InstructGPT's pipeline on the sorting task.

SFT on imperfect demonstrations -> a Bradley-Terry reward model on noisy preference
pairs -> PPO against the reward model (KL in the reward, critic, GAE), and GRPO from the
same SFT model on the task's verifiable reward. The task's hidden gold score (1 = the
prompt's digits sorted) measures each policy; the reward models never see it. Runs on a
2-core CPU in a few minutes and writes:

* ``metrics.jsonl``: one line per training step of every phase;
* ``checkpoints/<sft|reward_model|ppo|grpo>/``: the final models (safetensors);
* ``curves.png`` (:func:`demo_panels`): PPO's reward-model score beside the gold score (two
  y axes), the gold score of both RL runs against the SFT model's (a dashed line), KL, and
  the loss of every phase;
* ``summary.json``: ``rm_accuracy``, ``gold`` (sft / ppo / grpo), ``kl`` (ppo / grpo),
  ``seconds`` and more.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rlhf_engine.algos.common import check_device
from rlhf_engine.algos.evaluation import evaluate_policy
from rlhf_engine.algos.grpo import grpo_config
from rlhf_engine.algos.loop import run_steps
from rlhf_engine.algos.ppo import ppo_config
from rlhf_engine.algos.reward_model import RewardModelConfig, RewardModelTrainer, evaluate_reward_model
from rlhf_engine.algos.rl import RLConfig, RLTrainer
from rlhf_engine.algos.sft import SFTConfig, SFTTrainer
from rlhf_engine.curves import CURVE_COLUMNS, CURVE_HEIGHT, CURVE_WIDTH
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.plot import Panel, write_line_plot_png
from rlhf_engine.rollout import SamplingConfig
from rlhf_engine.runlog import RunLog
from rlhf_engine.tasks.sorting import SortingTask


@dataclass
class DemoConfig:
    """Sizes and step counts of the demo; the defaults fit a 2-core CPU in minutes."""

    seed: int = 0
    model: str = "tiny"
    # torch intra-op threads while the demo runs: the tiny models are overhead-bound, and
    # extra threads mostly spin-wait (several times slower on a busy 2-core machine).
    threads: int = 1
    # Where the models run. The demo is sized for the CPU; "cuda" works the same way.
    device: str = "cpu"
    demonstrations: int = 4000
    preference_pairs: int = 10000
    heldout_pairs: int = 1000
    eval_prompts: int = 512
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=400))
    reward_model: RewardModelConfig = field(default_factory=lambda: RewardModelConfig(steps=1000))
    ppo: RLConfig = field(default_factory=lambda: ppo_config(steps=40, prompts_per_step=64, lr=2e-4, kl_coef=0.1, critic_lr=1e-3))
    grpo: RLConfig = field(default_factory=lambda: grpo_config(steps=40, prompts_per_step=16, group_size=8, lr=5e-4, kl_coef=0.02))


def run_demo(out_dir: str | Path, config: DemoConfig | None = None, *, quiet: bool = False) -> dict:
    """Run the whole pipeline, write ``out_dir`` (see the module docstring), return the summary."""
    config = config or DemoConfig()
    check_device(config.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run_demo(Path(out_dir), config, quiet)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, config: DemoConfig, quiet: bool) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    task = SortingTask()
    data = torch.Generator().manual_seed(config.seed)
    demonstrations = task.demonstrations(config.demonstrations, data)
    pairs = task.preference_pairs(config.preference_pairs, data)
    heldout = task.preference_pairs(config.heldout_pairs, data)
    eval_prompts = task.sample_prompts(config.eval_prompts, data)
    sampling = SamplingConfig(
        max_new_tokens=task.max_response_len, temperature=1.0, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id
    )

    def evaluate(policy, reference=None):
        return evaluate_policy(policy, eval_prompts, task.gold_scores, sampling, reference=reference,
                               generator=torch.Generator().manual_seed(config.seed + 1))  # fmt: skip

    model_config = llama_config(config.model, task.vocab_size, pad_token_id=task.pad_token_id,
                                bos_token_id=task.bos_token_id, eos_token_id=task.eos_token_id)  # fmt: skip
    checkpoints = out / "checkpoints"
    with RunLog(out / "metrics.jsonl", total=_total_steps(config), desc="demo", quiet=quiet) as log:
        sft_policy = PolicyModel.from_config(model_config, seed=config.seed).to(config.device)
        sft_history = run_steps(SFTTrainer(sft_policy, demonstrations, replace(config.sft, seed=config.seed), pad_id=task.pad_token_id),
                                steps=config.sft.steps, phase="sft", log=log)  # fmt: skip
        sft_policy.save(checkpoints / "sft")
        sft_eval = evaluate(sft_policy)

        reward_model = ScalarHeadModel.from_policy(sft_policy)
        rm_history = run_steps(RewardModelTrainer(reward_model, pairs, replace(config.reward_model, seed=config.seed), pad_id=task.pad_token_id),
                               steps=config.reward_model.steps, phase="reward_model", log=log)  # fmt: skip
        reward_model.save(checkpoints / "reward_model")
        rm_eval = evaluate_reward_model(reward_model, heldout, pad_id=task.pad_token_id)
        log.log("reward_model_eval", config.reward_model.steps, rm_eval)

        results = {}
        for name, rl_config in (("ppo", config.ppo), ("grpo", config.grpo)):
            policy = copy.deepcopy(sft_policy)
            extra = (
                {"reward_model": reward_model, "critic": copy.deepcopy(reward_model)}  # InstructGPT: critic from the RM
                if name == "ppo"
                else {"reward_fn": task.gold_scores}
            )
            trainer = RLTrainer(
                replace(rl_config, seed=config.seed, max_new_tokens=task.max_response_len), policy=policy, reference=copy.deepcopy(sft_policy),
                prompts=task.sample_prompts, pad_token_id=task.pad_token_id, eos_token_id=task.eos_token_id,
                gold_fn=task.gold_scores, **extra,
            )  # fmt: skip
            history = run_steps(trainer, steps=rl_config.steps, phase=name, log=log)
            policy.save(checkpoints / name)
            results[name] = {"eval": evaluate(policy, reference=sft_policy), "history": history}

    summary = {
        "rm_accuracy": rm_eval["accuracy"],
        "rm_ece": rm_eval["ece"],
        "gold": {"sft": sft_eval["score"], **{k: v["eval"]["score"] for k, v in results.items()}},
        "kl": {k: v["eval"]["kl"] for k, v in results.items()},
        "gap_closed": {k: _gap_closed(sft_eval["score"], v["eval"]["score"]) for k, v in results.items()},
        "seed": config.seed,
        "seconds": time.perf_counter() - start,
    }
    histories = {"sft": sft_history, "reward_model": rm_history, **{k: v["history"] for k, v in results.items()}}
    write_line_plot_png(out / "curves.png", demo_panels(histories, sft_eval["score"]), width=CURVE_WIDTH, height=CURVE_HEIGHT,
                        columns=CURVE_COLUMNS)  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def demo_panels(histories: dict[str, list[dict]], sft_gold: float) -> list[Panel]:
    """The charts of ``curves.png`` from each phase's per-step metrics (``histories["sft" |
    "reward_model" | "ppo" | "grpo"]``, as ``run_steps`` returns them) and the SFT policy's gold
    score ``sft_gold`` (the evaluation's), drawn dashed as the baseline the RL runs start from.

    PPO's reward is the reward model's score and the gold score is the task's, on different
    scales: they get a y axis each. GRPO trains on the gold score itself, so its reward is the
    gold line of the second chart."""

    def line(phase: str, metric: str) -> list[tuple[int, float]]:
        return [(k, h[metric]) for k, h in enumerate(histories[phase]) if h.get(metric) is not None]

    rl = ("ppo", "grpo")
    return [
        Panel("ppo: reward model score and gold score", {"reward model": line("ppo", "reward_mean")},
              y_label="reward model score", right={"gold": line("ppo", "gold")}, right_label="gold score",
              right_baselines={"sft gold": sft_gold}),
        Panel("gold score of the samples", {name: line(name, "gold") for name in rl}, y_label="gold score",
              baselines={"sft": sft_gold}),
        Panel("kl to the sft model (per sequence)", {name: line(name, "kl") for name in rl}, y_label="kl"),
        Panel("policy loss", {name: line(name, "policy_loss") for name in rl}, y_label="policy loss"),
        Panel("ppo critic: value loss", {"ppo": line("ppo", "value_loss")}, y_label="value loss"),
        Panel("sft loss", {"sft": line("sft", "loss")}, y_label="token nll"),
        Panel("reward model: loss and pair accuracy", {"loss": line("reward_model", "loss")}, y_label="bradley-terry loss",
              right={"accuracy": line("reward_model", "accuracy")}, right_label="train pair accuracy"),
    ]  # fmt: skip


def _total_steps(config: DemoConfig) -> int:
    """Log calls of the demo (the progress bar's length): every step, plus the RM evaluation."""
    return config.sft.steps + config.reward_model.steps + 1 + config.ppo.steps + config.grpo.steps


def _gap_closed(before: float, after: float) -> float:
    """Fraction of the gap to a perfect score (1.0) that training closed."""
    return (after - before) / (1.0 - before) if before < 1.0 else 0.0


def format_summary(summary: dict) -> str:
    """The final table the CLI prints."""
    rows = [("policy", "gold", "gap closed", "KL to SFT")]
    rows.append(("sft", f"{summary['gold']['sft']:.3f}", "-", "-"))
    for name in ("ppo", "grpo"):
        rows.append((name, f"{summary['gold'][name]:.3f}", f"{summary['gap_closed'][name]:.0%}", f"{summary['kl'][name]:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"reward model held-out accuracy {summary['rm_accuracy']:.1%}, ECE {summary['rm_ece']:.3f}; {summary['seconds']:.0f} s")
    return "\n".join(lines)
