"""Backends ``cpp`` / ``cuda`` of the advantage family: ``group_advantages`` and
``masked_whiten`` (spec: ``rlhf_engine/reference/advantages.py``; kernels:
``csrc/cpp/advantages.cpp``, ``csrc/cuda/advantages.cu``)."""

from __future__ import annotations

import torch

from rlhf_engine.native.library import launch, ref, workspace


def masked_whiten_fwd(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float) -> torch.Tensor:
    """fp32 whitened ``x`` (any shape), ``mask`` (same shape, any dtype) as weights; 0
    where ``mask == 0``."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    x, mask = x.contiguous(), mask.contiguous()
    extra = () if x.device.type == "cpu" else (workspace("masked_whiten", x.device).data_ptr(),)
    launch("masked_whiten", x.device, ref(x), ref(mask), out.data_ptr(), *extra, x.numel(), shift_mean, eps)
    return out
