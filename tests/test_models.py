"""models/: configs, PolicyModel, ScalarHeadModel, safetensors save/load and checkpoints."""

import json
import random

import numpy as np
import pytest
import safetensors.torch
import torch

from rlhf_engine.models import (
    MODEL_SIZES,
    PolicyModel,
    ScalarHeadModel,
    atomic_save_safetensors,
    atomic_write_bytes,
    latest_checkpoint,
    llama_config,
    load_checkpoint,
    save_checkpoint,
)
from rlhf_engine.models import checkpoint as ckpt

VOCAB = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_policy(seed=0, *, tied=True, bias=False) -> PolicyModel:
    config = llama_config("tiny", VOCAB)
    config.tie_word_embeddings = tied
    policy = PolicyModel.from_config(config, seed=seed)
    if bias:  # exercises lm_head_bias (Llama has none of its own)
        policy.lm.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)))
    return policy


def left_padded_batch(lengths, total, seed=0):
    """Rows of real tokens (ids >= 3) right-aligned in ``[B, total]``, pad 0 on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), total), generator=g)
    mask = torch.arange(total)[None, :] >= total - torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def full_logits_logprobs(policy, ids, mask, start, temperature):
    """The plain computation the fused path must reproduce: full logits, log_softmax, gather."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = policy.lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits.float()
    logp = torch.log_softmax(logits[:, start - 1 : -1] / temperature, dim=-1)
    return logp.gather(-1, ids[:, start:, None]).squeeze(-1) * mask[:, start:]


# -- configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_llama_config_shapes(size):
    config = llama_config(size, 300, pad_token_id=5, eos_token_id=7, max_position_embeddings=64)
    assert config.hidden_size == MODEL_SIZES[size]["hidden_size"]
    assert config.num_hidden_layers == MODEL_SIZES[size]["num_hidden_layers"]
    assert (config.vocab_size, config.pad_token_id, config.eos_token_id, config.max_position_embeddings) == (300, 5, 7, 64)
    assert MODEL_SIZES["tiny"]["hidden_size"] == 64 and MODEL_SIZES["small"]["num_hidden_layers"] == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"size": "huge", "vocab_size": 10}, "size"),
        ({"size": "tiny", "vocab_size": 0}, "vocab_size"),
        ({"size": "tiny", "vocab_size": 10, "eos_token_id": 10}, "eos_token_id"),
        ({"size": "tiny", "vocab_size": 10, "pad_token_id": -1}, "pad_token_id"),
        ({"size": "tiny", "vocab_size": 10, "max_position_embeddings": 0}, "max_position_embeddings"),
    ],
)
def test_llama_config_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        llama_config(**kwargs)


# -- PolicyModel ---------------------------------------------------------------------------
def test_from_config_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_policy(seed=1), tiny_policy(seed=1), tiny_policy(seed=2)
    assert torch.equal(torch.rand(3), expected_next)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.lm_head_weight, c.lm_head_weight)
    assert all(p.dtype == torch.float32 for p in a.parameters())


def test_tied_and_untied_lm_head():
    tied, untied = tiny_policy(tied=True), tiny_policy(tied=False)
    assert tied.lm_head_weight is tied.lm.get_input_embeddings().weight
    assert untied.lm_head_weight is not untied.lm.get_input_embeddings().weight
    assert tied.lm_head_weight.shape == (VOCAB, 64) and tied.vocab_size == VOCAB and tied.lm_head_bias is None


@pytest.mark.parametrize("tied, bias", [(True, False), (False, True)])
def test_hidden_states_are_post_norm(tied, bias):
    # lm_head(hidden) must equal the model's own logits: the hidden states are after the
    # final norm, and the bias (when present) is the one the model uses.
    policy = tiny_policy(tied=tied, bias=bias)
    ids, mask = left_padded_batch([5, 2, 7], 7)
    hidden = policy.hidden_states(ids, mask)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = policy.lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
    ours = torch.nn.functional.linear(hidden, policy.lm_head_weight, policy.lm_head_bias)
    torch.testing.assert_close(ours[mask], logits[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied, bias", [(True, False), (False, True)])
def test_response_logprobs_match_full_logits(tied, bias):
    policy = tiny_policy(tied=tied, bias=bias)
    ids, mask = left_padded_batch([6, 3, 8], 8)
    mask[1, -2:] = False  # a response that ended early: right padding is masked out
    start, temperature = 5, 0.7
    logp, entropy = policy.response_logprobs(ids, mask, start, temperature=temperature, return_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == (3, 3)
    torch.testing.assert_close(logp, full_logits_logprobs(policy, ids, mask, start, temperature), rtol=0, atol=1e-5)
    assert torch.all(logp[1, -2:] == 0) and torch.all(entropy[1, -2:] == 0)
    assert torch.all(entropy[mask[:, start:]] > 0)


def test_left_padding_does_not_change_logprobs():
    policy = tiny_policy()
    ids, mask = left_padded_batch([5], 5)
    padded_ids = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), mask], dim=1)
    plain = policy.response_logprobs(ids, mask, 2)
    padded = policy.response_logprobs(padded_ids, padded_mask, 6)
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-5)


def test_response_hidden_and_gradients():
    policy = tiny_policy()
    ids, mask = left_padded_batch([4, 6], 6)
    hidden = policy.response_hidden(ids, mask, 2)
    assert hidden.shape == (2, 4, 64)
    torch.testing.assert_close(hidden, policy.hidden_states(ids, mask)[:, 1:-1])
    policy.response_logprobs(ids, mask, 2).sum().backward()
    assert policy.lm_head_weight.grad is not None and policy.lm_head_weight.grad.abs().sum() > 0


def test_next_token_logits_with_cache_match_full_forward():
    policy = tiny_policy()
    ids, mask = left_padded_batch([3, 6], 6)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits, cache = policy.next_token_logits(ids[:, :5], mask[:, :5], positions[:, :5], None)
    step_logits, _ = policy.next_token_logits(ids[:, 5:], mask, positions[:, 5:], cache)
    full = torch.nn.functional.linear(policy.hidden_states(ids, mask), policy.lm_head_weight)
    assert step_logits.dtype == torch.float32 and step_logits.shape == (2, VOCAB)
    torch.testing.assert_close(logits, full[:, 4], rtol=0, atol=1e-5)
    torch.testing.assert_close(step_logits, full[:, 5], rtol=0, atol=1e-5)


def test_policy_bad_input():
    policy = tiny_policy()
    ids, mask = left_padded_batch([3, 4], 4)
    with pytest.raises(ValueError, match="attention_mask"):
        policy.hidden_states(ids, mask[:, :3])
    with pytest.raises(TypeError, match="input_ids"):
        policy.hidden_states(ids.float(), mask)
    with pytest.raises(ValueError, match="response_start"):
        policy.response_logprobs(ids, mask, 0)
    with pytest.raises(ValueError, match="response_start"):
        policy.response_logprobs(ids, mask, 5)
    with pytest.raises(ValueError, match="temperature"):
        policy.response_logprobs(ids, mask, 2, temperature=0.0)
    with pytest.raises(TypeError, match="lm"):
        PolicyModel(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="seed"):
        PolicyModel.from_config(llama_config("tiny", VOCAB), seed="0")
    with pytest.raises(ValueError, match="path"):
        PolicyModel.from_pretrained("/nonexistent/model-dir")


# -- ScalarHeadModel -----------------------------------------------------------------------
def test_scalar_head_from_policy_values_and_rewards():
    policy = tiny_policy()
    model = ScalarHeadModel.from_policy(policy)
    ids, mask = left_padded_batch([4, 2, 5], 5)
    assert torch.all(model.values(ids, mask) == 0)  # zero-initialized head
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(0))
    # An independent copy of the backbone: training the policy does not move the critic.
    torch.testing.assert_close(model.backbone.embed_tokens.weight, policy.lm.get_input_embeddings().weight)
    with torch.no_grad():
        policy.lm.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(model.backbone.embed_tokens.weight, policy.lm.get_input_embeddings().weight)

    values = model.values(ids, mask)
    assert values.dtype == torch.float32 and values.shape == (3, 5)
    # Right padding after the last real token: the reward is read at that token and is
    # unchanged by the padding (causal attention).
    padded_ids = torch.cat([ids, torch.zeros(3, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    padded_mask[1, 5] = True
    padded_ids[1, 5] = 9
    rewards = model.rewards(padded_ids, padded_mask)
    longer = model.values(padded_ids, padded_mask)
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    torch.testing.assert_close(rewards[[0, 2]], values[[0, 2], -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(rewards[1], longer[1, 5])
    assert not torch.allclose(rewards[1], values[1, -1])


def test_scalar_head_from_config_and_bad_input():
    model = ScalarHeadModel.from_config(llama_config("tiny", VOCAB), seed=3)
    other = ScalarHeadModel.from_config(llama_config("tiny", VOCAB), seed=3)
    assert torch.equal(model.backbone.embed_tokens.weight, other.backbone.embed_tokens.weight)
    with pytest.raises(TypeError, match="policy"):
        ScalarHeadModel.from_policy(model)
    ids, mask = left_padded_batch([2], 3)
    with pytest.raises(ValueError, match="attention_mask"):
        model.rewards(ids, mask.T)


# -- save / load ---------------------------------------------------------------------------
def test_policy_save_load_round_trip_tied(tmp_path):
    policy = tiny_policy(seed=4)
    ids, mask = left_padded_batch([5, 3], 6)
    expected = policy.response_logprobs(ids, mask, 3, temperature=0.9)
    policy.save(tmp_path / "policy")
    stored = safetensors.torch.load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert "lm_head.weight" not in stored  # the tied lm_head is the embedding, stored once
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["model_type"] == "llama"
    for loaded in (PolicyModel.load(tmp_path / "policy"), PolicyModel.from_pretrained(tmp_path / "policy")):
        assert loaded.lm_head_weight is loaded.lm.get_input_embeddings().weight
        assert torch.equal(loaded.response_logprobs(ids, mask, 3, temperature=0.9), expected)


def test_policy_save_load_round_trip_untied(tmp_path):
    policy = tiny_policy(seed=5, tied=False)
    policy.save(tmp_path)
    loaded = PolicyModel.load(tmp_path)
    assert loaded.lm_head_weight is not loaded.lm.get_input_embeddings().weight
    assert torch.equal(loaded.lm_head_weight, policy.lm_head_weight)


def test_scalar_head_save_load_and_from_pretrained(tmp_path):
    policy = tiny_policy(seed=6)
    policy.save(tmp_path / "policy")
    model = ScalarHeadModel.from_pretrained(tmp_path / "policy")
    assert torch.equal(model.backbone.embed_tokens.weight, policy.lm.get_input_embeddings().weight)
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(1))
    ids, mask = left_padded_batch([5, 2], 5)
    model.save(tmp_path / "rm")
    loaded = ScalarHeadModel.load(tmp_path / "rm")
    assert torch.equal(loaded.values(ids, mask), model.values(ids, mask))
    assert loaded.values(ids, mask).abs().sum() > 0


def test_load_state_rejects_other_models(tmp_path):
    tiny_policy().save(tmp_path / "p")
    with pytest.raises(ValueError, match="lacks"):
        ckpt.load_state(ScalarHeadModel.from_config(llama_config("tiny", VOCAB), seed=0), tmp_path / "p" / "model.safetensors")


# -- checkpoints ---------------------------------------------------------------------------
def trained_pair(seed=0):
    """A policy, a critic and their optimizers after one step (so Adam has state)."""
    policy = tiny_policy(seed)
    critic = ScalarHeadModel.from_policy(policy)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    ids, mask = left_padded_batch([4, 3], 4, seed)
    (policy.response_logprobs(ids, mask, 1).sum() + critic.values(ids, mask).sum()).backward()
    opt_p.step()
    opt_c.step()
    return policy, critic, opt_p, opt_c


def test_checkpoint_round_trip(tmp_path):
    policy, critic, opt_p, opt_c = trained_pair(0)
    path = save_checkpoint(tmp_path, 12, models={"policy": policy, "critic": critic},
                           optimizers={"policy": opt_p, "critic": opt_c}, state={"step": 12, "kl": 0.5})  # fmt: skip
    assert path == tmp_path / "step-00000012" and latest_checkpoint(tmp_path) == path
    assert (tmp_path / "latest").read_text() == "step-00000012"
    assert {p.name for p in path.iterdir()} == {
        "policy.safetensors", "policy.config.json", "critic.safetensors", "critic.config.json",
        "optimizers.pt", "rng.pt", "state.json",
    }  # fmt: skip
    expected = (torch.rand(2), random.random(), np.random.rand())

    policy2, critic2, opt_p2, opt_c2 = trained_pair(1)
    state = load_checkpoint(path, models={"policy": policy2, "critic": critic2}, optimizers={"policy": opt_p2, "critic": opt_c2})
    assert state == {"step": 12, "kl": 0.5}
    assert torch.equal(torch.rand(2), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
    for a, b in ((policy, policy2), (critic, critic2)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert policy2.lm_head_weight is policy2.lm.get_input_embeddings().weight
    for a, b in ((opt_p, opt_p2), (opt_c, opt_c2)):
        for sa, sb in zip(a.state_dict()["state"].values(), b.state_dict()["state"].values()):
            assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_checkpoint_restores_torch_rng(tmp_path):
    policy = tiny_policy()
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 0, models={"policy": policy})
    after_save = torch.rand(4)
    torch.rand(10)
    load_checkpoint(path, models={})
    assert torch.equal(torch.rand(4), after_save)
    load_checkpoint(path, models={}, restore_rng=False)
    assert not torch.equal(torch.rand(4), after_save)


def test_crash_mid_save_keeps_previous_latest(tmp_path, monkeypatch):
    policy, critic, opt_p, _ = trained_pair(0)
    first = save_checkpoint(tmp_path, 1, models={"policy": policy}, state={"step": 1})
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        policy.lm_head_weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # The policy weights are written, then the crash comes while writing the next file.
    monkeypatch.setattr(ckpt, "_rng_state", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, models={"policy": policy}, optimizers={"policy": opt_p}, state={"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]  # no partial dirs left

    # A crash while `latest` is replaced: the new step directory is complete, `latest`
    # still names the old one, which still loads.
    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, models={"policy": policy}, state={"step": 2})
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "step-00000001"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    fresh = tiny_policy(seed=9)
    assert load_checkpoint(latest_checkpoint(tmp_path), models={"policy": fresh}) == {"step": 1}
    for name, value in before.items():
        assert torch.equal(fresh.state_dict()[name], value), name

    # Saving step 2 again replaces the orphaned copy and moves `latest` on.
    assert save_checkpoint(tmp_path, 2, models={"policy": policy}, state={"step": 2}) == tmp_path / "step-00000002"
    assert load_checkpoint(latest_checkpoint(tmp_path), models={"policy": fresh}) == {"step": 2}
    assert torch.equal(fresh.lm_head_weight, policy.lm_head_weight)


def test_latest_checkpoint_without_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    policy = tiny_policy()
    save_checkpoint(tmp_path, 3, models={"policy": policy})
    newest = save_checkpoint(tmp_path, 10, models={"policy": policy})
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == newest


def test_atomic_writes_keep_old_file_on_crash(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")
    weights = tmp_path / "w.safetensors"
    atomic_save_safetensors(weights, {"a": torch.ones(3)})

    def partial_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00partial")
        raise OSError("killed")

    monkeypatch.setattr(ckpt.safetensors.torch, "save_file", partial_write)
    with pytest.raises(OSError, match="killed"):
        atomic_save_safetensors(weights, {"a": torch.zeros(3)})
    assert torch.equal(safetensors.torch.load_file(str(weights))["a"], torch.ones(3))
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "w.safetensors"]
    with pytest.raises(TypeError, match="data"):
        atomic_write_bytes(target, "text")


def test_checkpoint_bad_input(tmp_path):
    policy = tiny_policy()
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, models={"policy": policy})
    with pytest.raises(ValueError, match="models"):
        save_checkpoint(tmp_path, 0, models={"../escape": policy})
    with pytest.raises(TypeError, match="optimizers"):
        save_checkpoint(tmp_path, 0, models={"policy": policy}, optimizers={"policy": policy})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 0, models={"policy": policy}, state={"bad": object()})
    assert not list(tmp_path.iterdir())  # nothing written by a rejected call
    path = save_checkpoint(tmp_path, 0, models={"policy": policy})
    with pytest.raises(ValueError, match="critic"):
        load_checkpoint(path, models={"critic": policy})
    with pytest.raises(ValueError, match="optimizers"):
        load_checkpoint(path, models={}, optimizers={"policy": torch.optim.SGD(policy.parameters(), lr=1.0)})
    with pytest.raises(ValueError, match="path"):
        load_checkpoint(tmp_path, models={})
