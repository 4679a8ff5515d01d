"""GPU checks of the memory plan (marked gpu; run by benchmarks/gpu_check.sh on a GPU machine).

Real-size shapes with random weights (configs written here, nothing downloaded), PPO with all
four roles on one GPU, planned with ``rlhf_engine.memory.plan`` and run by ``RLTrainer``:

* a Qwen2.5-0.5B-shaped run: each phase's measured ``max_memory_allocated`` within 10% of the
  plan's prediction (the plan is a contract);
* the headline: Qwen2.5-1.5B shapes, full fine-tuning in bf16, planned onto one 80 GB GPU,
  runs 3 steps without running out of memory; and Qwen2.5-7B shapes with LoRA on the policy
  and the critic (needs peft).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from rlhf_engine.algos.rl import RLConfig, RLTrainer  # noqa: E402
from rlhf_engine.benchmarks.bench_planner import Cell, cell_specs, hf_config  # noqa: E402
from rlhf_engine.memory.estimate import Workload  # noqa: E402
from rlhf_engine.memory.plan import GPU_MEMORY, plan  # noqa: E402
from rlhf_engine.models import PolicyModel, ScalarHeadModel  # noqa: E402

PAD, EOS = 0, 1


def run_ppo(model: str, *, lora: bool, budget: int, steps: int, prompt_length=256, response_length=256):
    from transformers import AutoModel, AutoModelForCausalLM

    cell = Cell(model, "bf16", False, lora)
    rank = 64 if lora else 0
    config = RLConfig(steps=steps, prompts_per_step=16, group_size=4, max_new_tokens=response_length, minibatch_size=32,
                      advantage="gae", kl_in_reward=True, dtype="bf16", lora_rank=rank, critic_lora_rank=rank)  # fmt: skip
    work = Workload(prompts_per_step=16, group_size=4, prompt_length=prompt_length, response_length=response_length,
                    minibatch_size=32)  # fmt: skip
    chosen = plan(cell_specs(cell), work, budget)
    assert chosen.fits, chosen.to_dict()
    micro = chosen.micro_batches
    config = RLConfig(**{**config.__dict__, "generate_micro_batch_size": micro["generate"], "score_micro_batch_size": micro["score"],
                         "micro_batch_size": min(micro["update_policy"], micro["update_critic"]),
                         "policy_gradient_checkpointing": chosen.checkpointing.get("policy", False),
                         "critic_gradient_checkpointing": chosen.checkpointing.get("critic", False)})  # fmt: skip
    hf = hf_config(model)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            policy = PolicyModel(AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa"))
            reference = None if lora else PolicyModel(AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa"))
            critic = ScalarHeadModel(AutoModel.from_config(hf, attn_implementation="sdpa"))
            reward_model = ScalarHeadModel(AutoModel.from_config(hf, attn_implementation="sdpa"))
        finally:
            torch.set_default_dtype(torch.float32)
    generator = torch.Generator().manual_seed(0)

    def prompts(n, gen):
        return [torch.randint(2, 1000, (prompt_length,), generator=generator).tolist() for _ in range(n)]

    trainer = RLTrainer(config, policy=policy, reference=reference, prompts=prompts, pad_token_id=PAD, eos_token_id=EOS,
                        reward_model=reward_model, critic=critic, placement=chosen)  # fmt: skip
    return chosen, [trainer.step(step) for step in range(steps)]


def test_measured_peak_of_every_phase_within_10_percent_of_the_plan_for_a_05b_ppo_run():
    chosen, history = run_ppo("qwen2.5-0.5b", lora=False, budget=torch.cuda.get_device_properties(0).total_memory, steps=2)
    last = history[-1]
    for phase in chosen.phases:
        measured, predicted = last[f"peak_gib/{phase}"], last[f"predicted_gib/{phase}"]
        assert abs(measured / predicted - 1) <= 0.10, (phase, measured, predicted)


def test_headline_15b_full_bf16_ppo_planned_onto_80gb_runs_3_steps():
    _, history = run_ppo("qwen2.5-1.5b", lora=False, budget=GPU_MEMORY["h100-80gb"], steps=3)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)


def test_headline_7b_lora_ppo_planned_onto_80gb_runs_3_steps():
    pytest.importorskip("peft", reason="LoRA needs peft (the lora extra)")
    _, history = run_ppo("qwen2.5-7b", lora=True, budget=GPU_MEMORY["h100-80gb"], steps=3)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)
