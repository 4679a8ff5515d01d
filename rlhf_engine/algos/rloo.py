"""RLOO (Ahmadian et al. 2024, "Back to Basics"): REINFORCE with a leave-one-out baseline.

Each of a prompt's ``G`` samples is baselined by the mean score of the other ``G − 1``:
``A_i = s_i − mean_{j≠i} s_j``. As in TRL's RLOO, the KL is in the reward, summed over the
sequence: ``s_i ← s_i − β·Σ_t (lp_t − ref_t)``. Runs on ``RLTrainer``.
"""

from __future__ import annotations

from rlhf_engine.algos.rl import RLConfig

RLOO_DEFAULTS = dict(advantage="rloo", group_size=4, kl_in_reward=True, kl_coef=0.05, aggregation="token-mean")


def rloo_config(**overrides) -> RLConfig:
    """``RLConfig`` for RLOO: ``RLOO_DEFAULTS`` with ``overrides`` applied."""
    return RLConfig(**{**RLOO_DEFAULTS, **overrides})
