"""Training algorithms, each a small module that composes ops.

* ``sft``: supervised fine-tuning. ``reward_model``: Bradley-Terry / K-wise reward models.
* ``rl``: ``RLTrainer``, one on-policy trainer with explicit phases (generate, score,
  update_policy, update_critic) whose presets are ``ppo``, ``grpo`` (and its variants),
  ``rloo`` and ``reinforce_pp``.
* ``dpo``: DPO / cDPO / IPO / hinge (+ NLL). ``rejection_sampling``: best-of-N fine-tuning.
* ``preference_losses``, ``eval_metrics``, ``kl_control``: the math they share.
* ``loop.run_steps``: steps, logging, atomic checkpoints and resume for every trainer.
"""

from rlhf_engine.algos.dpo import DPOConfig, DPOTrainer
from rlhf_engine.algos.grpo import GRPO_VARIANTS, grpo_config
from rlhf_engine.algos.kl_control import KLController
from rlhf_engine.algos.loop import run_steps
from rlhf_engine.algos.ppo import ppo_config
from rlhf_engine.algos.reinforce_pp import reinforce_pp_config
from rlhf_engine.algos.rejection_sampling import RejectionSamplingConfig, RejectionSamplingTrainer, best_of_n
from rlhf_engine.algos.reward_model import RewardModelConfig, RewardModelTrainer, evaluate_reward_model
from rlhf_engine.algos.rl import RLConfig, RLTrainer
from rlhf_engine.algos.rloo import rloo_config
from rlhf_engine.algos.sft import SFTConfig, SFTTrainer

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "GRPO_VARIANTS",
    "KLController",
    "RLConfig",
    "RLTrainer",
    "RejectionSamplingConfig",
    "RejectionSamplingTrainer",
    "RewardModelConfig",
    "RewardModelTrainer",
    "SFTConfig",
    "SFTTrainer",
    "best_of_n",
    "evaluate_reward_model",
    "grpo_config",
    "ppo_config",
    "reinforce_pp_config",
    "rloo_config",
    "run_steps",
]
