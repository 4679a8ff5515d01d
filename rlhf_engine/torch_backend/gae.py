"""Torch backend of GAE and discounted returns (spec: ``rlhf_engine/reference/gae.py``):
the backward recursions as log-depth linear scans over ``[rows, L]``.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.gae import WHITEN_EPS
from rlhf_engine.torch_backend.advantages import masked_whiten_torch


def _reverse_linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h_t = b_t + a_t·h_{t+1}`` along the last axis, ``h`` past the end = 0.

    Hillis-Steele doubling: after the step with distance ``d`` the pair ``(a_t, b_t)``
    maps ``h_{t+2d}`` to ``h_t``. ``ceil(log2 L)`` full-tensor steps instead of ``L``
    tiny ones: the whole batch advances together, which beats a Python loop over time
    on the CPU for large batches and by far on a GPU (a handful of launches, not ``L``).
    Pairs whose span reaches past the end are left as they are: they are never read
    again, because the state past the end is 0. Works in place on ``a`` and ``b`` (fresh
    temporaries of the caller) with one scratch buffer, since fresh full-size
    allocations per step cost more than the arithmetic.
    """
    length = a.shape[-1]
    scratch = torch.empty_like(b)
    d = 1
    while d < length:
        head = length - d
        tmp = scratch[..., :head]
        torch.mul(a[..., :head], b[..., d:], out=tmp)
        b[..., :head].add_(tmp)
        if 2 * d < length:  # a is read again only by a later step
            torch.mul(a[..., :head], a[..., d:], out=tmp)
            a[..., :head].copy_(tmp)
        d *= 2
    return b


def _as_rows(x, cu_seqlens):
    """View padded ``[B, T]`` or packed ``[N]`` as ``[rows, L]`` plus the sequence-end flags."""
    if cu_seqlens is None:
        rows = x.reshape(x.shape[0], -1)
        ends = torch.zeros(rows.shape, dtype=torch.bool, device=x.device)
        ends[:, -1] = True
        return rows, ends
    rows = x.reshape(1, -1)
    ends = torch.zeros(rows.shape[1], dtype=torch.bool, device=x.device)
    # An empty sequence's "last token" index is the previous one's, already an end;
    # -1 (an empty first sequence) wraps to N-1, the last sequence's end anyway.
    last = (cu_seqlens[1:].long() - 1).remainder(rows.shape[1])
    ends.index_fill_(0, last, True)
    return rows, ends.view(1, -1)


def gae_torch(rewards, values, mask, gamma, lam, whiten, cu_seqlens):
    """Vectorized :func:`rlhf_engine.reference.gae.gae_ref`: fp32 ``(advantages, returns)``."""
    if rewards.numel() == 0:
        empty = torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
        return empty, empty.clone()
    r, ends = _as_rows(rewards.to(torch.float32), cu_seqlens)
    v, _ = _as_rows(values.to(torch.float32), cu_seqlens)
    valid, _ = _as_rows(mask != 0, cu_seqlens)
    zero = torch.zeros((), dtype=torch.float32, device=r.device)
    r = torch.where(valid, r, zero)
    v = torch.where(valid, v, zero)
    keep = (~ends).to(torch.float32)  # the state never crosses a sequence end

    # u_t = value of the first valid token at or after t; V_{n(t)} = u_{t+1}.
    u = _reverse_linear_scan(torch.where(valid, zero, keep), v.clone())  # the scan works in place
    next_value = torch.nn.functional.pad(u[..., 1:], (0, 1)) * keep
    delta = torch.where(valid, r + gamma * next_value - v, zero)
    adv = _reverse_linear_scan(torch.where(valid, gamma * lam * keep, keep), delta)
    adv = torch.where(valid, adv, zero)
    ret = torch.where(valid, adv + v, zero)
    if whiten:
        adv = masked_whiten_torch(adv, valid, True, WHITEN_EPS)
    return adv.view(rewards.shape), ret.view(rewards.shape)


def discounted_returns_torch(rewards, mask, gamma, cu_seqlens):
    """Vectorized :func:`rlhf_engine.reference.gae.discounted_returns_ref`: fp32, shape of ``rewards``."""
    if rewards.numel() == 0:
        return torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
    r, ends = _as_rows(rewards.to(torch.float32), cu_seqlens)
    valid, _ = _as_rows(mask != 0, cu_seqlens)
    zero = torch.zeros((), dtype=torch.float32, device=r.device)
    keep = (~ends).to(torch.float32)
    out = _reverse_linear_scan(torch.where(valid, gamma * keep, keep), torch.where(valid, r, zero))
    return torch.where(valid, out, zero).view(rewards.shape)
