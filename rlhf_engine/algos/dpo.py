"""Direct preference optimization and its variants (Rafailov et al. 2023; the losses: ``rlhf_engine/algos/preference_losses.py``).

Per pair, with sequence-summed response logprobs from ``ops.sequence_logprobs`` (hidden
states through the fused lm_head, no full logits)::

    h = β·[(lp_w − ref_w) − (lp_l − ref_l)]

``loss_type`` ``"sigmoid"`` (DPO; with ``label_smoothing`` ε, cDPO), ``"ipo"``, ``"hinge"``;
``nll_coef`` α adds RPO's ``α·NLL(y_w)/|y_w|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_engine import ops
from rlhf_engine.algos.common import (
    SequenceBatch, SingleModelTrainer, freeze, model_device, optimizer_step, pair_batch, step_generator,
)  # fmt: skip
from rlhf_engine.algos.config import OptimConfig, check_field
from rlhf_engine.algos.preference_losses import DPO_LOSS_TYPES, dpo_loss
from rlhf_engine.distributed.group import SINGLE, DataParallel
from rlhf_engine.models import PolicyModel


@dataclass
class DPOConfig(OptimConfig):
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-4
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    nll_coef: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_field(self, "beta", self.beta > 0, "> 0")
        check_field(self, "loss_type", self.loss_type in DPO_LOSS_TYPES, f"one of {DPO_LOSS_TYPES}")
        check_field(self, "label_smoothing", 0 <= self.label_smoothing < 0.5, "in [0, 0.5)")
        check_field(self, "nll_coef", self.nll_coef >= 0, ">= 0")


def response_logprob_sums(policy: PolicyModel, batch: SequenceBatch) -> torch.Tensor:
    """fp32 ``[B]``: ``Σ_t lp_t`` over each response."""
    hidden = policy.response_hidden(batch.input_ids, batch.attention_mask, batch.response_start)
    return ops.sequence_logprobs(hidden, policy.lm_head_weight, batch.response_ids, batch.response_mask, bias=policy.lm_head_bias)


def pair_loss(policy: PolicyModel, reference: PolicyModel, records: list[dict], config: DPOConfig,
              pad_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """``dpo_loss`` of ``config`` over the pair ``records`` (the reference without gradients):
    ``(loss, metrics)``, the loss and every metric a mean over the pairs (``chosen_reward``,
    ``rejected_reward``, ``reward_margin``, ``reward_accuracy``, and ``nll_loss`` with RPO's
    ``nll_coef``). What a training step minimises and ``train --eval-data`` reports."""
    batch = pair_batch(records, pad_id, model_device(policy))
    policy_chosen, policy_rejected = response_logprob_sums(policy, batch).split(len(records))
    with torch.no_grad():
        ref_chosen, ref_rejected = response_logprob_sums(reference, batch).split(len(records))
    nll = None
    if config.nll_coef > 0:
        chosen_lengths = batch.response_mask[: len(records)].sum(dim=1).clamp(min=1)
        nll = (-policy_chosen / chosen_lengths).mean()
    return dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=config.beta, loss_type=config.loss_type,
        label_smoothing=config.label_smoothing, nll_loss=nll, nll_coef=config.nll_coef,
    )  # fmt: skip


class DPOTrainer(SingleModelTrainer):
    """DPO on ``{"prompt", "chosen", "rejected"}`` records against a frozen reference.

    Under ``parallel`` every rank draws the same global batch of pairs and trains on its
    contiguous share; the reference is a full replica on every rank (no collective). The loss
    and the metrics are means over the global pairs (the ranks' means, equal shares, averaged).
    """

    def __init__(self, policy: PolicyModel, reference: PolicyModel, pairs: list[dict], config: DPOConfig, *, pad_id: int,
                 parallel: DataParallel = SINGLE):  # fmt: skip
        if not pairs:
            raise ValueError("DPOTrainer: pairs is empty")
        super().__init__(policy, config.lr, config.weight_decay, parallel)
        reference = freeze(reference.to(parallel.device) if parallel.distributed else reference)
        self.policy, self.reference, self.pairs, self.config, self.pad_id = self.trained_model, reference, pairs, config, pad_id

    def step(self, step: int) -> dict[str, float]:
        cfg = self.config
        index = torch.randint(len(self.pairs), (cfg.batch_size,), generator=step_generator(cfg.seed, step, "dpo")).tolist()
        records = [self.pairs[i] for i in index[self.parallel.rows(cfg.batch_size)]]
        self.policy.train()
        loss, metrics = pair_loss(self.policy, self.reference, records, cfg, self.pad_id)
        world = self.parallel.world_size
        # the global loss is the mean of the ranks' means (equal shares); FSDP sums the gradients
        out = self.parallel.sum_floats({"loss": float(loss.detach()) / world, **{k: float(v) / world for k, v in metrics.items()}})
        out["grad_norm"] = float(optimizer_step(self.optimizer, loss / world if world > 1 else loss, cfg.grad_clip))
        return out
