"""verl integration: rlhf_engine's fused ops behind verl 0.9.1's own names and signatures.

One line, in the driver and (through verl's plugin hook) in every Ray worker::

    VERL_USE_EXTERNAL_MODULES=rlhf_engine.integrations.verl python -m verl.trainer.main_ppo ...

Importing this module imports verl and calls :func:`register`, which puts our policy losses
into ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY`` under verl's names. verl's actor
looks the loss up by name on every micro-batch, so nothing else changes.

What is here:

* Policy losses (``loss_mode``): ``vanilla`` (PPO, always with verl's dual clip
  ``c = clip_ratio_c``), ``gpg`` (REINFORCE) and ``cispo``. Each has verl's signature
  ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
  rollout_is_weights) -> (0-d loss, metrics)``, with verl's metric names as Python floats,
  and is computed by :func:`rlhf_engine.ops.policy_loss` (any backend).
* Advantage estimators with verl's signatures and returns (:data:`ADVANTAGE_ESTIMATORS`),
  built on :func:`~rlhf_engine.ops.group_advantages`, :func:`~rlhf_engine.ops.gae`,
  :func:`~rlhf_engine.ops.discounted_returns` and :func:`~rlhf_engine.ops.masked_whiten`.
  They are *not* put into verl's advantage registry: ``register_adv_est`` refuses to
  replace an existing name, and verl calls GAE and GRPO directly rather than through the
  registry. Call them yourself (e.g. from a custom ``compute_advantage``).
* :class:`FusedLinearForPPO` and :func:`linear_cross_entropy`: verl's two fused
  lm_head logprob / entropy entry points, computed by
  :func:`rlhf_engine.ops.fused_linear_logprobs`; :func:`patch_fused_linear` swaps them in.

Not supported (verl keeps its own): the losses ``gspo`` (verl clamps the sequence log
ratio at +10 from above only, ours at ±20), ``sapo`` (verl reads ``tau_pos`` / ``tau_neg``
from the config, ours are fixed at 1.0 / 1.05), ``dro`` (verl importance-weights the
quadratic term too), ``dppo_tv``, ``dppo_kl``, ``clip_cov``, ``kl_cov``, ``geo_mean`` and
``bypass_mode`` (no matching op), and the estimators ``remax``, ``gpg``, ``grpo_passk``,
``gdpo``, ``optimal_token_baseline``, ``tir_optimal_token_baseline``.

Differences that remain, all below fp32 rounding: our ops compute in fp32 whatever the
input dtype (verl computes in the input dtype), and divide by exact token counts where verl
adds 1e-8 (``masked_mean``; ``seq-mean-token-mean``'s per-sequence count).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from rlhf_engine.ops import discounted_returns, fused_linear_logprobs, gae, group_advantages, masked_whiten
from rlhf_engine.ops import policy_loss as _policy_loss

VERL_VERSION = "0.9.1"
_INSTALL_HINT = (
    f"rlhf_engine.integrations.verl needs verl=={VERL_VERSION}: pip install 'rlhf-engine[verl]' && "
    f"pip install --no-deps verl=={VERL_VERSION} (the extra brings the packages verl's core_algos imports; "
    "--no-deps keeps verl's pins from replacing transformers)"
)
# verl's loss_agg_mode names (ActorConfig.__post_init__) are our aggregation names.
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# The log-ratio clamp of verl's vanilla / cispo, which their ppo_kl metric reports through.
_LOG_RATIO_CLAMP = 20.0


def _core_algos():
    """``verl.trainer.ppo.core_algos``, or an ImportError that says how to install verl."""
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return core_algos


# ---------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------


def _config_value(config, name: str, default):
    """``config.<name>`` for an ActorConfig (attributes) or a DictConfig / dict (keys)."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _check_inputs(op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    """verl's inputs: every tensor ``[B, T]``; a config; a known ``loss_agg_mode``."""
    if config is None:
        raise ValueError(f"{op}: config is required (verl's ActorConfig: clip ratios, global_batch_info)")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"{op}: loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    tensors = dict(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=response_mask)
    if rollout_is_weights is not None:
        tensors["rollout_is_weights"] = rollout_is_weights
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 2 or value.shape != log_prob.shape:
            raise ValueError(
                f"{op}: {name} must be [batch, response_length] like log_prob {tuple(log_prob.shape)}, "
                f"got {tuple(value.shape)}"
            )


def _aggregation(op: str, loss_agg_mode: str, response_mask: torch.Tensor, config):
    """verl's ``agg_loss(..., **config.global_batch_info)`` as our ``normalizer``.

    verl multiplies each rank's loss by ``dp_size`` (DDP / FSDP average the gradients over
    ranks) and divides by a global denominator ``D``; ours divides by ``normalizer``, so
    ``normalizer = D / dp_size``. ``D`` per mode, from ``global_batch_info``:

    * token-mean: ``batch_num_tokens`` (local default: the valid tokens, ours too);
    * token-sum: 1;
    * seq-mean-token-sum / -mean: ``global_batch_size`` (local default: the sequences with
      a valid token, ours too);
    * seq-mean-token-sum-norm: ``global_batch_size · K`` with ``K = loss_scale_factor``
      (default ``response_mask.shape[-1]``); the local sequence count is verl's (non-empty
      sequences), passed as a device tensor (no host sync), since ours would count all.

    Returns ``(aggregation, normalizer)``; ``normalizer`` None means "our local default".
    """
    info = dict(_config_value(config, "global_batch_info", None) or {})
    dp_size = info.get("dp_size") or 1
    tokens, sequences = info.get("batch_num_tokens"), info.get("global_batch_size")
    if loss_agg_mode == "token-sum":
        return loss_agg_mode, None if dp_size == 1 else 1.0 / dp_size
    if loss_agg_mode == "token-mean":
        denominator, field = tokens, "batch_num_tokens"
    else:
        denominator, field = sequences, "global_batch_size"
    if denominator is None and dp_size > 1:
        raise ValueError(f"{op}: config.global_batch_info['{field}'] is required when dp_size > 1 ({loss_agg_mode})")
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if denominator is None:
            denominator = (response_mask.sum(-1) > 0).sum().to(torch.float32)
        scale = info.get("loss_scale_factor")
        denominator = denominator * (response_mask.shape[-1] if scale is None else scale)
    if denominator is None:
        return loss_agg_mode, None
    if isinstance(denominator, torch.Tensor):  # an all-reduced count may sit on another device
        denominator = denominator.to(response_mask.device)
    return loss_agg_mode, denominator / dp_size


def _clip_ratios(config) -> tuple[float, float]:
    """verl's ``(clip_ratio_low ?? clip_ratio, clip_ratio_high ?? clip_ratio)``."""
    base = _config_value(config, "clip_ratio", 0.2)
    low, high = _config_value(config, "clip_ratio_low", None), _config_value(config, "clip_ratio_high", None)
    return (base if low is None else low), (base if high is None else high)


def _ppo_kl(old_log_prob: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """verl's ``actor/ppo_kl``: the masked mean of ``clamp(old − lp, ±20)``, 0-d, detached
    (0 for an all-masked batch). Our op reports ``approx_kl = mean δ²/2`` instead, so the
    wrapper computes this one itself: three elementwise ops and two sums."""
    weight = response_mask.to(log_prob.dtype)
    kl = torch.clamp(old_log_prob - log_prob.detach(), -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    count = weight.sum()
    total = torch.where(response_mask != 0, kl * weight, 0.0).sum()
    return torch.where(count > 0, total / count, 0.0)


def _floats(metrics: dict) -> dict:
    """0-d tensors -> Python floats with one host sync (verl's metrics are floats)."""
    values = torch.stack([v.detach().reshape(()).to(torch.float64) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def _run(op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, backend,
         **loss_options):
    _check_inputs(op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    aggregation, normalizer = _aggregation(op, loss_agg_mode, response_mask, config)
    return _policy_loss(
        log_prob, old_log_prob, advantages, response_mask, is_weights=rollout_is_weights, aggregation=aggregation,
        normalizer=normalizer, backend=backend, **loss_options,
    )


def compute_policy_loss_vanilla(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``vanilla`` loss: PPO with the dual clip, by ``ops.policy_loss(loss="ppo")``.

    With ``δ = clamp(lp − old, ±20)``, ``r = e^δ``, ``ε_lo/ε_hi = clip_ratio_low/high`` (each
    defaulting to ``clip_ratio``) and ``c = clip_ratio_c`` (> 1; default 3)::

        l = max(−A r, −A clip(r, 1 − ε_lo, 1 + ε_hi)),  and for A < 0: l = min(l, −A c)
        l ← l · rollout_is_weights,  then aggregated by loss_agg_mode

    Args:
        old_log_prob, log_prob, advantages: ``[B, T]`` float; ``log_prob`` carries the gradient.
        response_mask: ``[B, T]`` bool (as verl's actor passes it) or float.
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`; ``config.global_batch_info`` sets the
            global denominators (see :func:`_aggregation`).
        config: verl's ActorConfig (or a DictConfig with the same fields).
        rollout_is_weights: optional ``[B, T]`` truncated IS weights (constants).
        backend: ours (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpp"``).

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d fp32; metrics ``actor/pg_clipfrac`` (fraction
        of tokens with ``L2 > L1``), ``actor/ppo_kl`` (mean ``clamp(old − lp, ±20)``),
        ``actor/pg_clipfrac_lower`` (the dual clip is active), masked token means as floats.
    """
    op = "verl vanilla"
    clip_low, clip_high = _clip_ratios(config) if config is not None else (None, None)
    dual_clip = _config_value(config, "clip_ratio_c", 3.0) if config is not None else None
    loss, metrics = _run(
        op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, backend,
        loss="ppo", clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
    )
    return loss, _floats({
        "actor/pg_clipfrac": metrics["clipfrac"],
        "actor/ppo_kl": _ppo_kl(old_log_prob, log_prob, response_mask),
        "actor/pg_clipfrac_lower": metrics["clipfrac_lower"],
    })


def compute_policy_loss_gpg(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``gpg`` loss (REINFORCE): ``l = −A · lp · rollout_is_weights``, aggregated by
    ``loss_agg_mode``; ``ops.policy_loss(loss="reinforce")``. ``old_log_prob`` is unused
    by the loss (as in verl) but checked for shape. Arguments as
    :func:`compute_policy_loss_vanilla`. Returns ``(0-d fp32 loss, {})``: verl's gpg
    reports no metrics."""
    loss, _ = _run(
        "verl gpg", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        backend, loss="reinforce",
    )
    return loss, {}


def compute_policy_loss_cispo(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``cispo`` loss (MiniMax-M1): ``l = −sg(w) · A · lp`` with
    ``w = clip(e^{clamp(lp − old, ±20)}, 1 − ε_lo, 1 + ε_hi)`` (ε as in vanilla), then
    ``· rollout_is_weights`` and ``loss_agg_mode``; ``ops.policy_loss(loss="cispo")``.
    Arguments as :func:`compute_policy_loss_vanilla`. Metrics: ``actor/pg_clipfrac`` (the
    weight was clipped), ``actor/ppo_kl`` (as vanilla), ``actor/pg_clipfrac_lower`` = 0.0."""
    clip_low, clip_high = _clip_ratios(config) if config is not None else (None, None)
    loss, metrics = _run(
        "verl cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        backend, loss="cispo", clip_low=clip_low, clip_high=clip_high,
    )
    return loss, _floats({
        "actor/pg_clipfrac": metrics["clipfrac"],
        "actor/ppo_kl": _ppo_kl(old_log_prob, log_prob, response_mask),
        "actor/pg_clipfrac_lower": metrics["clipfrac"].new_zeros(()),
    })


# verl loss_mode name -> our implementation with verl's signature.
POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gpg": compute_policy_loss_gpg,
    "cispo": compute_policy_loss_cispo,
}


def register(names=None, *, backend: str = "auto") -> list:
    """Put our policy losses into verl's ``POLICY_LOSS_REGISTRY`` under verl's names,
    replacing verl's own (verl's registry overwrites silently; verl's functions stay
    reachable as ``core_algos.compute_policy_loss_<name>``).

    Args:
        names: iterable of names from :data:`POLICY_LOSSES`; None registers all.
        backend: our backend for the registered losses (``"auto"`` picks per device).
    Returns:
        the names registered.
    """
    core_algos = _core_algos()
    chosen = list(POLICY_LOSSES) if names is None else list(names)
    unknown = [name for name in chosen if name not in POLICY_LOSSES]
    if unknown:
        raise ValueError(f"register: names must be among {tuple(POLICY_LOSSES)}, got unknown {unknown}")
    for name in chosen:
        fn = POLICY_LOSSES[name]
        core_algos.register_policy_loss(name)(fn if backend == "auto" else functools.partial(fn, backend=backend))
    return chosen


# ---------------------------------------------------------------------------------------
# Advantage estimators (not registered: see the module docstring)
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Fused lm_head logprobs / entropy
# ---------------------------------------------------------------------------------------


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl's ``verl.utils.experimental.torch_functional.FusedLinearForPPO``
    (the ``fused_kernel_options.impl_backend="torch"|"liger"`` path), computed by
    :func:`rlhf_engine.ops.fused_linear_logprobs`.

    ``forward(hidden_states [T, H] or [B, T, H], vocab_weights [V, H], input_ids [T] or
    [B, T], temperature: float = 1.0) -> (log_probs, entropy)`` of ``input_ids``' shape,
    with ``z = hidden @ W.T / temperature``: ``log_probs = z[id] − logsumexp(z)`` (fp32)
    and ``entropy = logsumexp(z) − Σ softmax(z) z`` (in the hidden dtype, as verl's torch
    path returns it). Both are differentiable w.r.t. ``hidden_states`` and ``vocab_weights``.

    ``chunk_size`` bounds the logits held at once (tokens per chunk, as in verl);
    ``impl_backend`` ("torch" or "liger", verl's choice between its two kernels) is
    checked and then unused: ours replaces both. ``backend`` picks ours.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, backend: str = "auto"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"FusedLinearForPPO: impl_backend must be 'torch' or 'liger', got {impl_backend!r}")
        self.chunk_size, self.impl_backend, self.backend = chunk_size, impl_backend, backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() not in (2, 3):
            raise ValueError("FusedLinearForPPO: hidden_states must be a [T, H] or [B, T, H] tensor")
        log_probs, entropy = fused_linear_logprobs(
            hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=float(temperature),
            return_entropy=True, chunk_size=self.chunk_size, backend=self.backend,
        )
        return log_probs, entropy.to(hidden_states.dtype)


def linear_cross_entropy(hidden, weight, labels, temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None, *, backend: str = "auto"):
    """Drop-in for verl's ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
    (the ``impl_backend="triton"`` path): ``hidden [..., H]``, ``weight [V, H]``, ``labels
    [...]`` -> fp32 ``(log_probs [N], entropy [N])``, flattened like verl's (``N`` = the
    number of tokens), with the formulas of :class:`FusedLinearForPPO`.

    Only ``reduction="none"`` (what verl's models pass) and ``dist_process_group=None``
    (no vocabulary-parallel lm_head) are supported: anything else is a ValueError."""
    if reduction != "none":
        raise ValueError(f"linear_cross_entropy: only reduction='none' is supported, got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError("linear_cross_entropy: dist_process_group (a vocabulary-parallel lm_head) is not supported")
    log_probs, entropy = fused_linear_logprobs(
        hidden, weight, labels.to(torch.int64), temperature=float(temperature), return_entropy=True, backend=backend
    )
    return log_probs.reshape(-1), entropy.reshape(-1)


def patch_fused_linear() -> None:
    """Swap our :class:`FusedLinearForPPO` and :func:`linear_cross_entropy` into verl, for
    ``actor_rollout_ref.model.use_fused_kernels=True``: verl's HF model forwards import
    both at call time, so patching their modules suffices. Megatron's fused forwards
    import ``linear_cross_entropy`` at module load: those modules are patched too when
    they are already imported, so call this after building the model."""
    import sys

    import verl.utils.experimental.torch_functional as torch_functional
    import verl.utils.kernel.linear_cross_entropy as kernel_module

    torch_functional.FusedLinearForPPO = FusedLinearForPPO
    kernel_module.linear_cross_entropy = linear_cross_entropy
    for name in ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "linear_cross_entropy"):
            module.linear_cross_entropy = linear_cross_entropy


# Registering on import is what makes VERL_USE_EXTERNAL_MODULES=rlhf_engine.integrations.verl
# work: verl imports the module in every process and the registry is then ours.
register()
