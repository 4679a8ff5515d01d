"""Triton forward of the fused lm_head + logprobs: a GEMM whose epilogue is an online
logsumexp over vocabulary tiles, so the ``[N, V]`` logits never reach memory.

Grid ``(cdiv(N, BLOCK_N), SPLITS)``: a program owns ``BLOCK_N`` tokens and one contiguous
split of the vocabulary. For each ``BLOCK_V`` tile of its split it computes the logits tile
``hidden[rows] @ weight[cols].T`` (fp32 accumulation over ``H`` in ``BLOCK_K`` steps), adds
the bias, and folds the tile into per-row running statistics, in base 2
(``u = z·log2(e)``, ``z = logits / temperature``):

    m = max u,   s = Σ 2^(u − m),   t = Σ 2^(u − m)·(u − m),   z_label (when in this split)

Columns past ``V`` load nothing and contribute exactly 0 (``u = −inf``). The partials of the
splits are combined on the host side (:func:`_combine_splits`, a few ``[SPLITS, N]`` ops):
``lse = M + log2 Σ s_k 2^(m_k − M)`` and ``H = log2 S − T / S`` (times ln 2), with
``T = Σ 2^(m_k − M)·(t_k + (m_k − M)·s_k)``. Labels equal to ``ignore_index`` give 0;
labels outside ``[0, V)`` give NaN (never an out-of-bounds read).

The backward (recompute per vocabulary tile, then the d hidden / d weight GEMMs) is shared
with the torch backend: ``rlhf_engine.ops._lm_head_chunks.chunked_logprobs_bwd`` with the
Triton token_logprobs epilogue.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlhf_engine._backend import triton_interpreter_on
from rlhf_engine.kernels.logprobs import online_lse_rescale

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@triton.jit
def _fused_linear_logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr,
    m_ptr, s_ptr, t_ptr, zlab_ptr,
    N, V, H, cols_per_split,
    stride_hn, stride_wv,
    log2e_over_t, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROUND_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    split_start = split * cols_per_split
    split_stop = tl.minimum(split_start + cols_per_split, V)

    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zlab = tl.zeros((BLOCK_N,), tl.float32)  # u of the label column, 0 if not in this split
    ks = tl.arange(0, BLOCK_K)
    for v0 in range(split_start, split_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < split_stop
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + ks) < H
            a = tl.load(
                hidden_ptr + rows[:, None].to(tl.int64) * stride_hn + (k0 + ks)[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0,
            )
            b = tl.load(
                weight_ptr + cols[None, :].to(tl.int64) * stride_wv + (k0 + ks)[:, None],
                mask=col_ok[None, :] & k_ok[:, None], other=0.0,
            )
            if UPCAST_DOT:  # exact: a bf16 product fits in fp32
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # The backward recomputes the logits in the model dtype and uses this lse: round
        # them the same way here, or its softmax does not sum to 1 (for V = 1, p != 1).
        if ROUND_LOGITS == 1:  # bf16, round to nearest even in bits (the interpreter's cast truncates)
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            acc = bits.to(tl.float32, bitcast=True)
        elif ROUND_LOGITS == 2:  # fp16
            acc = acc.to(tl.float16).to(tl.float32)
        u = tl.where(col_ok[None, :], acc * log2e_over_t, -float("inf"))
        zlab += tl.sum(tl.where(cols[None, :] == labels[:, None], u, 0.0), axis=1)

        m_new, shift, alpha, t = online_lse_rescale(m, s, t, tl.max(u, axis=1))
        d = u - shift[:, None]
        e = tl.exp2(d)
        if WITH_ENTROPY:
            t += tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new

    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zlab_ptr + out, zlab, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)


def _launch_config(n: int, vocab: int, dtype: torch.dtype) -> dict:
    """Tile sizes by a fixed rule. On a GPU: 128 x 128 output tiles with 64-deep K steps
    for 16-bit inputs; for fp32 64 x 128 tiles with 32-deep K steps (128 x 128 spilled up to
    312 bytes a thread on sm_80 at 255 registers, ``benchmarks/build_check.py``; 64 rows
    spill nothing on sm_80 or sm_90, and three pipeline stages of operand tiles stay within
    A100's 164 KiB of shared memory as well as H100's 228 KiB); enough vocabulary splits to
    give every SM a few programs. Under the interpreter: the smallest tiles ``tl.dot`` takes."""
    if triton_interpreter_on():
        block_n, block_v, block_k, warps, stages = 16, 16, 16, 1, 1
    else:
        block_n, block_k = (64, 32) if dtype == torch.float32 else (128, 64)
        block_v, warps, stages = 128, 8, 3
    row_blocks = triton.cdiv(n, block_n)
    target_programs = 4 * 132
    splits = max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(target_programs, row_blocks)))
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, cols_per_split)
    return dict(
        splits=splits, cols_per_split=cols_per_split, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _combine_splits(m, s, t, zlab, labels, vocab, temperature, ignore_index, with_entropy):
    """Per-split base-2 partials ``[SPLITS, N]`` -> fp32 ``(logp, entropy or [0], lse)``."""
    big_m = m.amax(dim=0)
    shift = torch.where(big_m == float("-inf"), torch.zeros_like(big_m), big_m)
    scale = torch.exp2(m - shift)
    total = (s * scale).sum(dim=0)
    lse2 = shift + torch.log2(total)
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= vocab))
    nan = torch.full_like(lse2, float("nan"))
    lse = torch.where(bad, nan, lse2 * _LN2)
    zero = torch.zeros_like(lse)
    logp = torch.where(ignored, zero, torch.where(bad, nan, (zlab.sum(dim=0) - lse2) * _LN2))
    if with_entropy:
        # Σ_k 2^(m_k − M)·(t_k + (m_k − M)·s_k): each split's centred sum moved to the shift
        # M (a split that saw only -inf has s_k = t_k = 0 and must not give 0·inf).
        centred = (scale * (t + torch.where(s > 0, m - shift, 0.0) * s)).sum(dim=0)
        entropy = torch.where(ignored, zero, torch.where(bad, nan, (torch.log2(total) - centred / total) * _LN2))
    else:
        entropy = lse.new_empty(0)
    return logp, entropy, torch.where(ignored, zero, lse)


def fused_linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]`` (row stride any, unit column stride), weight ``[V, H]`` (same),
    bias ``[V]`` or None, labels ``[N]`` -> fp32 ``(logp [N], entropy [N] or [0], lse [N])``
    with ``lse`` the natural logsumexp of ``z`` (0 on ignored rows), as the chunked
    forward returns it."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    labels = labels.contiguous()
    cfg = _launch_config(n, vocab, hidden.dtype)
    splits = cfg.pop("splits")
    cols_per_split = cfg.pop("cols_per_split")
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m, s, t, zlab = (torch.empty(splits, n, **f32) for _ in range(4))
    # The Triton interpreter's tl.dot multiplies the raw bit patterns of bf16 operands
    # (triton-lang/triton#11584), so under it bf16 tiles go to the dot as fp32.
    upcast = hidden.dtype == torch.bfloat16 and triton_interpreter_on()
    if n > 0:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), splits)
        _fused_linear_logprobs_fwd_kernel[grid](
            hidden, weight, hidden if bias is None else bias, labels,
            m, s, t, zlab,
            n, vocab, h, cols_per_split,
            hidden.stride(0), weight.stride(0),
            _LOG2E / temperature, ignore_index,
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
            # fp32 inputs get full-precision products, as torch.matmul gives them by default.
            DOT_PRECISION="ieee" if hidden.dtype == torch.float32 or upcast else "tf32", UPCAST_DOT=upcast,
            ROUND_LOGITS={torch.bfloat16: 1, torch.float16: 2}.get(hidden.dtype, 0), **cfg,
        )  # fmt: skip
    return _combine_splits(m, s, t, zlab, labels, vocab, temperature, ignore_index, with_entropy)
