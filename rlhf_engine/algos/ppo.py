"""PPO with a critic (InstructGPT; Ouyang et al. 2022, Schulman et al. 2017).

The reward is per token, ``r_t = −β·(lp_t − ref_t) + [t = last]·score`` (KL in the
reward, β fixed or adaptive), advantages by GAE with the critic's values (whitened), the
clipped surrogate on several epochs of minibatches, and a clipped value loss. Runs on
``RLTrainer`` (``algos/rl.py``); this module holds the preset.
"""

from __future__ import annotations

from rlhf_engine.algos.rl import RLConfig

PPO_DEFAULTS = dict(
    advantage="gae", group_size=1, kl_in_reward=True, kl_coef=0.05, epochs=2, aggregation="token-mean",
    gamma=1.0, lam=0.95, value_clip=0.2,
)  # fmt: skip


def ppo_config(**overrides) -> RLConfig:
    """``RLConfig`` for PPO: ``PPO_DEFAULTS`` with ``overrides`` applied."""
    return RLConfig(**{**PPO_DEFAULTS, **overrides})
