"""Torch backend of ``rlhf_engine.ops.value_loss`` (spec:
``rlhf_engine/reference/value_loss.py``), returning what the custom op returns.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.value_loss import PARTIALS
from rlhf_engine.torch_backend.aggregation import (
    Segments,
    TokenMask,
    Where,
    aggregate_sums,
    fp32,
    half_square,
    if_counted,
    numeric,
)


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
