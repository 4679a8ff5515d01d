"""Triton kernels for per-token logprobs and entropy (the spec: ``rlhf_engine/reference/logprobs.py``).

With ``z = logits / temperature`` per row:

    lse     = logsumexp(z)
    logp    = z[label] - lse
    entropy = lse - sum(softmax(z) * z)

Forward: one program per row reads the row once in ``BLOCK_V`` tiles and keeps an online
(running max) logsumexp in fp32; the label logit is one scalar load. The kernels work in
base 2 (``u = z * log2(e)``, ``exp2``) because that is what the hardware exponential
computes. Backward: one program per row re-reads the row and writes
``dlogits = ((p - onehot) * (-dlogp) - dentropy * p * (z - E_p[z])) / temperature`` in one
pass, in fp32, cast to the logits dtype on store. Only ``[N]`` fp32 vectors (logsumexp
and entropy) are kept between the two; no fp32 ``[N, V]`` buffer exists.

Rows: the launchers take logits as a 3-D view ``[D0, D1, V]`` whose last dimension has
stride 1 and whose two leading dimensions have any strides, so a slice such as
``logits[:, :-1]`` of a contiguous ``[B, T, V]`` is read in place (the op layer folds
``[..., V]`` into this form). Row ``r`` lives at ``(r // D1) * stride0 + (r % D1) * stride1``.

Labels equal to ``ignore_index`` give 0 and zero gradient rows, and their logits are never
read. Labels outside ``[0, V)`` are never used as addresses: such a row gives NaN (logp,
entropy and its gradient row), so the GPU path needs no host-side check.

Host launchers take tensors, pick block sizes by a fixed rule, allocate and launch; there is
no validation and no autograd here (see ``rlhf_engine.ops.logprobs``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The launchers fold log2(e) / temperature into one scalar argument; the kernels read the
# constants as tl.constexpr globals (plain Python floats cannot be read inside @jit).
_LOG2E_HOST = math.log2(math.e)
_LOG2E = tl.constexpr(_LOG2E_HOST)
_LN2 = tl.constexpr(math.log(2.0))

# Largest vocabulary tile. 4096 elements over 8 warps is 16 elements per thread: wide
# enough vector loads to stream at bandwidth, few enough registers for several resident
# programs per SM.
_MAX_BLOCK_V = 4096


def _launch_config(vocab: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)``: the smallest power of two covering the row, capped at
    ``_MAX_BLOCK_V``, with one warp per 256 elements (1 to 8 warps)."""
    block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
    return block_v, min(8, max(1, block_v // 256))


@triton.jit
def online_lse_rescale(m, s, t, tile_max):
    """One step of the online logsumexp in base 2, shared by the token_logprobs and the
    fused lm_head kernels (elementwise: scalars or per-row vectors).

    Running state: ``m`` (max of ``u``), ``s = Σ 2^(u − m)``, ``t = Σ 2^(u − m)·(u − m)``
    (centred, so the entropy does not cancel two large numbers). Returns ``(m_new, shift,
    alpha, t)``: the new max, the shift to subtract from this tile's ``u`` (0 while every
    value seen is -inf, so -inf - -inf never makes NaN), ``alpha`` that rescales ``s`` to
    it, and ``t`` already re-centred on it. The caller adds the tile's ``Σ e`` and
    ``Σ e·d`` (``d = u − shift``, ``e = 2^d``).
    """
    m_new = tl.maximum(m, tile_max)
    shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m - shift)
    t = tl.where(s > 0, alpha * (t + (m - shift) * s), 0.0)
    return m_new, shift, alpha, t


@triton.jit
def _row_pointer(base_ptr, row, rows_inner, stride_outer, stride_inner):
    return base_ptr + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    rows_inner,
    stride_outer,
    stride_inner,
    V,
    log2e_over_t,
    inv_t,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = _row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    out_of_range = (label < 0) | (label >= V)
    # Ignored and out-of-range rows read no logits (masked loads move no memory); their
    # outputs are fixed after the loop.
    read_cols = tl.where(ignored | out_of_range, 0, V)

    offs = tl.arange(0, BLOCK_V)
    m = -float("inf")  # running max of u = z * log2(e)
    s = 0.0  # sum of exp2(u - m)
    t = 0.0  # sum of exp2(u - m) * (u - m): centred, so H does not cancel two large numbers
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        # Columns past V (and unread rows) load -inf, so they add exactly 0 below.
        u = tl.load(x_ptr + cols, mask=cols < read_cols, other=-float("inf")).to(tl.float32) * log2e_over_t
        m_new, shift, alpha, t = online_lse_rescale(m, s, t, tl.max(u, axis=0))
        d = u - shift
        e = tl.exp2(d)
        if WITH_ENTROPY:
            # e == 0 exactly where u == -inf: those terms are 0, not 0 * inf.
            t += tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    lse = (m + tl.log2(s)) * _LN2
    # NaN marks an out-of-range label; it flows into logp, entropy and the gradient row.
    lse = tl.where(out_of_range, float("nan"), lse)
    z_label = tl.load(x_ptr + label, mask=(read_cols > 0), other=0.0).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, z_label - lse))
    tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse))
    if WITH_ENTROPY:
        entropy = (tl.log2(s) - t / s) * _LN2
        entropy = tl.where(out_of_range, float("nan"), entropy)
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    dlogits_ptr,
    labels_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    lse_ptr,
    entropy_ptr,
    rows_inner,
    stride_outer,
    stride_inner,
    d_rows_inner,
    d_stride_outer,
    d_stride_inner,
    grad_logp_stride,
    grad_entropy_stride,
    V,
    log2e_over_t,
    inv_t,
    ignore_index,
    label_offset,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = _row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner)
    dx_ptr = _row_pointer(dlogits_ptr, row, d_rows_inner, d_stride_outer, d_stride_inner)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    # Ignored rows read nothing: u = -inf gives p = 0 and, with c = c_h = 0, a zero row.
    read_cols = tl.where(ignored, 0, V)
    lse2 = tl.load(lse_ptr + row) * _LOG2E
    # d logp / d z = onehot - p, and d z / d logits = 1 / temperature.
    c = tl.where(ignored, 0.0, -tl.load(grad_logp_ptr + row * grad_logp_stride) * inv_t)
    if WITH_ENTROPY:
        c_h = tl.where(ignored, 0.0, -tl.load(grad_entropy_ptr + row * grad_entropy_stride) * inv_t)
        h = tl.load(entropy_ptr + row)

    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        u = tl.load(x_ptr + cols, mask=cols < read_cols, other=-float("inf")).to(tl.float32) * log2e_over_t
        log2p = u - lse2
        p = tl.exp2(log2p)
        g = p * c - tl.where(cols == label - label_offset, c, 0.0)
        if WITH_ENTROPY:
            # dH/dz = -p * (z - E_p[z]) and z - E_p[z] = log p + H; p == 0 terms are 0.
            g += tl.where(p > 0, p * (log2p * _LN2 + h), 0.0) * c_h
        tl.store(dx_ptr + cols, g.to(dlogits_ptr.dtype.element_ty), mask=cols < V)


def token_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher.

    logits: ``[D0, D1, V]`` fp32/bf16/fp16, ``stride(-1) == 1``, any leading strides.
    labels: ``[N = D0 * D1]`` int32/int64, contiguous.
    Returns fp32 ``logp [N]``, ``entropy [N]`` (``[0]`` unless ``with_entropy``) and
    ``lse [N]`` (logsumexp of ``z``, 0 on ignored rows; saved for the backward).
    """
    d0, d1, vocab = logits.shape
    n = d0 * d1
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    lse = torch.empty(n, **f32)
    if n == 0:
        return logp, entropy, lse
    block_v, num_warps = _launch_config(vocab)
    _token_logprobs_fwd_kernel[(n,)](
        logits, labels, logp, entropy, lse,
        d1, logits.stride(0), logits.stride(1), vocab,
        _LOG2E_HOST / temperature, 1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return logp, entropy, lse


def token_logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    dlogits: torch.Tensor,
    temperature: float,
    ignore_index: int,
    label_offset: int = 0,
) -> None:
    """Backward launcher: writes the logits gradient into ``dlogits``.

    grad_logp, grad_entropy (or None: no entropy term), lse, entropy: fp32 ``[N]``, any
    stride for the two grads. logits, dlogits: ``[D0, D1, V]`` views with
    ``stride(-1) == 1`` (``dlogits`` may be ``logits`` itself: each tile is read before it
    is overwritten, by the same program). labels: ``[N]`` contiguous.
    label_offset: the vocabulary id of column 0, for a slice of the vocabulary (the fused
    lm_head backward works on vocabulary tiles with ``lse``/``entropy`` of whole rows);
    a label outside ``[label_offset, label_offset + V)`` adds no one-hot term here.
    """
    d0, d1, vocab = logits.shape
    n = d0 * d1
    if n == 0:
        return
    with_entropy = grad_entropy is not None
    if not with_entropy:
        grad_entropy, entropy = grad_logp, lse  # placeholders, never read
    block_v, num_warps = _launch_config(vocab)
    _token_logprobs_bwd_kernel[(n,)](
        logits, dlogits, labels, grad_logp, grad_entropy, lse, entropy,
        d1, logits.stride(0), logits.stride(1),
        dlogits.shape[1], dlogits.stride(0), dlogits.stride(1),
        grad_logp.stride(0), grad_entropy.stride(0), vocab,
        _LOG2E_HOST / temperature, 1.0 / temperature, ignore_index, label_offset,
        WITH_ENTROPY=with_entropy, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
