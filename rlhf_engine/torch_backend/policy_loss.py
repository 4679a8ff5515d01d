"""Torch backend of ``rlhf_engine.ops.policy_loss`` (spec:
``rlhf_engine/reference/policy_loss.py``): the same math with the derivative written
out, vectorized, returning what the custom op returns.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.policy_loss import DPPO_KL_EPS, SEQUENCE_LEVEL_LOSSES
from rlhf_engine.torch_backend.aggregation import (
    Segments,
    TokenMask,
    Where,
    aggregate_sums,
    fp32,
    half_square,
    if_counted,
    numeric,
    scalar,
    token_passes,
)
from rlhf_engine.torch_backend.kl import kl_estimate_and_grad


# Rows of the masked per-sequence sums the torch backend reduces in one pass: these eight,
# then kl and entropy when given.
_SUM_ROWS = ("loss", "count", "clipped", "clipped_lower", "approx_kl", "ratio", "ppo_kl", "cispo_clip_ratio")


def _dppo_valid(loss, lp, old, adv, clip_low, clip_high):
    """DPPO's mask (spec: ``reference/policy_loss._dppo_valid``): the token's probability moved
    less than the divergence bound (total variation, or the binary KL)."""
    p, q = lp.exp(), old.exp()
    positive = adv > 0
    if loss == "dppo_tv":
        diff = p - q
        return torch.where(positive, diff <= clip_high, diff >= -clip_low)
    binary_kl = q * (old - lp) + (1 - q) * torch.log((1 - q + DPPO_KL_EPS) / (1 - p + DPPO_KL_EPS))
    return torch.where(positive, (binary_kl <= clip_high) | (p <= q), (binary_kl <= clip_low) | (p >= q))


def policy_loss_torch(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, normalizer, *, loss, clip_low,
    clip_high, dual_clip, delta, log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, kl_estimator,
    kl_clamp, kl_ratio_weight, entropy_coef, aggregation, count_empty_seqs, normalizer_const, seq_len,
):
    """Torch backend: contiguous token inputs (``[N]``, or ``[S, T]`` when padded;
    ``advantages`` / ``is_weights`` per token or ``[S]``)
    -> ``(loss 0-d, metrics [len(METRICS)], g (logp's shape), w [S])``, all fp32, with ``g = m dl/dlp``
    and ``w = d loss / d L_b``: what ``rlhf_engine::policy_loss_fwd`` returns.

    ``seq_len``: the padded length, 0 when packed (see ``Segments``); ``normalizer`` /
    ``normalizer_const`` / ``count_empty_seqs``: as in ``aggregate_partials``;
    ``log_ratio_min`` / ``log_ratio_max`` floats (``-inf`` / ``inf`` for no bound).

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
        loss=loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, delta=delta,
        log_ratio_min=log_ratio_min, log_ratio_max=log_ratio_max, sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
        kl_ratio_weight=kl_ratio_weight, entropy_coef=entropy_coef, seq_len=seq_len,
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
    total, w, totals, count = aggregate_sums(
        sums, aggregation, cu_seqlens, seq_len, normalizer, normalizer_const, count_empty_seqs
    )
    # clipped, clipped_lower, approx_kl, ratio, ppo_kl, cispo_clip_ratio, then kl / entropy when given
    means = totals[2:] / count
    with_kl, with_entropy = ref_logp is not None, entropy is not None
    if with_kl == with_entropy:
        given = [means[6:] if with_kl else totals.new_zeros(2)]
    else:  # the one not given is 0
        given = [means[6:], totals.new_zeros(1)] if with_kl else [totals.new_zeros(1), means[6:]]
    metrics = if_counted(torch.cat([means[:4], extremes, *given, means[4:6]]), count)
    return total, metrics, grad, w


def _token_pass(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, *, loss, clip_low, clip_high,
    dual_clip, delta, log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, kl_estimator, kl_clamp,
    kl_ratio_weight, entropy_coef, seq_len,
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
    sequence, geo_mean = loss in SEQUENCE_LEVEL_LOSSES, loss == "geo_mean"
    dseq = None  # geo_mean: d (its per-token log-ratio) / d lp, 1 where GMPO's cap is not active
    if sequence:
        seq_count = seg.sum(numeric(seg.tokens(mask)).to(f32))

        def seq_mean(x):  # each sequence's masked mean of x on its tokens (0 without a valid one)
            mean = torch.where(seq_count > 0, seg.sum(token_mask.apply(x)) / torch.where(seq_count > 0, seq_count, 1.0), 0.0)
            return seg.expand(mean)

        if geo_mean:
            positive, negative = adv > 0, adv < 0
            capped = torch.where(positive, log_ratio.clamp(max=clip_high), log_ratio.clamp(min=-clip_low))
            ratio_arg = seq_mean(Where(positive | negative).keep(capped))
            seq_adv = seq_mean(adv)
            dseq = ((positive & (log_ratio <= clip_high)) | (negative & (log_ratio >= -clip_low))).to(f32)
        else:
            ratio_arg = seq_mean(log_ratio)
    else:
        ratio_arg = log_ratio
    clamped = ratio_arg.clamp(log_ratio_min, log_ratio_max)
    ratio = clamped.exp()
    # d ratio / d lp of the KL term's r (the loss's own gradient selects below)
    kl_dratio = None
    if kl_ratio_weight and ref_logp is not None:
        kl_dratio = Where(clamped == ratio_arg).keep(ratio)
        kl_dratio = kl_dratio if dseq is None else kl_dratio * dseq
    # The ratio's gradient flows where the clamp is inactive (and not NaN). The losses below
    # narrow this bool down to the tokens whose winning term moves with r, and select their
    # gradient once: bool ops cost a third of a select at a few thousand tokens. Without a
    # KL term or IS weights (NaN on a masked token must not reach the gradient) that select
    # is the whole gradient's, so it takes the mask's too.
    through = clamped == ratio_arg
    masked_through = ref_logp is None and is_weights is None and loss in ("ppo", "gspo", "sapo")
    if masked_through:
        through = through & token_mask.active.cond  # not in place: gspo's is per sequence

    clipped = lower = cispo_clipped = None
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
        cap = 1 + clip_high if loss == "cispo" else clip_high
        cispo_clipped = (ratio > cap).logical_and_(adv > scalar(0.0, adv))  # TRL's cispo_clip_ratio
        grad = -weight * adv
        loss_tok = grad * lp
    elif loss == "sapo":
        tau = Where(adv > 0).select(scalar(sapo_tau_pos, adv), sapo_tau_neg)
        gate = torch.sigmoid(tau * (ratio - 1))
        loss_tok = -adv * gate * (4 / tau)
        grad = Where(through).keep(-adv * 4 * gate * (1 - gate) * ratio)
    elif loss in ("dppo_tv", "dppo_kl"):
        valid = _dppo_valid(loss, lp, old, adv, clip_low, clip_high)
        weight = ratio if delta is None else ratio.clamp(max=delta)
        clipped = ~valid
        lower = None if delta is None else (ratio > delta).logical_and_(valid)
        grad = -adv * weight * valid.to(f32)
        loss_tok = grad * lp
    elif geo_mean:
        outside = (log_ratio < -clip_low) | (log_ratio > clip_high)
        clipped, lower = outside & (adv > 0), outside & (adv < 0)
        loss_tok = -seq_adv * ratio
        grad = Where(through).keep(loss_tok) * dseq
    else:
        loss_tok, grad = -adv * lp, -adv
    if is_weights is not None:
        isw = seg.per_token(fp32(is_weights))
        loss_tok, grad = loss_tok * isw, grad * isw
    given = []  # the kl and entropy rows, when given
    if ref_logp is not None:
        kl, dkl = kl_estimate_and_grad(lp, seg.tokens(fp32(ref_logp)), kl_estimator, kl_clamp)
        if kl_dratio is not None:  # r KL, r differentiable (a sequence's r moves with every token: its mean KL)
            dkl = ratio * dkl + kl_dratio * (seq_mean(kl) if sequence else kl)
            kl = ratio * kl
        loss_tok, grad = torch.add(loss_tok, kl, alpha=kl_coef), torch.add(grad, dkl, alpha=kl_coef)
        given.append(kl)
    if entropy is not None:
        ent = seg.tokens(fp32(entropy))
        given.append(ent)
        loss_tok = torch.sub(loss_tok, ent, alpha=entropy_coef)

    buf = torch.empty((len(_SUM_ROWS) + len(given),) + seg.shape, dtype=f32, device=lp.device)
    loss_row, count_row, clipped_row, lower_row, approx_kl_row, ratio_row, ppo_kl_row, cispo_row, *given_rows = buf
    loss_row.copy_(loss_tok)
    for row, flags in ((clipped_row, clipped), (lower_row, lower), (cispo_row, cispo_clipped)):
        row.zero_() if flags is None else row.copy_(numeric(flags))
    half_square(log_ratio, out=approx_kl_row)
    ratio_row.copy_(ratio)
    # verl's ppo_kl: -delta, clamped like the ratio's argument for the token-level losses
    torch.neg(log_ratio if sequence else clamped, out=ppo_kl_row)
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
