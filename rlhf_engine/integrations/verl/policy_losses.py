"""verl's policy losses on :func:`rlhf_engine.ops.policy_loss`, and their registration in
verl's policy-loss registry (see the package docstring for what is and is not covered)."""

from __future__ import annotations

import functools

import torch

from rlhf_engine.ops import policy_loss as _policy_loss

VERL_VERSION = "0.9.1"
_INSTALL_HINT = (
    f"rlhf_engine.integrations.verl needs verl=={VERL_VERSION}: pip install 'rlhf-engine[verl]' && "
    f"pip install --no-deps verl=={VERL_VERSION} (the extra brings the packages verl's core_algos imports; "
    "--no-deps keeps verl's pins from replacing transformers)"
)
# verl's loss_agg_mode names (ActorConfig.__post_init__) are our aggregation names.
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's GSPO clamps the sequence log-ratio from above only (torch.clamp(max=10)).
_GSPO_LOG_RATIO_MAX = 10.0


def _core_algos():
    """``verl.trainer.ppo.core_algos``, or an ImportError that says how to install verl."""
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return core_algos


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
      (default ``response_mask.shape[-1]``, our padded length); locally verl counts the
      non-empty sequences, as ours does with ``count_empty_seqs=False`` (which
      :func:`_run` passes).

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
        scale = info.get("loss_scale_factor")
        if denominator is None and scale is None:
            return loss_agg_mode, None
        if denominator is None:  # the local non-empty count, as a device tensor (no host sync)
            denominator = (response_mask.sum(-1) > 0).sum().to(torch.float32)
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


def _metrics(metrics: dict, clipfrac: bool = True, clipfrac_lower: bool = True) -> dict:
    """verl's three metrics from the op's (``ppo_kl`` is the op's, verl's definition); a
    loss without a clip fraction reports 0.0, as verl's do."""
    zero = metrics["ppo_kl"].new_zeros(())
    return _floats({
        "actor/pg_clipfrac": metrics["clipfrac"] if clipfrac else zero,
        "actor/ppo_kl": metrics["ppo_kl"],
        "actor/pg_clipfrac_lower": metrics["clipfrac_lower"] if clipfrac_lower else zero,
    })


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
        count_empty_seqs=False, normalizer=normalizer, backend=backend, **loss_options,
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
    return loss, _metrics(metrics)


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
    return loss, _metrics(metrics, clipfrac_lower=False)


def compute_policy_loss_gspo(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``gspo`` loss (Zheng et al. 2025): PPO's clipped objective on the sequence
    ratio, ``ops.policy_loss(loss="gspo")`` with verl's clamp of the sequence log-ratio
    (from above only, at 10)::

        log s_bt = min(sg(mean_t δ) + lp_t − sg(lp_t), 10),   δ = lp − old
        l = max(−A s, −A clip(s, 1 − ε_lo, 1 + ε_hi)) · rollout_is_weights

    (no dual clip), aggregated by ``loss_agg_mode``. Arguments as
    :func:`compute_policy_loss_vanilla`. Metrics: ``actor/pg_clipfrac`` (``L2 > L1``),
    ``actor/ppo_kl`` (mean ``old − lp``, unclamped), ``actor/pg_clipfrac_lower`` = 0.0."""
    clip_low, clip_high = _clip_ratios(config) if config is not None else (None, None)
    loss, metrics = _run(
        "verl gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        backend, loss="gspo", clip_low=clip_low, clip_high=clip_high, log_ratio_min=None,
        log_ratio_max=_GSPO_LOG_RATIO_MAX,
    )
    return loss, _metrics(metrics, clipfrac_lower=False)


def compute_policy_loss_sapo(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``sapo`` loss (Qwen 2025), ``ops.policy_loss(loss="sapo")``::

        l = −A · sigmoid(τ (r − 1)) · 4 / τ · rollout_is_weights,   r = e^{clamp(lp − old, ±20)}

    with ``τ = config.tau_pos`` where ``A > 0`` and ``config.tau_neg`` elsewhere. Like verl,
    always aggregated as ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says (with
    ``config.global_batch_info``'s ``global_batch_size``); the mode is still checked.
    Metrics: ``actor/ppo_kl`` (as vanilla), ``actor/pg_clipfrac`` and
    ``actor/pg_clipfrac_lower`` = 0.0."""
    tau_pos = _config_value(config, "tau_pos", 1.0) if config is not None else None
    tau_neg = _config_value(config, "tau_neg", 1.05) if config is not None else None
    _check_inputs("verl sapo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                  rollout_is_weights)  # fmt: skip
    loss, metrics = _run(
        "verl sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
        rollout_is_weights, backend, loss="sapo", sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg,
    )
    return loss, _metrics(metrics, clipfrac=False, clipfrac_lower=False)


def _dppo(name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, backend):
    clip_low, clip_high = _clip_ratios(config) if config is not None else (None, None)
    # verl reads config.get("clip_ratio_c", 20.0): ActorConfig's field (3.0 by default), or 20 for a dict without it
    cap = _config_value(config, "clip_ratio_c", 20.0) if config is not None else None
    loss, metrics = _run(
        f"verl {name}", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        backend, loss=name, clip_low=clip_low, clip_high=clip_high, delta=cap,
    )
    return loss, _metrics(metrics)


def compute_policy_loss_dppo_tv(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``dppo_tv`` loss (DPPO-Binary-TV, arXiv 2602.04879), ``ops.policy_loss(loss="dppo_tv")``::

        l = −A · sg(min(r, c)) · lp · v · rollout_is_weights,   r = e^{clamp(lp − old, ±20)}

    with ``c = clip_ratio_c`` and ``v`` (constant) 1 where ``p − q <= ε_hi`` (``A > 0``) /
    ``p − q >= −ε_lo`` (otherwise), ``p = e^lp``, ``q = e^old``, ``ε`` verl's clip ratios read
    as TV thresholds. Arguments as :func:`compute_policy_loss_vanilla`. Metrics:
    ``actor/pg_clipfrac`` (``v = 0``), ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``
    (``r > c`` with ``v = 1``)."""
    return _dppo("dppo_tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights, backend)  # fmt: skip


def compute_policy_loss_dppo_kl(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``dppo_kl`` loss (DPPO-Binary-KL): :func:`compute_policy_loss_dppo_tv` with ``v``
    1 where the binary KL ``q (old − lp) + (1 − q) log((1 − q + 1e-8) / (1 − p + 1e-8))`` is
    within ``ε_hi`` or ``p <= q`` (``A > 0``), within ``ε_lo`` or ``p >= q`` (otherwise);
    ``ops.policy_loss(loss="dppo_kl")``. Same arguments and metrics."""
    return _dppo("dppo_kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights, backend)  # fmt: skip


def compute_policy_loss_geo_mean(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``geo_mean`` loss (GMPO), ``ops.policy_loss(loss="geo_mean")``: per sequence
    ``l_b = −mean_t(A) · exp(mean_t dmin) · w_b`` with ``dmin`` the log-ratio ``lp − old``
    (unclamped) capped at ``ε_hi`` where ``A > 0`` and at ``−ε_lo`` where ``A < 0``, ``w_b``
    the geometric mean of the sequence's ``rollout_is_weights``; the loss is the mean of
    ``l_b`` over all sequences. Like verl, ``loss_agg_mode`` and ``global_batch_info`` do not
    change it (the mode is still checked). Arguments as :func:`compute_policy_loss_vanilla`.
    Metrics: ``actor/pg_clipfrac`` / ``actor/pg_clipfrac_lower`` (the cap is active with
    ``A > 0`` / ``A < 0``), ``actor/ppo_kl`` (mean ``old − lp``)."""
    op = "verl geo_mean"
    _check_inputs(op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    clip_low, clip_high = _clip_ratios(config)
    seq_weights = None
    if rollout_is_weights is not None:  # verl's geometric mean over each sequence's valid tokens
        weight = response_mask.to(rollout_is_weights.dtype)
        log_weights = (torch.log(rollout_is_weights + 1e-10) * weight).sum(-1) / (weight.sum(-1) + 1e-8)
        seq_weights = torch.exp(log_weights)
    loss, metrics = _policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss="geo_mean", clip_low=clip_low, clip_high=clip_high,
        log_ratio_min=None, log_ratio_max=None, is_weights=seq_weights, aggregation="seq-mean-token-mean",
        count_empty_seqs=True, backend=backend,
    )
    return loss, _metrics(metrics)


# Imported here, not at the top: cov_losses builds on the helpers above.
from rlhf_engine.integrations.verl.cov_losses import (  # noqa: E402
    compute_policy_loss_clip_cov, compute_policy_loss_kl_cov,
)

# verl loss_mode name -> our implementation with verl's signature.
POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gpg": compute_policy_loss_gpg,
    "cispo": compute_policy_loss_cispo,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "geo_mean": compute_policy_loss_geo_mean,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
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
