"""Backends ``cpp`` / ``cuda`` of the gae family: ``gae`` and ``discounted_returns`` (spec:
``rlhf_engine/reference/gae.py``; kernels: ``csrc/cpp/gae.cpp``, ``csrc/cuda/gae.cu``).

The inputs are read through their strides (no copies of sliced ``[B, T]`` or ``[N]``
tensors); the outputs are fresh contiguous fp32 tensors. ``whiten=True`` whitens the
advantages with the native ``masked_whiten`` over the valid tokens (``mask != 0``)."""

from __future__ import annotations

import torch

from rlhf_engine.native.advantages import masked_whiten_fwd
from rlhf_engine.native.library import ABSENT, launch, ref
from rlhf_engine.reference.gae import WHITEN_EPS


def _strided(t: torch.Tensor) -> tuple[int, int, int, int]:
    """``(address, dtype code, row stride, token stride)`` of a padded ``[B, T]`` or packed
    ``[N]`` tensor (row stride 0: packed tokens are addressed globally)."""
    address, code = ref(t)
    if t.dim() == 1:
        return address, code, 0, t.stride(0)
    return address, code, t.stride(0), t.stride(1)


def _layout(rewards: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """``(cu_seqlens ref, number of sequences, T)``: rows of ``[B, T]``, or the segments of ``[N]``."""
    if cu_seqlens is None:
        return ABSENT, rewards.shape[0], rewards.shape[1]
    return ref(cu_seqlens.contiguous()), cu_seqlens.numel() - 1, 0


def gae_fwd(rewards, values, mask, gamma: float, lam: float, whiten: bool, cu_seqlens=None):
    """fp32 ``(advantages, returns)`` of the shape of ``rewards`` (``[B, T]``, or ``[N]`` packed)."""
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if rewards.numel() == 0:
        return adv, ret
    cu, num_seqs, T = _layout(rewards, cu_seqlens)
    launch(
        "gae", rewards.device, _strided(rewards), _strided(values), _strided(mask), cu,
        adv.data_ptr(), ret.data_ptr(), num_seqs, T, float(gamma), float(gamma * lam),
    )
    if whiten:
        # The whitening weights are the valid tokens, not a float mask's values.
        adv = masked_whiten_fwd(adv, mask if mask.dtype == torch.bool else mask != 0, True, WHITEN_EPS)
    return adv, ret


def discounted_returns_fwd(rewards, mask, gamma: float, cu_seqlens=None):
    """fp32 REINFORCE++ returns of the shape of ``rewards``."""
    out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    if rewards.numel() == 0:
        return out
    cu, num_seqs, T = _layout(rewards, cu_seqlens)
    launch(
        "discounted_returns", rewards.device, _strided(rewards), _strided(mask), cu,
        out.data_ptr(), num_seqs, T, float(gamma),
    )
    return out
