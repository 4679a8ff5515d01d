"""The covariance pre-pass of ``ops.clip_cov_loss`` / ``ops.kl_cov_loss``: which tokens
each loss treats apart, and kl_cov's penalty on them. Plain torch on the inputs' device,
shared by every backend (the loss itself is the fused ``policy_loss``); the spec is
``rlhf_engine/reference/cov_losses.py``.

The picks read values on the host (the candidate count, verl's ``torch.randperm`` draw,
``torch.topk``'s k): one sync per call. On fake tensors nothing is read and nothing is
picked, so a traced call has the real call's shapes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor

from rlhf_engine.reference.cov_losses import draw_device
from rlhf_engine.torch_backend.aggregation import Segments, TokenMask, aggregate_partials, fp32, numeric


class CovTokens(NamedTuple):
    """The pre-pass's view of a batch: flat ``[N]`` fp32 constants (no gradient)."""

    cu_seqlens: torch.Tensor  # [S + 1]
    seq_len: int  # the padded length, 0 when packed
    lp: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor  # per token (a per-sequence one broadcast)
    m: torch.Tensor  # mask weights, 0 on masked tokens
    active: torch.Tensor  # bool, m != 0
    masked: TokenMask  # selects the valid tokens exactly, whatever the masked ones hold
    count: Optional[float]  # sum(m) as a host float; None on fake tensors (no value to read)
    isw: Optional[torch.Tensor]  # per token, or None


def cov_tokens(logp, old_logp, advantages, mask, is_weights, cu_seqlens, seq_len) -> CovTokens:
    """Validated dense inputs (``advantages`` / ``is_weights`` per token or ``[S]``) -> :class:`CovTokens`."""
    seg = Segments(cu_seqlens, logp.numel(), seq_len)

    def flat(x):
        return None if x is None else seg.per_token(fp32(x.detach())).expand(seg.shape).reshape(-1)

    mask = mask.reshape(-1)
    m = fp32(numeric(mask))
    # a bool mask is its own "active" (a bool != 0 on the CPU is a scalar loop)
    active = mask if mask.dtype == torch.bool else mask != 0
    count = None if isinstance(m, FakeTensor) else m.sum(dtype=torch.float64).item()
    return CovTokens(
        cu_seqlens, seq_len, flat(logp), flat(old_logp), flat(advantages), m, active, TokenMask(mask), count,
        flat(is_weights),
    )


def masked_mean(x: torch.Tensor, t: CovTokens) -> torch.Tensor:
    """Mask-weighted mean of ``x`` over the valid tokens, 0-d fp32 (0 without one)."""
    total = t.masked.apply(x).sum()
    if t.count is None:  # fake tensors: the same ops, no value read
        count = t.m.sum()
        return torch.where(count > 0, total / count, 0.0)
    return total / t.count if t.count > 0 else x.new_zeros(())


def clip_cov_weights(t: CovTokens, clip_low, clip_high, ratio, lb, ub, generator) -> torch.Tensor:
    """fp32 ``[N]``: 0 on the tokens clip_cov drops, 1 elsewhere (the ``corr`` of verl)."""
    r = torch.exp(t.lp - t.old)
    # PPO clipped the token where -A clip(r) > -A r, i.e. A clip(r) < A r (negation is exact)
    clipped = t.adv * r.clamp(1 - clip_low, 1 + clip_high) < t.adv * r
    cov = (t.adv - masked_mean(t.adv, t)) * (t.lp - masked_mean(t.lp, t))
    in_window = t.active & ~clipped & (cov > lb) & (cov < ub)
    corr = torch.ones_like(t.m)
    if t.count is None:
        return corr
    candidates = torch.nonzero(in_window).reshape(-1)
    if candidates.numel() > 0:
        keep = max(int(ratio * t.count), 1)
        # verl draws a permutation of every candidate, even when it keeps them all: the same
        # draw consumes the generator the same way
        order = torch.randperm(candidates.numel(), generator=generator, device=draw_device(generator))
        corr[candidates[order[:keep].to(candidates.device)]] = 0.0
    return corr


def kl_cov_top(t: CovTokens, ratio: float) -> Optional[torch.Tensor]:
    """int64 ``[k]``: the flat indices of the k = max(1, int(n * ratio)) valid tokens of
    largest covariance (plain means over the n valid tokens, verl's); None when n = 0 or
    on fake tensors."""
    if t.count is None:
        return None
    valid = torch.nonzero(t.active).reshape(-1)
    if valid.numel() == 0:
        return None
    adv, lp = t.adv[valid], t.lp[valid]
    cov = (adv - adv.mean()) * (lp - lp.mean())
    return valid[torch.topk(cov, max(1, int(valid.numel() * ratio)), largest=True).indices]


def kl_cov_penalty(
    logp, top, coef, t: CovTokens, aggregation, count_empty_seqs, normalizer, normalizer_const
) -> torch.Tensor:
    """``sum_b w_b sum_{t in top, b} coef |delta_t| is_w_t m_t``: the penalty's share of the
    aggregated loss, differentiable w.r.t. ``logp`` through the k gathered tokens only.
    ``w_b = d loss / d L_b`` from the per-sequence counts ``M_b``, as the op aggregates
    ``L_b`` (``normalizer``: a tensor or None; ``normalizer_const``: a number or 0)."""
    seg = Segments(t.cu_seqlens, logp.numel(), t.seq_len)
    counts = seg.sum(seg.tokens(t.m))  # m is 0 on masked tokens
    _, w = aggregate_partials(
        counts, counts, aggregation, t.cu_seqlens, t.seq_len, normalizer, normalizer_const,
        count_empty_seqs=count_empty_seqs,
    )
    seq = torch.searchsorted(t.cu_seqlens.long(), top, right=True) - 1
    delta = fp32(logp.reshape(-1)[top]) - t.old[top]
    scale = t.m[top] if t.isw is None else t.m[top] * t.isw[top]
    return torch.dot(w[seq], coef * delta.abs() * scale)
