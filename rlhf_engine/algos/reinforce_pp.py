"""REINFORCE++ (Hu 2025): critic-free, with batch-whitened returns.

Token rewards ``r_t = −β·(lp_t − ref_t) + [t = last]·score``, discounted returns
``G_t = r_t + γ·G_{t+1}``, whitened over every valid token of the batch, then the PPO clip.
``baseline=True`` gives REINFORCE++-baseline: ``s_i − μ_g`` per group, whitened (KL in the
loss). Runs on ``RLTrainer``.
"""

from __future__ import annotations

from rlhf_engine.algos.rl import RLConfig

REINFORCE_PP_DEFAULTS = dict(advantage="reinforce_pp", group_size=1, kl_in_reward=True, kl_coef=0.05, aggregation="token-mean")
REINFORCE_PP_BASELINE_DEFAULTS = dict(
    advantage="reinforce_pp_baseline", group_size=4, kl_in_reward=False, kl_coef=0.05, kl_estimator="k3",
    aggregation="token-mean",
)  # fmt: skip


def reinforce_pp_config(baseline: bool = False, **overrides) -> RLConfig:
    """``RLConfig`` for REINFORCE++ (or REINFORCE++-baseline), then ``overrides``."""
    defaults = REINFORCE_PP_BASELINE_DEFAULTS if baseline else REINFORCE_PP_DEFAULTS
    return RLConfig(**{**defaults, **overrides})
