"""Plumbing shared by the per-sequence-aggregated losses (``policy_loss``, ``value_loss``).

* :func:`token_layout` validates the padded ``[B, T]`` / packed ``[N]`` + ``cu_seqlens``
  layout. A padded batch becomes ``cu_seqlens = arange(B+1) * T`` built on the device, so
  no host sync. Backends take the tokens :func:`dense`, in their own shape, and read them
  as flat ``[N]`` memory.
* :func:`per_token_or_seq` validates tensors given per token or per sequence.
* :func:`normalizer_args` splits ``normalizer`` into a tensor or a constant.
* ``rlhf_engine::seq_loss_bwd``: the backward of both losses, ``out_t = scale * grad *
  w_b(t) * x_t`` (``w_b = d loss / d L_b`` from ``reference/aggregation.py``), called
  through :func:`seq_loss_backward`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_engine import _checks
from rlhf_engine._backend import lazy
from rlhf_engine.torch_backend.aggregation import fp32


class Layout(NamedTuple):
    cu_seqlens: torch.Tensor  # [S + 1]
    num_seqs: int
    seq_len: int  # T for a padded batch, 0 when packed


def token_layout(op: str, name: str, x: torch.Tensor, cu_seqlens) -> Layout:
    """``x`` is ``[B, T]`` (padded, ``cu_seqlens`` None) or ``[N]`` (packed, ``cu_seqlens`` given)."""
    if cu_seqlens is None:
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"{op}: {name} must be [B, T] with B >= 1 (or [N] with cu_seqlens), got shape {tuple(x.shape)}")
        rows, cols = x.shape
        index = dict(device=x.device, dtype=torch.int32)
        # One op, not arange * cols; the step must be nonzero
        cu = torch.arange(0, (rows + 1) * cols, cols, **index) if cols else torch.zeros(rows + 1, **index)
        return Layout(cu, rows, cols)
    if x.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D [N] when cu_seqlens is given, got shape {tuple(x.shape)}")
    cu = _checks.check_cu_seqlens(op, cu_seqlens, x.numel(), x.device)
    return Layout(cu.contiguous(), cu.numel() - 1, 0)


def per_token_or_seq(op: str, name: str, t, like: torch.Tensor, num_seqs: int):
    """``t`` has the shape of ``like`` (per token) or ``[num_seqs]`` (per sequence); dense."""
    if t is None:
        return None
    _checks.check_tensor(op, name, t)
    if t.shape != like.shape and tuple(t.shape) != (num_seqs,):
        raise ValueError(
            f"{op}: {name} must have the shape of the tokens {tuple(like.shape)} or one value per sequence "
            f"({num_seqs},), got {tuple(t.shape)}"
        )
    _checks.check_same_device(op, "the tokens", like, **{name: t})
    return dense(t)


def dense(t):
    """``t`` contiguous in its own shape (itself when it already is), or None: the backends
    read it as flat ``[N]`` memory and return gradients in its shape. Not flattened here: a
    reshape is a call per input, and a view of ``logp`` would add a node to the autograd
    graph."""
    return None if t is None else t.contiguous()


def normalizer_args(op: str, normalizer, device: torch.device):
    """``(tensor or None, constant)``: a number stays a number (no device copy); a tensor
    (e.g. an all-reduced global count) stays on the device; constant 0 means "none"."""
    if normalizer is None:
        return None, 0.0
    if isinstance(normalizer, torch.Tensor):
        _checks.check_tensor(op, "normalizer", normalizer, _checks.FLOAT_DTYPES + _checks.INDEX_DTYPES)
        if normalizer.numel() != 1:
            raise ValueError(f"{op}: normalizer must hold one value, got shape {tuple(normalizer.shape)}")
        if normalizer.device != device:
            raise ValueError(f"{op}: normalizer is on {normalizer.device} but the tokens are on {device}")
        return normalizer.reshape(()), 0.0
    return None, _checks.check_number(op, "normalizer", normalizer, positive=True)


def _seq_scale_torch(grad, w, x, cu_seqlens, scale, seq_len, out_dtype):
    coef = w * fp32(grad) if scale == 1.0 else w * (fp32(grad) * scale)
    if seq_len:
        out = (x if x.dim() == 2 else x.view(-1, seq_len)) * coef[:, None]
        out = out if out.shape == x.shape else out.view(x.shape)
    else:
        out = x * torch.repeat_interleave(coef, cu_seqlens[1:] - cu_seqlens[:-1], output_size=x.numel())
    return out if out.dtype == out_dtype else out.to(out_dtype)


# "cuda" / "cpp" serve the policy loss; the value loss (no native kernel) never asks for them.
_BWD = {
    "torch": _seq_scale_torch,
    "triton": lazy("rlhf_engine.kernels.policy_loss", "seq_scale_bwd"),
    "cuda": lazy("rlhf_engine.native.policy_loss", "seq_scale_bwd"),
    "cpp": lazy("rlhf_engine.native.policy_loss", "seq_scale_bwd"),
}


@torch.library.custom_op("rlhf_engine::seq_loss_bwd", mutates_args=())
def seq_loss_bwd(
    grad: torch.Tensor, w: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, seq_len: int,
    out_dtype: torch.dtype, backend: str,
) -> torch.Tensor:
    """``scale * grad * w[b(t)] * x_t`` over the tokens (``x`` dense, ``[S, T]`` when padded),
    in ``x``'s shape and ``out_dtype``."""
    return _BWD[backend](grad, w, x, cu_seqlens, scale, seq_len, out_dtype)


@seq_loss_bwd.register_fake
def _(grad, w, x, cu_seqlens, scale, seq_len, out_dtype, backend):
    return x.new_empty(x.shape, dtype=out_dtype)


def seq_loss_backward(grad, w, x, cu_seqlens, scale: float, seq_len: int, out_dtype: torch.dtype, backend: str, eager: bool):
    """``rlhf_engine::seq_loss_bwd``, or its torch body when the forward ran eagerly
    (``rlhf_engine._backend.eager_torch``, decided there: torch.compile traces the
    backward outside Dynamo)."""
    if eager:
        return _seq_scale_torch(grad, w, x, cu_seqlens, scale, seq_len, out_dtype)
    return seq_loss_bwd(grad, w, x, cu_seqlens, scale, seq_len, out_dtype, backend)
