"""Rejection sampling / best-of-N fine-tuning (RAFT, Dong et al. 2023; ReST, Gulcehre et
al. 2023).

Each step samples ``samples_per_prompt`` responses for ``prompts_per_step`` prompts,
scores them (reward model or function), keeps each prompt's ``keep_top`` best (and only
those scoring at least ``threshold`` when set; never one with a NaN score, which
``rlhf_engine.rewards`` gives a sample no reward function scored), and takes one SFT step
on the kept responses. ``best_of_n`` is the inference-time version: the argmax per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_engine.algos.common import (
    SingleModelTrainer, collate, model_device, optimizer_step, sample_responses, step_generator,
)  # fmt: skip
from rlhf_engine.algos.config import check_field
from rlhf_engine.algos.rl import PromptFn, ScoreFn
from rlhf_engine.algos.sft import sft_loss
from rlhf_engine.models import PolicyModel
from rlhf_engine.rollout import Rollout, SamplingConfig


@dataclass
class RejectionSamplingConfig:
    steps: int = 30
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    keep_top: int = 1
    threshold: Optional[float] = None
    max_new_tokens: int = 12
    temperature: float = 1.0
    lr: float = 1e-3
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("prompts_per_step", "samples_per_prompt", "keep_top", "max_new_tokens"):
            check_field(self, name, getattr(self, name) >= 1, ">= 1")
        check_field(self, "steps", self.steps >= 0, ">= 0")
        check_field(self, "keep_top", self.keep_top <= self.samples_per_prompt, "<= samples_per_prompt")
        check_field(self, "temperature", self.temperature > 0, "> 0")
        check_field(self, "lr", self.lr > 0, "> 0")
        check_field(self, "grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)")


def sample_and_score(
    policy: PolicyModel, prompts: list[list[int]], n: int, score_fn: ScoreFn, sampling: SamplingConfig,
    generator: torch.Generator,
) -> tuple[Rollout, torch.Tensor]:  # fmt: skip
    """``n`` samples per prompt (grouped consecutively) and their fp32 ``[len(prompts)·n]`` scores."""
    rollout = sample_responses(policy, prompts, n, sampling, generator)
    return rollout, score_fn(*rollout.token_lists()).to(torch.float32)


def best_of_n(
    policy: PolicyModel, prompts: list[list[int]], n: int, score_fn: ScoreFn, sampling: SamplingConfig,
    generator: torch.Generator,
) -> list[list[int]]:  # fmt: skip
    """For each prompt, the highest-scoring of ``n`` sampled responses (token lists)."""
    rollout, scores = sample_and_score(policy, prompts, n, score_fn, sampling, generator)
    best = scores.view(len(prompts), n).argmax(dim=1) + torch.arange(len(prompts), device=scores.device) * n
    responses = rollout.token_lists()[1]
    return [responses[i] for i in best.tolist()]


class RejectionSamplingTrainer(SingleModelTrainer):
    """Best-of-N fine-tuning of ``policy`` (see the module docstring)."""

    def __init__(
        self, policy: PolicyModel, config: RejectionSamplingConfig, *, prompts: PromptFn, score_fn: ScoreFn,
        pad_token_id: int, eos_token_id: int,
    ):  # fmt: skip
        super().__init__(policy, config.lr)
        self.policy, self.config, self.prompts, self.score_fn = policy, config, prompts, score_fn
        self.sampling = SamplingConfig(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )  # fmt: skip

    def step(self, step: int) -> dict[str, float]:
        cfg = self.config
        prompts = self.prompts(cfg.prompts_per_step, step_generator(cfg.seed, step, "prompts"))
        n = cfg.samples_per_prompt
        rollout, scores = sample_and_score(self.policy, prompts, n, self.score_fn, self.sampling, step_generator(cfg.seed, step, "sample"))
        # an unscorable sample (NaN: no reward function scored it) ranks last and is never kept
        scorable = ~scores.isnan()
        top_scores, top = scores.nan_to_num(nan=-torch.inf).view(len(prompts), n).topk(cfg.keep_top, dim=1)
        keep = (top + torch.arange(len(prompts), device=top.device).unsqueeze(1) * n).flatten()
        kept = scorable[keep]
        if cfg.threshold is not None:
            kept &= top_scores.flatten() >= cfg.threshold
        keep = keep[kept]
        metrics = {"reward_mean": float(scores[scorable].mean()) if scorable.any() else float("nan"), "kept": float(keep.numel()),
                   "kept_reward_mean": float(scores[keep].mean()) if keep.numel() else 0.0}  # fmt: skip
        if keep.numel() == 0:
            return metrics
        all_prompts, all_responses = rollout.token_lists()
        batch = collate([all_prompts[i] for i in keep.tolist()], [all_responses[i] for i in keep.tolist()], self.sampling.pad_token_id,
                        model_device(self.policy))  # fmt: skip
        self.policy.train()
        loss, sft_metrics = sft_loss(self.policy, batch)
        metrics["loss"] = sft_metrics["loss"]
        metrics["grad_norm"] = float(optimizer_step(self.optimizer, loss, cfg.grad_clip))
        return metrics
