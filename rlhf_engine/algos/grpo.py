"""GRPO (DeepSeekMath; Shao et al. 2024) and the loss variants built on it.

``group_size`` responses per prompt; each response's advantage is its score relative to
its group (``ops.group_advantages``); the KL to the reference (k3) is in the loss, not the
reward. Variants (``GRPO_VARIANTS``), each a set of ``RLConfig`` fields:

* ``grpo``: ``(s − μ_g)/(σ_g + ε)``, PPO clip, per-sequence token mean (TRL ``grpo``).
* ``dr_grpo`` (Liu et al. 2025): ``s − μ_g``, token sum over ``B·max_new_tokens``.
* ``dapo`` (Yu et al. 2025): clip-higher 0.2 / 0.28, token mean over the batch, no KL
  (DAPO's dynamic sampling and overlong shaping are not part of this preset).
* ``gspo`` (Zheng et al. 2025): the sequence-level ratio, clip 3e-4 / 4e-4.
* ``cispo`` (MiniMax 2025): ``−sg(clip(r))·A·lp`` (verl's bounds), token mean.
"""

from __future__ import annotations

from rlhf_engine.algos.rl import RLConfig

GRPO_VARIANTS = {
    "grpo": dict(advantage="grpo", loss="ppo", aggregation="seq-mean-token-mean"),
    "dr_grpo": dict(advantage="dr_grpo", loss="ppo", aggregation="seq-mean-token-sum-norm"),
    "dapo": dict(advantage="grpo", loss="ppo", clip_low=0.2, clip_high=0.28, aggregation="token-mean", kl_coef=0.0),
    "gspo": dict(advantage="grpo", loss="gspo", clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean"),
    "cispo": dict(advantage="grpo", loss="cispo", clip_low=0.2, clip_high=0.28, aggregation="token-mean"),
}

GRPO_DEFAULTS = dict(group_size=8, kl_in_reward=False, kl_coef=0.04, kl_estimator="k3")


def grpo_preset(variant: str = "grpo") -> dict:
    """The ``RLConfig`` fields of a GRPO ``variant`` (a key of ``GRPO_VARIANTS``)."""
    if not isinstance(variant, str) or variant not in GRPO_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(GRPO_VARIANTS)}, got {variant!r}")
    return {**GRPO_DEFAULTS, **GRPO_VARIANTS[variant]}


def grpo_config(variant: str = "grpo", **overrides) -> RLConfig:
    """``RLConfig`` for a GRPO ``variant`` (``grpo_preset``), then ``overrides``."""
    return RLConfig(**{**grpo_preset(variant), **overrides})
