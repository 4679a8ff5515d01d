"""Triton kernels for GAE and discounted returns (semantics: ``reference.gae``).

Why a chunked associative scan: the recursion runs backwards over time, once per
sequence. A loop over single time steps (rows vectorized) would make each program
wait ``T`` dependent steps and read memory column-wise; instead one program owns one
sequence and walks it from the end in chunks of ``BLOCK_T`` tokens. Each chunk is
loaded in reversed order (so a forward ``tl.associative_scan`` runs backwards in time,
which needs no ``reverse=`` support from older Triton releases), its first-order linear
recurrence ``h = a·h_prev + b`` is solved in registers by the scan, and the state at the
chunk's far end is carried into the next chunk. Loads stay contiguous and coalesced.

GAE needs ``V_{n(t)}``, the value of the next *valid* token: itself a recurrence
(``u_t = V_t`` on a valid token, ``u_{t+1}`` on a masked one), so it is a second scan,
run on the inputs shifted by one position (``u_{t+1}`` lands at position ``t``).

With ``whiten=True`` the GAE kernel also writes each row's (count, Σ A) so the masked
whitening starts at its second (centered) pass.
"""

import torch
import triton
import triton.language as tl

from rlhf_engine.kernels.advantages import whiten_apply, whiten_stats

_WHITEN_EPS = 1e-8


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    # Apply (a1, b1) then (a2, b2): h -> a2·(a1·h + b1) + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _last(x, k, BLOCK_T: tl.constexpr):
    return tl.sum(tl.where(k == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _reverse_scan_kernel(
    r_ptr, v_ptr, m_ptr, out_ptr, ret_ptr, part_ptr, cu_ptr, T, num_seqs, gamma, gamma_lam,
    GAE: tl.constexpr, PACKED: tl.constexpr, BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0)
    if PACKED:
        start = tl.load(cu_ptr + seq).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        start = seq.to(tl.int64) * T
        end = start + T
    k = tl.arange(0, BLOCK_T)
    carry_u = 0.0  # V of the first valid token at or after the chunk's near end
    carry_h = 0.0  # A (or G) of the first valid token at or after it
    acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c in range(0, tl.cdiv(end - start, BLOCK_T)):
        t = end - 1 - c * BLOCK_T - k  # reversed: k = 0 is the latest token of the chunk
        inb = t >= start
        valid = tl.load(m_ptr + t, mask=inb, other=0) != 0
        r = tl.load(r_ptr + t, mask=inb, other=0.0).to(tl.float32)
        if GAE:
            v = tl.load(v_ptr + t, mask=inb, other=0.0).to(tl.float32)
            has_next = inb & (t + 1 < end)
            next_valid = tl.load(m_ptr + t + 1, mask=has_next, other=0) != 0
            next_v = tl.load(v_ptr + t + 1, mask=has_next, other=0.0).to(tl.float32)
            au, bu = tl.associative_scan(
                (tl.where(next_valid, 0.0, 1.0), tl.where(next_valid, next_v, 0.0)), 0, _linear_combine
            )
            v_next = au * carry_u + bu
            carry_u = _last(v_next, k, BLOCK_T)
            a = tl.where(valid, gamma_lam, 1.0)
            b = tl.where(valid, r + gamma * v_next - v, 0.0)
        else:
            a = tl.where(valid, gamma, 1.0)
            b = tl.where(valid, r, 0.0)
        ah, bh = tl.associative_scan((a, b), 0, _linear_combine)
        h = ah * carry_h + bh
        carry_h = _last(h, k, BLOCK_T)
        adv = tl.where(valid, h, 0.0)
        tl.store(out_ptr + t, adv, mask=inb)
        if GAE:
            tl.store(ret_ptr + t, tl.where(valid, h + v, 0.0), mask=inb)
            acc_n += valid.to(tl.float32)
            acc_s += adv
    if GAE:
        tl.store(part_ptr + seq, tl.sum(acc_n, axis=0))
        tl.store(part_ptr + num_seqs + seq, tl.sum(acc_s, axis=0))


def _launch(rewards, values, mask, gamma, lam, cu_seqlens, gae: bool):
    """Run the scan; returns ``(out, returns or None, valid mask, row partials or None)``."""
    r = rewards.contiguous()
    # The recursion reads the mask as a gate (mask != 0); bool loads as uint8.
    valid = (mask if mask.dtype == torch.bool else mask != 0).contiguous()
    out = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    ret = torch.empty_like(out) if gae else None
    if r.numel() == 0:
        return out, ret, valid, None
    if cu_seqlens is None:
        num_seqs, T = r.shape
        avg_len = T
    else:
        num_seqs, T = cu_seqlens.numel() - 1, 0
        avg_len = triton.cdiv(r.numel(), num_seqs)
    block_t = min(1024, max(16, triton.next_power_of_2(avg_len)))
    part = torch.empty(2, num_seqs, dtype=torch.float32, device=r.device) if gae else out
    v = values.contiguous() if gae else r
    cu = cu_seqlens.contiguous() if cu_seqlens is not None else r
    _reverse_scan_kernel[(num_seqs,)](
        r, v, valid.view(torch.uint8), out, ret if gae else out, part, cu, T, num_seqs,
        float(gamma), float(gamma * lam),
        GAE=gae, PACKED=cu_seqlens is not None, BLOCK_T=block_t,
    )
    return out, ret, valid, part if gae else None


def gae_fwd(rewards, values, mask, gamma: float, lam: float, whiten: bool, cu_seqlens=None):
    """fp32 ``(advantages, returns)`` of the shape of ``rewards`` (``[B, T]``, or ``[N]`` packed)."""
    adv, ret, valid, part = _launch(rewards, values, mask, gamma, lam, cu_seqlens, gae=True)
    if whiten and part is not None:
        flat = adv.view(-1)
        part1, part2 = whiten_stats(flat, valid, part1=part)
        whiten_apply(flat, valid, flat, part1, part2, True, _WHITEN_EPS)
    return adv, ret


def discounted_returns_fwd(rewards, mask, gamma: float, cu_seqlens=None):
    """fp32 REINFORCE++ returns of the shape of ``rewards``."""
    return _launch(rewards, None, mask, gamma, 1.0, cu_seqlens, gae=False)[0]
