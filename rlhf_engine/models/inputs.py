"""Checks and position ids shared by the model wrappers and the rollout."""

from __future__ import annotations

import torch

from rlhf_engine._checks import INDEX_DTYPES, MASK_DTYPES, check_same_shape, check_tensor


def check_token_batch(op: str, input_ids, attention_mask) -> None:
    """``input_ids``: int32/int64 ``[B, T]``; ``attention_mask``: same shape, bool or 0/1 numbers."""
    check_tensor(op, "input_ids", input_ids, INDEX_DTYPES)
    check_tensor(op, "attention_mask", attention_mask, MASK_DTYPES)
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"{op}: input_ids must have shape [B, T] with B, T >= 1, got {tuple(input_ids.shape)}")
    check_same_shape(op, "input_ids", input_ids, attention_mask=attention_mask)
    if attention_mask.device != input_ids.device:
        raise ValueError(f"{op}: attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(attention_mask.cumsum(-1) - 1).clamp(min=0)``: long ``[B, T]``.

    A token's position counts only the real tokens before it, so left padding never
    shifts it (generation and training agree on every position).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
