"""Triton kernel for the fused clipped value loss (formula: ``reference/value_loss.py``).

One program per sequence, like ``kernels/policy_loss.py``: per token ``g_t = m_t dl_t/dV_t``
into an fp32 ``[N]`` buffer saved for backward, per sequence the partial sums of
``reference/value_loss.PARTIALS``. The backward is ``kernels/policy_loss.seq_scale_bwd``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_engine.kernels.policy_loss import as_loadable, block_size
from rlhf_engine.reference.value_loss import PARTIALS

_NUM_PARTIALS = tl.constexpr(len(PARTIALS))


@triton.jit
def _value_loss_fwd_kernel(v_ptr, old_ptr, ret_ptr, mask_ptr, cu_ptr, g_ptr, part_ptr, clip,
                           HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = tl.load(cu_ptr + pid).to(tl.int64)
    end = tl.load(cu_ptr + pid + 1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_count = tl.zeros([BLOCK], tl.float32)
    acc_clip = tl.zeros([BLOCK], tl.float32)
    acc_values = tl.zeros([BLOCK], tl.float32)
    for off in range(start, end, BLOCK):
        offs = off + cols
        inb = offs < end
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        active = m != 0
        v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        ret = tl.load(ret_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        err = v - ret
        if HAS_CLIP:
            old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            low = old - clip
            high = old + clip
            clipped_err = tl.minimum(tl.maximum(v, low), high) - ret
            is_clipped = clipped_err * clipped_err > err * err
            loss = 0.5 * tl.where(is_clipped, clipped_err * clipped_err, err * err)
            grad = tl.where(is_clipped, tl.where((v >= low) & (v <= high), clipped_err, 0.0), err)
            acc_clip += tl.where(active & is_clipped, m, 0.0)
        else:
            loss = 0.5 * err * err
            grad = err
        tl.store(g_ptr + offs, tl.where(active, grad * m, 0.0), mask=inb)
        acc_loss += tl.where(active, loss * m, 0.0)
        acc_count += m
        acc_values += tl.where(active, v * m, 0.0)
    row = part_ptr + pid.to(tl.int64) * _NUM_PARTIALS  # column order: reference/value_loss.PARTIALS
    tl.store(row + 0, tl.sum(acc_loss, 0))
    tl.store(row + 1, tl.sum(acc_count, 0))
    tl.store(row + 2, tl.sum(acc_clip, 0))
    tl.store(row + 3, tl.sum(acc_values, 0))


def value_loss_fwd(values, old_values, returns, mask, cu_seqlens, *, clip, seq_len):
    """Contiguous inputs of any shape, read as flat ``[N]``, ``cu_seqlens`` ``[S+1]`` ->
    ``(g fp32 in values' shape, partials [S, len(PARTIALS)] fp32)``."""
    n = values.numel()
    num_seqs = cu_seqlens.numel() - 1
    g = torch.empty(values.shape, dtype=torch.float32, device=values.device)
    partials = torch.empty(num_seqs, len(PARTIALS), dtype=torch.float32, device=values.device)
    _value_loss_fwd_kernel[(num_seqs,)](
        values, old_values, returns, as_loadable(mask), cu_seqlens, g, partials, 0.0 if clip is None else clip,
        HAS_CLIP=clip is not None, BLOCK=block_size(n, num_seqs, seq_len),
    )
    return g, partials
