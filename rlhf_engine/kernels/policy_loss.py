"""Triton kernels for the fused policy loss (the spec: ``rlhf_engine/reference/policy_loss.py`` and ``aggregation.py``).

Forward: one program per sequence (tokens ``[cu_seqlens[b], cu_seqlens[b+1])``; a padded
``[B, T]`` batch is ``cu_seqlens = arange(B+1) * T``) computes, per token, the loss
``l_t`` and ``g_t = m_t dl_t/dlp_t`` (written to an fp32 ``[N]`` buffer saved for
backward), and per sequence the partial sums of ``reference/policy_loss.PARTIALS``.
The sequence-level losses (gspo, geo_mean) make a first pass over their sequence for the
mean log-ratio (GMPO's capped one and the mean advantage for geo_mean; with
``KL_RATIO_WEIGHT``, the mean KL), inside the same program. The loss formulas are the ones of ``reference/policy_loss.py``.

Backward (shared with the value loss): ``out_t = scale * grad * w_b(t) * x_t`` for the
per-sequence weights ``w_b = d loss / d L_b`` of ``reference/aggregation.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_engine.kernels.kl import estimator_codes, kl_estimate, store_dtype
from rlhf_engine.reference.policy_loss import DPPO_KL_EPS, LOSSES, PARTIALS, SEQUENCE_LEVEL_LOSSES

# ppo 0, gspo 1, cispo 2, cispo-trl 3, sapo 4, reinforce 5, dppo_tv 6, dppo_kl 7, geo_mean 8
LOSS_CODES = {name: code for code, name in enumerate(LOSSES)}
_DPPO_KL_EPS = tl.constexpr(DPPO_KL_EPS)
_NUM_PARTIALS = tl.constexpr(len(PARTIALS))


def block_size(num_tokens: int, num_seqs: int, seq_len: int) -> int:
    """Tokens per loop step: the (average) sequence length rounded up to a power of two,
    within [16, 1024]. Shapes only, so no host sync."""
    typical = seq_len if seq_len else triton.cdiv(max(num_tokens, 1), max(num_seqs, 1))
    return max(16, min(1024, triton.next_power_of_2(typical)))


@triton.jit
def _seq_bounds(cu_ptr):
    pid = tl.program_id(0)
    return pid, tl.load(cu_ptr + pid).to(tl.int64), tl.load(cu_ptr + pid + 1).to(tl.int64)


@triton.jit
def _geo_mean_log_ratio(d, adv, clip_low, clip_high):
    """GMPO's per-token log-ratio: ``d`` capped from above where A > 0, from below where A < 0, 0 at A == 0."""
    return tl.where(adv > 0, tl.minimum(d, clip_high), tl.where(adv < 0, tl.maximum(d, -clip_low), 0.0))


@triton.jit
def _policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, isw_ptr, cu_ptr, g_ptr, part_ptr,
    clip_low, clip_high, dual_clip, delta, log_ratio_min, log_ratio_max, tau_pos, tau_neg, kl_coef, entropy_coef,
    LOSS: tl.constexpr, SEQUENCE: tl.constexpr, ADV_PER_SEQ: tl.constexpr, HAS_IS: tl.constexpr, IS_PER_SEQ: tl.constexpr,
    HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, KL_BASE: tl.constexpr,
    KL_STRAIGHT_THROUGH: tl.constexpr, KL_CLAMP: tl.constexpr, KL_RATIO_WEIGHT: tl.constexpr, HAS_ENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, start, end = _seq_bounds(cu_ptr)
    cols = tl.arange(0, BLOCK)

    # GSPO: log s_b = sum_t delta m / sum_t m; geo_mean: the same of GMPO's capped delta, and
    # the mean advantage; with KL_RATIO_WEIGHT the mean KL too (d(s_b KL)/dlp_t needs it): a
    # first pass over the sequence.
    seq_log_ratio = 0.0
    seq_kl = 0.0
    seq_adv = 0.0
    if SEQUENCE:
        acc_delta = tl.zeros([BLOCK], tl.float32)
        acc_count = tl.zeros([BLOCK], tl.float32)
        acc_seq_kl = tl.zeros([BLOCK], tl.float32)
        acc_seq_adv = tl.zeros([BLOCK], tl.float32)
        for off in range(start, end, BLOCK):
            offs = off + cols
            inb = offs < end
            m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
            lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            if LOSS == 8:  # geo_mean
                if ADV_PER_SEQ:
                    adv = tl.zeros([BLOCK], tl.float32) + tl.load(adv_ptr + pid).to(tl.float32)
                else:
                    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                acc_delta += tl.where(m != 0, _geo_mean_log_ratio(lp - old, adv, clip_low, clip_high) * m, 0.0)
                acc_seq_adv += tl.where(m != 0, adv * m, 0.0)
            else:
                acc_delta += tl.where(m != 0, (lp - old) * m, 0.0)
            acc_count += m
            if HAS_KL:
                if KL_RATIO_WEIGHT:
                    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                    kl, _ = kl_estimate(lp, ref, KL_BASE, KL_STRAIGHT_THROUGH, KL_CLAMP)
                    acc_seq_kl += tl.where(m != 0, kl * m, 0.0)
        total = tl.sum(acc_count, 0)
        seq_log_ratio = tl.where(total > 0, tl.sum(acc_delta, 0) / tl.where(total > 0, total, 1.0), 0.0)
        seq_kl = tl.where(total > 0, tl.sum(acc_seq_kl, 0) / tl.where(total > 0, total, 1.0), 0.0)
        seq_adv = tl.where(total > 0, tl.sum(acc_seq_adv, 0) / tl.where(total > 0, total, 1.0), 0.0)

    if ADV_PER_SEQ:
        adv_seq = tl.load(adv_ptr + pid).to(tl.float32)
    if HAS_IS:
        if IS_PER_SEQ:
            isw_seq = tl.load(isw_ptr + pid).to(tl.float32)

    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_count = tl.zeros([BLOCK], tl.float32)
    acc_clip = tl.zeros([BLOCK], tl.float32)
    acc_lower = tl.zeros([BLOCK], tl.float32)
    acc_k2 = tl.zeros([BLOCK], tl.float32)
    acc_ratio = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    acc_ent = tl.zeros([BLOCK], tl.float32)
    acc_ppo_kl = tl.zeros([BLOCK], tl.float32)
    acc_cispo = tl.zeros([BLOCK], tl.float32)
    ratio_min = tl.full([BLOCK], float("inf"), tl.float32)
    ratio_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for off in range(start, end, BLOCK):
        offs = off + cols
        inb = offs < end
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        active = m != 0
        lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if ADV_PER_SEQ:
            adv = tl.zeros([BLOCK], tl.float32) + adv_seq
        else:
            adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        log_ratio = lp - old
        if SEQUENCE:
            ratio_arg = tl.zeros([BLOCK], tl.float32) + seq_log_ratio
        else:
            ratio_arg = log_ratio
        clamped_arg = tl.minimum(tl.maximum(ratio_arg, log_ratio_min), log_ratio_max)
        ratio = tl.exp(clamped_arg)
        # d ratio / d lp: 0 where the clamp is active (or the argument is NaN); geo_mean's
        # per-token log-ratio moves with lp only where GMPO's cap is not active
        dratio = tl.where((ratio_arg >= log_ratio_min) & (ratio_arg <= log_ratio_max), ratio, 0.0)
        if LOSS == 8:
            capped = ((adv > 0) & (log_ratio <= clip_high)) | ((adv < 0) & (log_ratio >= -clip_low))
            dratio = tl.where(capped, dratio, 0.0)

        clipped = tl.zeros([BLOCK], tl.float32)
        lower = tl.zeros([BLOCK], tl.float32)
        cispo_clipped = tl.zeros([BLOCK], tl.float32)
        if LOSS <= 1:  # ppo, gspo
            if HAS_DELTA:
                bounded = tl.minimum(ratio, delta)
                dbounded = tl.where(ratio <= delta, dratio, 0.0)
            else:
                bounded = ratio
                dbounded = dratio
            low = 1.0 - clip_low
            high = 1.0 + clip_high
            loss1 = -adv * bounded
            loss2 = -adv * tl.minimum(tl.maximum(ratio, low), high)
            is_clipped = loss2 > loss1
            loss = tl.where(is_clipped, loss2, loss1)
            grad = -adv * tl.where(is_clipped, tl.where((ratio >= low) & (ratio <= high), dratio, 0.0), dbounded)
            clipped = tl.where(is_clipped, 1.0, 0.0)
            if HAS_DUAL:
                loss3 = -adv * dual_clip
                is_lower = (adv < 0) & (loss > loss3)
                loss = tl.where(is_lower, loss3, loss)
                grad = tl.where(is_lower, 0.0, grad)
                lower = tl.where(is_lower, 1.0, 0.0)
        elif LOSS <= 3:  # cispo (clip(r, 1-eps_low, 1+eps_high)), cispo-trl (min(r, bound))
            if LOSS == 2:
                weight = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
                cap = 1.0 + clip_high
            else:
                weight = tl.minimum(ratio, clip_high)
                cap = clip_high
            clipped = tl.where(weight != ratio, 1.0, 0.0)
            cispo_clipped = tl.where((ratio > cap) & (adv > 0), 1.0, 0.0)  # TRL's cispo_clip_ratio
            loss = -weight * adv * lp
            grad = -weight * adv
        elif LOSS == 4:  # sapo
            tau = tl.where(adv > 0, tau_pos, tau_neg)
            gate = tl.sigmoid(tau * (ratio - 1.0))
            loss = -adv * gate * 4.0 / tau
            grad = -adv * 4.0 * gate * (1.0 - gate) * dratio
        elif LOSS == 5:  # reinforce
            loss = -adv * lp
            grad = -adv
        elif LOSS <= 7:  # dppo_tv, dppo_kl: -A sg(min(r, delta?)) lp v
            p = tl.exp(lp)
            q = tl.exp(old)
            if LOSS == 6:
                valid = tl.where(adv > 0, p - q <= clip_high, p - q >= -clip_low)
            else:
                binary_kl = q * (old - lp) + (1.0 - q) * tl.log((1.0 - q + _DPPO_KL_EPS) / (1.0 - p + _DPPO_KL_EPS))
                valid = tl.where(adv > 0, (binary_kl <= clip_high) | (p <= q), (binary_kl <= clip_low) | (p >= q))
            v = tl.where(valid, 1.0, 0.0)
            if HAS_DELTA:
                weight = tl.minimum(ratio, delta)
                lower = tl.where((ratio > delta) & valid, 1.0, 0.0)
            else:
                weight = ratio
            clipped = 1.0 - v
            loss = -adv * weight * lp * v
            grad = -adv * weight * v
        else:  # geo_mean: -mean(A) g_b
            outside = (log_ratio < -clip_low) | (log_ratio > clip_high)
            clipped = tl.where(outside & (adv > 0), 1.0, 0.0)
            lower = tl.where(outside & (adv < 0), 1.0, 0.0)
            loss = -seq_adv * ratio
            grad = -seq_adv * dratio
        if HAS_IS:
            if IS_PER_SEQ:
                isw = isw_seq
            else:
                isw = tl.load(isw_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            loss = loss * isw
            grad = grad * isw
        if HAS_KL:
            ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            kl, dkl = kl_estimate(lp, ref, KL_BASE, KL_STRAIGHT_THROUGH, KL_CLAMP)
            if KL_RATIO_WEIGHT:  # r KL with r differentiable (sequence losses: through every token, the mean KL)
                if SEQUENCE:
                    dkl = ratio * dkl + dratio * seq_kl
                else:
                    dkl = ratio * dkl + dratio * kl
                kl = ratio * kl
            loss = loss + kl_coef * kl
            grad = grad + kl_coef * dkl
            acc_kl += tl.where(active, kl * m, 0.0)
        if HAS_ENT:
            ent = tl.load(ent_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            loss = loss - entropy_coef * ent
            acc_ent += tl.where(active, ent * m, 0.0)

        tl.store(g_ptr + offs, tl.where(active, grad * m, 0.0), mask=inb)
        acc_loss += tl.where(active, loss * m, 0.0)
        acc_count += m
        acc_clip += tl.where(active, clipped * m, 0.0)
        acc_lower += tl.where(active, lower * m, 0.0)
        acc_k2 += tl.where(active, 0.5 * log_ratio * log_ratio * m, 0.0)
        acc_ratio += tl.where(active, ratio * m, 0.0)
        if SEQUENCE:  # verl's ppo_kl: -delta, clamped like the ratio's argument for the token losses
            acc_ppo_kl += tl.where(active, -log_ratio * m, 0.0)
        else:
            acc_ppo_kl += tl.where(active, -clamped_arg * m, 0.0)
        acc_cispo += tl.where(active, cispo_clipped * m, 0.0)
        ratio_min = tl.minimum(ratio_min, tl.where(active, ratio, float("inf")))
        ratio_max = tl.maximum(ratio_max, tl.where(active, ratio, float("-inf")))

    row = part_ptr + pid.to(tl.int64) * _NUM_PARTIALS  # column order: reference/policy_loss.PARTIALS
    tl.store(row + 0, tl.sum(acc_loss, 0))
    tl.store(row + 1, tl.sum(acc_count, 0))
    tl.store(row + 2, tl.sum(acc_clip, 0))
    tl.store(row + 3, tl.sum(acc_lower, 0))
    tl.store(row + 4, tl.sum(acc_k2, 0))
    tl.store(row + 5, tl.sum(acc_ratio, 0))
    tl.store(row + 6, tl.min(ratio_min, 0))
    tl.store(row + 7, tl.max(ratio_max, 0))
    tl.store(row + 8, tl.sum(acc_kl, 0))
    tl.store(row + 9, tl.sum(acc_ent, 0))
    tl.store(row + 10, tl.sum(acc_ppo_kl, 0))
    tl.store(row + 11, tl.sum(acc_cispo, 0))


def as_loadable(mask: torch.Tensor) -> torch.Tensor:
    """Triton loads bytes, not bools: view a bool mask as uint8 (no copy)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def policy_loss_fwd(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, *, loss, clip_low, clip_high,
    dual_clip, delta, log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, kl_estimator, kl_clamp,
    kl_ratio_weight, entropy_coef, seq_len,
):
    """Contiguous token inputs of any shape, read as flat ``[N]`` (``advantages`` /
    ``is_weights`` per token or ``[S]``),
    ``cu_seqlens`` ``[S+1]`` -> ``(g fp32 in logp's shape, partials [S, len(PARTIALS)] fp32)``."""
    n = logp.numel()
    num_seqs = cu_seqlens.numel() - 1
    g = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    partials = torch.empty(num_seqs, len(PARTIALS), dtype=torch.float32, device=logp.device)
    kl_base, kl_st = estimator_codes(kl_estimator)
    _policy_loss_fwd_kernel[(num_seqs,)](
        logp, old_logp, advantages, as_loadable(mask),
        logp if ref_logp is None else ref_logp,  # placeholders are never read (constexpr off)
        logp if entropy is None else entropy,
        logp if is_weights is None else is_weights,
        cu_seqlens, g, partials,
        clip_low, clip_high, 0.0 if dual_clip is None else dual_clip, 0.0 if delta is None else delta,
        log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, entropy_coef,
        LOSS=LOSS_CODES[loss], SEQUENCE=loss in SEQUENCE_LEVEL_LOSSES, ADV_PER_SEQ=advantages.numel() != n, HAS_IS=is_weights is not None,
        IS_PER_SEQ=is_weights is not None and is_weights.numel() != n, HAS_DUAL=dual_clip is not None,
        HAS_DELTA=delta is not None, HAS_KL=ref_logp is not None, KL_BASE=kl_base, KL_STRAIGHT_THROUGH=kl_st,
        KL_CLAMP=kl_clamp, KL_RATIO_WEIGHT=kl_ratio_weight, HAS_ENT=entropy is not None, BLOCK=block_size(n, num_seqs, seq_len),
    )
    return g, partials


@triton.jit
def _seq_scale_kernel(x_ptr, w_ptr, grad_ptr, cu_ptr, out_ptr, scale, BLOCK: tl.constexpr):
    pid, start, end = _seq_bounds(cu_ptr)
    coef = scale * tl.load(grad_ptr).to(tl.float32) * tl.load(w_ptr + pid)
    cols = tl.arange(0, BLOCK)
    for off in range(start, end, BLOCK):
        offs = off + cols
        inb = offs < end
        x = tl.load(x_ptr + offs, mask=inb, other=0).to(tl.float32)
        tl.store(out_ptr + offs, (coef * x).to(out_ptr.dtype.element_ty), mask=inb)


def seq_scale_bwd(grad, w, x, cu_seqlens, scale: float, seq_len: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``out_t = scale * grad * w[b(t)] * x_t`` in ``out_dtype``: ``grad`` 0-d (the loss's
    gradient, read on the device), ``w`` fp32 ``[S]``, ``x`` contiguous, ``N`` elements of
    any dtype (bool too); the result has ``x``'s shape."""
    n = x.numel()
    num_seqs = cu_seqlens.numel() - 1
    out = torch.empty(x.shape, dtype=store_dtype(out_dtype, x.device), device=x.device)
    _seq_scale_kernel[(num_seqs,)](
        as_loadable(x), w, grad, cu_seqlens, out, scale, BLOCK=block_size(n, num_seqs, seq_len)
    )
    return out.to(out_dtype)
