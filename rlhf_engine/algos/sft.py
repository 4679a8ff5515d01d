"""Supervised fine-tuning on demonstrations (the first InstructGPT stage).

Loss: the mean negative logprob of the response tokens, ``-Σ lp·m / Σ m``, with the
logprobs from hidden states through the fused lm_head op (no full logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_engine.algos.common import SequenceBatch, SingleModelTrainer, collate, model_device, optimizer_step, step_generator
from rlhf_engine.algos.config import OptimConfig
from rlhf_engine.distributed.group import SINGLE, DataParallel
from rlhf_engine.models import PolicyModel


@dataclass
class SFTConfig(OptimConfig):
    steps: int = 400
    lr: float = 3e-3


def sft_loss(policy: PolicyModel, batch: SequenceBatch, parallel: DataParallel = SINGLE) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood of the responses; metrics ``loss``, ``tokens``.

    Data-parallel (``parallel``): ``batch`` is this rank's share, the denominator is the global
    token count (all-reduced), so the ranks' losses (and gradients) add up to the global batch's;
    the metrics are the global ones."""
    logp = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.response_start)
    mask = batch.response_mask.to(logp.dtype)
    tokens = parallel.sum(mask.sum())
    loss = -(logp * mask).sum() / tokens.clamp(min=1.0)
    return loss, {"loss": float(parallel.sum(loss.detach())), "tokens": float(tokens)}


class SFTTrainer(SingleModelTrainer):
    """SFT over a fixed list of ``(prompt, response)`` token lists.

    Step ``k`` trains on ``batch_size`` examples drawn (with replacement) by
    ``step_generator(seed, k, "sft")``, so a resumed run matches an uninterrupted one. Under
    ``parallel`` every rank draws the same global batch and trains on its contiguous share.
    """

    def __init__(self, policy: PolicyModel, examples: list[tuple[list[int], list[int]]], config: SFTConfig, *, pad_id: int,
                 parallel: DataParallel = SINGLE):  # fmt: skip
        if not examples:
            raise ValueError("SFTTrainer: examples is empty")
        super().__init__(policy, config.lr, config.weight_decay, parallel)
        self.policy, self.examples, self.config, self.pad_id = self.trained_model, examples, config, pad_id

    def step(self, step: int) -> dict[str, float]:
        generator = step_generator(self.config.seed, step, "sft")
        index = torch.randint(len(self.examples), (self.config.batch_size,), generator=generator).tolist()
        index = index[self.parallel.rows(self.config.batch_size)]
        batch = collate(
            [self.examples[i][0] for i in index], [self.examples[i][1] for i in index], self.pad_id, model_device(self.policy)
        )
        self.policy.train()
        loss, metrics = sft_loss(self.policy, batch, self.parallel)
        metrics["grad_norm"] = float(optimizer_step(self.optimizer, loss, self.config.grad_clip))
        return metrics
