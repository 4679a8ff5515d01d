"""Triton kernels for group-relative advantages and masked whitening.

Semantics are those of ``rlhf_engine.reference.advantages``; launchers take tensors,
allocate fp32 outputs and launch. No validation, no autograd.

Whitening is a two-pass (centered) reduction without host syncs or atomics: each of a
capped number of programs grid-strides over the input and writes its partial sums;
the next kernel's programs each re-reduce those few partials (at most ``_MAX_PROGRAMS``
values, cheap L2 reads) instead of waiting for a separate reduction launch. Summation
order is fixed, so results are deterministic.

Group statistics: with a fixed ``group_size`` one program owns a ``[BLOCK_R, BLOCK_G]``
tile of whole groups and does everything in registers. With ``group_ids`` the groups are
scattered, so per-group sums go through fp32 atomics into a ``[5, num_groups]`` buffer
(count, Σs, ΣL, ΣL·s, then Σ(s−μ)² in a second pass); atomics make the last bits of the
sums order-dependent (not bitwise deterministic across runs).
"""

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_MAX_PROGRAMS = 256
_BLOCK_P = 256

# tl.constexpr codes of the methods and scales (the order of reference.advantages).
_METHOD = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "reinforce_pp_baseline": 3, "opo": 4}
_SCALE = {"group": 0, "batch": 1, "none": 2}


# ------------------------------------------------------------------ whitening passes


@triton.jit
def _sum_partials(ptr, P, BLOCK_P: tl.constexpr):
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        offs = start + tl.arange(0, BLOCK_P)
        acc += tl.load(ptr + offs, mask=offs < P, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _count_and_mean(part1_ptr, P1, BLOCK_P: tl.constexpr):
    """``(Σw, μ)`` from pass-1 partials laid out as ``[2, P1]`` (Σw row, Σw·x row)."""
    n = _sum_partials(part1_ptr, P1, BLOCK_P)
    total = _sum_partials(part1_ptr + P1, P1, BLOCK_P)
    mean = tl.where(n > 0, total / tl.where(n > 0, n, 1.0), 0.0)
    return n, mean


@triton.jit
def _count_mean_var(part1_ptr, P1, part2_ptr, P2, BLOCK_P: tl.constexpr):
    """``(Σw, μ, unbiased var)``; the variance is 0 when ``Σw ≤ 1`` (undefined there)."""
    n, mean = _count_and_mean(part1_ptr, P1, BLOCK_P)
    sq = _sum_partials(part2_ptr, P2, BLOCK_P)
    var = tl.where(n > 1, sq / tl.where(n > 1, n - 1.0, 1.0), 0.0)
    return n, mean, var


@triton.jit
def _load_x_w(x_ptr, w_ptr, offs, N, HAS_W: tl.constexpr):
    """fp32 values and weights; values at zero weight read as 0 (padding may hold NaN)."""
    inb = offs < N
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=inb, other=0).to(tl.float32)
    else:
        w = inb.to(tl.float32)
    return tl.where(w != 0, x, 0.0), w


@triton.jit
def _whiten_sums_kernel(x_ptr, w_ptr, part1_ptr, N, P, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, N, P * BLOCK):
        x, w = _load_x_w(x_ptr, w_ptr, start + tl.arange(0, BLOCK), N, HAS_W)
        acc_n += w
        acc_s += w * x
    tl.store(part1_ptr + pid, tl.sum(acc_n, axis=0))
    tl.store(part1_ptr + P + pid, tl.sum(acc_s, axis=0))


@triton.jit
def _whiten_sq_kernel(
    x_ptr, w_ptr, part1_ptr, P1, part2_ptr, N, P,
    HAS_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    _, mean = _count_and_mean(part1_ptr, P1, BLOCK_P)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, N, P * BLOCK):
        x, w = _load_x_w(x_ptr, w_ptr, start + tl.arange(0, BLOCK), N, HAS_W)
        d = tl.where(w != 0, x - mean, 0.0)
        acc += w * d * d
    tl.store(part2_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _whiten_apply_kernel(
    x_ptr, w_ptr, out_ptr, part1_ptr, P1, part2_ptr, N, P, eps,
    SHIFT_MEAN: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n, mean, var = _count_mean_var(part1_ptr, P1, part2_ptr, P, BLOCK_P)
    # Σw ≤ 1: no spread is known, so every valid value maps to the mean (not to
    # rounding noise times rsqrt(eps)).
    inv_std = tl.where(n > 1, 1.0 / tl.sqrt(var + eps), 0.0)
    for start in range(pid * BLOCK, N, P * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x, w = _load_x_w(x_ptr, w_ptr, offs, N, HAS_W)
        y = (x - mean) * inv_std
        if not SHIFT_MEAN:
            y += mean
        tl.store(out_ptr + offs, tl.where(w != 0, y, 0.0), mask=offs < N)


def _num_programs(n: int) -> int:
    return max(1, min(triton.cdiv(n, _BLOCK), _MAX_PROGRAMS))


def _flat_weights(w):
    """Flat weights a kernel can load (bool as uint8), or the flag that there are none."""
    if w is None:
        return None, False
    w = w.reshape(-1)
    return (w.view(torch.uint8) if w.dtype == torch.bool else w), True


def whiten_stats(x: torch.Tensor, w: torch.Tensor | None, part1: torch.Tensor | None = None):
    """Both reduction passes over flat ``x``: ``(part1 [2, P1], part2 [P])`` partial sums.

    ``part1`` may come precomputed from a producer kernel (GAE writes one pair per row).
    """
    n = x.numel()
    programs = _num_programs(n)
    wf, has_w = _flat_weights(w)
    w_arg = wf if has_w else x
    if part1 is None:
        part1 = torch.empty(2, programs, dtype=torch.float32, device=x.device)
        _whiten_sums_kernel[(programs,)](x, w_arg, part1, n, programs, HAS_W=has_w, BLOCK=_BLOCK)
    part2 = torch.empty(programs, dtype=torch.float32, device=x.device)
    _whiten_sq_kernel[(programs,)](
        x, w_arg, part1, part1.shape[1], part2, n, programs, HAS_W=has_w, BLOCK=_BLOCK, BLOCK_P=_BLOCK_P
    )
    return part1, part2


def whiten_apply(x, w, out, part1, part2, shift_mean: bool, eps: float) -> torch.Tensor:
    """``out = whiten(x)`` from the partials of :func:`whiten_stats` (``out`` may be ``x``)."""
    n = x.numel()
    programs = part2.numel()
    wf, has_w = _flat_weights(w)
    _whiten_apply_kernel[(programs,)](
        x, wf if has_w else x, out, part1, part1.shape[1], part2, n, programs, eps,
        SHIFT_MEAN=shift_mean, HAS_W=has_w, BLOCK=_BLOCK, BLOCK_P=_BLOCK_P,
    )
    return out


def masked_whiten_fwd(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float) -> torch.Tensor:
    """fp32 whitened ``x`` (any shape), ``mask`` as weights; 0 where ``mask == 0``."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out
    xf = x.contiguous().reshape(-1)
    mask = mask.contiguous()
    part1, part2 = whiten_stats(xf, mask)
    whiten_apply(xf, mask, out.view(-1), part1, part2, shift_mean, eps)
    return out


# ------------------------------------------------------------------ group advantages


@triton.jit
def _advantage_formula(s, n, mean, var, lmean, batch_std, eps,
                       METHOD: tl.constexpr, SCALE: tl.constexpr, VERL: tl.constexpr):
    """One sample's advantage from its group's statistics (see reference.advantages).

    Reinforce++-baseline returns ``s − μ_g`` here; the batch whitening follows.
    """
    single = n < 2.0
    if METHOD == 2:  # RLOO: s − mean of the others = n/(n−1)·(s − μ)
        loo = n / tl.maximum(n - 1.0, 1.0) * (s - mean)
        if VERL:
            y = tl.where(single, s, loo)
        else:
            y = tl.where(single, 0.0, loo)
    else:
        if METHOD == 4:
            center = lmean
        else:
            center = mean
        if VERL:
            y = s - tl.where(single, 0.0, center)
        else:
            y = s - tl.where(single, s, center)
        if METHOD == 0:
            if SCALE == 0:
                if VERL:
                    std = tl.where(single, 1.0, tl.sqrt(var))
                else:
                    std = tl.where(single, 0.0, tl.sqrt(var))
                y = y / (std + eps)
            elif SCALE == 1:
                y = y / (batch_std + eps)
    return y


@triton.jit
def _batch_std(part1_ptr, P1, part2_ptr, P2, VERL: tl.constexpr, BLOCK_P: tl.constexpr):
    """Unbiased std of all scores; the preset's value (1 verl, 0 trl) for fewer than two."""
    n, _, var = _count_mean_var(part1_ptr, P1, part2_ptr, P2, BLOCK_P)
    if VERL:
        fallback = 1.0
    else:
        fallback = 0.0
    return tl.where(n < 2, fallback, tl.sqrt(var))


@triton.jit
def _group_fixed_kernel(
    s_ptr, len_ptr, out_ptr, bpart1_ptr, bP1, bpart2_ptr, bP2, num_groups, G, eps,
    METHOD: tl.constexpr, SCALE: tl.constexpr, VERL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_G)[None, :]
    inb = (rows < num_groups) & (cols < G)
    offs = rows.to(tl.int64) * G + cols
    s = tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    n = tl.zeros([BLOCK_R, 1], dtype=tl.float32) + G
    mean = tl.sum(s, axis=1)[:, None] / n
    d = tl.where(inb, s - mean, 0.0)
    var = tl.sum(d * d, axis=1)[:, None] / tl.maximum(n - 1.0, 1.0)
    lmean = mean
    if METHOD == 4:
        length = tl.load(len_ptr + offs, mask=inb, other=0).to(tl.float32)
        lsum = tl.sum(length, axis=1)[:, None]
        lmean = tl.where(lsum > 0, tl.sum(length * s, axis=1)[:, None] / tl.where(lsum > 0, lsum, 1.0), mean)
    batch_std = 0.0
    if METHOD == 0 and SCALE == 1:
        batch_std = _batch_std(bpart1_ptr, bP1, bpart2_ptr, bP2, VERL, BLOCK_P)
    y = _advantage_formula(s, n, mean, var, lmean, batch_std, eps, METHOD, SCALE, VERL)
    tl.store(out_ptr + offs, y, mask=inb)


@triton.jit
def _load_ids(ids_ptr, offs, S, num_groups):
    inb = offs < S
    g = tl.load(ids_ptr + offs, mask=inb, other=0).to(tl.int64)
    return g, inb & (g >= 0) & (g < num_groups)


@triton.jit
def _segment_sums_kernel(s_ptr, ids_ptr, len_ptr, seg_ptr, S, num_groups,
                         METHOD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g, ok = _load_ids(ids_ptr, offs, S, num_groups)
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.atomic_add(seg_ptr + g, tl.where(ok, 1.0, 0.0), mask=ok)
    tl.atomic_add(seg_ptr + num_groups + g, s, mask=ok)
    if METHOD == 4:
        length = tl.load(len_ptr + offs, mask=ok, other=0).to(tl.float32)
        tl.atomic_add(seg_ptr + 2 * num_groups + g, length, mask=ok)
        tl.atomic_add(seg_ptr + 3 * num_groups + g, length * s, mask=ok)


@triton.jit
def _segment_sq_kernel(s_ptr, ids_ptr, seg_ptr, S, num_groups, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g, ok = _load_ids(ids_ptr, offs, S, num_groups)
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    n = tl.load(seg_ptr + g, mask=ok, other=1.0)
    mean = tl.load(seg_ptr + num_groups + g, mask=ok, other=0.0) / n
    tl.atomic_add(seg_ptr + 4 * num_groups + g, (s - mean) * (s - mean), mask=ok)


@triton.jit
def _group_ids_apply_kernel(
    s_ptr, ids_ptr, out_ptr, seg_ptr, bpart1_ptr, bP1, bpart2_ptr, bP2, S, num_groups, eps,
    METHOD: tl.constexpr, SCALE: tl.constexpr, VERL: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g, ok = _load_ids(ids_ptr, offs, S, num_groups)
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    n = tl.load(seg_ptr + g, mask=ok, other=1.0)
    mean = tl.load(seg_ptr + num_groups + g, mask=ok, other=0.0) / n
    var = tl.load(seg_ptr + 4 * num_groups + g, mask=ok, other=0.0) / tl.maximum(n - 1.0, 1.0)
    lmean = mean
    if METHOD == 4:
        lsum = tl.load(seg_ptr + 2 * num_groups + g, mask=ok, other=0.0)
        lssum = tl.load(seg_ptr + 3 * num_groups + g, mask=ok, other=0.0)
        lmean = tl.where(lsum > 0, lssum / tl.where(lsum > 0, lsum, 1.0), mean)
    batch_std = 0.0
    if METHOD == 0 and SCALE == 1:
        batch_std = _batch_std(bpart1_ptr, bP1, bpart2_ptr, bP2, VERL, BLOCK_P)
    y = _advantage_formula(s, n, mean, var, lmean, batch_std, eps, METHOD, SCALE, VERL)
    # An id outside [0, num_groups) (checked on the CPU only: a check would sync) reads NaN.
    tl.store(out_ptr + offs, tl.where(ok, y, float("nan")), mask=offs < S)


def group_advantages_fwd(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    lengths: torch.Tensor | None,
    group_size: int,
    num_groups: int,
    method: str,
    scale: str,
    eps: float,
    preset: str,
) -> torch.Tensor:
    """fp32 advantages ``[S]``; see ``torch_backend.advantages.group_advantages_torch``."""
    S = scores.numel()
    out = torch.empty(S, dtype=torch.float32, device=scores.device)
    if S == 0:
        return out
    s = scores.contiguous()
    length = lengths.contiguous() if lengths is not None else s  # dummy pointer when unused
    code, scale_code, verl = _METHOD[method], _SCALE[scale], preset == "verl"
    flags = dict(METHOD=code, SCALE=scale_code, VERL=verl)

    if code == 0 and scale_code == 1:
        bpart1, bpart2 = whiten_stats(s, None)
    else:
        bpart1 = bpart2 = out  # unread dummies
    bP1, bP2 = bpart1.shape[-1], bpart2.shape[-1]

    if group_ids is None:
        block_g = triton.next_power_of_2(group_size)
        block_r = max(1, min(triton.next_power_of_2(num_groups), 2048 // block_g))
        _group_fixed_kernel[(triton.cdiv(num_groups, block_r),)](
            s, length, out, bpart1, bP1, bpart2, bP2, num_groups, group_size, eps,
            BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_P=_BLOCK_P, **flags,
        )
    else:
        ids = group_ids.contiguous()
        seg = torch.zeros(5, num_groups, dtype=torch.float32, device=s.device)
        grid = (triton.cdiv(S, _BLOCK),)
        _segment_sums_kernel[grid](s, ids, length, seg, S, num_groups, METHOD=code, BLOCK=_BLOCK)
        _segment_sq_kernel[grid](s, ids, seg, S, num_groups, BLOCK=_BLOCK)
        _group_ids_apply_kernel[grid](
            s, ids, out, seg, bpart1, bP1, bpart2, bP2, S, num_groups, eps,
            BLOCK=_BLOCK, BLOCK_P=_BLOCK_P, **flags,
        )

    if method == "reinforce_pp_baseline":
        part1, part2 = whiten_stats(out, lengths)
        whiten_apply(out, lengths, out, part1, part2, True, eps)
    return out
