"""Clipped value loss (PPO, Schulman et al. 2017, as in verl/TRL).

Per token, with ``V`` the critic's value, ``V_old`` the value at rollout time, ``R`` the
return and ``c`` the clip range:

    ``l = 1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``

(``clip=None``: ``l = 1/2 (V - R)^2``), aggregated like the policy loss
(``reference/aggregation.py``). Metrics, masked token means over the batch (0 when all
tokens are masked): ``clipfrac`` (the clipped term is strictly larger, verl's
``vf_clipfrac``) and ``values_mean``.

:func:`value_loss_ref` is the spec (autograd); :func:`value_loss_torch` is the torch
backend, returning what the custom op returns.
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
)
from rlhf_engine.reference.policy_loss import sequence_bounds

METRICS = ("clipfrac", "values_mean")
# Per-sequence masked sums both backends reduce (the Triton kernel returns them), in this
# column order.
PARTIALS = ("loss", "count", "clipped", "values")


def value_loss_ref(values, old_values, returns, mask, *, clip=0.2, aggregation="token-mean", normalizer=None, cu_seqlens=None):
    """The spec. Same arguments as ``ops.value_loss``; ``(loss, metrics)`` in the inputs'
    dtype, differentiable w.r.t. ``values``."""
    n = values.numel()
    bounds = sequence_bounds(n, values.shape, cu_seqlens)
    v = values.reshape(-1)
    old = old_values.reshape(-1).to(v.dtype)
    ret = returns.reshape(-1).to(v.dtype)
    m = mask.reshape(-1).to(v.dtype)
    active = mask.reshape(-1) != 0
    unclipped = (v - ret) ** 2
    if clip is None:
        loss_tok, clipped = 0.5 * unclipped, torch.zeros_like(active)
    else:
        v_clipped = torch.clamp(v, old - clip, old + clip)
        clipped_sq = (v_clipped - ret) ** 2
        loss_tok, clipped = 0.5 * torch.maximum(unclipped, clipped_sq), clipped_sq > unclipped
    max_len = values.shape[1] if (cu_seqlens is None and values.dim() == 2) else None
    total = aggregate_ref(loss_tok, m, bounds, aggregation, normalizer, max_len)
    with torch.no_grad():
        count = m[active].sum()

        def mean(x):
            return (x.to(v.dtype) * m)[active].sum() / count if count > 0 else v.new_zeros(())

        metrics = {"clipfrac": mean(clipped), "values_mean": mean(v)}
    return total, metrics


def value_loss_torch(values, old_values, returns, mask, cu_seqlens, normalizer, *, clip, aggregation, normalizer_const, seq_len):
    """Torch backend: contiguous inputs (``[N]``, or ``[S, T]`` when padded) -> ``(loss 0-d,
    metrics [len(METRICS)], g (values' shape), w [S])``, all fp32, with ``g = m dl/dV`` and ``w = d loss
    / d L_b``: what ``rlhf_engine::value_loss_fwd`` returns. ``seq_len``: the padded length,
    0 when packed.

    Written for few ops and passes like ``policy_loss_torch``: ``[S, T]`` views when
    padded, :class:`Where` selects, one reduction for every column, and loss, weights and
    metrics straight from the per-sequence sums.
    """
    seg = Segments(cu_seqlens, values.numel(), seq_len)
    f32 = torch.float32
    v, ret = seg.tokens(fp32(values)), seg.tokens(fp32(returns))
    token_mask = TokenMask(seg.tokens(mask))
    err = v - ret
    # Rows in PARTIALS order; the halved squares are exact (a power of two).
    buf = torch.empty((len(PARTIALS),) + seg.shape, dtype=f32, device=v.device)
    loss_row, count_row, clipped_row, values_row = buf
    if clip is None:
        half_square(err, out=loss_row)
        clipped_row.zero_()
        through = token_mask.active.cond
    else:
        old = seg.tokens(fp32(old_values))
        clipped_err = torch.clamp(v, old - clip, old + clip).sub_(ret)
        half_sq, half_sq_clipped = half_square(err, out=loss_row), half_square(clipped_err)
        is_clipped = half_sq_clipped > half_sq
        torch.maximum(half_sq, half_sq_clipped, out=loss_row)
        clipped_row.copy_(numeric(is_clipped))
        # The clipped term wins only where clip(V) != V (equal values give equal terms), so
        # its gradient there is 0: the gradient is err where active and not clipped (bools:
        # a > b is a and not b), one select for both.
        through = token_mask.active.cond > is_clipped
    values_row.copy_(v)
    token_mask.apply_(buf)
    count_row.copy_(numeric(seg.tokens(mask)))  # the weights themselves, after masking
    sums = seg.sum(buf)
    total, w, totals, count = aggregate_sums(sums, aggregation, cu_seqlens, seq_len, normalizer, normalizer_const)
    metrics = if_counted(totals[2:] / count, count)  # PARTIALS[2:] are the METRICS
    grad = token_mask.weigh(Where(through).keep(err))
    return total, metrics, grad, w
