"""Argument validation shared by the public ops.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind,
wrong value) with the op name, the argument name and what was expected, so bad input
never reaches a kernel.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from rlhf_engine.torch_backend.aggregation import host_readable

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + (torch.uint8, torch.int32, torch.int64)


def check_tensor(op: str, name: str, t, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_optional_tensor(op: str, name: str, t, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES):
    return None if t is None else check_tensor(op, name, t, dtypes)


def check_same_shape(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) has the shape of ``ref``."""
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(
                f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
            )


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_choice(op: str, name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")


def check_number(op: str, name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{op}: {name} must not be NaN")
    if positive and not value > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {value}")
    return value


def check_cu_seqlens(op: str, cu_seqlens, num_tokens: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens``: int32/int64 ``[num_seqs + 1]``, starting at 0 and ending at ``num_tokens``.

    The values are checked on CPU tensors only, and not while torch.compile traces nor on
    fake tensors (``host_readable``): on the GPU reading them would be a host sync, which
    ops never do, and a fake tensor has none.
    """
    check_tensor(op, "cu_seqlens", cu_seqlens, INDEX_DTYPES)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D with num_seqs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    if host_readable(cu_seqlens) and (
        int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any())
    ):
        raise ValueError(f"{op}: cu_seqlens must rise from 0 to the number of tokens ({num_tokens})")
    return cu_seqlens
