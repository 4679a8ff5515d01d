"""Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning
for Reasoning Language Models", PRIME-RL; verl's ``clip_cov`` / ``kl_cov`` losses).

Both pick a few tokens by the centred covariance of advantage and logprob over the batch's
valid tokens (``m != 0``), the tokens whose update drives the policy's entropy down the
most, and treat them apart. Notation as ``reference/policy_loss.py``; ``delta = lp - old``,
``r = exp(delta)`` **unclamped** (as verl writes both losses):

    cov_t = (A_t - mean(A)) (lp_t - mean(lp))

* ``clip_cov``: PPO's clipped loss ``l = max(-A r, -A clip(r, 1-eps_low, 1+eps_high))``.
  Candidates: valid tokens not clipped by PPO (``L2 > L1`` false) with ``lb < cov < ub``.
  ``max(int(clip_cov_ratio * sum(m)), 1)`` of them, drawn at random (the first entries of
  ``torch.randperm(#candidates)`` over the candidates in row-major order, verl's draw),
  lose their loss: ``l_t = 0`` there (so no gradient either). The means are mask-weighted
  (``sum(x m) / sum(m)``). Metrics: ``clipfrac`` (the masked mean of "dropped", verl's
  ``pg_clipfrac``), ``ppo_kl`` (mean ``old - lp``).
* ``kl_cov``: ``l = -A r`` on every token, plus ``ppo_kl_coef |delta|`` on the ``k = max(1,
  int(n_valid * kl_cov_ratio))`` tokens of largest ``cov`` (``torch.topk``; none without a
  valid token). The means are plain means over the ``n_valid`` valid tokens, as verl's.
  Metric: ``ppo_kl`` (mean ``|delta|``, verl's name for it here).

For a bool mask (verl's ``response_mask``) the two kinds of mean are the same. Then, for
both, ``l <- l * is_weights`` and the aggregation of ``reference/aggregation.py``. Metrics
are mask-weighted means over the valid tokens, 0 without one.

Written for autograd and clarity; the ops (``rlhf_engine/ops/cov_losses.py``) pick the
tokens the same way and compute the loss with the fused ``policy_loss``.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.aggregation import aggregate_ref
from rlhf_engine.reference.policy_loss import _clip, per_token, sequence_bounds


def _flat_inputs(logp, old_logp, advantages, mask, is_weights, cu_seqlens):
    """Flat ``[N]`` tensors in ``logp``'s dtype (per-sequence advantages / weights broadcast)."""
    bounds = sequence_bounds(logp.numel(), logp.shape, cu_seqlens)
    lp = logp.reshape(-1)
    old = old_logp.reshape(-1).to(lp.dtype).detach()
    adv = per_token(advantages, logp.shape, bounds).to(lp.dtype)
    isw = None if is_weights is None else per_token(is_weights, logp.shape, bounds).to(lp.dtype)
    m = mask.reshape(-1).to(lp.dtype)
    max_len = logp.shape[1] if (cu_seqlens is None and logp.dim() == 2) else None
    return lp, old, adv, m, mask.reshape(-1) != 0, isw, bounds, max_len


def _weighted_mean(x, m, active):
    count = m[active].sum()
    return (x * m)[active].sum() / count if count > 0 else x.new_zeros(())


def clip_cov_ref(
    logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, clip_cov_ratio=0.0002, clip_cov_lb=1.0,
    clip_cov_ub=5.0, is_weights=None, aggregation="token-mean", count_empty_seqs=None, normalizer=None,
    cu_seqlens=None, generator=None,
):
    """The spec of ``ops.clip_cov_loss`` (same arguments): ``(loss, {"clipfrac", "ppo_kl"})``
    in ``logp``'s dtype, differentiable w.r.t. ``logp``. The draw uses ``generator`` (the
    default CPU generator when None)."""
    clip_high = clip_low if clip_high is None else clip_high
    lp, old, adv, m, active, isw, bounds, max_len = _flat_inputs(
        logp, old_logp, advantages, mask, is_weights, cu_seqlens
    )
    ratio = torch.exp(lp - old)
    loss1 = -adv * ratio
    loss2 = -adv * _clip(ratio, 1 - clip_low, 1 + clip_high)
    with torch.no_grad():
        clipped = loss2 > loss1
        x = lp.detach()
        cov = (adv - _weighted_mean(adv, m, active)) * (x - _weighted_mean(x, m, active))
        candidates = torch.nonzero(active & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)).reshape(-1)
        keep = max(int(clip_cov_ratio * m[active].sum().item()), 1)
        dropped = torch.zeros_like(active)
        if candidates.numel() > 0:
            order = torch.randperm(candidates.numel(), generator=generator, device=draw_device(generator))
            dropped[candidates[order[:keep].to(candidates.device)]] = True
    loss_tok = torch.where(dropped, torch.zeros_like(loss1), torch.maximum(loss1, loss2))
    if isw is not None:
        loss_tok = loss_tok * isw
    total = aggregate_ref(loss_tok, m, bounds, aggregation, normalizer, max_len, count_empty_seqs)
    with torch.no_grad():
        metrics = {"clipfrac": _weighted_mean(dropped.to(lp.dtype), m, active),
                   "ppo_kl": _weighted_mean(old - x, m, active)}  # fmt: skip
    return total, metrics


def kl_cov_ref(
    logp, old_logp, advantages, mask, *, kl_cov_ratio=0.0002, ppo_kl_coef=0.1, is_weights=None,
    aggregation="token-mean", count_empty_seqs=None, normalizer=None, cu_seqlens=None,
):
    """The spec of ``ops.kl_cov_loss`` (same arguments): ``(loss, {"ppo_kl"})`` in ``logp``'s
    dtype, differentiable w.r.t. ``logp``."""
    lp, old, adv, m, active, isw, bounds, max_len = _flat_inputs(
        logp, old_logp, advantages, mask, is_weights, cu_seqlens
    )
    delta = lp - old
    loss_tok = -adv * torch.exp(delta)
    with torch.no_grad():
        valid = torch.nonzero(active).reshape(-1)
        penalized = torch.zeros_like(active)
        if valid.numel() > 0:
            a, x = adv[valid], lp.detach()[valid]
            cov = (a - a.mean()) * (x - x.mean())
            k = max(1, int(valid.numel() * kl_cov_ratio))
            penalized[valid[torch.topk(cov, k, largest=True).indices]] = True
    loss_tok = torch.where(penalized, loss_tok + ppo_kl_coef * delta.abs(), loss_tok)
    if isw is not None:
        loss_tok = loss_tok * isw
    total = aggregate_ref(loss_tok, m, bounds, aggregation, normalizer, max_len, count_empty_seqs)
    with torch.no_grad():
        metrics = {"ppo_kl": _weighted_mean(delta.detach().abs(), m, active)}
    return total, metrics


def draw_device(generator):
    """Where ``torch.randperm`` draws: the generator's device, the CPU for the default one
    (verl's ``torch.randperm(n)``)."""
    return torch.device("cpu") if generator is None else generator.device
