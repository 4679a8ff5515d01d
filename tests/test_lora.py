"""models/lora.py and models/adapters.py: LoRA on the policy and the critic, the adapter-free reference, merged saves."""

import sys

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.models.lora import AdapterDisabledPolicy, LoraSettings, adapter_disabled, apply_lora, has_lora
from rlhf_engine.rollout import SamplingConfig, generate, score_rollout

VOCAB, PAD, EOS = 32, 0, 2
SETTINGS = LoraSettings(rank=4, alpha=8.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config():
    return llama_config("tiny", VOCAB, pad_token_id=PAD, eos_token_id=EOS)


def policy_pair(seed=0):
    """(the untouched base policy, the same weights with fresh LoRA adapters)."""
    return PolicyModel.from_config(config(), seed=seed).eval(), apply_lora(PolicyModel.from_config(config(), seed=seed), SETTINGS, seed=seed).eval()


def left_padded_batch(lengths, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), total), generator=g)
    mask = torch.arange(total)[None, :] >= total - torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, PAD), mask


def right_padded_batch(lengths, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), total), generator=g)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, PAD), mask


def train_steps(model, loss_fn, steps=3):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def linear_layer_names(transformer):
    """Every Linear of a transformer except its lm_head: what LoRA adapts by default."""
    head = transformer.get_output_embeddings()
    return {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def cached_logits(policy, ids, mask, prompt_len):
    """Last-position logits after feeding the prompt, then each further token, through the KV cache."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits, cache = policy.next_token_logits(ids[:, :prompt_len], mask[:, :prompt_len], positions[:, :prompt_len], None)
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = policy.next_token_logits(ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], cache)
    return logits


# -- applying LoRA -------------------------------------------------------------------------
def test_policy_only_adapters_train_and_the_lm_head_is_never_adapted():
    base, policy = policy_pair()
    expected = linear_layer_names(base.lm)
    assert len(expected) == 7 * config().num_hidden_layers  # q k v o gate up down per block
    trainable = {n for n, p in policy.lm.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.default.weight" for m in expected for ab in "AB"}
    assert type(policy.lm.get_output_embeddings()) is torch.nn.Linear and not policy.lm_head_weight.requires_grad
    assert policy.lm_head_weight is policy.lm.get_input_embeddings().weight  # still tied
    assert has_lora(policy) and not has_lora(base)
    lora_a = policy.lm.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.shape == (SETTINGS.rank, config().hidden_size)


def test_critic_adapters_and_head_train():
    critic = apply_lora(ScalarHeadModel.from_config(config(), seed=0), SETTINGS, seed=0)
    expected = linear_layer_names(ScalarHeadModel.from_config(config(), seed=0).backbone)
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.{m}.lora_{ab}.default.weight" for m in expected for ab in "AB"} | {"head.weight"}


def test_target_modules_pick_layers_by_suffix():
    policy = apply_lora(PolicyModel.from_config(config(), seed=0), LoraSettings(rank=2, target_modules=["q_proj", "mlp.down_proj"]), seed=0)
    trainable = {n.split(".lora_")[0] for n, p in policy.lm.named_parameters() if p.requires_grad}
    layers = range(config().num_hidden_layers)
    assert trainable == {f"model.layers.{i}.{m}" for i in layers for m in ("self_attn.q_proj", "mlp.down_proj")}


def test_adapter_init_depends_on_the_seed_only():
    def adapters(seed):
        policy = apply_lora(PolicyModel.from_config(config(), seed=0), SETTINGS, seed=seed)
        return {n: p for n, p in policy.named_parameters() if "lora_A" in n}

    state = torch.get_rng_state()
    first, again, other = adapters(1), adapters(1), adapters(2)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


# -- the fresh adapter is the identity; training moves only the adapter ------------------------
def test_fresh_lora_policy_equals_the_base_model_exactly():
    base, policy = policy_pair(seed=1)
    ids, mask = left_padded_batch([6, 3, 5], 6)
    assert torch.equal(policy.hidden_states(ids, mask), base.hidden_states(ids, mask))
    assert torch.equal(policy.response_logprobs(ids, mask, 2), base.response_logprobs(ids, mask, 2))
    assert torch.equal(cached_logits(policy, ids, mask, 3), cached_logits(base, ids, mask, 3))


def test_trained_lora_policy_reference_view_and_merged_save(tmp_path):
    base, policy = policy_pair(seed=2)
    ids, mask = left_padded_batch([7, 4, 6], 7, seed=1)
    train_steps(policy, lambda: -policy.response_logprobs(ids, mask, 3).sum())
    trained = policy.response_logprobs(ids, mask, 3)
    base_logprobs = base.response_logprobs(ids, mask, 3)
    assert (trained - base_logprobs).abs().max() > 1e-3  # the adapter learned something

    reference = AdapterDisabledPolicy(policy)
    assert isinstance(reference, PolicyModel) and list(reference.parameters()) == []
    assert torch.equal(reference.response_logprobs(ids, mask, 3), base_logprobs)
    assert torch.equal(reference.hidden_states(ids, mask), base.hidden_states(ids, mask))
    assert torch.equal(cached_logits(reference, ids, mask, 4), cached_logits(base, ids, mask, 4))
    with adapter_disabled(policy):
        assert torch.equal(policy.response_logprobs(ids, mask, 3), base_logprobs)
    # Back on, with the adapters' requires_grad as before; freezing or moving the view never reaches the policy.
    assert torch.equal(policy.response_logprobs(ids, mask, 3), trained)
    reference.eval().requires_grad_(False)
    assert sum(p.requires_grad for p in policy.parameters()) == 2 * 7 * config().num_hidden_layers

    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    policy.save(tmp_path / "merged")
    assert has_lora(policy) and all(torch.equal(p, adapters[n]) for n, p in policy.named_parameters() if "lora_" in n)
    assert torch.equal(policy.response_logprobs(ids, mask, 3), trained)
    stored = safetensors.torch.load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(stored) == set(base.lm.state_dict()) - {"lm_head.weight"}  # plain names; tied head stored once
    merged = PolicyModel(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")).eval()
    torch.testing.assert_close(merged.response_logprobs(ids, mask, 3), trained, rtol=1e-5, atol=1e-5)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = merged.lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits[:, -1]
    torch.testing.assert_close(cached_logits(policy, ids, mask, 4), full, rtol=1e-5, atol=1e-5)

    reference.save(tmp_path / "base")
    assert torch.equal(PolicyModel.load(tmp_path / "base").response_logprobs(ids, mask, 3), base_logprobs)


def test_reference_view_in_generation_and_scoring():
    base, policy = policy_pair(seed=3)
    ids, mask = left_padded_batch([5, 2, 4], 5, seed=2)
    train_steps(policy, lambda: -policy.response_logprobs(ids, mask, 2).sum())
    reference = AdapterDisabledPolicy(policy)
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD)
    from_view = generate(reference, ids, mask, sampling, generator=torch.Generator().manual_seed(4))
    from_base = generate(base, ids, mask, sampling, generator=torch.Generator().manual_seed(4))
    assert torch.equal(from_view.response_ids, from_base.response_ids) and torch.equal(from_view.logprobs, from_base.logprobs)

    rollout = generate(policy, ids, mask, sampling, generator=torch.Generator().manual_seed(5))
    scored, metrics = score_rollout(rollout, temperature=1.0, policy=policy, reference=reference)
    assert metrics["logprob_gap_max"] <= 1e-5  # the LoRA policy's KV-cache sampling matches its training logprobs
    expected = base.response_logprobs(rollout.input_ids, rollout.attention_mask, rollout.response_start)
    assert torch.equal(scored.ref_logprobs, expected)
    assert (scored.ref_logprobs - scored.old_logprobs)[rollout.response_mask].abs().max() > 1e-4


def test_lora_policy_under_activation_checkpointing_gets_the_same_adapter_grads():
    # Only the adapters need grads, not the (frozen) embeddings' output: non-reentrant checkpointing
    # must still route gradients into every layer's adapters.
    ids, mask = left_padded_batch([6, 4], 6, seed=3)
    grads = []
    for checkpointed in (False, True):
        _, policy = policy_pair(seed=5)
        with torch.no_grad():  # a nonzero B, so A's gradient is not trivially 0
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(len(n)))
        if checkpointed:
            policy.gradient_checkpointing_enable()
        policy.train()
        (-policy.response_logprobs(ids, mask, 2).sum()).backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6)


def tiny_qwen2():
    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)  # fmt: skip


@pytest.mark.parametrize("make_config", [config, tiny_qwen2], ids=["llama", "qwen2"])
def test_lora_critic_values_rewards_base_and_merged_save(tmp_path, make_config):
    base = ScalarHeadModel.from_config(make_config(), seed=4).eval()
    torch.nn.init.normal_(base.head.weight, generator=torch.Generator().manual_seed(0))
    critic = ScalarHeadModel.from_config(make_config(), seed=4).eval()
    critic.head.load_state_dict(base.head.state_dict())
    apply_lora(critic, SETTINGS, seed=1)
    ids, mask = right_padded_batch([6, 2, 5], 6)
    assert torch.equal(critic.values(ids, mask), base.values(ids, mask))

    targets = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    train_steps(critic, lambda: (critic.values(ids, mask) - targets).square().mean())
    trained_head = critic.head.weight.detach().clone()
    assert not torch.equal(trained_head, base.head.weight)
    with adapter_disabled(critic):  # the base backbone under the trained head
        disabled = critic.values(ids, mask)
    base.head.weight.data.copy_(trained_head)
    assert torch.equal(disabled, base.values(ids, mask))
    rewards = critic.rewards(ids, mask)
    assert (rewards - base.rewards(ids, mask)).abs().max() > 1e-3

    critic.save(tmp_path)
    assert has_lora(critic)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        hf = classifier(input_ids=ids, attention_mask=mask.long()).logits[:, 0]
    torch.testing.assert_close(hf, rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ScalarHeadModel.load(tmp_path).rewards(ids, mask), rewards, rtol=1e-5, atol=1e-5)


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"alpha": 0.0}, "alpha"), ({"dropout": 1.0}, "dropout"),
     ({"target_modules": "q_proj"}, "target_modules"), ({"target_modules": []}, "target_modules")],
)  # fmt: skip
def test_lora_settings_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"LoraSettings.{field}"):
        LoraSettings(**kwargs)


def test_lora_bad_input():
    base, policy = policy_pair()
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(policy, seed=0)
    for names in (["lm_head"], ["head"], ["no_such_layer"]):
        with pytest.raises(ValueError, match="target_modules"):
            apply_lora(PolicyModel.from_config(config(), seed=0), LoraSettings(target_modules=names), seed=0)
    with pytest.raises(TypeError, match="PolicyModel or a ScalarHeadModel"):
        apply_lora(torch.nn.Linear(2, 2), seed=0)
    with pytest.raises(TypeError, match="settings"):
        apply_lora(base, {"rank": 4}, seed=0)
    with pytest.raises(TypeError, match="seed"):
        apply_lora(base, seed=1.0)
    with pytest.raises(TypeError, match="reference view"):
        apply_lora(AdapterDisabledPolicy(policy), seed=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        AdapterDisabledPolicy(base)
    with pytest.raises(ValueError, match="no LoRA layers"):
        with adapter_disabled(base):
            pass
    with pytest.raises(ValueError, match="LoRA layers"):
        ScalarHeadModel.from_policy(policy)


def test_missing_peft_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    policy = PolicyModel.from_config(config(), seed=0)
    with pytest.raises(ImportError, match=r"rlhf-engine\[lora\]"):
        apply_lora(policy, seed=0)
    policy.save(tmp_path)  # models without LoRA never need peft
    assert torch.equal(PolicyModel.load(tmp_path).lm_head_weight, policy.lm_head_weight)
