"""GAE and discounted returns in plain PyTorch: the spec (``*_ref``) and the vectorized
``"torch"`` backend (``*_torch``).

Masked positions (``mask == 0``) are skipped: their reward and value are ignored, the
recursion state passes through them unchanged (γ and λ are applied once per *valid*
token), and their outputs are 0. For a valid token ``t`` let ``n(t)`` be the next valid
token of the same sequence (none past the end, where ``V`` and ``A`` are 0):

    δ_t = r_t + γ·V_{n(t)} − V_t,   A_t = δ_t + γλ·A_{n(t)},   R_t = A_t + V_t
    G_t = r_t + γ·G_{n(t)}                                    (discounted returns)

This is verl's GAE rule for observation tokens inside a response; for right- or
left-padded batches (valid tokens contiguous) it also equals TRL's GAE and verl's
REINFORCE++ returns, which zero the state at padding instead.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.advantages import masked_whiten_ref, masked_whiten_torch

WHITEN_EPS = 1e-8


def _sequences(num_tokens_or_shape, cu_seqlens):
    """Index lists of the sequences: rows of ``[B, T]``, or ``cu_seqlens`` segments of ``[N]``."""
    if cu_seqlens is None:
        rows, length = num_tokens_or_shape
        return [list(range(b * length, (b + 1) * length)) for b in range(rows)]
    bounds = cu_seqlens.tolist()
    return [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- spec


def gae_ref(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=True, cu_seqlens=None):
    """``(advantages, returns)`` in the dtype of ``rewards``; same shape as ``rewards``."""
    r, v, m = rewards.reshape(-1), values.reshape(-1), mask.reshape(-1) != 0
    adv = torch.zeros_like(r)
    ret = torch.zeros_like(r)
    for seq in _sequences(rewards.shape, cu_seqlens):
        next_value = r.new_zeros(())
        next_adv = r.new_zeros(())
        for t in reversed(seq):
            if not m[t]:
                continue
            delta = r[t] + gamma * next_value - v[t]
            next_adv = delta + gamma * lam * next_adv
            next_value = v[t]
            adv[t] = next_adv
            ret[t] = next_adv + v[t]
    if whiten:
        adv = masked_whiten_ref(adv, m, True, WHITEN_EPS)
    return adv.view(rewards.shape), ret.view(rewards.shape)


def discounted_returns_ref(rewards, mask, *, gamma=1.0, cu_seqlens=None):
    """REINFORCE++ returns in the dtype of ``rewards``; same shape."""
    r, m = rewards.reshape(-1), mask.reshape(-1) != 0
    out = torch.zeros_like(r)
    for seq in _sequences(rewards.shape, cu_seqlens):
        running = r.new_zeros(())
        for t in reversed(seq):
            if m[t]:
                running = r[t] + gamma * running
                out[t] = running
    return out.view(rewards.shape)


# --------------------------------------------------------------------- torch backend


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
    """Vectorized :func:`gae_ref`: fp32 ``(advantages, returns)``."""
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
    """Vectorized :func:`discounted_returns_ref`: fp32, shape of ``rewards``."""
    if rewards.numel() == 0:
        return torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
    r, ends = _as_rows(rewards.to(torch.float32), cu_seqlens)
    valid, _ = _as_rows(mask != 0, cu_seqlens)
    zero = torch.zeros((), dtype=torch.float32, device=r.device)
    keep = (~ends).to(torch.float32)
    out = _reverse_linear_scan(torch.where(valid, gamma * keep, keep), torch.where(valid, r, zero))
    return torch.where(valid, out, zero).view(rewards.shape)
