"""Supervised fine-tuning on demonstrations (the first InstructGPT stage).

Loss: the mean negative logprob of the response tokens, ``-Σ lp·m / Σ m``, with the
logprobs from hidden states through the fused lm_head op (no full logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_engine.algos.common import SequenceBatch, collate, make_optimizer, optimizer_step, step_generator
from rlhf_engine.algos.config import check_field
from rlhf_engine.models import PolicyModel


@dataclass
class SFTConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_field(self, "steps", self.steps >= 0, ">= 0")
        check_field(self, "batch_size", self.batch_size >= 1, ">= 1")
        check_field(self, "lr", self.lr > 0, "> 0")
        check_field(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        check_field(self, "grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)")


def sft_loss(policy: PolicyModel, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood of the responses; metrics ``loss``, ``tokens``."""
    logp = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.response_start)
    mask = batch.response_mask.to(logp.dtype)
    loss = -(logp * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"loss": loss.item(), "tokens": float(mask.sum())}


class SFTTrainer:
    """SFT over a fixed list of ``(prompt, response)`` token lists.

    Step ``k`` trains on ``batch_size`` examples drawn (with replacement) by
    ``step_generator(seed, k, "sft")``, so a resumed run matches an uninterrupted one.
    """

    def __init__(self, policy: PolicyModel, examples: list[tuple[list[int], list[int]]], config: SFTConfig, *, pad_id: int):
        if not examples:
            raise ValueError("SFTTrainer: examples is empty")
        self.policy, self.examples, self.config, self.pad_id = policy, examples, config, pad_id
        self.optimizer = make_optimizer(policy, config.lr, config.weight_decay)

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.optimizer}

    def step(self, step: int) -> dict[str, float]:
        generator = step_generator(self.config.seed, step, "sft")
        index = torch.randint(len(self.examples), (self.config.batch_size,), generator=generator).tolist()
        batch = collate([self.examples[i][0] for i in index], [self.examples[i][1] for i in index], self.pad_id)
        self.policy.train()
        loss, metrics = sft_loss(self.policy, batch)
        metrics["grad_norm"] = optimizer_step(self.optimizer, loss, self.config.grad_clip)
        return metrics
