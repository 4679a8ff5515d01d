"""rollout/: sampling with a KV cache, the Rollout container, scoring."""

import pytest
import torch

from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.rollout import Rollout, SamplingConfig, generate, response_logprobs, sample_tokens, score_rollout

VOCAB, EOS, PAD = 12, 2, 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_policy(seed=0, eos_bias=None) -> PolicyModel:
    """A tiny Llama; ``eos_bias`` adds an lm_head bias on EOS (untied head) to force or forbid it."""
    config = llama_config("tiny", VOCAB, eos_token_id=EOS, pad_token_id=PAD)
    if eos_bias is None:
        return PolicyModel.from_config(config, seed=seed).eval()
    config.tie_word_embeddings = False
    policy = PolicyModel.from_config(config, seed=seed).eval()
    bias = torch.zeros(VOCAB)
    bias[EOS] = eos_bias
    policy.lm.lm_head.bias = torch.nn.Parameter(bias)
    return policy


def prompts(lengths, seed=0):
    """Left-padded prompts of real tokens (ids >= 3) with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), total), generator=g)
    mask = torch.arange(total)[None, :] >= total - torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, PAD), mask


def check_response_layout(rollout: Rollout):
    """Right-padded after EOS: mask is a prefix, ends at the first EOS, pad and logprob 0 after."""
    mask = rollout.response_mask
    assert torch.all(mask[:, 1:] <= mask[:, :-1])  # a prefix of each row
    is_eos = (rollout.response_ids == EOS) & mask
    assert torch.all(is_eos.sum(dim=1) <= 1)
    ended = is_eos.any(dim=1)
    last = rollout.response_lengths - 1
    assert torch.all(rollout.response_ids[ended, last[ended]] == EOS)
    assert torch.all(rollout.response_ids[~mask] == PAD) and torch.all(rollout.logprobs[~mask] == 0)
    assert torch.all(rollout.logprobs[mask] <= 0) and rollout.logprobs.dtype == torch.float32


# -- the central property: sampling logprobs == training logprobs ---------------------------
def test_rollout_logprobs_match_training_recompute():
    policy = tiny_policy()
    ids, mask = prompts([5, 2, 7, 3, 1, 6, 4, 7], seed=1)
    config = SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=8, top_p=0.9, eos_token_id=EOS, pad_token_id=PAD)
    rollout = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(3))
    check_response_layout(rollout)
    lengths = rollout.response_lengths
    # The case the test is about: some rows stop early at EOS while others run on.
    assert lengths.min() < rollout.response_ids.shape[1] and lengths.max() == rollout.response_ids.shape[1]
    recomputed = response_logprobs(policy, rollout, temperature=0.8)
    assert recomputed.dtype == torch.float32 and recomputed.shape == rollout.logprobs.shape
    assert (recomputed - rollout.logprobs).abs().max() <= 1e-5
    # The logprobs are of the untruncated distribution: at temperature 1 they differ.
    assert (response_logprobs(policy, rollout, temperature=1.0) - rollout.logprobs)[rollout.response_mask].abs().max() > 1e-3


def test_generation_is_deterministic_given_a_generator():
    policy = tiny_policy()
    ids, mask = prompts([3, 5, 4])
    config = SamplingConfig(max_new_tokens=8, temperature=1.3, top_p=0.95, eos_token_id=EOS, pad_token_id=PAD)
    a = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(0))
    b = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(0))
    c = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_greedy_matches_full_forward_argmax_and_ignores_left_padding():
    policy = tiny_policy()
    ids, mask = prompts([4, 4])
    padded_ids = torch.cat([torch.full((2, 3), PAD), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask], dim=1)
    padded_mask[1, :3] = True  # row 1 gets a longer prompt instead, so the rows differ
    padded_ids[1, :3] = torch.tensor([5, 6, 7])
    config = SamplingConfig(max_new_tokens=6, top_k=1, eos_token_id=EOS, pad_token_id=PAD)
    alone = generate(policy, ids[:1], mask[:1], config)
    batched = generate(policy, padded_ids, padded_mask, config)
    width = alone.response_ids.shape[1]
    assert torch.equal(batched.response_ids[0, :width], alone.response_ids[0])
    torch.testing.assert_close(batched.logprobs[0, :width], alone.logprobs[0], rtol=0, atol=1e-5)
    # Greedy tokens are the argmax of a plain full forward over the generated sequence.
    full = batched.input_ids
    hidden = policy.hidden_states(full, batched.attention_mask)
    logits = torch.nn.functional.linear(hidden, policy.lm_head_weight)
    start = batched.response_start
    argmax = logits[:, start - 1 : -1].argmax(-1)
    assert torch.equal(argmax[batched.response_mask], batched.response_ids[batched.response_mask])


# -- awkward cases ---------------------------------------------------------------------------
def test_batch_of_one():
    policy = tiny_policy()
    ids, mask = prompts([3])
    config = SamplingConfig(max_new_tokens=5, temperature=0.7, top_k=5, eos_token_id=EOS, pad_token_id=PAD)
    rollout = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(0))
    assert rollout.response_ids.shape[0] == 1
    check_response_layout(rollout)
    assert (response_logprobs(policy, rollout, temperature=0.7) - rollout.logprobs).abs().max() <= 1e-5


def test_all_rows_stop_at_step_one():
    policy = tiny_policy(eos_bias=100.0)
    ids, mask = prompts([2, 5, 3])
    config = SamplingConfig(max_new_tokens=10, temperature=0.5, eos_token_id=EOS, pad_token_id=PAD)
    rollout = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(0))
    assert rollout.response_ids.shape == (3, 1)
    assert torch.all(rollout.response_ids == EOS) and torch.all(rollout.response_mask)
    assert torch.equal(rollout.response_lengths, torch.ones(3, dtype=torch.long))
    assert (response_logprobs(policy, rollout, temperature=0.5) - rollout.logprobs).abs().max() <= 1e-5


def test_max_new_tokens_reached():
    policy = tiny_policy(eos_bias=-100.0)
    ids, mask = prompts([2, 4])
    config = SamplingConfig(max_new_tokens=7, temperature=1.5, top_p=0.8, eos_token_id=EOS, pad_token_id=PAD)
    rollout = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(0))
    assert rollout.response_ids.shape == (2, 7) and torch.all(rollout.response_mask)
    assert not torch.any(rollout.response_ids == EOS)
    assert (response_logprobs(policy, rollout, temperature=1.5) - rollout.logprobs).abs().max() <= 1e-5


# -- sample_tokens ---------------------------------------------------------------------------
def frequencies(z, top_k, top_p, n=4000):
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(z.expand(n, -1).contiguous(), top_k, top_p, g)
    return torch.bincount(draws, minlength=z.shape[-1]).float() / n


def test_sample_tokens_distribution():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
    z = probs.log()[None]
    # 4000 draws: the standard error of each frequency is below 0.008; 0.04 is 5 of them.
    torch.testing.assert_close(frequencies(z, 0, 1.0), probs, rtol=0, atol=0.04)
    kept = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.0]) / 0.7  # top-2
    torch.testing.assert_close(frequencies(z, 2, 1.0), kept, rtol=0, atol=0.04)
    nucleus = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.15]) / 0.85  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    torch.testing.assert_close(frequencies(z, 0, 0.8), nucleus, rtol=0, atol=0.04)
    # top-k first, then top-p on the renormalized top-k mass: 0.5/0.85 + 0.2/0.85 >= 0.8.
    both = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.0]) / 0.7
    torch.testing.assert_close(frequencies(z, 3, 0.8), both, rtol=0, atol=0.04)
    assert torch.equal(frequencies(z, 0, 0.3), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))  # one token always kept
    assert torch.equal(frequencies(z, 1, 1.0), frequencies(z, 0, 0.3))


def test_sample_tokens_never_picks_masked_or_zero_probability_tokens():
    z = torch.tensor([[0.0, -float("inf"), 3.0, -200.0]])
    draws = sample_tokens(z.expand(2000, -1).contiguous(), 0, 1.0, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) <= {0, 2}


# -- Rollout --------------------------------------------------------------------------------
def small_rollout():
    return Rollout(
        prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]),
        prompt_mask=torch.tensor([[False, True, True], [True, True, True]]),
        response_ids=torch.tensor([[4, 2], [2, 0]]),
        response_mask=torch.tensor([[True, True], [True, False]]),
        logprobs=torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]),
        group_ids=torch.tensor([0, 1]),
    )


def test_rollout_properties_select_and_token_lists():
    r = small_rollout()
    assert r.response_start == 3
    assert torch.equal(r.input_ids, torch.tensor([[0, 5, 6, 4, 2], [7, 8, 9, 2, 0]]))
    assert torch.equal(r.attention_mask, torch.tensor([[False, True, True, True, True], [True, True, True, True, False]]))
    assert torch.equal(r.response_lengths, torch.tensor([2, 1]))
    assert r.token_lists() == ([[5, 6], [7, 8, 9]], [[4, 2], [2]])
    one = r.select(torch.tensor([1]))
    assert one.token_lists() == ([[7, 8, 9]], [[2]]) and torch.equal(one.group_ids, torch.tensor([1]))
    assert one.values is None and torch.equal(one.logprobs, torch.tensor([[-0.5, 0.0]]))


def test_rollout_bad_shapes():
    r = small_rollout()
    with pytest.raises(ValueError, match="logprobs"):
        Rollout(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.logprobs[:, :1])
    with pytest.raises(ValueError, match="prompt_mask"):
        Rollout(r.prompt_ids, r.prompt_mask[:, 1:], r.response_ids, r.response_mask, r.logprobs)
    with pytest.raises(ValueError, match="scores"):
        Rollout(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.logprobs, scores=torch.zeros(3))
    with pytest.raises(TypeError, match="response_ids"):
        Rollout(r.prompt_ids, r.prompt_mask, [[4, 2]], r.response_mask, r.logprobs)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_k": -1}, ValueError, "top_k"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens"),
        ({"temperature": "hot"}, TypeError, "temperature"),
    ],
)
def test_sampling_config_bad_values(kwargs, error, name):
    with pytest.raises(error, match=name):
        SamplingConfig(**kwargs)


def test_generate_bad_input():
    policy = tiny_policy()
    ids, mask = prompts([2, 3])
    config = SamplingConfig(max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(policy, ids, mask[:, 1:], config)
    with pytest.raises(TypeError, match="prompt_ids"):
        generate(policy, ids.float(), mask, config)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(policy, ids, mask & torch.tensor([[True], [False]]), config)  # an empty prompt
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(policy, ids, mask, SamplingConfig(eos_token_id=VOCAB))
    with pytest.raises(TypeError, match="config"):
        generate(policy, ids, mask, {"max_new_tokens": 2})
    with pytest.raises(TypeError, match="policy"):
        generate(policy.lm, ids, mask, config)
    with pytest.raises(TypeError, match="generator"):
        generate(policy, ids, mask, config, generator=0)


# -- scoring ---------------------------------------------------------------------------------
def test_score_rollout_fills_every_field():
    policy = tiny_policy()
    reference = tiny_policy(seed=1)
    critic, reward_model = ScalarHeadModel.from_policy(policy), ScalarHeadModel.from_policy(reference)
    g = torch.Generator().manual_seed(0)
    torch.nn.init.normal_(critic.head.weight, generator=g)
    torch.nn.init.normal_(reward_model.head.weight, generator=g)
    ids, mask = prompts([3, 6, 1, 4])
    config = SamplingConfig(max_new_tokens=6, temperature=0.9, top_k=6, eos_token_id=EOS, pad_token_id=PAD)
    rollout = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(5))
    m, start = rollout.response_mask, rollout.response_start

    scored, metrics = score_rollout(rollout, temperature=0.9, policy=policy, reference=reference, critic=critic,
                                    reward_model=reward_model)  # fmt: skip
    assert metrics["logprob_gap_max"] <= 1e-5 and metrics["entropy"] > 0
    assert (scored.old_logprobs - rollout.logprobs).abs().max() <= 1e-5
    torch.testing.assert_close(scored.ref_logprobs, response_logprobs(reference, rollout, temperature=0.9))
    assert scored.ref_logprobs[m].sub(scored.old_logprobs[m]).abs().max() > 1e-3
    expected_values = critic.values(rollout.input_ids, rollout.attention_mask)[:, start - 1 : -1] * m
    torch.testing.assert_close(scored.values, expected_values)
    assert torch.all(scored.values[~m] == 0) and torch.all(scored.entropy[~m] == 0)
    torch.testing.assert_close(scored.scores, reward_model.rewards(rollout.input_ids, rollout.attention_mask))
    assert rollout.old_logprobs is None  # a new Rollout is returned

    seen = []

    def reward_fn(prompt_lists, response_lists):
        seen.append((prompt_lists, response_lists))
        return [float(len(r)) for r in response_lists]

    scored, metrics = score_rollout(rollout, temperature=0.9, reward_fn=reward_fn)
    assert seen == [rollout.token_lists()] and seen[0][0][2] == ids[2, -1:].tolist()
    assert torch.equal(scored.scores, rollout.response_lengths.float()) and metrics == {}


def test_score_rollout_bad_input():
    r = small_rollout()
    policy = tiny_policy()
    with pytest.raises(ValueError, match="reward_fn"):
        score_rollout(r, temperature=1.0, reward_fn=lambda p, q: [0.0] * len(p), reward_model=ScalarHeadModel.from_policy(policy))
    with pytest.raises(ValueError, match="reward_fn"):
        score_rollout(r, temperature=1.0, reward_fn=lambda p, q: [0.0] * 3)
    with pytest.raises(TypeError, match="critic"):
        score_rollout(r, temperature=1.0, critic=policy)
    with pytest.raises(TypeError, match="rollout"):
        score_rollout(r.logprobs, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        score_rollout(r, temperature=-1.0, policy=policy)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_sampling_passes_the_cache_by_the_installed_transformers_name(static_cache):
    """transformers 5.25 takes the KV cache as ``cache`` and warns on every ``past_key_values``
    call (older releases take only ``past_key_values``): a rollout emits no such warning, and the
    name chosen is one the installed base model's forward accepts."""
    import inspect
    import warnings

    from rlhf_engine.models.policy import cache_argument

    policy = tiny_policy()
    base = type(policy.lm.base_model)
    assert cache_argument(base) in inspect.signature(base.forward).parameters
    ids, mask = prompts([3, 5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(policy, ids, mask, SamplingConfig(max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD,
                                                   static_cache=static_cache), generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
