"""Backends ``cpp`` / ``cuda`` of the policy-loss family: ``policy_loss_fwd`` and
``seq_scale_bwd`` (spec: ``rlhf_engine/reference/policy_loss.py`` and ``aggregation.py``;
kernels: ``csrc/cpp/policy_loss.cpp``, ``csrc/cuda/policy_loss.cu``, formulas in
``csrc/include/rlhf/policy_loss.h`` and ``kl.h``). Same signatures and returns as the
Triton launchers of ``kernels/policy_loss.py``."""

from __future__ import annotations

import torch

from rlhf_engine.native.library import DTYPE_CODES, launch, ref
from rlhf_engine.reference.kl import ESTIMATORS
from rlhf_engine.reference.policy_loss import LOSSES, PARTIALS

# The codes of csrc/include/rlhf/policy_loss.h (PolicyLossKind: the order of LOSSES) and
# kl.h (KlBase); tests/test_policy_loss.py checks them against _C.POLICY_LOSS_CONSTANTS.
LOSS_CODES = {name: code for code, name in enumerate(LOSSES)}
KL_BASE_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}


def policy_loss_fwd(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, *, loss, clip_low, clip_high,
    dual_clip, delta, log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, kl_estimator, kl_clamp,
    kl_ratio_weight, entropy_coef, seq_len,
):
    """Contiguous token inputs of any shape, read as flat ``[N]`` (``advantages`` /
    ``is_weights`` per token or ``[S]``), ``cu_seqlens`` ``[S+1]`` -> ``(g fp32 in logp's
    shape, partials [S, len(PARTIALS)] fp32)``. ``seq_len`` is unused: the kernels walk
    each sequence whatever its length (the Triton launcher sizes its blocks with it)."""
    n = logp.numel()
    num_seqs = cu_seqlens.numel() - 1
    g = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    partials = torch.empty(num_seqs, len(PARTIALS), dtype=torch.float32, device=logp.device)
    base, straight_through = ESTIMATORS[kl_estimator]
    launch(
        "policy_loss_fwd", logp.device,
        ref(logp), ref(old_logp), ref(advantages), ref(mask), ref(ref_logp), ref(entropy), ref(is_weights),
        ref(cu_seqlens), g.data_ptr(), partials.data_ptr(), num_seqs,
        advantages.numel() != n, is_weights is not None and is_weights.numel() != n,
        LOSS_CODES[loss], clip_low, clip_high, dual_clip is not None, 0.0 if dual_clip is None else dual_clip,
        delta is not None, 0.0 if delta is None else delta, log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg,
        kl_coef, KL_BASE_CODES[base], straight_through, kl_clamp, kl_ratio_weight, entropy_coef,
    )  # fmt: skip
    return g, partials


def seq_scale_bwd(grad, w, x, cu_seqlens, scale: float, seq_len: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``out_t = scale * grad * w[b(t)] * x_t`` in ``out_dtype``: ``grad`` 0-d (the loss's
    gradient, read on the device), ``w`` fp32 ``[S]``, ``x`` contiguous, ``N`` elements of
    any dtype (bool too); the result has ``x``'s shape. ``seq_len`` is unused (as above).

    Written in ``out_dtype`` directly: the kernels round to nearest even (elements.h), as
    the GPU does, so the Triton launcher's fp32 detour for the interpreter
    (``kernels.kl.store_dtype``, which would also import triton here) is not needed."""
    num_seqs = cu_seqlens.numel() - 1
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    launch(
        "seq_scale_bwd", x.device, ref(grad), ref(w), ref(x), ref(cu_seqlens), scale, out.data_ptr(),
        DTYPE_CODES[out_dtype], num_seqs,
    )
    return out
