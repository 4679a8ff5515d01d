"""``FusedRLOOTrainer``: TRL 1.16's ``RLOOTrainer`` with its loss computed from the last
hidden states by rlhf_engine's fused lm_head op.

TRL 1.16's RLOO puts the KL into the reward (``r - beta Σ_t (old_t - ref_t)`` per
completion, in ``_generate_and_score_completions``, from no-grad logprobs) and its loss
(``_compute_loss``) is a PPO-clipped objective on the *sequence-sum* log-ratio::

    logp_b = Σ_t lp_t m_t,   c_b = exp(logp_b - old_b),
    loss   = mean_b max(-A_b c_b, -A_b clip(c_b, 1 - ε, 1 + ε_high))

with no clamp of the log-ratio and no accumulation scaling (the HF Trainer's). Here the
per-token logprobs (and entropies, for the ``entropy`` metric) of the completion tokens are
:func:`rlhf_engine.ops.fused_linear_logprobs` on their hidden states, summed per completion,
and the loss is :func:`rlhf_engine.ops.policy_loss` on ``[B, 1]`` pseudo-tokens (loss
``"ppo"``, ``log_ratio_min = log_ratio_max = None``, ``token-mean``: the mean over
completions). The old / reference logprobs go through our ``add_fused_lm_head``, as in
:mod:`.dpo`. The metrics are TRL's (``entropy``, ``clip_ratio/*``).
"""

from __future__ import annotations

import torch
import trl.trainer.rloo_trainer as _rloo_module
from trl import RLOOTrainer
from trl.trainer.utils import nanmax, nanmin

from rlhf_engine.integrations.trl.lm_head import swapped_into
from rlhf_engine.integrations.trl.refusals import refuse_aux_loss, refuse_multimodal
from rlhf_engine.ops import fused_linear_logprobs, policy_loss


class FusedRLOOTrainer(RLOOTrainer):
    """TRL 1.16's ``RLOOTrainer`` (same arguments, same training, same logged metrics) whose
    loss is computed from the completion positions' last hidden states by
    :func:`rlhf_engine.ops.fused_linear_logprobs` and :func:`rlhf_engine.ops.policy_loss`:
    the ``[B, T, V]`` logits never exist. Every RLOOConfig option of the loss (``epsilon``,
    ``epsilon_high``, ``beta``, ``num_iterations``, ``normalize_advantages``, ...) and PEFT
    are supported; the backward recomputes the head's logits per vocabulary tile
    (``8·n·H·V`` FLOPs for ``n`` completion tokens), since each token's coefficient is
    known only once its completion is summed.

    Extra keyword arguments: ``backend`` and ``chunk_size``, as :class:`FusedGRPOTrainer`.

    Raises:
        ValueError: at construction, for the MoE load-balancing loss
            (``router_aux_loss_coef``), models that softcap or scale their logits, DeepSpeed
            ZeRO-3; at the loss step, a vision-language batch.
    """

    def __init__(self, *args, backend: str = "auto", chunk_size: int | None = None, **kwargs):
        with swapped_into(_rloo_module, backend, chunk_size):
            super().__init__(*args, **kwargs)
        refuse_aux_loss(self)
        self._op_options = dict(backend=backend, chunk_size=chunk_size)

    def _compute_loss(self, model, inputs):
        refuse_multimodal(self, inputs)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : -completion_ids.size(1)] = -100
        step = _SequenceRatioLoss(self, inputs, **self._op_options)
        with self.accelerator.autocast():
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, head_fn=step)
        _log_metrics(self, step, completion_mask)
        return loss


class _SequenceRatioLoss:
    """``head_fn`` of one loss step: ``(h [n, H], w, b, y [n], label_mask [B, L])`` -> TRL's
    RLOO loss (0-d). Keeps, detached, ``entropy [n]`` (fp32) and the sequence ratios ``c [B]``."""

    def __init__(self, trainer, inputs, *, backend: str, chunk_size: int | None):
        self.trainer, self.inputs = trainer, inputs
        self.backend, self.chunk_size = backend, chunk_size

    def __call__(self, hidden, weight, bias, labels, label_mask):
        trainer, inputs = self.trainer, self.inputs
        completion_mask = inputs["completion_mask"]
        scored = label_mask[:, -completion_mask.shape[1] :]
        logp, entropy = fused_linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=trainer.temperature, return_entropy=True,
            chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip
        # Σ_t lp_t m_t per completion, summed over TRL's [B, T] layout as TRL sums the old logprobs:
        # on-policy, the ratio is then exactly 1, as TRL's.
        per_token = logp.new_zeros(scored.shape).masked_scatter(scored, logp)
        sequence = (per_token * completion_mask).sum(1)
        old = inputs["old_logps"]
        loss, _ = policy_loss(
            sequence[:, None], old[:, None], inputs["advantages"], torch.ones_like(sequence[:, None], dtype=torch.bool),
            loss="ppo", clip_low=trainer.epsilon_low, clip_high=trainer.epsilon_high, log_ratio_min=None,
            log_ratio_max=None, aggregation="token-mean",
            backend=self.backend,
        )  # fmt: skip
        self.entropy = entropy.detach()
        self.scored = scored
        self.ratio = torch.exp(sequence.detach() - old)
        return loss


def _log_metrics(trainer, step: _SequenceRatioLoss, completion_mask) -> None:
    """TRL's RLOO loss-step metrics: the global token mean of the entropy; the clipped
    fractions of the sequence ratios (low: ``c < 1 - ε`` with ``A < 0``, high: ``c > 1 +
    ε_high`` with ``A > 0``) as means and extremes over all processes' completions."""
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    accelerator, advantages = trainer.accelerator, step.inputs["advantages"]
    weights = completion_mask[step.scored].to(step.entropy.dtype)
    stats = accelerator.reduce(
        torch.stack([(step.entropy * weights).sum(), completion_mask.sum().float()]), reduction="sum"
    )
    metrics["entropy"].append((stats[0] / stats[1].clamp(min=1.0)).item())
    low = ((step.ratio < 1 - trainer.epsilon_low) & (advantages < 0)).float()
    high = ((step.ratio > 1 + trainer.epsilon_high) & (advantages > 0)).float()
    low, high, region = (accelerator.gather(x) for x in (low, high, torch.maximum(low, high)))
    metrics["clip_ratio/low_mean"].append(low.nanmean().item())
    metrics["clip_ratio/low_min"].append(nanmin(low).item())
    metrics["clip_ratio/high_mean"].append(high.nanmean().item())
    metrics["clip_ratio/high_max"].append(nanmax(high).item())
    metrics["clip_ratio/region_mean"].append(region.nanmean().item())
