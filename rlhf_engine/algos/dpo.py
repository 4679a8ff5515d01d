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
        batch = pair_batch(records, self.pad_id, model_device(self.policy))
        self.policy.train()
        policy_chosen, policy_rejected = response_logprob_sums(self.policy, batch).split(len(records))
        with torch.no_grad():
            ref_chosen, ref_rejected = response_logprob_sums(self.reference, batch).split(len(records))
        nll = None
        if cfg.nll_coef > 0:
            chosen_lengths = batch.response_mask[: len(records)].sum(dim=1).clamp(min=1)
            nll = (-policy_chosen / chosen_lengths).mean()
        loss, metrics = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=cfg.beta, loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing, nll_loss=nll, nll_coef=cfg.nll_coef,
        )  # fmt: skip
        world = self.parallel.world_size
        # the global loss is the mean of the ranks' means (equal shares); FSDP sums the gradients
        out = self.parallel.sum_floats({"loss": float(loss.detach()) / world, **{k: float(v) / world for k, v in metrics.items()}})
        out["grad_norm"] = float(optimizer_step(self.optimizer, loss / world if world > 1 else loss, cfg.grad_clip))
        return out
