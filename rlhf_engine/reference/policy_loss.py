"""Policy-gradient losses and their training metrics.

Notation: ``lp`` policy logprob of the sampled token, ``old`` the same under the rollout
policy, ``A`` advantage, ``m`` mask, ``delta_t = lp - old``, ``r = exp(clamp(delta, lo,
hi))`` with ``lo, hi = log_ratio_min, log_ratio_max`` (default ``-20, 20``, verl's clamp;
``None`` leaves that side unbounded, TRL's rule; the gradient is zero where the clamp is
active).

* ``ppo`` (Schulman et al. 2017): ``l = max(-A r', -A clip(r, 1-eps_low, 1+eps_high))``
  with ``r' = min(r, delta)`` when the two-sided bound ``delta`` is set (INTELLECT-2) and
  ``r' = r`` otherwise; ``eps_high > eps_low`` is DAPO's clip-higher. Dual clip (Ye et
  al. 2020), for ``A < 0`` only: ``l = min(l, -A c)``.
* ``gspo`` (Zheng et al. 2025): the same clipped objective on the sequence ratio
  ``s_b = exp(sum_t delta m / sum_t m)``, per token ``log s_bt = sg(log s_b) + lp - sg(lp)``
  (value ``s_b``, gradient ``s_b`` w.r.t. each ``lp_t``), clamped like ``r`` (verl's GSPO:
  ``lo = None, hi = 10``).
* ``cispo`` (MiniMax-M1 2025, verl): ``l = -sg(w) A lp``, ``w = clip(r, 1-eps_low,
  1+eps_high)`` (``clip_low``, ``clip_high`` are relative, as in PPO).
* ``cispo-trl`` (TRL): ``l = -sg(w) A lp``, ``w = min(r, clip_high)``: ``clip_high`` is
  the raw upper bound on the weight (e.g. 5.0) and must be given; ``clip_low`` is unused.
* ``sapo`` (Qwen 2025): ``l = -A sigmoid(tau (r - 1)) 4 / tau``, ``tau = sapo_tau_pos``
  (default 1.0) if ``A > 0`` else ``sapo_tau_neg`` (default 1.05).
* ``reinforce`` (REINFORCE / GPG): ``l = -A lp``.
* ``dppo_tv`` / ``dppo_kl`` (DPPO-Binary, arXiv 2602.04879, verl): ``l = -A sg(w) lp v``
  with ``w = min(r, delta)`` (truncated IS; ``delta`` None: ``w = r``) and ``v`` (constant)
  1 where the token's probability moved less than a divergence bound: ``p = e^lp``, ``q =
  e^old``; TV: ``p - q <= clip_high`` for ``A > 0``, ``p - q >= -clip_low`` otherwise;
  binary KL ``D = q (old - lp) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8))``:
  ``D <= clip_high or p <= q`` for ``A > 0``, ``D <= clip_low or p >= q`` otherwise
  (``clip_low`` / ``clip_high`` are the divergence thresholds here).
* ``geo_mean`` (GMPO, Zhao et al. 2025, verl): the sequence ratio is the geometric mean of
  token ratios clipped in log space on the advantage's side: ``d_t = lp - old``, ``c_t =
  clamp(d_t, -clip_low, clip_high)``, ``dmin_t = sgn(A) min(sgn(A) d_t, sgn(A) c_t)``, ``g_b
  = exp(mean_t dmin)`` (clamped like ``r``), ``l = -mean_t(A) g_b`` on every token of the
  sequence, per token with the sg trick like gspo (value ``g_b``, gradient ``g_b dmin'_t``
  w.r.t. ``lp_t``). With ``seq-mean-token-mean`` over all sequences this is verl's mean of
  ``-A_b g_b`` over the batch.

Then, per token: ``l <- is_w * l`` (truncated importance weights, on the policy-gradient
term only, as TRL and verl apply them), ``l += beta KL(lp, ref)`` (``kl_estimator``, see
``reference/kl.py``; with ``kl_ratio_weight``, ``l += beta r KL`` with ``r`` differentiable,
TRL's ``use_bias_correction_kl``: for gspo ``r = s_b`` itself, a function of every token
of the sequence), ``l -= c_H H``. Aggregation: ``reference/aggregation.py``; with
``entropy_aggregation="token-mean"`` the entropy term leaves ``l`` and the loss gets
``- c_H sum(H m) / sum(m)`` over the batch instead (TRL's rule, whatever the loss's
aggregation). ``is_weights_per_sequence`` replaces per-token IS weights by their masked
mean per sequence (TRL's sequence-level importance sampling spreads them so).

Metrics are masked token means (mask-weighted for a float mask) over the whole batch:
``clipfrac`` (ppo/gspo: ``L2 > L1``; cispo: the weight was truncated; dppo: ``v = 0``;
geo_mean: ``d != c`` with ``A > 0``; 0 for sapo and reinforce), ``clipfrac_lower`` (the
dual clip is active; dppo: ``r > delta`` with ``v = 1``; geo_mean: ``d != c`` with ``A <
0``), ``approx_kl`` (``delta^2 / 2``),
``ratio_mean``/``ratio_min``/``ratio_max`` (of ``r``, or ``s_b`` / ``g_b`` for gspo /
geo_mean, min/max over tokens with ``m != 0``), ``kl`` (of the KL term's ``KL``, or ``r KL`` with
``kl_ratio_weight``) and ``entropy`` means when given, ``ppo_kl`` (verl's: ``old - lp``,
clamped like ``r``'s argument for the token-level losses, unclamped for gspo / geo_mean) and
``cispo_clip_ratio`` (TRL's: ``r > clip_high`` for cispo-trl, ``r > 1 + clip_high`` for
cispo, and ``A > 0``; 0 for the other losses). An all-masked batch gives 0 for every
metric.

:func:`policy_loss_ref` is the spec, written for autograd and clarity (packed batches
loop over sequences in Python). The torch backend, the same math with the derivative
written out: ``rlhf_engine/torch_backend/policy_loss.py``.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine.reference.aggregation import aggregate_ref
from rlhf_engine.reference.kl import kl_penalty_ref

LOSSES = ("ppo", "gspo", "cispo", "cispo-trl", "sapo", "reinforce", "dppo_tv", "dppo_kl", "geo_mean")
# Losses whose per-token coefficient needs a statistic of the whole sequence first.
SEQUENCE_LEVEL_LOSSES = ("gspo", "geo_mean")
# The binary KL's guard against log(0) in dppo_kl (verl's).
DPPO_KL_EPS = 1e-8
# Defaults of the options log_ratio_min / log_ratio_max and sapo_tau_pos / sapo_tau_neg.
LOG_RATIO_CLAMP = 20.0
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05
ENTROPY_AGGREGATIONS = (None, "token-mean")
METRICS = (
    "clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "kl", "entropy", "ppo_kl",
    "cispo_clip_ratio",
)
# Columns of the per-sequence partial sums the kernels produce (kernels/policy_loss.py
# writes them in this order): masked sums, except the ratio min / max over active tokens.
PARTIALS = (
    "loss", "count", "clipped", "clipped_lower", "approx_kl", "ratio", "ratio_min", "ratio_max", "kl", "entropy",
    "ppo_kl", "cispo_clip_ratio",
)


def sequence_bounds(num_tokens: int, batch_shape, cu_seqlens) -> list:
    """``(start, end)`` of each sequence on the flat token axis (Python ints: spec only)."""
    if cu_seqlens is not None:
        cu = [int(c) for c in cu_seqlens]
        return list(zip(cu[:-1], cu[1:]))
    rows, cols = (batch_shape[0], batch_shape[1]) if len(batch_shape) == 2 else (1, num_tokens)
    return [(b * cols, (b + 1) * cols) for b in range(rows)]


def per_token(x, shape, bounds):
    """Flatten a per-token tensor (``shape`` of logp), or broadcast a per-sequence one over
    its sequence's tokens."""
    if x is None or x.shape == shape:
        return None if x is None else x.reshape(-1)
    lengths = torch.tensor([e - s for s, e in bounds], device=x.device)
    return torch.repeat_interleave(x.reshape(-1), lengths)


def _clip(x, low, high):
    return torch.minimum(torch.maximum(x, torch.full_like(x, low)), torch.full_like(x, high))


def log_ratio_bounds(log_ratio_min, log_ratio_max) -> tuple[float, float]:
    """The clamp of the log-ratio as two floats: ``None`` (no bound) becomes ``-inf`` / ``+inf``."""
    return (-math.inf if log_ratio_min is None else log_ratio_min, math.inf if log_ratio_max is None else log_ratio_max)


def _seq_means(x, m, active, bounds):
    """Each sequence's masked mean of ``x`` (0 without a valid token) on its tokens, differentiable."""
    zero = torch.zeros_like(x)
    parts = [
        (torch.where(active[s:e], x[s:e] * m[s:e], zero[s:e]).sum() / m[s:e].sum()).expand(e - s)
        if m[s:e].sum() > 0 else zero[s:e]
        for s, e in bounds
    ]
    return torch.cat(parts) if parts else zero


def _geo_mean_log_ratio(d, adv, clip_low, clip_high):
    """GMPO's per-token log-ratio ``sgn(A) min(sgn(A) d, sgn(A) clamp(d, -clip_low, clip_high))``:
    ``d`` capped from above where ``A > 0``, from below where ``A < 0``, 0 where ``A = 0``."""
    sign = torch.sign(adv)
    return sign * torch.minimum(sign * d, sign * d.clamp(-clip_low, clip_high))


def _dppo_valid(loss, lp, old, adv, clip_low, clip_high):
    """DPPO's (constant) mask: the token's probability moved less than the divergence bound."""
    p, q = torch.exp(lp), torch.exp(old)
    if loss == "dppo_tv":
        return torch.where(adv > 0, p - q <= clip_high, p - q >= -clip_low)
    binary_kl = q * (old - lp) + (1 - q) * torch.log((1 - q + DPPO_KL_EPS) / (1 - p + DPPO_KL_EPS))
    return torch.where(adv > 0, (binary_kl <= clip_high) | (p <= q), (binary_kl <= clip_low) | (p >= q))


def policy_loss_ref(
    logp, old_logp, advantages, mask, *, loss="ppo", clip_low=0.2, clip_high=None, dual_clip=None, delta=None,
    log_ratio_min=-LOG_RATIO_CLAMP, log_ratio_max=LOG_RATIO_CLAMP, sapo_tau_pos=SAPO_TAU_POS,
    sapo_tau_neg=SAPO_TAU_NEG, ref_logp=None, kl_coef=0.0, kl_estimator="k3", kl_clamp=False, kl_ratio_weight=False,
    entropy=None, entropy_coef=0.0, entropy_aggregation=None, is_weights=None, is_weights_per_sequence=False,
    aggregation="token-mean", count_empty_seqs=None, normalizer=None, cu_seqlens=None,
):
    """The spec. Same arguments as ``ops.policy_loss``; returns ``(loss, metrics dict)`` in
    the inputs' dtype, differentiable w.r.t. ``logp`` and ``entropy``."""
    clip_high = clip_low if clip_high is None else clip_high
    lo, hi = log_ratio_bounds(log_ratio_min, log_ratio_max)
    n = logp.numel()
    bounds = sequence_bounds(n, logp.shape, cu_seqlens)
    lp = logp.reshape(-1)
    old = old_logp.reshape(-1).to(lp.dtype)
    adv = per_token(advantages, logp.shape, bounds).to(lp.dtype)
    m = mask.reshape(-1).to(lp.dtype)
    active = mask.reshape(-1) != 0

    log_ratio = lp - old.detach()
    if loss == "geo_mean":
        dmin = _geo_mean_log_ratio(log_ratio, adv, clip_low, clip_high)
        log_ratio = _seq_means(dmin, m, active, bounds).detach() + dmin - dmin.detach()
        adv = _seq_means(adv, m, active, bounds)
    elif loss == "gspo":
        log_ratio = _seq_means(log_ratio, m, active, bounds).detach() + lp - lp.detach()
    ratio = torch.exp(log_ratio.clamp(lo, hi))

    clipped = lower = torch.zeros_like(active)
    cispo_clipped = torch.zeros_like(active)
    if loss in ("ppo", "gspo"):
        bounded = ratio if delta is None else torch.minimum(ratio, torch.full_like(ratio, delta))
        loss1 = -adv * bounded
        loss2 = -adv * _clip(ratio, 1 - clip_low, 1 + clip_high)
        clipped = loss2 > loss1
        loss_tok = torch.maximum(loss1, loss2)
        if dual_clip is not None:
            loss3 = -adv * dual_clip
            lower = (adv < 0) & (loss_tok > loss3)
            loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, loss3), loss_tok)
    elif loss in ("cispo", "cispo-trl"):
        if loss == "cispo":
            weight = _clip(ratio, 1 - clip_low, 1 + clip_high)
            cispo_clipped = (ratio > 1 + clip_high) & (adv > 0)
        else:
            weight = torch.minimum(ratio, torch.full_like(ratio, clip_high))
            cispo_clipped = (ratio > clip_high) & (adv > 0)
        clipped = weight != ratio
        loss_tok = -weight.detach() * adv * lp
    elif loss == "sapo":
        tau = torch.where(adv > 0, sapo_tau_pos, sapo_tau_neg).to(lp.dtype)
        loss_tok = -adv * torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    elif loss in ("dppo_tv", "dppo_kl"):
        valid = _dppo_valid(loss, lp.detach(), old, adv, clip_low, clip_high)
        weight = ratio if delta is None else torch.minimum(ratio, torch.full_like(ratio, delta))
        clipped = ~valid
        if delta is not None:
            lower = (ratio > delta) & valid
        loss_tok = -adv * weight.detach() * lp * valid.to(lp.dtype)
    elif loss == "geo_mean":
        d = (lp - old).detach()
        outside = (d < -clip_low) | (d > clip_high)
        raw_adv = per_token(advantages, logp.shape, bounds).to(lp.dtype)
        clipped, lower = outside & (raw_adv > 0), outside & (raw_adv < 0)
        loss_tok = -adv * ratio
    else:
        loss_tok = -adv * lp
    if is_weights is not None:
        isw = per_token(is_weights, logp.shape, bounds).to(lp.dtype)
        if is_weights_per_sequence:
            isw = _seq_means(isw, m, active, bounds)
        loss_tok = loss_tok * isw
    kl = None
    if ref_logp is not None:
        kl = kl_penalty_ref(lp, ref_logp.reshape(-1).to(lp.dtype).detach(), kl_estimator, kl_clamp)
        if kl_ratio_weight:
            # TRL multiplies by its importance weight itself: for gspo the sequence ratio with
            # the gradient of every token's logprob (not the per-token sg form above).
            if loss == "geo_mean":
                raw_adv = per_token(advantages, logp.shape, bounds).to(lp.dtype)
                full = _seq_means(_geo_mean_log_ratio(lp - old, raw_adv, clip_low, clip_high), m, active, bounds)
            else:
                full = _seq_means(lp - old, m, active, bounds) if loss == "gspo" else lp - old
            kl = kl * torch.exp(full.clamp(lo, hi))
        loss_tok = loss_tok + kl_coef * kl
    ent = None
    entropy_term = 0.0
    if entropy is not None:
        ent = entropy.reshape(-1).to(lp.dtype)
        if entropy_aggregation == "token-mean":
            count = m.sum()
            if count > 0:
                entropy_term = torch.where(active, ent * m, torch.zeros_like(ent)).sum() / count
        else:
            loss_tok = loss_tok - entropy_coef * ent
    max_len = logp.shape[1] if (cu_seqlens is None and logp.dim() == 2) else None
    total = aggregate_ref(loss_tok, m, bounds, aggregation, normalizer, max_len, count_empty_seqs)
    total = total - entropy_coef * entropy_term

    with torch.no_grad():
        count = m[active].sum()

        def mean(x):
            return (x.to(lp.dtype) * m)[active].sum() / count if count > 0 else lp.new_zeros(())

        r = ratio.detach()
        delta_tok = (lp - old) if loss in SEQUENCE_LEVEL_LOSSES else (lp - old).clamp(lo, hi)
        metrics = {
            "clipfrac": mean(clipped),
            "clipfrac_lower": mean(lower),
            "approx_kl": mean(0.5 * (lp - old) ** 2),
            "ratio_mean": mean(r),
            "ratio_min": r[active].min() if count > 0 else lp.new_zeros(()),
            "ratio_max": r[active].max() if count > 0 else lp.new_zeros(()),
            "ppo_kl": mean(-delta_tok),
            "cispo_clip_ratio": mean(cispo_clipped),
        }
        if kl is not None:
            metrics["kl"] = mean(kl)
        if ent is not None:
            metrics["entropy"] = mean(ent)
    return total, metrics
