"""verl's ``clip_cov`` and ``kl_cov`` policy losses (PRIME-RL) on
:func:`rlhf_engine.ops.clip_cov_loss` / :func:`rlhf_engine.ops.kl_cov_loss`, with verl's
signature, config fields (``config.policy_loss``: ``clip_cov_ratio``, ``clip_cov_lb``,
``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``) and metric names."""

from __future__ import annotations

from rlhf_engine.integrations.verl.policy_losses import (
    _aggregation, _check_inputs, _clip_ratios, _config_value, _floats,
)
from rlhf_engine.ops import clip_cov_loss, kl_cov_loss

# verl's fallbacks when a config field is None (compute_policy_loss_clip_cov / _kl_cov)
_CLIP_COV_DEFAULTS = dict(clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0)
_KL_COV_DEFAULTS = dict(kl_cov_ratio=0.0002, ppo_kl_coef=1.0)


def _policy_loss_options(op: str, config, defaults: dict) -> dict:
    """``config.policy_loss``'s fields named in ``defaults``, each ``defaults[name]`` when None."""
    policy = _config_value(config, "policy_loss", None)
    if policy is None:
        raise ValueError(f"{op}: config.policy_loss is required (verl's PolicyLossConfig: {', '.join(defaults)})")
    values = {name: _config_value(policy, name, None) for name in defaults}
    return {name: default if values[name] is None else values[name] for name, default in defaults.items()}


def _prepare(op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    _check_inputs(op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    return _aggregation(op, loss_agg_mode, response_mask, config)


def compute_policy_loss_clip_cov(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``clip_cov`` loss: PPO's clipped loss on the unclamped ratio ``r = e^{lp − old}``
    with a random few high-covariance tokens dropped, by :func:`rlhf_engine.ops.clip_cov_loss`::

        l = max(−A r, −A clip(r, 1 − ε_lo, 1 + ε_hi)) · corr · rollout_is_weights

    (ε as in vanilla, no dual clip), aggregated by ``loss_agg_mode``. ``corr`` is 0 on
    ``max(int(clip_cov_ratio · Σ mask), 1)`` tokens drawn by ``torch.randperm`` on torch's
    default generator (verl's draw: seeding torch alike gives verl's pick) among the valid
    tokens PPO did not clip with ``clip_cov_lb < (A − mean A)(lp − mean lp) < clip_cov_ub``,
    1 elsewhere. Arguments as :func:`compute_policy_loss_vanilla`; the three fields come
    from ``config.policy_loss`` (verl's defaults 0.0002, 1.0, 5.0 where None). Metrics:
    ``actor/pg_clipfrac`` (the fraction of tokens dropped) and ``actor/ppo_kl`` (mean
    ``old − lp``), floats."""
    op = "verl clip_cov"
    aggregation, normalizer = _prepare(op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                       rollout_is_weights)  # fmt: skip
    clip_low, clip_high = _clip_ratios(config)
    loss, metrics = clip_cov_loss(
        log_prob, old_log_prob, advantages, response_mask, clip_low=clip_low, clip_high=clip_high,
        is_weights=rollout_is_weights, aggregation=aggregation, count_empty_seqs=False, normalizer=normalizer,
        backend=backend, **_policy_loss_options(op, config, _CLIP_COV_DEFAULTS),
    )
    return loss, _floats({"actor/pg_clipfrac": metrics["clipfrac"], "actor/ppo_kl": metrics["ppo_kl"]})


def compute_policy_loss_kl_cov(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None, *, backend: str = "auto",
):
    """verl's ``kl_cov`` loss, by :func:`rlhf_engine.ops.kl_cov_loss`: with ``δ = lp − old``
    (unclamped)::

        l = (−A e^δ + ppo_kl_coef |δ| [t among the top k by (A − mean A)(lp − mean lp)])
            · rollout_is_weights,   k = max(1, int(kl_cov_ratio · #valid))

    aggregated by ``loss_agg_mode``. Arguments as :func:`compute_policy_loss_vanilla`;
    ``kl_cov_ratio`` and ``ppo_kl_coef`` come from ``config.policy_loss`` (verl's fallbacks
    0.0002 and 1.0 where None; ``PolicyLossConfig`` itself defaults ``ppo_kl_coef`` to 0.1).
    Metric: ``actor/ppo_kl`` (mean ``|δ|``), a float."""
    op = "verl kl_cov"
    aggregation, normalizer = _prepare(op, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                       rollout_is_weights)  # fmt: skip
    loss, metrics = kl_cov_loss(
        log_prob, old_log_prob, advantages, response_mask, is_weights=rollout_is_weights, aggregation=aggregation,
        count_empty_seqs=False, normalizer=normalizer, backend=backend,
        **_policy_loss_options(op, config, _KL_COV_DEFAULTS),
    )
    return loss, _floats({"actor/ppo_kl": metrics["ppo_kl"]})
