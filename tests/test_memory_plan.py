"""memory/shapes.py, estimate.py, plan.py: the planner's pure arithmetic against independent counts.

Parameter counts are checked against ``transformers`` models built on the meta device (no
memory, any size), LoRA counts against the trainable parameters peft injects, the KV-cache
size against a real ``DynamicCache``. The plan is checked by re-estimating its choices and by
re-planning with each suggestion applied. Budgets are a few MiB above the CUDA context so
that small configs exercise every choice quickly.
"""

import dataclasses
import functools
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from rlhf_engine.memory.estimate import KINDS, RoleSpec, Workload, estimate, optimizer_bytes, weights_bytes
from rlhf_engine.memory.executor import check_schedule
from rlhf_engine.memory.plan import (
    ALLOCATOR_RESERVE_FRACTION, CUDA_CONTEXT_BYTES, GIB, GPU_MEMORY, PlanOptions, gpu_budget, parse_memory, plan, usable_bytes,
)  # fmt: skip
from rlhf_engine.memory.shapes import ModelShape
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.models.lora import LoraSettings, apply_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MIB = 1 << 20

# -- configs -------------------------------------------------------------------------------
# Published real-size configs (the fields that matter), so the counts are checked at the sizes people plan.
REAL = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # head_dim 128 is not hidden / heads = 64: the explicit field must win.
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=100)
TINY_CASES = {
    # No num_key_value_heads at all: Llama's default is one kv head per head.
    "llama-mha-untied": {k: v for k, v in {**TINY, "model_type": "llama"}.items() if k != "num_key_value_heads"},
    "llama-gqa-tied": {**TINY, "model_type": "llama", "num_key_value_heads": 2, "tie_word_embeddings": True},
    "llama-head-dim": {**TINY, "model_type": "llama", "num_key_value_heads": 1, "head_dim": 24},
    "qwen2-gqa-untied": {**TINY, "model_type": "qwen2", "num_key_value_heads": 2, "tie_word_embeddings": False},
    "qwen2-mha-tied": {**TINY, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3-head-dim": {**TINY, "model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 32},
    "qwen3-tied": {**TINY, "model_type": "qwen3", "head_dim": 8, "tie_word_embeddings": True},
    "mistral-gqa": {**TINY, "model_type": "mistral", "num_key_value_heads": 2, "head_dim": 24},
}


def hf_config(fields: dict):
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def meta_parameters(config, auto=AutoModelForCausalLM) -> int:
    """Parameters of the transformers model of ``config`` (tied weights counted once), built without memory."""
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


# -- ModelShape ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*TINY_CASES, *REAL])
def test_parameters_equal_the_transformers_model_built_on_meta(name):
    config = hf_config({**TINY_CASES, **REAL}[name])
    shape = ModelShape.from_config(config)
    assert shape.parameters("lm") == meta_parameters(config, AutoModelForCausalLM)
    assert shape.backbone_parameters() == meta_parameters(config, AutoModel)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-gqa-untied", "qwen3-head-dim", "qwen2.5-0.5b"])
def test_scalar_head_parameters_equal_scalar_head_model(name):
    config = hf_config({**TINY_CASES, **REAL}[name])
    with torch.device("meta"):
        model = ScalarHeadModel(AutoModel.from_config(config))
    assert ModelShape.from_config(config).parameters("scalar") == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_attention_bias_counts_every_projection_bias(model_type):
    config = hf_config({**TINY, "model_type": model_type, "attention_bias": True})
    assert ModelShape.from_config(config).parameters("lm") == meta_parameters(config)


def test_mlp_bias_counts_the_mlp_biases():
    config = hf_config({**TINY, "model_type": "llama", "mlp_bias": True})
    assert ModelShape.from_config(config).parameters("lm") == meta_parameters(config)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_parameters_equal_the_adapters_apply_lora_injects(rank):
    config = llama_config("tiny", 32)
    shape = ModelShape.from_config(config)
    policy = apply_lora(PolicyModel.from_config(config, seed=0), LoraSettings(rank=rank), seed=0)
    # The default targets are every Linear of the blocks (the lm_head is frozen, not adapted).
    assert shape.lora_parameters(rank) == trainable(policy)
    critic = apply_lora(ScalarHeadModel.from_config(config, seed=0), LoraSettings(rank=rank), seed=0)
    spec = RoleSpec(config, shape, "scalar", "fp32", trained=True, lora_rank=rank)
    assert spec.trainable_parameters == trainable(critic)  # the adapters and the trainable head


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen3-head-dim", "mistral-gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_equal_a_filled_dynamic_cache(name, dtype):
    config = hf_config(TINY_CASES[name])
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    batch, length = 3, 5
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, config.vocab_size, (batch, length)), cache=cache, use_cache=True)
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    element = torch.empty((), dtype=dtype).element_size()
    assert ModelShape.from_config(config).kv_bytes_per_token(element) * batch * length == cached


def test_from_a_config_json_file_a_folder_and_a_nested_text_config(tmp_path):
    config = hf_config(REAL["qwen3-0.6b"])
    config.save_pretrained(tmp_path)
    expected = ModelShape.from_config(config)
    assert ModelShape.from_config(tmp_path) == expected
    assert ModelShape.from_config(str(tmp_path / "config.json")) == expected
    assert ModelShape.from_config(json.loads((tmp_path / "config.json").read_text())) == expected
    assert ModelShape.from_config({"model_type": "qwen3", "text_config": config.to_dict()}) == expected


@pytest.mark.parametrize("fields, match", [
    ({k: v for k, v in REAL["llama3-8b"].items() if k != "intermediate_size"}, "'intermediate_size'"),
    ({**REAL["llama3-8b"], "num_hidden_layers": 0}, "'num_hidden_layers' must be a positive int"),
    ({**REAL["llama3-8b"], "vocab_size": True}, "'vocab_size' must be a positive int"),
    ({**REAL["llama3-8b"], "model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({k: v for k, v in REAL["llama3-8b"].items() if k != "model_type"}, "model_type None is not supported"),
    ({**REAL["llama3-8b"], "num_attention_heads": 6, "num_key_value_heads": 4}, "6 is not a multiple of num_key_value_heads 4"),
    ({**REAL["llama3-8b"], "head_dim": -1}, "'head_dim' must be a positive int"),
])  # fmt: skip
def test_bad_config_fields_raise_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelShape.from_config(fields)


def test_bad_files_and_types_raise(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelShape.from_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelShape.from_config(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no config.json there"):
        ModelShape.from_config(tmp_path / "missing")
    with pytest.raises(TypeError, match="expected a PretrainedConfig, a mapping or a path"):
        ModelShape.from_config(42)
    with pytest.raises(ValueError, match="head must be 'lm' or 'scalar'"):
        ModelShape.from_config(REAL["llama3-8b"]).parameters("value")


# -- Workload / RoleSpec -------------------------------------------------------------------
SMALL = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, vocab_size=1000)  # fmt: skip
SHAPE = ModelShape.from_config(SMALL)
WORK = Workload(prompts_per_step=4, group_size=2, prompt_length=32, response_length=32, minibatch_size=4)


def role_specs(*, critic=False, lora=0, dtype="fp32"):
    specs = {"policy": RoleSpec(SMALL, SHAPE, "lm", dtype, True, lora_rank=lora),
             "reference": RoleSpec(SMALL, SHAPE, "lm", dtype, False, is_adapter_view=bool(lora))}  # fmt: skip
    if critic:
        specs["critic"] = RoleSpec(SMALL, SHAPE, "scalar", dtype, True, lora_rank=lora)
        specs["reward_model"] = RoleSpec(SMALL, SHAPE, "scalar", dtype, False)
    return specs


@pytest.mark.parametrize("field", ["prompts_per_step", "group_size", "prompt_length", "response_length", "minibatch_size",
                                   "generate_micro_batch", "score_micro_batch", "update_micro_batch"])  # fmt: skip
@pytest.mark.parametrize("value", [0, True, 2.0])
def test_workload_rejects_a_bad_field_naming_it(field, value):
    with pytest.raises(ValueError, match=f"Workload.{field} must be an int >= 1"):
        Workload(**{**dict(prompts_per_step=4, group_size=2, prompt_length=8, response_length=8, minibatch_size=4), field: value})


def test_workload_micro_batches_default_to_and_are_capped_by_the_batch():
    work = Workload(prompts_per_step=3, group_size=2, prompt_length=8, response_length=8, minibatch_size=16,
                    generate_micro_batch=100, score_micro_batch=4)  # fmt: skip
    assert (work.generate_micro_batch, work.score_micro_batch, work.update_micro_batch) == (6, 4, 6)


@pytest.mark.parametrize("field, value", [("head", "value"), ("dtype", "fp16"), ("lora_rank", -1), ("lora_rank", True)])
def test_role_spec_rejects_a_bad_field_naming_it(field, value):
    kwargs = dict(config=SMALL, shape=SHAPE, head="lm", dtype="fp32", trained=True)
    with pytest.raises(ValueError, match=f"RoleSpec.{field} must be"):
        RoleSpec(**{**kwargs, field: value})


# -- estimate ------------------------------------------------------------------------------
def phase_peaks(specs, work, residency=None):
    return {phase: e.peak_bytes for phase, e in estimate(specs, work, residency).items()}


@pytest.mark.parametrize("dtype, element, per_trained", [("fp32", 4, 8), ("bf16", 2, 12)])
def test_weights_and_optimizer_bytes_per_parameter(dtype, element, per_trained):
    specs = role_specs(critic=True, dtype=dtype)
    lm, scalar = meta_parameters(hf_config(SMALL)), SHAPE.backbone_parameters() + SMALL["hidden_size"]
    for phase, result in estimate(specs, WORK).items():
        for role, params in (("policy", lm), ("reference", lm), ("critic", scalar), ("reward_model", scalar)):
            assert result.roles[role]["weights"] == params * element, (phase, role)
        assert result.roles["policy"]["optimizer"] == lm * per_trained
        assert result.roles["critic"]["optimizer"] == scalar * per_trained
        assert result.roles["reference"]["optimizer"] == result.roles["reward_model"]["optimizer"] == 0
        # The peak is the sum of every role's every kind.
        assert result.peak_bytes == sum(result.roles[r][k] for r in specs for k in KINDS)


def test_lora_optimizer_covers_only_the_adapters_and_the_adapter_reference_holds_nothing():
    specs = role_specs(lora=4)
    for phase, result in estimate(specs, WORK).items():
        assert result.roles["policy"]["optimizer"] == SHAPE.lora_parameters(4) * 8
        assert result.roles["policy"]["weights"] == (SHAPE.parameters("lm") + SHAPE.lora_parameters(4)) * 4
        assert all(v == 0 for v in result.roles["reference"].values()), phase


def test_an_offloaded_role_holds_no_weights_in_that_phase_and_a_prefetched_one_does():
    specs = role_specs(critic=True)
    residency = {"generate": {"reference": "offload", "critic": "prefetch", "policy.optimizer": "offload"}}
    base, moved = estimate(specs, WORK), estimate(specs, WORK, residency)
    assert moved["generate"].roles["reference"]["weights"] == 0
    assert moved["generate"].roles["policy"]["optimizer"] == 0
    assert moved["generate"].roles["critic"]["weights"] == base["generate"].roles["critic"]["weights"] > 0
    for phase in ("score", "update_policy", "update_critic"):
        assert moved[phase].roles == base[phase].roles
    dropped = weights_bytes(specs["reference"]) + optimizer_bytes(specs["policy"])
    assert moved["generate"].peak_bytes == base["generate"].peak_bytes - dropped


def test_kv_cache_is_linear_in_the_generate_micro_batch_and_the_sequence_length():
    def kv(n, prompt, response):
        work = dataclasses.replace(WORK, generate_micro_batch=n, prompt_length=prompt, response_length=response)
        return estimate(role_specs(), work)["generate"].roles["policy"]["kv_cache"]

    unit = kv(1, 16, 16)
    assert unit == 32 * SHAPE.kv_bytes_per_token(4)
    assert kv(3, 16, 16) == 3 * unit and kv(1, 48, 48) == 3 * unit and kv(2, 16, 48) == 4 * unit


def test_update_activations_shrink_with_checkpointing_and_smaller_micro_batches():
    work = dataclasses.replace(WORK, prompt_length=128, response_length=128, prompts_per_step=8, minibatch_size=8)

    def update(micro, checkpointing):
        specs = role_specs()
        specs["policy"] = dataclasses.replace(specs["policy"], checkpointing=checkpointing)
        return estimate(specs, dataclasses.replace(work, update_micro_batch=micro))["update_policy"].roles["policy"]

    for ckpt in (False, True):
        activations = [update(n, ckpt)["activations"] for n in range(1, 9)]
        assert activations == sorted(activations) and activations[0] < activations[-1]
    for n in (1, 4, 8):
        assert update(n, True)["activations"] < update(n, False)["activations"]
    # Several micro-batches: all gradients are alive; one: fewer (blocks' grads appear as activations free).
    full_grads = meta_parameters(hf_config(SMALL)) * 4
    assert update(4, False)["grads"] == full_grads
    assert update(8, False)["grads"] < full_grads


def test_update_critic_exists_only_with_a_critic():
    assert set(estimate(role_specs(), WORK)) == {"generate", "score", "update_policy"}
    assert set(estimate(role_specs(critic=True), WORK)) == {"generate", "score", "update_policy", "update_critic"}


def test_estimate_rejects_specs_without_policy_or_with_unknown_roles():
    specs = role_specs()
    with pytest.raises(ValueError, match="must include a 'policy'"):
        estimate({"reference": specs["reference"]}, WORK)
    with pytest.raises(ValueError, match=r"unknown roles \['value_model'\]"):
        estimate({**specs, "value_model": specs["reference"]}, WORK)


# -- plan ----------------------------------------------------------------------------------
def budget_for(usable: int) -> int:
    """The smallest budget whose usable bytes are at least ``usable``."""
    budget = CUDA_CONTEXT_BYTES + math.ceil(usable * (1 + ALLOCATOR_RESERVE_FRACTION))
    while usable_bytes(budget) < usable:
        budget += 1
    return budget


def at_micro_one(work):
    return dataclasses.replace(work, generate_micro_batch=1, score_micro_batch=1, update_micro_batch=1)


def moved_by_hand(specs, residency) -> int:
    """Bytes per step: each device -> offload transition (cyclic) is one off-period; trained
    items go out and back, frozen ones only come back; a swapped reference moves R + 2P."""
    phases = list(next(iter(residency.values())))
    total = 0
    for key, where in residency.items():
        role = key.split(".")[0]
        if "swap" in where.values():
            total += weights_bytes(specs[role]) + 2 * weights_bytes(specs["policy"])
            continue
        periods = sum(where[p] == "offload" and where[phases[i - 1]] != "offload" for i, p in enumerate(phases))
        if key.endswith(".optimizer"):
            total += periods * 2 * optimizer_bytes(specs[role])
        else:
            total += periods * weights_bytes(specs[role]) * (2 if specs[role].trained else 1)
    return total


def check_plan_accounting(result, specs, work):
    """Every phase within the usable bytes (when it fits); each role's weights and optimizer
    on the device exactly when the role is there in that phase or the next (prefetch)."""
    phases = list(result.phases)
    for i, phase in enumerate(phases):
        entry = result.phases[phase]
        following = phases[(i + 1) % len(phases)]
        if result.fits:
            assert entry.peak_bytes <= result.usable_bytes == usable_bytes(result.budget_bytes)
        assert entry.peak_bytes == sum(sum(r["bytes"].values()) for r in entry.roles.values())
        for role, spec in specs.items():
            where = result.residency[role]
            resident = where[phase] == "device" or (where[phase] == "offload" and where[following] == "device")
            assert entry.roles[role]["bytes"]["weights"] == (weights_bytes(spec) if resident else 0), (phase, role)
            if spec.trained:
                opt = result.residency[f"{role}.optimizer"]
                resident = opt[phase] == "device" or opt[following] == "device"
                assert entry.roles[role]["bytes"]["optimizer"] == (optimizer_bytes(spec) if resident else 0), (phase, role)
    assert result.bytes_moved_per_step == moved_by_hand(specs, result.residency)


@pytest.mark.parametrize("text, expected", [
    ("80GiB", 80 * 2**30), ("40GB", 40 * 10**9), ("81920MiB", 80 * 2**30), ("1.5e10", 15 * 10**9), (" 512 KiB ", 512 * 1024),
    ("0.5TB", 5 * 10**11), ("123", 123),
])  # fmt: skip
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "eighty GiB", "80 GiBs", "-1GB", "GiB", "1e", "80 gigs"])
def test_parse_memory_rejects_a_bad_size(text):
    with pytest.raises(ValueError, match="--gpu-memory must be a size"):
        parse_memory(text)


def test_gpu_budget_names_and_error():
    assert gpu_budget("H100-80GB") == GPU_MEMORY["h100-80gb"] and gpu_budget("a100-40gb") == GPU_MEMORY["a100-40gb"]
    with pytest.raises(ValueError, match=r"--gpu must be one of \['a100-40gb', 'a100-80gb', 'h100-80gb', 'h200-141gb'\]"):
        gpu_budget("v100")


@pytest.mark.parametrize("budget", [CUDA_CONTEXT_BYTES, GIB // 2])
def test_a_budget_within_the_cuda_context_raises(budget):
    with pytest.raises(ValueError, match="not larger than the CUDA context"):
        plan(role_specs(), WORK, budget)


@functools.cache
def four_roles_on_80gb():
    """The four-role plan on 80 GB, planned once (about a second) for the tests that read it."""
    return plan(role_specs(critic=True), WORK, parse_memory("80GB"))


def test_a_small_run_on_80gb_keeps_everything_on_the_device_at_full_micro_batches():
    specs, result = role_specs(critic=True), four_roles_on_80gb()
    assert result.fits and result.bytes_moved_per_step == 0 and not result.suggestions
    assert all(w == "device" for where in result.residency.values() for w in where.values())
    assert result.micro_batches == {"generate": 8, "score": 8, "update_policy": 4, "update_critic": 4}
    assert not any(result.checkpointing.values())
    check_plan_accounting(result, specs, WORK)
    assert result.peak_bytes == max(phase_peaks(specs, WORK).values())


def test_shrinking_the_budget_shrinks_micro_batches_then_offloads_or_checkpoints():
    specs = role_specs()
    resident_full = max(phase_peaks(specs, WORK).values())
    resident_one = max(phase_peaks(specs, at_micro_one(WORK)).values())
    assert resident_one < resident_full  # the case needs micro-batches to matter
    # Everything resident fits at micro-batch 1: nothing moves, nothing is checkpointed, micro-batches shrink
    # to the largest that fit.
    result = plan(specs, WORK, budget_for(resident_one))
    assert result.fits and result.bytes_moved_per_step == 0 and not any(result.checkpointing.values())
    assert any(result.micro_batches[p] < n for p, n in {"generate": 8, "score": 8, "update_policy": 4}.items())
    check_plan_accounting(result, specs, WORK)
    for phase, micro in result.micro_batches.items():
        field = {"generate": "generate_micro_batch", "score": "score_micro_batch"}.get(phase, "update_micro_batch")
        bigger = dataclasses.replace(WORK, **{field: micro + 1})
        if getattr(bigger, field) > micro:
            assert estimate(specs, bigger)[phase].peak_bytes > result.usable_bytes, phase
    # Below that, the plan must move something or checkpoint; with 80% of it the cheapest move is the
    # frozen reference out of the phases that do not use it (its weights come back once per step).
    for usable in (resident_one - 1, int(resident_one * 0.8)):
        result = plan(specs, WORK, budget_for(usable))
        assert result.fits and (result.bytes_moved_per_step > 0 or any(result.checkpointing.values()))
        check_plan_accounting(result, specs, WORK)
    assert result.residency["reference"] == {"generate": "offload", "score": "device", "update_policy": "offload"}
    assert result.bytes_moved_per_step == weights_bytes(specs["reference"])


def test_without_offloading_nothing_moves_and_the_suggestions_fit_when_applied():
    specs = role_specs()
    budget = budget_for(int(max(phase_peaks(specs, at_micro_one(WORK)).values()) * 0.6))
    offloading = plan(specs, WORK, budget)
    assert not offloading.fits
    resident = plan(specs, WORK, budget, PlanOptions(offload=False))
    assert not resident.fits and resident.bytes_moved_per_step == 0
    assert all(w == "device" for where in resident.residency.values() for w in where.values())
    assert resident.suggestions
    for suggestion in resident.suggestions:
        change = suggestion.change
        new_specs, new_work, options = specs, WORK, PlanOptions(offload=False)
        if "lora_rank" in change:
            new_specs = role_specs(lora=change["lora_rank"])
        elif "dtype" in change:
            new_specs = role_specs(dtype=change["dtype"])
        elif "offload" in change:
            options = PlanOptions(offload=change["offload"])
        elif "max_new_tokens" in change:
            new_work = dataclasses.replace(WORK, response_length=change["max_new_tokens"])
        else:  # FSDP2 over several GPUs: rank 0's plan
            assert set(change) == {"gpus"} and suggestion.peak_bytes <= usable_bytes(budget)
            replanned = plan(specs, WORK, budget, options, gpus=change["gpus"])
            assert replanned.fits and replanned.gpus == change["gpus"] and replanned.peak_bytes == suggestion.peak_bytes
            continue
        replanned = plan(new_specs, new_work, budget, options)
        assert replanned.fits and replanned.peak_bytes == suggestion.peak_bytes, suggestion.what
        check_plan_accounting(replanned, new_specs, new_work)
    assert any("lora_rank" in s.change for s in resident.suggestions)


def swap_case():
    """Long sequences scored and generated at fixed full micro-batches: the score phase fits only
    when the reference's weights are not a second copy on the device (swap)."""
    work = dataclasses.replace(WORK, prompt_length=128, response_length=128)
    options = PlanOptions(micro_batches={"generate": 8, "score": 8})
    specs = role_specs()
    usable = estimate(specs, work)["score"].peak_bytes - weights_bytes(specs["reference"]) // 2
    return specs, work, plan(specs, work, budget_for(usable), options)


def test_fixed_micro_batches_are_respected_and_the_reference_swaps_when_only_that_fits():
    specs, work, result = swap_case()
    assert result.fits and result.micro_batches["generate"] == result.micro_batches["score"] == 8
    assert result.residency["reference"]["score"] == "swap"
    check_plan_accounting(result, specs, work)
    fixed = plan(specs, WORK, parse_memory("80GB"), PlanOptions(micro_batches={"update_policy": 3, "score": 2}))
    assert fixed.micro_batches == {"generate": 8, "score": 2, "update_policy": 3}


def test_to_dict_is_json_with_the_documented_structure():
    result = four_roles_on_80gb()
    data = json.loads(json.dumps(result.to_dict()))
    assert isinstance(data["fits"], bool) and data["fits"] == result.fits
    assert isinstance(data["budget_bytes"], int) and data["budget_bytes"] == result.budget_bytes
    assert list(data["phases"]) == ["generate", "score", "update_policy", "update_critic"]
    assert data["phases"]["update_critic"]["roles"]["critic"]["bytes"]["grads"] > 0
    for phase, entry in data["phases"].items():
        assert isinstance(entry["peak_bytes"], int) and isinstance(entry["micro_batch"], int)
        assert set(entry["roles"]) == {"policy", "reference", "critic", "reward_model"}
        for role in entry["roles"].values():
            assert isinstance(role["residency"], str)
            assert set(role["bytes"]) == set(KINDS) and all(isinstance(v, int) for v in role["bytes"].values())


@pytest.mark.parametrize("case", ["resident", "offloading", "lora-adapter"])
def test_schedule_is_accepted_by_the_executor(case):
    # The resident case has all four roles (and update_critic); the others the policy and its reference.
    specs = role_specs(critic=case == "resident", lora=4 if case == "lora-adapter" else 0)
    usable = max(phase_peaks(specs, at_micro_one(WORK) if case == "offloading" else WORK).values())
    if case == "resident":
        result = four_roles_on_80gb()
    else:
        result = plan(specs, WORK, budget_for(usable if case != "offloading" else int(usable * 0.8)))
    assert result.fits and (result.bytes_moved_per_step > 0) == (case == "offloading")
    assert "swap" not in result.residency["reference"].values()  # swap plans: the next test
    checked = check_schedule(result.schedule(), specs, [r for r, s in specs.items() if s.trained])
    assert list(checked) == list(result.phases)


def test_a_swap_schedule_is_accepted_by_the_executor():
    specs, _, result = swap_case()
    assert "swap" in result.residency["reference"].values()
    check_schedule(result.schedule(), specs, ["policy"])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_fields_a_config_leaves_out_take_transformers_class_defaults(model_type):
    # A config.json without num_key_value_heads / head_dim / tie_word_embeddings: transformers fills
    # them from its config class (Mistral: 8 KV heads, Qwen2: 32, Qwen3: head_dim 128), and so must we.
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"hidden_size": 256, "num_attention_heads": 32, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    shape = ModelShape.from_config({"model_type": model_type, **sizes})
    config = AutoConfig.for_model(model_type, **sizes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert shape.num_kv_heads == config.num_key_value_heads
    assert shape.parameters("lm") == sum(p.numel() for p in model.parameters())


# -- the fused lm_head's chunk ---------------------------------------------------------------
def test_chunk_rule_takes_efficient_gemms_within_a_memory_budget():
    from rlhf_engine.ops._lm_head_chunks import CHUNK_BYTES, MIN_CHUNK_ROWS, chunk_rows_for, default_chunk_rows

    # CPU, V = 151936 fp32: the 64 MiB budget would give 110 rows; the GEMM floor gives 256.
    assert chunk_rows_for(2048, 151936, 4, "cpu") == MIN_CHUNK_ROWS["cpu"] == 256
    assert chunk_rows_for(2048, 32000, 4, "cpu") == CHUNK_BYTES["cpu"] // (32000 * 4) == 524
    assert chunk_rows_for(100, 151936, 4, "cpu") == 100  # never more rows than tokens
    assert chunk_rows_for(8192, 151936, 2, "cuda") == (512 << 20) // (151936 * 2) == 1766
    assert chunk_rows_for(8192, 151936, 2, "mps") == 1766  # other devices take CUDA's rule
    assert default_chunk_rows(8192, 151936, torch.bfloat16, torch.device("cpu")) == chunk_rows_for(8192, 151936, 2, "cpu")


def test_the_update_estimate_follows_the_lm_head_chunk_and_path():
    config = {**SMALL, "vocab_size": 151936}
    shape = ModelShape.from_config(config)
    specs = {"policy": RoleSpec(config, shape, "lm", "bf16", True)}
    work = Workload(prompts_per_step=4, group_size=1, prompt_length=16, response_length=1024, minibatch_size=4,
                    update_micro_batch=4)  # fmt: skip
    logits = {}
    for rows in (None, 256, 4096):
        for one_pass in (True, False):
            w = dataclasses.replace(work, lm_head_chunk_rows=rows, lm_head_one_pass=one_pass)
            logits[rows, one_pass] = estimate(specs, w)["update_policy"].roles["policy"]["logits"]
    v, h = 151936, SMALL["hidden_size"]
    # One pass: a chunk of bf16 logits, and the fp32 sum of d weight over the several chunks.
    assert logits[256, True] == 256 * v * 2 + v * h * 4
    assert logits[None, True] == 1766 * v * 2 + v * h * 4
    assert logits[4096, True] == 4096 * v * 2  # one chunk: no fp32 sum
    assert logits[256, False] < logits[None, False]  # the recompute backward's tile follows the chunk too


def test_the_plan_takes_the_smallest_lm_head_chunk_when_it_fits_a_larger_update_micro_batch():
    from rlhf_engine.ops._lm_head_chunks import MIN_CHUNK_ROWS

    config = {**SMALL, "vocab_size": 151936}
    shape = ModelShape.from_config(config)
    specs = {"policy": RoleSpec(config, shape, "lm", "bf16", True)}
    work = Workload(prompts_per_step=4, group_size=1, prompt_length=16, response_length=1024, minibatch_size=4)

    def update_peak(micro, rows=None):
        w = dataclasses.replace(work, update_micro_batch=micro, lm_head_chunk_rows=rows)
        return estimate(specs, w)["update_policy"].peak_bytes

    small = MIN_CHUNK_ROWS["cuda"]
    assert update_peak(4, small) < update_peak(4)
    others = max(p.peak_bytes for name, p in estimate(specs, work).items() if name != "update_policy")
    # Room for the whole minibatch only with the small chunk.
    result = plan(specs, work, budget_for(max(update_peak(4, small), others)), PlanOptions(offload=False, checkpointing=False))
    assert result.fits and result.micro_batches["update_policy"] == 4
    assert result.phases["update_policy"].lm_head_chunk_rows == small
    assert result.to_dict()["phases"]["update_policy"]["lm_head_chunk_rows"] == small
    # Room for the rule's chunk: the plan leaves it to the op.
    roomy = plan(specs, work, budget_for(max(update_peak(4), others)), PlanOptions(offload=False, checkpointing=False))
    assert roomy.phases["update_policy"].lm_head_chunk_rows is None
    assert "lm_head_chunk_rows" not in roomy.to_dict()["phases"]["update_policy"]


def test_the_report_names_a_chosen_lm_head_chunk():
    from rlhf_engine.memory.plan import PhasePlan, Plan
    from rlhf_engine.memory.report import format_plan

    phases = {"generate": PhasePlan(2, 10), "update_policy": PhasePlan(1, 20, lm_head_chunk_rows=256)}
    text = format_plan(Plan(True, 2 * GIB, GIB, phases, {}, {}, 0))
    assert "update_policy: peak 0.00 of 1.00 GiB (fits), micro-batch 1, lm_head chunk 256 tokens" in text
    assert "generate: peak 0.00 of 1.00 GiB (fits), micro-batch 2\n" in text
