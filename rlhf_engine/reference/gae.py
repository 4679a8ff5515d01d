"""GAE and discounted returns: the spec (``*_ref``; the vectorized torch backend is
``rlhf_engine/torch_backend/gae.py``).

Masked positions (``mask == 0``) are skipped: their reward and value are ignored, the
recursion state passes through them unchanged (γ and λ are applied once per *valid*
token), and their outputs are 0. For a valid token ``t`` let ``n(t)`` be the next valid
token of the same sequence (none past the end, where ``V`` and ``A`` are 0):

    δ_t = r_t + γ·V_{n(t)} − V_t,   A_t = δ_t + γλ·A_{n(t)},   R_t = A_t + V_t
    G_t = r_t + γ·G_{n(t)}                                    (discounted returns)

This is verl 0.9.1's rule for observation tokens inside a response, for GAE and for the
REINFORCE++ returns alike (both carry the state through masked positions; verl's GAE also
writes the carried value at masked positions, where ours writes 0). For right- or
left-padded batches (valid tokens contiguous) it also equals TRL's GAE.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.advantages import masked_whiten_ref

WHITEN_EPS = 1e-8


def _sequences(num_tokens_or_shape, cu_seqlens):
    """Index lists of the sequences: rows of ``[B, T]``, or ``cu_seqlens`` segments of ``[N]``."""
    if cu_seqlens is None:
        rows, length = num_tokens_or_shape
        return [list(range(b * length, (b + 1) * length)) for b in range(rows)]
    bounds = cu_seqlens.tolist()
    return [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


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
