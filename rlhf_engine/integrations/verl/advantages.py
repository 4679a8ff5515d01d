"""verl's advantage estimators with verl's signatures and returns, on
:func:`~rlhf_engine.ops.group_advantages`, :func:`~rlhf_engine.ops.gae`,
:func:`~rlhf_engine.ops.discounted_returns` and :func:`~rlhf_engine.ops.masked_whiten`.
Not put into verl's advantage registry (see the package docstring)."""

from __future__ import annotations

import numpy as np
import torch

from rlhf_engine.integrations.verl.policy_losses import _config_value
from rlhf_engine.ops import discounted_returns, gae, group_advantages, masked_whiten

def _group_ids(op: str, index, batch: int, device) -> tuple[torch.Tensor, int]:
    """verl's ``index`` (the ``uid`` of each sample's prompt: a numpy array, usually of
    strings) -> int64 group ids ``[B]`` in ``[0, num_groups)`` and ``num_groups``."""
    if index is None:
        raise ValueError(f"{op}: index (the prompt uid of each sample, non_tensor_batch['uid']) is required")
    values = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    if values.shape != (batch,):
        raise ValueError(f"{op}: index must have one uid per sample, shape ({batch},), got {values.shape}")
    uniques, inverse = np.unique(values, return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64)).to(device), len(uniques)


def _check_rewards(op: str, token_level_rewards, response_mask):
    for name, value in (("token_level_rewards", token_level_rewards), ("response_mask", response_mask)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 2 or value.shape != token_level_rewards.shape:
            raise ValueError(f"{op}: {name} must be [batch, response_length], got {tuple(value.shape)}")


def _outcome(op, token_level_rewards, response_mask, index, backend, **options):
    """Per-sequence advantages of verl's outcome estimators: score ``s = Σ_t r_t`` over all
    positions (verl's convention), group ids from ``index``, ``group_advantages`` with
    verl's preset; broadcast as ``a · mask`` in the rewards' dtype -> ``(adv, adv)``."""
    _check_rewards(op, token_level_rewards, response_mask)
    scores = token_level_rewards.detach().sum(-1)
    group_ids, num_groups = _group_ids(op, index, scores.shape[0], scores.device)
    adv = group_advantages(scores, group_ids=group_ids, num_groups=num_groups, backend=backend, **options)
    adv = adv.to(token_level_rewards.dtype)[:, None] * response_mask
    return adv, adv


def compute_grpo_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True, config=None,
    *, backend: str = "auto",
):
    """verl's ``grpo`` (and ``grpo_vectorized``): ``a = (s − μ_g)/(σ_g + ε)`` with the
    unbiased group std, or ``s − μ_g`` (Dr. GRPO) when ``norm_adv_by_std_in_grpo`` is
    False; a singleton group uses ``μ = 0, σ = 1``.

    Args:
        token_level_rewards, response_mask: ``[B, T]`` (``s = Σ_t r_t``).
        index: ``[B]`` prompt uids (numpy array of any hashable values, or a tensor).
        epsilon: ``ε``. config: unused (verl's signature).
    Returns:
        ``(advantages, returns)``, equal, ``[B, T]`` = ``a · mask``, rewards' dtype
        (computed in fp32), no gradient.
    """
    if norm_adv_by_std_in_grpo:
        return _outcome("verl grpo", token_level_rewards, response_mask, index, backend,
                        method="grpo", preset="verl", eps=epsilon)
    return _outcome("verl grpo", token_level_rewards, response_mask, index, backend, method="dr_grpo", preset="verl")


def compute_rloo_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, *, backend: str = "auto", **kwargs
):
    """verl's ``rloo``: ``a = s − mean_{j≠i} s_j`` (``n/(n−1)·(s − μ_g)``); a singleton
    keeps ``s``. Shapes and returns as :func:`compute_grpo_outcome_advantage`; ``epsilon``,
    ``config`` and extra keywords are unused (verl's signature)."""
    return _outcome("verl rloo", token_level_rewards, response_mask, index, backend, method="rloo", preset="verl")


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, *, backend: str = "auto", **kwargs
):
    """verl's ``rloo_vectorized``: as :func:`compute_rloo_outcome_advantage`, except that a
    singleton group gets 0 (the ``trl`` preset's rule, which is this path's)."""
    return _outcome("verl rloo_vectorized", token_level_rewards, response_mask, index, backend,
                    method="rloo", preset="trl")


def compute_opo_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, *, backend: str = "auto", **kwargs
):
    """verl's ``opo``: ``a = s − b_g``, ``b_g = Σ_j L_j s_j / Σ_j L_j`` with ``L`` the response
    lengths (``mask.sum(-1)``); a singleton group uses ``b = 0``. Where verl gives NaN (a
    group whose responses are all empty), ours uses the group mean. Shapes and returns as
    :func:`compute_grpo_outcome_advantage`."""
    return _outcome("verl opo", token_level_rewards, response_mask, index, backend, method="opo", preset="verl",
                    lengths=response_mask.sum(-1) if isinstance(response_mask, torch.Tensor) else response_mask)


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, *, backend: str = "auto", **kwargs
):
    """verl's ``reinforce_plus_plus_baseline``: ``s − μ_g`` (singleton ``μ = 0``), broadcast
    over the tokens and whitened over all valid tokens (each sequence weighted by its
    length; unbiased variance, ``rsqrt(var + 1e-8)``). verl raises for fewer than two valid
    tokens; ours gives 0. ``epsilon`` is unused, as in verl. Shapes and returns as
    :func:`compute_grpo_outcome_advantage`."""
    return _outcome("verl reinforce_plus_plus_baseline", token_level_rewards, response_mask, index, backend,
                    method="reinforce_pp_baseline", preset="verl",
                    lengths=response_mask.sum(-1) if isinstance(response_mask, torch.Tensor) else response_mask)


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards, response_mask, config=None, *, backend: str = "auto", **kwargs
):
    """verl's ``reinforce_plus_plus``: discounted returns ``G_t = r_t + γ G_{n(t)}`` (``n(t)``
    the next valid token; masked positions pass the running return through and output 0),
    ``γ = config.gamma``; advantages = ``masked_whiten(G, mask)``.

    Returns ``(advantages, returns)``, ``[B, T]``, rewards' dtype (computed in fp32), 0 at
    masked positions."""
    op = "verl reinforce_plus_plus"
    _check_rewards(op, token_level_rewards, response_mask)
    if config is None:
        raise ValueError(f"{op}: config (verl's AlgoConfig, for config.gamma) is required")
    gamma = _config_value(config, "gamma", None)
    if gamma is None:
        raise ValueError(f"{op}: config.gamma is required")
    returns = discounted_returns(token_level_rewards, response_mask, gamma=float(gamma), backend=backend)
    advantages = masked_whiten(returns, response_mask, backend=backend)
    dtype = token_level_rewards.dtype
    return advantages.to(dtype), returns.to(dtype)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam, *, backend: str = "auto"):
    """verl's ``gae``: ``δ_t = r_t + γ V_{n(t)} − V_t``, ``A_t = δ_t + γλ A_{n(t)}`` over valid
    tokens (masked positions pass the state through), ``returns = A + V``, advantages
    whitened over the valid tokens.

    Equal to verl on valid tokens. At masked positions ours gives 0 for both outputs,
    where verl writes the carried (and whitened) value: verl's losses mask them out.

    Args:
        token_level_rewards, values, response_mask: ``[B, T]``.
        gamma, lam: floats (or 0-d tensors).
    Returns:
        ``(advantages, returns)``, ``[B, T]``, rewards' dtype (computed in fp32).
    """
    op = "verl gae"
    _check_rewards(op, token_level_rewards, response_mask)
    advantages, returns = gae(
        token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam), whiten=True, backend=backend
    )
    dtype = token_level_rewards.dtype
    return advantages.to(dtype), returns.to(dtype)


# verl estimator name -> our implementation with verl's signature.
ADVANTAGE_ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
}
