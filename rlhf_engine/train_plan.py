"""``rlhf-engine train``'s memory plan: made from the configs, the data and the GPU's size before
any model is loaded, it fills the run's micro-batches and checkpointing in (``--plan auto``) or
only predicts (``--plan off``); see ``rlhf_engine.memory`` for the planner itself."""

from __future__ import annotations

import dataclasses

import torch

from rlhf_engine.memory.run_specs import RL_ALGOS
from rlhf_engine.models import llama_config
from rlhf_engine.models.configs import MODEL_SIZES


def place_for_first_phase(placement, device: torch.device, **roles) -> None:
    """Models built on the CPU go to ``device`` when the plan has them there in ``generate``;
    the others stay on the CPU, where the executor takes them as offloaded. (Building every
    model on the GPU first could need more memory than the plan allows.)"""
    for role, model in roles.items():
        if isinstance(model, torch.nn.Module) and placement.residency.get(role, {}).get("generate") == "device":
            model.to(device)


def plan_run(algo: str, config, model: str, tokenizer, records: list, reward_model_path: str | None, device: torch.device,
             mode: str, gpu_memory: str | None = None, world_size: int = 1, reward_scores: bool = True):  # fmt: skip
    """The memory plan of an RL run on ``device``, made before any model is loaded, and the
    config with the plan's micro-batches and checkpointing in it; with ``world_size`` > 1
    (torchrun), rank 0's plan under FSDP2 (every role resident, each rank sampling its share
    at once) and the frozen roles replicated or sharded as it says (``frozen_sharding``).

    ``mode``: ``"auto"`` (the planner may offload, checkpoint and pick micro-batches; a run
    that cannot fit is refused with what would make it fit) or ``"off"`` (exactly the
    configuration given, everything resident: the plan only predicts). Returns
    ``(config, plan)``; ``(config, None)`` off CUDA or for algorithms the planner does not
    cover (SFT, reward model, DPO, rejection sampling) with ``mode="off"``. ``reward_scores``:
    False when reward functions score a PPO run (its reward model then starts the critic only,
    and the plan has no ``reward_model`` role).
    """
    from rlhf_engine.memory.plan import parse_memory, plan
    from rlhf_engine.memory.report import format_plan
    from rlhf_engine.memory.run_specs import plan_options, role_specs, workload

    if mode not in ("auto", "off"):
        raise ValueError(f"--plan must be 'auto' or 'off', got {mode!r}")
    if algo not in RL_ALGOS:
        if mode == "auto" and device.type == "cuda":
            raise ValueError(f"--plan auto covers the RL algorithms {RL_ALGOS}; use --plan off for --algo {algo}")
        return config, None
    if device.type != "cuda":
        if mode == "auto":
            raise ValueError(f"--plan auto plans GPU memory; --device {device} has none (use --plan off)")
        return config, None
    if model in MODEL_SIZES:
        policy_config = llama_config(model, tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    else:
        policy_config = model
    budget = parse_memory(gpu_memory) if gpu_memory else torch.cuda.get_device_properties(device).total_memory
    prompt_length = max(len(r["prompt"]) for r in records)
    specs = role_specs(algo, config, policy_config, reward_model_path, reward_scores=reward_scores)
    chosen = plan(specs, workload(config, prompt_length), budget, plan_options(config, offload=mode == "auto"),
                  gpus=world_size)  # fmt: skip
    if mode == "auto" and not chosen.fits:
        where = "this GPU" if world_size == 1 else f"{world_size} GPUs of this size"
        raise ValueError(f"--plan auto: the run does not fit {where}; nothing was loaded.\n" + format_plan(chosen))
    micro = chosen.micro_batches
    distributed = {}
    if world_size > 1:  # each rank samples its share in one batch; the frozen roles where the plan put them
        distributed = dict(frozen_sharding=chosen.frozen)
    config = dataclasses.replace(
        config, generate_micro_batch_size=None if world_size > 1 else micro["generate"], **distributed,
        score_micro_batch_size=micro["score"],
        micro_batch_size=min(m for p, m in micro.items() if p.startswith("update")),
        lm_head_chunk_size=chosen.phases["update_policy"].lm_head_chunk_rows or config.lm_head_chunk_size,
        policy_gradient_checkpointing=chosen.checkpointing.get("policy", config.policy_gradient_checkpointing),
        critic_gradient_checkpointing=chosen.checkpointing.get("critic", config.critic_gradient_checkpointing),
    )  # fmt: skip
    return config, chosen
