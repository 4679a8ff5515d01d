"""From an RL run's config to what the planner reads: its roles and its workload.

The roles of each algorithm (``rlhf_engine.train``): every RL algorithm has
the policy and its frozen reference; PPO adds the critic (initialised from the reward
model, so of its shape) and the reward model; the others have a reward model only when
one is given (else a reward function scores on the host). With LoRA on the policy the
reference is the policy with its adapter disabled.
"""

from __future__ import annotations

from typing import Any

from rlhf_engine.memory.estimate import RoleSpec, Workload
from rlhf_engine.memory.plan import PlanOptions
from rlhf_engine.memory.shapes import ModelShape
from rlhf_engine.ops._lm_head_loss_grad import SEQUENCE_LEVEL_LOSSES

RL_ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp")


def role_specs(algo: str, config, policy_config: Any, reward_config: Any | None = None, *,
               reward_scores: bool = True) -> dict[str, RoleSpec]:  # fmt: skip
    """The roles of ``algo`` under the RL config ``config`` (an ``RLConfig``).

    ``reward_scores``: whether the reward model scores the rollout (a ``reward_model`` role);
    False for PPO scored by reward functions, where it only initialises the critic.

    ``policy_config`` / ``reward_config``: Hugging Face configs (``PretrainedConfig``, a
    ``config.json`` mapping, or a path). Fields read from ``config``: ``dtype`` (trained
    roles), ``frozen_dtype`` (reference, reward model; None: ``dtype``), ``lora_rank``
    (policy), ``critic_lora_rank``, ``policy_gradient_checkpointing``,
    ``critic_gradient_checkpointing``.
    """
    if algo not in RL_ALGOS:
        raise ValueError(f"--algo {algo!r}: the memory planner covers the RL algorithms {RL_ALGOS}")
    if algo == "ppo" and reward_config is None:
        raise ValueError("--algo ppo needs --reward-model (PPO trains a critic initialised from it)")
    policy_shape = ModelShape.from_config(policy_config, source=_source(policy_config, "--model"))
    frozen = config.frozen_dtype or config.dtype
    specs = {
        "policy": RoleSpec(policy_config, policy_shape, "lm", config.dtype, True, lora_rank=config.lora_rank,
                           checkpointing=config.policy_gradient_checkpointing),
        "reference": RoleSpec(policy_config, policy_shape, "lm", frozen, False, is_adapter_view=config.lora_rank > 0),
    }  # fmt: skip
    if reward_config is not None:
        reward_shape = ModelShape.from_config(reward_config, source=_source(reward_config, "--reward-model"))
        if reward_scores:
            specs["reward_model"] = RoleSpec(reward_config, reward_shape, "scalar", frozen, False)
        if algo == "ppo":
            specs["critic"] = RoleSpec(reward_config, reward_shape, "scalar", config.dtype, True,
                                       lora_rank=config.critic_lora_rank, checkpointing=config.critic_gradient_checkpointing)  # fmt: skip
    return specs


def workload(config, prompt_length: int) -> Workload:
    """The step's sizes from an ``RLConfig``: ``prompts_per_step · group_size`` sequences of
    ``prompt_length + max_new_tokens`` tokens, minibatches of ``minibatch_size``, the
    micro-batches the config fixes (None: the planner chooses), whether score runs the
    policy's pass (``config.old_logprob_pass``: not for an on-policy update), and the fused
    lm_head's path (one pass for every loss but GSPO) and chunk."""
    return Workload(
        prompts_per_step=config.prompts_per_step, group_size=config.group_size, prompt_length=prompt_length,
        response_length=config.max_new_tokens, minibatch_size=config.minibatch_size,
        generate_micro_batch=config.generate_micro_batch_size, score_micro_batch=config.score_micro_batch_size,
        update_micro_batch=config.micro_batch_size, score_policy_pass=config.old_logprob_pass,
        lm_head_one_pass=config.loss not in SEQUENCE_LEVEL_LOSSES, lm_head_chunk_rows=config.lm_head_chunk_size,
    )  # fmt: skip


def plan_options(config, *, offload: bool) -> PlanOptions:
    """``offload=True`` (``--plan auto``): the planner may offload, checkpoint and choose the
    micro-batches the config leaves unset. ``offload=False`` (``--plan off``, ``--no-offload``):
    exactly the configuration given (everything resident; the config's checkpointing; its
    micro-batches, None meaning the whole batch)."""
    fixed = {
        "generate": config.generate_micro_batch_size, "score": config.score_micro_batch_size,
        "update_policy": config.micro_batch_size, "update_critic": config.micro_batch_size,
    }  # fmt: skip
    if offload:
        return PlanOptions(offload=True, checkpointing=True, micro_batches={p: m for p, m in fixed.items() if m is not None})
    whole = {p: m if m is not None else 1 << 30 for p, m in fixed.items()}
    return PlanOptions(offload=False, checkpointing=False, micro_batches=whole)


def check_gpus(config, gpus: int | str) -> None:
    """ValueError when ``config`` cannot be planned over several GPUs (``gpus`` > 1 or
    ``"auto"``): under torchrun each rank samples its share of the rollout in one batch, so
    ``generate_micro_batch_size`` must be unset (the trainer refuses it too)."""
    if gpus != 1 and config.generate_micro_batch_size is not None:
        raise ValueError(
            f"--gpus {gpus}: RLConfig.generate_micro_batch_size = {config.generate_micro_batch_size}, but under torchrun "
            "each rank samples its share of the rollout in one batch (set it to null)"
        )


def _source(config: Any, flag: str) -> str:
    return str(config) if isinstance(config, str) or hasattr(config, "__fspath__") else flag
