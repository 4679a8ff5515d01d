"""Generalized advantage estimation (PPO) and discounted returns (REINFORCE++).

These ops produce RL *targets*: they are not differentiable. The public functions treat
their inputs as constants (detached) and return tensors that carry no gradient.
"""

from typing import Optional

import torch

from rlhf_engine._backend import lazy, resolve_backend
from rlhf_engine._checks import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_cu_seqlens,
    check_number,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from rlhf_engine.torch_backend.gae import discounted_returns_torch, gae_torch

_GAE_BACKENDS = {
    "torch": gae_torch,
    "triton": lazy("rlhf_engine.kernels.gae", "gae_fwd"),
    "cuda": lazy("rlhf_engine.native.gae", "gae_fwd"),
    "cpp": lazy("rlhf_engine.native.gae", "gae_fwd"),
}
_RETURNS_BACKENDS = {
    "torch": discounted_returns_torch,
    "triton": lazy("rlhf_engine.kernels.gae", "discounted_returns_fwd"),
    "cuda": lazy("rlhf_engine.native.gae", "discounted_returns_fwd"),
    "cpp": lazy("rlhf_engine.native.gae", "discounted_returns_fwd"),
}


@torch.library.custom_op("rlhf_engine::gae", mutates_args=())
def _gae_op(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    gamma: float,
    lam: float,
    whiten: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _GAE_BACKENDS[backend](rewards, values, mask, gamma, lam, whiten, cu_seqlens)


@_gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam, whiten, backend):
    return rewards.new_empty(rewards.shape, dtype=torch.float32), rewards.new_empty(rewards.shape, dtype=torch.float32)


@torch.library.custom_op("rlhf_engine::discounted_returns", mutates_args=())
def _discounted_returns_op(
    rewards: torch.Tensor, mask: torch.Tensor, cu_seqlens: Optional[torch.Tensor], gamma: float, backend: str
) -> torch.Tensor:
    return _RETURNS_BACKENDS[backend](rewards, mask, gamma, cu_seqlens)


@_discounted_returns_op.register_fake
def _(rewards, mask, cu_seqlens, gamma, backend):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


def _check_tokens(op, rewards, mask, cu_seqlens, values=None):
    """Shapes: ``[B, T]`` padded, or ``[N]`` packed with ``cu_seqlens``."""
    check_tensor(op, "rewards", rewards, FLOAT_DTYPES)
    if values is not None:
        check_tensor(op, "values", values, FLOAT_DTYPES)
    check_tensor(op, "mask", mask, MASK_DTYPES)
    check_same_shape(op, "rewards", rewards, values=values, mask=mask)
    check_same_device(op, "rewards", rewards, values=values, mask=mask)
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(f"{op}: rewards must be [B, T] (or [N] with cu_seqlens), got shape {tuple(rewards.shape)}")
        return None
    if rewards.dim() != 1:
        raise ValueError(f"{op}: with cu_seqlens, rewards must be packed [N], got shape {tuple(rewards.shape)}")
    return check_cu_seqlens(op, cu_seqlens, rewards.numel(), rewards.device).detach()


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalized advantage estimation (Schulman et al. 2016), backwards over time.

    For each valid token ``t`` (``mask != 0``), with ``n(t)`` the next valid token of the
    same sequence (past the end ``V = A = 0``)::

        δ_t = r_t + γ·V_{n(t)} − V_t
        A_t = δ_t + γλ·A_{n(t)}
        R_t = A_t + V_t                      (returns, before whitening)

    Masked positions are skipped: their reward and value are ignored and the state
    passes through them unchanged, so γ and λ apply once per *valid* token (verl's rule
    for observation tokens inside a response). Their advantages and returns are 0. For
    padded batches whose valid tokens are contiguous this equals TRL's and verl's GAE.
    With ``whiten=True`` the advantages are whitened over all valid tokens of the batch
    (``masked_whiten``, ε = 1e-8; one valid token gives 0); returns never are.

    Args:
        rewards, values: ``[B, T]``, or packed ``[N]`` with ``cu_seqlens``; any float dtype.
        mask: same shape; bool / int / float, read as ``mask != 0``. A fully masked row
            gives zeros.
        gamma, lam: discount γ and GAE λ (TRL: 1, 0.95; verl defaults 1, 1).
        cu_seqlens: int32/int64 ``[num_seqs + 1]`` sequence boundaries of a packed batch
            (empty sequences allowed).
    Returns:
        ``(advantages, returns)``, fp32, shape of ``rewards``, no gradient.
    """
    op = "gae"
    cu_seqlens = _check_tokens(op, rewards, mask, cu_seqlens, values)
    gamma = check_number(op, "gamma", gamma, nonnegative=True)
    lam = check_number(op, "lam", lam, nonnegative=True)
    if not isinstance(whiten, bool):
        raise TypeError(f"{op}: whiten must be a bool, got {type(whiten).__name__}")
    backend = resolve_backend(op, backend, rewards.device)
    return _gae_op(rewards.detach(), values.detach(), mask.detach(), cu_seqlens, gamma, lam, whiten, backend)


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Per-token discounted returns of REINFORCE++ (Hu 2025): ``G_t = r_t + γ·G_{n(t)}``.

    ``n(t)`` is the next valid token of the sequence (``G = 0`` past the end). Masked
    positions are skipped like in :func:`gae`: their reward is ignored, the running
    return passes through unchanged, and their output is 0: verl 0.9.1's REINFORCE++
    rule (``compute_reinforce_plus_plus_outcome_advantage`` carries the running return
    through observation tokens). REINFORCE++ then whitens ``G`` with :func:`masked_whiten`.

    Args:
        rewards: ``[B, T]``, or packed ``[N]`` with ``cu_seqlens``; any float dtype.
        mask: same shape; bool / int / float, read as ``mask != 0``.
    Returns:
        fp32, shape of ``rewards``, no gradient.
    """
    op = "discounted_returns"
    cu_seqlens = _check_tokens(op, rewards, mask, cu_seqlens)
    gamma = check_number(op, "gamma", gamma, nonnegative=True)
    backend = resolve_backend(op, backend, rewards.device)
    return _discounted_returns_op(rewards.detach(), mask.detach(), cu_seqlens, gamma, backend)
