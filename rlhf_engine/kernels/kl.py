"""Triton kernels for the per-token KL estimators (the spec: ``rlhf_engine/reference/kl.py``).

:func:`kl_estimate` is the shared ``@triton.jit`` helper: the value of an estimator and
its derivative w.r.t. ``lp``, chosen by constexpr switches. The ``kl_penalty`` kernel
below and the policy-loss kernel (``kernels/policy_loss.py``) both call it.

When a gradient is needed, the forward kernel also writes the derivative (fp32), which
autograd saves: the backward is then one multiply, with no second read of ``lp`` and ``ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_engine.reference.kl import ESTIMATORS, K3_CLAMP, KAPPA_CLAMP

# jit functions may read module globals only when they are constexpr
_KAPPA_MAX = tl.constexpr(KAPPA_CLAMP)
_K3_MAX = tl.constexpr(K3_CLAMP)

BASE_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}


def estimator_codes(estimator: str) -> tuple[int, bool]:
    """``(base code, straight-through)`` constexpr arguments for :func:`kl_estimate`."""
    base, straight_through = ESTIMATORS[estimator]
    return BASE_CODES[base], straight_through


@triton.jit
def kl_estimate(lp, ref, BASE: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr, CLAMP: tl.constexpr):
    """fp32 ``(value, d value / d lp)`` of the estimator picked by ``BASE`` (0 k1, 1 abs,
    2 k2, 3 k3); ``STRAIGHT_THROUGH`` swaps in k2's gradient; ``CLAMP`` is verl's k3 clamp."""
    diff = lp - ref
    if BASE == 0:
        value = diff
        grad = tl.zeros_like(diff) + 1.0
    elif BASE == 1:
        value = tl.abs(diff)
        grad = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif BASE == 2:
        value = 0.5 * diff * diff
        grad = diff
    else:
        kappa = -diff
        if CLAMP:
            kappa_c = tl.minimum(tl.maximum(kappa, -_KAPPA_MAX), _KAPPA_MAX)
            e = tl.exp(kappa_c)
            raw = e - kappa_c - 1.0
            value = tl.minimum(tl.maximum(raw, -_K3_MAX), _K3_MAX)
            live = (tl.abs(kappa) <= _KAPPA_MAX) & (tl.abs(raw) <= _K3_MAX)
            grad = tl.where(live, 1.0 - e, 0.0)
        else:
            e = tl.exp(kappa)
            value = e - kappa - 1.0
            grad = 1.0 - e
    if STRAIGHT_THROUGH:
        grad = diff
    return value, grad


@triton.jit
def _kl_penalty_fwd_kernel(lp_ptr, ref_ptr, out_ptr, dlp_ptr, n, BASE: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
                           CLAMP: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    value, grad = kl_estimate(lp, ref, BASE, STRAIGHT_THROUGH, CLAMP)
    tl.store(out_ptr + offs, value, mask=inb)
    if NEED_GRAD:
        tl.store(dlp_ptr + offs, grad, mask=inb)


def store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a kernel should write for an output wanted in ``dtype``.

    The Triton interpreter (CPU tensors) truncates fp32 -> bf16 instead of rounding to
    nearest even as the GPU does, so there the kernel writes fp32 and torch rounds.
    """
    return torch.float32 if (device.type == "cpu" and dtype == torch.bfloat16) else dtype


BLOCK = 1024  # elementwise: one block of 1024 tokens per program saturates bandwidth


def kl_penalty_fwd(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: bool, need_grad: bool):
    """Contiguous ``logp``, ``ref_logp`` (any float dtype, same shape) -> ``(fp32 KL, fp32
    d KL / d logp)``, both of that shape; the second is an empty ``[0]`` tensor unless ``need_grad``."""
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    dlp = torch.empty(logp.shape if need_grad else 0, dtype=torch.float32, device=logp.device)
    n = logp.numel()
    if n == 0:
        return out, dlp
    base, straight_through = estimator_codes(estimator)
    _kl_penalty_fwd_kernel[(triton.cdiv(n, BLOCK),)](
        logp, ref_logp, out, dlp, n, BASE=base, STRAIGHT_THROUGH=straight_through, CLAMP=clamp, NEED_GRAD=need_grad,
        BLOCK=BLOCK,
    )
    return out, dlp
