"""Backends ``cpp`` / ``cuda`` of the advantage family: ``group_advantages`` and
``masked_whiten`` (spec: ``rlhf_engine/reference/advantages.py``; kernels:
``csrc/cpp/advantages.cpp``, ``csrc/cuda/advantages.cu``)."""

from __future__ import annotations

import torch

from rlhf_engine.native.library import launch, module, ref, workspace


def masked_whiten_fwd(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float) -> torch.Tensor:
    """fp32 whitened ``x`` (any shape), ``mask`` (same shape, any dtype) as weights; 0
    where ``mask == 0``."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    x, mask = x.contiguous(), mask.contiguous()
    extra = () if x.device.type == "cpu" else (workspace("masked_whiten", x.device).data_ptr(),)
    launch("masked_whiten", x.device, ref(x), ref(mask), out.data_ptr(), *extra, x.numel(), shift_mean, eps)
    return out


# Codes of rlhf/advantages.h's Method / Scale enums (the order of reference.advantages).
_METHOD = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "reinforce_pp_baseline": 3, "opo": 4}
_SCALE = {"group": 0, "batch": 1, "none": 2}


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
    """fp32 advantages ``[S]`` of ``scores`` ``[S]`` (any float dtype), grouped by
    ``group_size`` consecutive scores or by ``group_ids`` (int32/int64 ``[S]``, ids
    outside ``[0, num_groups)`` give NaN); ``lengths`` ``[S]`` (any int or float dtype) for
    opo and reinforce_pp_baseline. See ``torch_backend.advantages.group_advantages_torch``."""
    S = scores.numel()
    out = torch.empty(S, dtype=torch.float32, device=scores.device)
    s = scores.contiguous()
    ids = None if group_ids is None else group_ids.contiguous()
    length = None if lengths is None else lengths.contiguous()
    extra = ()
    if s.device.type != "cpu":
        floats = module().group_advantages_cuda_workspace(num_groups, ids is not None)
        extra = (torch.empty(floats, dtype=torch.float32, device=s.device).data_ptr(),)
    launch(
        "group_advantages", s.device, ref(s), ref(ids), ref(length), out.data_ptr(), *extra,
        S, group_size, num_groups, _METHOD[method], _SCALE[scale], eps, preset == "verl",
    )
    return out
