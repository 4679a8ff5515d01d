"""Policy-gradient losses and their training metrics.

Notation: ``lp`` policy logprob of the sampled token, ``old`` the same under the rollout
policy, ``A`` advantage, ``m`` mask, ``delta_t = lp - old``, ``r = exp(clamp(delta, -20,
20))`` (verl's clamp; the gradient is zero where it is active).

* ``ppo`` (Schulman et al. 2017): ``l = max(-A r', -A clip(r, 1-eps_low, 1+eps_high))``
  with ``r' = min(r, delta)`` when the two-sided bound ``delta`` is set (INTELLECT-2) and
  ``r' = r`` otherwise; ``eps_high > eps_low`` is DAPO's clip-higher. Dual clip (Ye et
  al. 2020), for ``A < 0`` only: ``l = min(l, -A c)``.
* ``gspo`` (Zheng et al. 2025): the same clipped objective on the sequence ratio
  ``s_b = exp(sum_t delta m / sum_t m)``, per token ``log s_bt = sg(log s_b) + lp - sg(lp)``
  (value ``s_b``, gradient ``s_b`` w.r.t. each ``lp_t``), clamped like ``r``.
* ``cispo`` (MiniMax-M1 2025, verl): ``l = -sg(w) A lp``, ``w = clip(r, 1-eps_low,
  1+eps_high)`` (``clip_low``, ``clip_high`` are relative, as in PPO).
* ``cispo-trl`` (TRL): ``l = -sg(w) A lp``, ``w = min(r, clip_high)``: ``clip_high`` is
  the raw upper bound on the weight (e.g. 5.0) and must be given; ``clip_low`` is unused.
* ``sapo`` (Qwen 2025): ``l = -A sigmoid(tau (r - 1)) 4 / tau``, ``tau = 1`` if ``A > 0``
  else ``1.05``.
* ``reinforce`` (REINFORCE / GPG): ``l = -A lp``.

Then, per token: ``l <- is_w * l`` (truncated importance weights, on the policy-gradient
term only, as TRL and verl apply them), ``l += beta KL(lp, ref)`` (``kl_estimator``, see
``reference/kl.py``), ``l -= c_H H``. Aggregation: ``reference/aggregation.py``.

Metrics are masked token means (mask-weighted for a float mask) over the whole batch:
``clipfrac`` (ppo/gspo: ``L2 > L1``; cispo: the weight was truncated; 0 for sapo and
reinforce), ``clipfrac_lower`` (the dual clip is active), ``approx_kl`` (``delta^2 / 2``),
``ratio_mean``/``ratio_min``/``ratio_max`` (of ``r``, or ``s_b`` for gspo, min/max over
tokens with ``m != 0``), ``kl`` and ``entropy`` means when given. An all-masked batch gives
0 for every metric.

Two implementations live here: :func:`policy_loss_ref` (the spec, written for autograd
and clarity; packed batches loop over sequences in Python) and
:func:`policy_loss_torch` (the torch backend: the same math with the derivative
written out, vectorized, returning what the custom op returns).
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.aggregation import (
    Segments,
    TokenMask,
    Where,
    aggregate_ref,
    aggregate_sums,
    fp32,
    half_square,
    if_counted,
    numeric,
    scalar,
    token_passes,
)
from rlhf_engine.reference.kl import kl_estimate_and_grad, kl_penalty_ref

LOSSES = ("ppo", "gspo", "cispo", "cispo-trl", "sapo", "reinforce")
LOG_RATIO_CLAMP = 20.0
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05
METRICS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "kl", "entropy")
# Columns of the per-sequence partial sums the Triton kernel produces (kernels/policy_loss.py
# writes them in this order): masked sums, except the ratio min / max over active tokens.
PARTIALS = ("loss", "count", "clipped", "clipped_lower", "approx_kl", "ratio", "ratio_min", "ratio_max", "kl", "entropy")


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


def policy_loss_ref(
    logp, old_logp, advantages, mask, *, loss="ppo", clip_low=0.2, clip_high=None, dual_clip=None, delta=None,
    ref_logp=None, kl_coef=0.0, kl_estimator="k3", kl_clamp=False, entropy=None, entropy_coef=0.0, is_weights=None,
    aggregation="token-mean", normalizer=None, cu_seqlens=None,
):
    """The spec. Same arguments as ``ops.policy_loss``; returns ``(loss, metrics dict)`` in
    the inputs' dtype, differentiable w.r.t. ``logp`` and ``entropy``."""
    clip_high = clip_low if clip_high is None else clip_high
    n = logp.numel()
    bounds = sequence_bounds(n, logp.shape, cu_seqlens)
    lp = logp.reshape(-1)
    old = old_logp.reshape(-1).to(lp.dtype)
    adv = per_token(advantages, logp.shape, bounds).to(lp.dtype)
    m = mask.reshape(-1).to(lp.dtype)
    active = mask.reshape(-1) != 0
    zero = torch.zeros_like(lp)

    log_ratio = lp - old.detach()
    if loss == "gspo":
        seq_log_ratio = torch.cat([
            (torch.where(active[s:e], log_ratio[s:e] * m[s:e], zero[s:e]).sum() / m[s:e].sum()).expand(e - s)
            if m[s:e].sum() > 0 else zero[s:e]
            for s, e in bounds
        ]) if bounds else zero
        log_ratio = seq_log_ratio.detach() + lp - lp.detach()
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    clipped = lower = torch.zeros_like(active)
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
        else:
            weight = torch.minimum(ratio, torch.full_like(ratio, clip_high))
        clipped = weight != ratio
        loss_tok = -weight.detach() * adv * lp
    elif loss == "sapo":
        tau = torch.where(adv > 0, SAPO_TAU_POS, SAPO_TAU_NEG).to(lp.dtype)
        loss_tok = -adv * torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    else:
        loss_tok = -adv * lp
    if is_weights is not None:
        loss_tok = loss_tok * per_token(is_weights, logp.shape, bounds).to(lp.dtype)
    kl = None
    if ref_logp is not None:
        kl = kl_penalty_ref(lp, ref_logp.reshape(-1).to(lp.dtype).detach(), kl_estimator, kl_clamp)
        loss_tok = loss_tok + kl_coef * kl
    ent = None
    if entropy is not None:
        ent = entropy.reshape(-1).to(lp.dtype)
        loss_tok = loss_tok - entropy_coef * ent
    max_len = logp.shape[1] if (cu_seqlens is None and logp.dim() == 2) else None
    total = aggregate_ref(loss_tok, m, bounds, aggregation, normalizer, max_len)

    with torch.no_grad():
        count = m[active].sum()

        def mean(x):
            return (x.to(lp.dtype) * m)[active].sum() / count if count > 0 else lp.new_zeros(())

        r = ratio.detach()
        metrics = {
            "clipfrac": mean(clipped),
            "clipfrac_lower": mean(lower),
            "approx_kl": mean(0.5 * (lp - old) ** 2),
            "ratio_mean": mean(r),
            "ratio_min": r[active].min() if count > 0 else lp.new_zeros(()),
            "ratio_max": r[active].max() if count > 0 else lp.new_zeros(()),
        }
        if kl is not None:
            metrics["kl"] = mean(kl)
        if ent is not None:
            metrics["entropy"] = mean(ent)
    return total, metrics


# Rows of the masked per-sequence sums the torch backend reduces in one pass: these six,
# then kl and entropy when given.
_SUM_ROWS = ("loss", "count", "clipped", "clipped_lower", "approx_kl", "ratio")


def policy_loss_torch(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, normalizer, *, loss, clip_low,
    clip_high, dual_clip, delta, kl_coef, kl_estimator, kl_clamp, entropy_coef, aggregation, normalizer_const,
    seq_len,
):
    """Torch backend: contiguous token inputs (``[N]``, or ``[S, T]`` when padded;
    ``advantages`` / ``is_weights`` per token or ``[S]``)
    -> ``(loss 0-d, metrics [len(METRICS)], g (logp's shape), w [S])``, all fp32, with ``g = m dl/dlp``
    and ``w = d loss / d L_b``: what ``rlhf_engine::policy_loss_fwd`` returns.

    ``seq_len``: the padded length, 0 when packed (see ``Segments``); ``normalizer`` /
    ``normalizer_const``: as in ``aggregate_partials``.

    This is the CPU path, timed against eager code at a few thousand tokens as much as at
    millions, so it is written for few ops and few passes: a padded batch is computed as
    ``[S, T]`` with per-sequence inputs broadcast (never expanded), selections go through
    :class:`Where` (int32 lanes on large CPU tensors, where ``torch.where`` is a scalar
    loop), the masked per-sequence sums are one reduction of a ``[rows, tokens]`` buffer,
    and loss, weights and metrics come straight from those sums (the kernel's per-sequence
    ratio extremes are not needed: the metrics take them over the whole batch). Large CPU
    batches run in passes of whole sequences (:func:`token_passes`), like the kernel's
    per-sequence programs, so temporaries stay small.
    """
    n = logp.numel()
    options = dict(
        loss=loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, delta=delta, kl_coef=kl_coef,
        kl_estimator=kl_estimator, kl_clamp=kl_clamp, entropy_coef=entropy_coef, seq_len=seq_len,
    )
    passes = token_passes(cu_seqlens, n, seq_len)
    if len(passes) == 1:
        sums, extremes, grad = _token_pass(
            logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, **options
        )
    else:
        grad = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
        sums, extremes = [], []
        for tokens, seqs in passes:
            def cut(x):  # per-token inputs by tokens, per-sequence ones by sequences
                return None if x is None else x.view(-1)[tokens] if x.numel() == n else x[seqs]

            pass_sums, pass_extremes, pass_grad = _token_pass(
                cut(logp), cut(old_logp), cut(advantages), cut(mask),
                cu_seqlens[seqs.start:seqs.stop + 1] - cu_seqlens[seqs.start], cut(ref_logp), cut(entropy),
                cut(is_weights), **options,
            )
            grad.view(-1)[tokens] = pass_grad.view(-1)
            sums.append(pass_sums)
            extremes.append(pass_extremes)
        sums, extremes = torch.cat(sums, dim=1), torch.stack(extremes)
        extremes = torch.stack([extremes[:, 0].amin(), extremes[:, 1].amax()])
    total, w, totals, count = aggregate_sums(sums, aggregation, cu_seqlens, seq_len, normalizer, normalizer_const)
    means = totals[2:] / count  # clipped, clipped_lower, approx_kl, ratio, then kl / entropy when given
    with_kl, with_entropy = ref_logp is not None, entropy is not None
    if with_kl == with_entropy:
        tail = [means[4:] if with_kl else totals.new_zeros(2)]
    else:  # the one not given is 0
        tail = [means[4:], totals.new_zeros(1)] if with_kl else [totals.new_zeros(1), means[4:]]
    metrics = if_counted(torch.cat([means[:4], extremes, *tail]), count)
    return total, metrics, grad, w


def _token_pass(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, *, loss, clip_low, clip_high,
    dual_clip, delta, kl_coef, kl_estimator, kl_clamp, entropy_coef, seq_len,
):
    """The per-token work of :func:`policy_loss_torch` over whole sequences -> ``(sums
    [rows, S]`` (``_SUM_ROWS``, then kl and entropy when given), ratio extremes ``[2]`` (min,
    max over active tokens; inf / 0 for none), ``g`` in the token shape)``."""
    seg = Segments(cu_seqlens, logp.numel(), seq_len)
    f32 = torch.float32
    lp, old = seg.tokens(fp32(logp)), seg.tokens(fp32(old_logp))
    token_mask = TokenMask(seg.tokens(mask))
    adv = seg.per_token(fp32(advantages))
    log_ratio = lp - old
    if loss == "gspo":
        seq_sum = seg.sum(token_mask.apply(log_ratio))
        seq_count = seg.sum(numeric(seg.tokens(mask)).to(f32))
        seq_mean = torch.where(seq_count > 0, seq_sum / torch.where(seq_count > 0, seq_count, 1.0), 0.0)
        ratio_arg = seg.expand(seq_mean)
    else:
        ratio_arg = log_ratio
    clamped = ratio_arg.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = clamped.exp()
    # The ratio's gradient flows where the clamp is inactive (and not NaN). The losses below
    # narrow this bool down to the tokens whose winning term moves with r, and select their
    # gradient once: bool ops cost a third of a select at a few thousand tokens. Without a
    # KL term or IS weights (NaN on a masked token must not reach the gradient) that select
    # is the whole gradient's, so it takes the mask's too.
    through = clamped == ratio_arg
    masked_through = ref_logp is None and is_weights is None and loss in ("ppo", "gspo", "sapo")
    if masked_through:
        through = through & token_mask.active.cond  # not in place: gspo's is per sequence

    clipped = lower = None
    if loss in ("ppo", "gspo"):
        neg_adv = -adv
        bounded = ratio if delta is None else ratio.clamp(max=delta)
        clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
        loss1, loss2 = neg_adv * bounded, neg_adv * clipped_ratio
        clipped = loss2 > loss1
        # where(clipped, loss2, loss1) (a NaN is in both), into loss2's fresh memory
        loss_tok = torch.maximum(loss1, loss2, out=loss2)
        if delta is None:
            # clipped implies clip(r) != r (equal ratios give equal losses): no gradient there
            through = through > clipped  # bools: a > b is a and not b
            pg_grad = loss1  # -A r
        else:
            # d min(r, delta) / d r = 1 where r <= delta; d clip(r) / d r = 1 where clip(r) == r
            through = through & torch.where(clipped, clipped_ratio == ratio, ratio <= delta)
            pg_grad = neg_adv * ratio
        if dual_clip is not None:
            loss3 = neg_adv * scalar(dual_clip, neg_adv)
            lower = (loss_tok > loss3).logical_and_(adv < scalar(0.0, adv))
            loss_tok = Where(lower).select(loss3, loss_tok)
            through = through > lower
        grad = Where(through).keep(pg_grad)
    elif loss in ("cispo", "cispo-trl"):
        weight = ratio.clamp(1 - clip_low, 1 + clip_high) if loss == "cispo" else ratio.clamp(max=clip_high)
        clipped = weight != ratio
        grad = -weight * adv
        loss_tok = grad * lp
    elif loss == "sapo":
        tau = Where(adv > 0).select(scalar(SAPO_TAU_POS, adv), SAPO_TAU_NEG)
        gate = torch.sigmoid(tau * (ratio - 1))
        loss_tok = -adv * gate * (4 / tau)
        grad = Where(through).keep(-adv * 4 * gate * (1 - gate) * ratio)
    else:
        loss_tok, grad = -adv * lp, -adv
    if is_weights is not None:
        isw = seg.per_token(fp32(is_weights))
        loss_tok, grad = loss_tok * isw, grad * isw
    given = []  # the kl and entropy rows, when given
    if ref_logp is not None:
        kl, dkl = kl_estimate_and_grad(lp, seg.tokens(fp32(ref_logp)), kl_estimator, kl_clamp)
        loss_tok, grad = torch.add(loss_tok, kl, alpha=kl_coef), torch.add(grad, dkl, alpha=kl_coef)
        given.append(kl)
    if entropy is not None:
        ent = seg.tokens(fp32(entropy))
        given.append(ent)
        loss_tok = torch.sub(loss_tok, ent, alpha=entropy_coef)

    buf = torch.empty((len(_SUM_ROWS) + len(given),) + seg.shape, dtype=f32, device=lp.device)
    loss_row, count_row, clipped_row, lower_row, approx_kl_row, ratio_row, *given_rows = buf
    loss_row.copy_(loss_tok)
    for row, flags in ((clipped_row, clipped), (lower_row, lower)):
        row.zero_() if flags is None else row.copy_(numeric(flags))
    half_square(log_ratio, out=approx_kl_row)
    ratio_row.copy_(ratio)
    for row, x in zip(given_rows, given):
        row.copy_(x)
    token_mask.apply_(buf)
    count_row.copy_(numeric(seg.tokens(mask)))  # the weights themselves, after masking
    sums = seg.sum(buf)
    if buf.shape[-1]:
        # ratio > 0 (or NaN), so a masked 0 never wins the maximum of an active token: with a
        # bool mask the masked ratio row of the buffer serves
        active = token_mask.active
        ratio_max_of = ratio_row if token_mask.weights is None else active.keep(ratio)
        extremes = torch.stack([active.select(ratio, float("inf")).amin(), ratio_max_of.amax()])
    else:
        extremes = torch.stack([scalar(float("inf"), buf), scalar(0.0, buf)])  # no host copy
    grad = token_mask.weigh(grad) if masked_through else token_mask.apply(grad)
    return sums, extremes, grad
