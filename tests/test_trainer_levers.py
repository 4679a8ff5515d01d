"""The RL trainer's memory levers on the CPU with the tiny model, a couple of steps each.

* ``RLConfig.dtype="bf16"``: bf16 trained roles stepped by ``MasterWeightAdamW`` (fp32 grads
  at the clip), frozen roles in ``frozen_dtype`` (default ``dtype``).
* ``lora_rank``: the reference is the adapter-disabled policy; only adapters train, and the
  reference still computes the base model's logprobs after the steps.
* gradient checkpointing: on in the transformers, and the same step as without it.
* ``placement=``: a plan that offloads (or swaps the reference) executed CPU->CPU gives
  bitwise the same run as no plan.
* ``train.plan_run``: the refusal before anything is loaded, the plan's micro-batches and
  checkpointing in the returned config, and the CPU cases.
"""

import copy
import dataclasses
import json
import math

import pytest
import torch

from rlhf_engine import train
from rlhf_engine.algos.grpo import grpo_config
from rlhf_engine.algos.ppo import ppo_config
from rlhf_engine.algos.precision import MasterWeightAdamW
from rlhf_engine.algos.rl import RLTrainer
from rlhf_engine.memory.estimate import estimate, weights_bytes
from rlhf_engine.memory.plan import ALLOCATOR_RESERVE_FRACTION, CUDA_CONTEXT_BYTES, PlanOptions, parse_memory, plan, usable_bytes
from rlhf_engine.memory.run_specs import plan_options, role_specs, workload
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.models.lora import AdapterDisabledPolicy
from rlhf_engine.models.tokenizers import ByteTokenizer

VOCAB, PAD, BOS, EOS, TARGET = 12, 0, 1, 2, 7
PROMPT_LENGTH = 3
# 8 prompts x 1 sample (PPO) of up to 4 tokens, 2 minibatches of 4 per epoch.
PPO = dict(prompts_per_step=8, max_new_tokens=4, minibatch_size=4, lr=5e-3, critic_lr=5e-3)
GRPO = dict(prompts_per_step=2, group_size=4, max_new_tokens=4, minibatch_size=4, lr=5e-3)
# Metrics that are wall-clock or report the executor's traffic, not the run's numbers.
NOT_COMPARED = ("tokens_per_s", "moved_gib")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_config():
    return llama_config("tiny", VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def prompts(n: int, generator: torch.Generator) -> list[list[int]]:
    return torch.randint(3, VOCAB, (n, PROMPT_LENGTH), generator=generator).tolist()


def target_fraction(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    return torch.tensor([sum(t == TARGET for t in r) / len(r) for r in responses], dtype=torch.float32)


def scalar_model(policy: PolicyModel, seed: int) -> ScalarHeadModel:
    """A scalar-head model on the policy's backbone with a random head (a zero head scores 0)."""
    model = ScalarHeadModel.from_policy(policy)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def ppo_trainer(config, seed: int = 0, placement=None) -> RLTrainer:
    """Policy, its reference copy, a critic and a reward model, all from ``seed`` alone."""
    policy = PolicyModel.from_config(model_config(), seed=seed)
    return RLTrainer(
        config, policy=policy, reference=copy.deepcopy(policy), prompts=prompts, pad_token_id=PAD, eos_token_id=EOS,
        reward_model=scalar_model(policy, seed + 1), critic=scalar_model(policy, seed + 2), placement=placement,
    )  # fmt: skip


def grpo_trainer(config, policy: PolicyModel, reference) -> RLTrainer:
    return RLTrainer(config, policy=policy, reference=reference, prompts=prompts, pad_token_id=PAD, eos_token_id=EOS,
                     reward_fn=target_fraction)  # fmt: skip


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def token_batch(seed: int, batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids, dtype=torch.bool)


# -- bf16 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("frozen_dtype", [None, "fp32"])
def test_bf16_trains_with_master_weights_and_frozen_roles_in_their_dtype(frozen_dtype, monkeypatch):
    trainer = ppo_trainer(ppo_config(**PPO, dtype="bf16", frozen_dtype=frozen_dtype))
    frozen = torch.float32 if frozen_dtype == "fp32" else torch.bfloat16
    for role, model in trainer.roles.items():
        expected = torch.bfloat16 if role in ("policy", "critic") else frozen
        assert {p.dtype for p in model.parameters()} == {expected}, role
    assert set(trainer.optimizers) == {"policy", "critic"}
    assert all(isinstance(opt, MasterWeightAdamW) for opt in trainer.optimizers.values())
    clipped_dtypes = set()
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, *args, **kwargs):
        params = list(params)
        clipped_dtypes.update(p.grad.dtype for p in params)
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    before = {role: snapshot(m) for role, m in trainer.roles.items()}
    metrics = trainer.step(0)
    assert clipped_dtypes == {torch.float32}
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert math.isfinite(metrics["value_loss"])
    for role, model in trainer.roles.items():
        after = model.state_dict()
        changed = any(not torch.equal(before[role][n], after[n]) for n in after)
        assert changed == (role in ("policy", "critic")), role
        assert all(t.dtype == before[role][n].dtype for n, t in after.items()), role  # the step keeps the dtypes


# -- LoRA --------------------------------------------------------------------------------------
def test_lora_reference_is_the_adapter_disabled_policy_and_only_adapters_train():
    config = grpo_config(**GRPO, lora_rank=4)
    policy = PolicyModel.from_config(model_config(), seed=0)
    base = copy.deepcopy(policy)
    trainer = grpo_trainer(config, policy, None)
    assert isinstance(trainer.reference, AdapterDisabledPolicy)
    trained = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    stepped = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for n, p in trainer.policy.named_parameters() if n in trained}
    before = snapshot(trainer.policy)
    for step in range(2):
        assert math.isfinite(trainer.step(step)["grad_norm"])
    after = trainer.policy.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in after if "lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in after if "lora_" in n)
    ids, mask = token_batch(1)
    with torch.no_grad():
        reference = trainer.reference.response_logprobs(ids, mask, PROMPT_LENGTH)
        expected = base.response_logprobs(ids, mask, PROMPT_LENGTH)
        adapted = trainer.policy.response_logprobs(ids, mask, PROMPT_LENGTH)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    assert (adapted - expected).abs().max() > 1e-4  # the adapters did move the policy


def test_lora_and_the_reference_argument_must_agree():
    policy = PolicyModel.from_config(model_config(), seed=0)
    with pytest.raises(ValueError, match="None with lora_rank > 0"):
        grpo_trainer(grpo_config(**GRPO, lora_rank=4), policy, copy.deepcopy(policy))
    with pytest.raises(ValueError, match="pass a reference for full fine-tuning"):
        grpo_trainer(grpo_config(**GRPO), policy, None)


# -- gradient checkpointing ----------------------------------------------------------------------
def test_gradient_checkpointing_is_on_and_gives_the_same_step():
    plain = ppo_trainer(ppo_config(**PPO))
    checkpointed = ppo_trainer(ppo_config(**PPO, policy_gradient_checkpointing=True, critic_gradient_checkpointing=True))
    # transformers' flag (is_activation_checkpointing, the newer name of is_gradient_checkpointing)
    assert checkpointed.policy.lm.is_activation_checkpointing and checkpointed.critic.backbone.is_activation_checkpointing
    assert not plain.policy.lm.is_activation_checkpointing and not plain.critic.backbone.is_activation_checkpointing
    before = snapshot(plain.policy)
    a, b = plain.step(0), checkpointed.step(0)
    for key in ("policy_loss", "grad_norm", "value_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for role in ("policy", "critic"):
        mine, theirs = plain.roles[role].state_dict(), checkpointed.roles[role].state_dict()
        for name in mine:
            torch.testing.assert_close(theirs[name], mine[name], rtol=1e-5, atol=1e-6, msg=f"{role} {name}")
    assert any(not torch.equal(before[n], t) for n, t in plain.policy.state_dict().items())


def test_lm_head_chunk_size_reaches_the_loss_and_gives_the_same_step(monkeypatch):
    from rlhf_engine import ops

    seen, original = [], ops.fused_linear_policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "fused_linear_policy_loss", spy)
    plain, chunked = ppo_trainer(ppo_config(**PPO)), ppo_trainer(ppo_config(**PPO, lm_head_chunk_size=3))
    a, b = plain.step(0), chunked.step(0)
    assert set(seen) == {None, 3}
    for key in ("policy_loss", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    with pytest.raises(ValueError, match="lm_head_chunk_size must be >= 1 or null"):
        ppo_config(**PPO, lm_head_chunk_size=0)


# -- placement -----------------------------------------------------------------------------------
def budget_for(usable: int) -> int:
    """The smallest budget whose usable bytes are at least ``usable``."""
    budget = CUDA_CONTEXT_BYTES + math.ceil(usable * (1 + ALLOCATOR_RESERVE_FRACTION))
    while usable_bytes(budget) < usable:
        budget += 1
    return budget


def tiny_ppo_plan(case: str):
    """A fitting plan of the tiny PPO run that moves bytes: ``"offload"`` (the budget a little
    under the all-resident peak) or ``"swap"`` (the score phase at full micro-batches fits only
    without a second copy of the policy's weights for the reference)."""
    config = ppo_config(**PPO)
    specs, work = role_specs("ppo", config, model_config(), model_config()), workload(config, PROMPT_LENGTH)
    if case == "offload":
        chosen = plan(specs, work, budget_for(int(max(e.peak_bytes for e in estimate(specs, work).values()) * 0.95)))
    else:
        rows = config.prompts_per_step * config.group_size
        full = dataclasses.replace(work, generate_micro_batch=rows, score_micro_batch=rows)
        usable = estimate(specs, full)["score"].peak_bytes - weights_bytes(specs["reference"]) // 2
        chosen = plan(specs, work, budget_for(usable), PlanOptions(micro_batches={"generate": rows, "score": rows}))
    assert chosen.fits and chosen.bytes_moved_per_step > 0
    assert ("swap" in chosen.residency["reference"].values()) == (case == "swap")
    micro = chosen.micro_batches
    config = dataclasses.replace(config, generate_micro_batch_size=micro["generate"], score_micro_batch_size=micro["score"],
                                 micro_batch_size=micro["update_policy"])  # fmt: skip
    return config, chosen


@pytest.mark.parametrize("case", ["offload", "swap"])
def test_a_placement_plan_run_on_the_cpu_equals_the_run_without_one(case):
    config, chosen = tiny_ppo_plan(case)
    plain, placed = ppo_trainer(config), ppo_trainer(config, placement=chosen)
    assert placed.placement.executor is not None and plain.placement.executor is None
    for step in range(2):
        a, b = plain.step(step), placed.step(step)
        assert b["moved_gib"] > 0
        assert {k: v for k, v in a.items() if k not in NOT_COMPARED} == {k: v for k, v in b.items() if k not in NOT_COMPARED}
    for role, model in plain.roles.items():
        mine, theirs = model.state_dict(), placed.roles[role].state_dict()
        assert all(torch.equal(mine[n], theirs[n]) for n in mine), role


# -- train.plan_run ------------------------------------------------------------------------------
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)  # fmt: skip
CUDA = torch.device("cuda")
RECORDS = [{"prompt": [BOS, 5, 6], "answer": None}, {"prompt": [BOS] + [4] * 40, "answer": None}]


@pytest.fixture
def nothing_loaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for owner, name in ((train, "load_policy"), (PolicyModel, "from_pretrained"), (PolicyModel, "from_config"),
                        (ScalarHeadModel, "load")):  # fmt: skip
        monkeypatch.setattr(owner, name, refuse)


def test_plan_run_auto_refuses_a_run_that_cannot_fit_before_loading_anything(tmp_path, nothing_loaded):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    # 7B full fine-tuning in fp32 on 40 GB (short responses keep the suggestions' search quick).
    config = dataclasses.replace(train.load_config("grpo", None), max_new_tokens=4)
    with pytest.raises(ValueError) as error:
        train.plan_run("grpo", config, str(tmp_path), None, RECORDS, None, CUDA, "auto", gpu_memory="40GB")
    message = str(error.value)
    assert "does not fit" in message and "nothing was loaded" in message
    for phase in ("generate", "score", "update_policy"):
        assert f"\n{phase}: peak " in message
    assert "role" in message and "residency" in message and "optimizer" in message
    assert "would fit with any one of:" in message and "LoRA rank" in message


def test_plan_run_auto_puts_the_plans_micro_batches_and_checkpointing_into_the_config(tmp_path, nothing_loaded):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps(QWEN25_7B))
    config = dataclasses.replace(train.load_config("ppo", None), dtype="bf16", lora_rank=16, critic_lora_rank=16,
                                 prompts_per_step=64, minibatch_size=32, max_new_tokens=1024)  # fmt: skip
    new, chosen = train.plan_run("ppo", config, str(rm), None, RECORDS, str(rm), CUDA, "auto", gpu_memory="50GiB")
    assert chosen.fits and chosen.budget_bytes == parse_memory("50GiB")
    # The plan of the same run made here, from the longest prompt.
    expected = plan(role_specs("ppo", config, QWEN25_7B, QWEN25_7B), workload(config, max(len(r["prompt"]) for r in RECORDS)),
                    parse_memory("50GiB"), plan_options(config, offload=True))  # fmt: skip
    assert chosen.micro_batches == expected.micro_batches and chosen.residency == expected.residency
    micro = chosen.micro_batches
    # The budget makes the planner micro-batch every phase and checkpoint both trained roles.
    assert micro["generate"] < 64 and micro["score"] < 64 and micro["update_policy"] < 32 and micro["update_critic"] < 32
    assert chosen.checkpointing == {"policy": True, "critic": True}
    assert new.generate_micro_batch_size == micro["generate"] and new.score_micro_batch_size == micro["score"]
    assert new.micro_batch_size == min(micro["update_policy"], micro["update_critic"])
    assert new.policy_gradient_checkpointing == chosen.checkpointing["policy"]
    assert new.critic_gradient_checkpointing == chosen.checkpointing["critic"]
    assert new.lm_head_chunk_size == chosen.phases["update_policy"].lm_head_chunk_rows
    unchanged = ("generate_micro_batch_size", "score_micro_batch_size", "micro_batch_size", "lm_head_chunk_size",
                 "policy_gradient_checkpointing", "critic_gradient_checkpointing")  # fmt: skip
    assert dataclasses.replace(new, **{f: getattr(config, f) for f in unchanged}) == config


def test_plan_run_tiny_model_by_name_needs_no_model_files(nothing_loaded):
    config = grpo_config(**GRPO)
    new, chosen = train.plan_run("grpo", config, "tiny", ByteTokenizer(), RECORDS, None, CUDA, "auto", gpu_memory="80GiB")
    assert chosen.fits and chosen.bytes_moved_per_step == 0
    assert new.generate_micro_batch_size == config.prompts_per_step * config.group_size


def test_plan_run_on_the_cpu():
    config = grpo_config(**GRPO)
    with pytest.raises(ValueError, match="--plan off"):
        train.plan_run("grpo", config, "tiny", ByteTokenizer(), RECORDS, None, torch.device("cpu"), "auto")
    assert train.plan_run("grpo", config, "tiny", ByteTokenizer(), RECORDS, None, torch.device("cpu"), "off") == (config, None)
    with pytest.raises(ValueError, match="--plan must be 'auto' or 'off'"):
        train.plan_run("grpo", config, "tiny", ByteTokenizer(), RECORDS, None, torch.device("cpu"), "on")


def test_run_train_on_cuda_refuses_before_loading_the_policy(tmp_path, monkeypatch, nothing_loaded):
    # No CUDA here: the device check is bypassed so that run_train's order (plan, then load) is what is tested.
    monkeypatch.setattr(train, "check_device", lambda device: CUDA)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": ""}) + "\n" for p in ("ab", "cba")))
    (tmp_path / "run.yaml").write_text("prompts_per_step: 2\ngroup_size: 4\nmax_new_tokens: 2\nminibatch_size: 8\n")
    budget = str(CUDA_CONTEXT_BYTES + (64 << 10))  # bytes: 64 KiB above the context, less than the tiny policy's weights
    with pytest.raises(ValueError, match=r"(?s)--plan auto: the run does not fit.*\ngenerate: peak .*does NOT fit"):
        train.run_train("grpo", "tiny", data, tmp_path / "out", config_path=tmp_path / "run.yaml", device="cuda",
                        gpu_memory=budget, quiet=True)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_models_of_an_offloading_plan_start_where_its_first_phase_puts_them():
    # train.run_train builds every model on the CPU when the plan offloads; only the roles the plan
    # has on the device in `generate` go there (meta stands in for the GPU: nothing is computed).
    from types import SimpleNamespace

    from rlhf_engine.train_plan import place_for_first_phase

    models = {role: torch.nn.Linear(2, 2) for role in ("policy", "reference", "critic", "reward_model")}
    residency = {"policy": {"generate": "device"}, "reference": {"generate": "swap"}, "critic": {"generate": "device"},
                 "reward_model": {"generate": "offload"}}  # fmt: skip
    place_for_first_phase(SimpleNamespace(residency=residency), torch.device("meta"), **models, reward_fn=None)
    assert {role: m.weight.device.type for role, m in models.items()} == {
        "policy": "meta", "reference": "cpu", "critic": "meta", "reward_model": "cpu"}
