"""TRL 1.16's GRPO loss-step metrics, under TRL's names and with TRL's values, computed
from a :class:`~rlhf_engine.integrations.trl._grpo_loss.LossStep`'s detached ``[B, T]``
logprobs (the op's own metrics are local token means; TRL's are reduced over processes
as sums and counts, and some are per-sequence extremes).

Two reductions, as TRL's: the *global mean* of a ``[B, T]`` quantity is ``Σ x m / Σ m``
over all processes; of a ``[B, 1]`` one (a sequence-level ratio) ``Σ x / B`` (every
sequence counts, padding-only ones included). The *sequence means* ``Σ_t x m / Σ_t m``
(NaN for a sequence without a valid token, which ``nanmin`` / ``nanmax`` skip) give the
extremes ``clip_ratio/low_min`` and ``clip_ratio/high_max``.

Logged: ``kl`` (``beta != 0``: the k3 estimate ``e^(ref - lp) - (ref - lp) - 1``, times the
ratio with ``use_bias_correction_kl``), ``entropy``; for the clipped losses
``clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}`` (ratio ``c`` bounded by
``delta`` when set; low: ``c < 1 - ε`` with ``A < 0``, high: ``c > 1 + ε_high`` with ``A >
0``); for cispo ``cispo_clip_ratio`` (``r > ε_high`` with ``A > 0``); for vespo
``vespo/phi_seq_mean``; with an entropy bonus ``policy_loss`` (the loss before the bonus
and before TRL's own accumulation scaling) and, at optimizer steps, ``entropy_coef``.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import nanmax, nanmin

from rlhf_engine.integrations.trl._grpo_loss import CLIPPED_LOSSES, LossStep


def importance_ratio(step: LossStep) -> torch.Tensor:
    """TRL's ``coef_1``: ``exp(lp - old)`` ``[B, T]`` (token level) or the sequence ratio
    ``exp(Σ (lp - old) m / max(Σ m, 1))`` ``[B, 1]``."""
    log_ratio = step.logp - step.old_logp
    if step.plan.sequence_level:
        mask = step.mask
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.exp(log_ratio)


def log_loss_metrics(trainer, step: LossStep) -> None:
    """Append this micro-batch's metrics to ``trainer._metrics[mode]``, as TRL's ``_compute_loss``."""
    plan, mask, accelerator = step.plan, step.mask, trainer.accelerator
    metrics = trainer._metrics[step.mode]

    def global_mean(x):
        if x.shape[1] == 1:
            total, count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            total, count = (x * mask).sum(), mask.sum().float()
        totals = accelerator.reduce(torch.stack([total, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def sequence_means(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    if trainer._entropy_bonus_enabled:
        metrics["policy_loss"].append(accelerator.gather(step.policy_loss).nanmean().item())
        if step.mode == "train" and accelerator.sync_gradients:
            metrics["entropy_coef"].append(trainer.entropy_coef)
    ratio = importance_ratio(step)
    if plan.beta != 0.0:
        ref_gap = step.inputs["ref_per_token_logps"] - step.logp
        kl = torch.exp(ref_gap) - ref_gap - 1
        metrics["kl"].append(global_mean(kl * ratio if plan.bias_correction_kl else kl))
    metrics["entropy"].append(global_mean(step.entropy))
    advantages = step.advantages
    if plan.loss_type in CLIPPED_LOSSES:
        bounded = ratio if plan.delta is None else ratio.clamp(max=plan.delta)
        low = ((bounded < 1 - plan.clip_low) & (advantages < 0)).float()
        high = ((bounded > 1 + plan.clip_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(accelerator.gather(sequence_means(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(accelerator.gather(sequence_means(high))).item())
    elif plan.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_mean(((ratio > plan.clip_high) & (advantages > 0)).float()))
    elif plan.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"].append(global_mean(step.phi_seq))
