"""Checks and position ids shared by the model wrappers and the rollout."""

from __future__ import annotations

import torch

from rlhf_engine._checks import INDEX_DTYPES, MASK_DTYPES, check_tensor


def check_token_batch(op: str, input_ids, attention_mask, names: tuple[str, str] = ("input_ids", "attention_mask")) -> None:
    """``input_ids``: int32/int64 ``[B, T]``; ``attention_mask``: same shape and device, bool or
    0/1 numbers. ``names`` are the argument names the errors use."""
    ids_name, mask_name = names
    check_tensor(op, ids_name, input_ids, INDEX_DTYPES)
    check_tensor(op, mask_name, attention_mask, MASK_DTYPES)
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"{op}: {ids_name} must have shape [B, T] with B, T >= 1, got {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"{op}: {mask_name} must have the shape of {ids_name} {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(f"{op}: {mask_name} is on {attention_mask.device} but {ids_name} is on {input_ids.device}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(attention_mask.cumsum(-1) - 1).clamp(min=0)``: long ``[B, T]``.

    A token's position counts only the real tokens before it, so left padding never
    shifts it (generation and training agree on every position).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
