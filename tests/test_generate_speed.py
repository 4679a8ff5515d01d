"""generate's speed options keep its results: k-step syncs, dropping finished rows, the static
cache (and, on a GPU, the compiled decode step), the CPU sort.

The reference is the straightforward loop ``generate`` ran before them: one step per token,
the whole batch to the end, a host check after every step, ``torch.sort`` in the sampler.
"""

import pytest
import torch
from transformers import Qwen2Config

from rlhf_engine.models import PolicyModel, llama_config
from rlhf_engine.models.inputs import position_ids_from_mask
from rlhf_engine.rollout import SamplingConfig, generate, sampling
from tests.test_rollout import prompts  # same vocabulary and pad id

VOCAB, EOS, PAD = 12, 2, 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_generate(policy, prompt_ids, prompt_mask, config, generator):
    """(response_ids, response_mask, logprobs) ``[B, R]`` of the per-step loop."""
    batch = prompt_ids.shape[0]
    mask = prompt_mask.bool()
    done = torch.zeros(batch, dtype=torch.bool)
    tokens, logprobs, alive_steps = [], [], []
    step_ids, positions, cache = prompt_ids, position_ids_from_mask(mask), None
    with torch.no_grad():
        for _ in range(config.max_new_tokens):
            logits, cache = policy.next_token_logits(step_ids, mask, positions, cache)
            z = logits / config.temperature
            sorted_z, order = z.sort(dim=-1, descending=True, stable=True)
            probs = torch.softmax(sorted_z, dim=-1)
            if config.top_k > 0:
                probs[:, config.top_k :] = 0
                probs = probs / probs.sum(dim=-1, keepdim=True)
            if config.top_p < 1:
                probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= config.top_p, 0)
            cdf = probs.cumsum(dim=-1)
            u = torch.rand(batch, 1, generator=generator)
            index = torch.minimum(torch.searchsorted(cdf, u * cdf[:, -1:], right=True), (probs > 0).sum(-1, keepdim=True) - 1)
            token = order.gather(1, index).squeeze(1)
            logp = z.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
            alive = ~done
            token = torch.where(alive, token, config.pad_token_id)
            tokens.append(token)
            logprobs.append(torch.where(alive, logp, 0.0))
            alive_steps.append(alive)
            done = done | (token == EOS)
            if bool(done.all()):
                break
            step_ids, positions = token[:, None], mask.long().sum(dim=1, keepdim=True)
            mask = torch.cat([mask, alive[:, None]], dim=1)
    return torch.stack(tokens, 1), torch.stack(alive_steps, 1), torch.stack(logprobs, 1)


def with_eos_bias(policy: PolicyModel, eos_bias: float) -> PolicyModel:
    """An untied lm_head with a bias on EOS: rows stop after about ``V / e^bias`` steps."""
    policy.lm.config.tie_word_embeddings = False
    policy.lm.lm_head.weight = torch.nn.Parameter(policy.lm.lm_head.weight.detach().clone())
    bias = torch.zeros(VOCAB)
    bias[EOS] = eos_bias
    policy.lm.lm_head.bias = torch.nn.Parameter(bias)
    return policy.eval()


def tiny_llama(eos_bias: float) -> PolicyModel:
    return with_eos_bias(PolicyModel.from_config(llama_config("tiny", VOCAB, eos_token_id=EOS, pad_token_id=PAD), seed=0), eos_bias)


def tiny_qwen2(eos_bias: float) -> PolicyModel:
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return with_eos_bias(PolicyModel.from_config(config, seed=1), eos_bias)


# Two regimes: (eos_bias, max_new_tokens) where every row stops well before the end, and
# where rows stop early at EOS but some row runs to max_new_tokens.
ALL_STOP, SOME_RUN_ON = (1.0, 40), (0.0, 12)
MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
LENGTHS = [5, 2, 7, 3, 1, 6, 4, 7]


def run_both(model, regime, sync_every, monkeypatch, seed=3, **options):
    """(ours, reference, generator states after each) on one model and prompt batch."""
    eos_bias, max_new = regime
    policy = MODELS[model](eos_bias)
    ids, mask = prompts(LENGTHS, seed=1)
    config = SamplingConfig(max_new_tokens=max_new, temperature=0.9, top_p=0.95, eos_token_id=EOS, pad_token_id=PAD, **options)
    monkeypatch.setattr(sampling, "CPU_SYNC_EVERY", sync_every)
    g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ours = generate(policy, ids, mask, config, generator=g_ours)
    ref = reference_generate(policy, ids, mask, config, g_ref)
    return ours, ref, (g_ours, g_ref)


def check_regime(regime, ref):
    """The case is the one the test means: rows of different lengths, and R < max_new_tokens
    exactly when every row stopped."""
    lengths = ref[1].sum(dim=1)
    assert lengths.min() < ref[0].shape[1], "no row stopped early"
    assert (ref[0].shape[1] < regime[1]) == (regime is ALL_STOP)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("regime", [ALL_STOP, SOME_RUN_ON], ids=["all-stop", "some-run-on"])
@pytest.mark.parametrize("sync_every", [1, 5, 16])
def test_k_step_syncs_are_bitwise_the_per_step_loop(model, regime, sync_every, monkeypatch):
    """Without row dropping the batch computes exactly what the per-step loop computes: same
    tokens, mask and logprobs to the bit, R trimmed to the last live step, and the
    generator left where the per-step loop leaves it (draws past the end undone)."""
    ours, ref, (g_ours, g_ref) = run_both(model, regime, sync_every, monkeypatch, drop_finished_rows=False)
    check_regime(regime, ref)
    assert torch.equal(ours.response_ids, ref[0])
    assert torch.equal(ours.response_mask, ref[1])
    assert torch.equal(ours.logprobs, ref[2])
    assert ours.response_ids.is_contiguous() and ours.logprobs.dtype == torch.float32
    assert torch.equal(torch.rand(4, generator=g_ours), torch.rand(4, generator=g_ref))


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("regime", [ALL_STOP, SOME_RUN_ON], ids=["all-stop", "some-run-on"])
@pytest.mark.parametrize("sync_every", [1, 4])
def test_dropping_finished_rows_keeps_the_samples(model, regime, sync_every, monkeypatch):
    """Dropped rows keep their draws' place in the stream: the same tokens and mask; the
    smaller batch's matmuls may round logits in the last bit, so logprobs agree to 1e-5."""
    dropped = []
    keep_rows = sampling._Decoder.keep_rows
    monkeypatch.setattr(sampling._Decoder, "keep_rows", lambda self, keep: (dropped.append(len(keep)), keep_rows(self, keep)))
    ours, ref, (g_ours, g_ref) = run_both(model, regime, sync_every, monkeypatch)
    check_regime(regime, ref)
    assert dropped and dropped[0] <= len(LENGTHS) // 2  # rows were dropped once half had stopped
    assert torch.equal(ours.response_ids, ref[0])
    assert torch.equal(ours.response_mask, ref[1])
    torch.testing.assert_close(ours.logprobs, ref[2], rtol=0, atol=1e-5)
    assert torch.all(ours.logprobs[~ours.response_mask] == 0)
    assert torch.equal(torch.rand(4, generator=g_ours), torch.rand(4, generator=g_ref))


@pytest.mark.parametrize("world_size", [1, 2])
def test_rows_are_dropped_in_a_world_of_one_only(world_size, monkeypatch):
    """``torchrun --nproc-per-node 1`` samples as the single process does, finished rows
    dropped; ranks of a larger world keep theirs (rank 0 of 2 here: its collectives are
    stubbed, the draws it keeps are its half of the global batch's)."""
    from rlhf_engine.distributed.group import DataParallel

    dropped = []
    keep_rows = sampling._Decoder.keep_rows
    monkeypatch.setattr(sampling._Decoder, "keep_rows", lambda self, keep: (dropped.append(len(keep)), keep_rows(self, keep)))
    parallel = DataParallel(rank=0, world_size=world_size, distributed=True)
    monkeypatch.setattr(DataParallel, "_reduce", lambda self, tensor, op: tensor * (world_size if op == "SUM" else 1))
    ids, mask = prompts(LENGTHS, seed=1)
    config = SamplingConfig(max_new_tokens=ALL_STOP[1], eos_token_id=EOS, pad_token_id=PAD)
    out = generate(tiny_llama(ALL_STOP[0]), ids, mask, config, generator=torch.Generator().manual_seed(3), parallel=parallel)
    assert bool(out.response_mask[:, -1].logical_not().any())  # some row stopped before the last step
    assert bool(dropped) == (world_size == 1)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("sync_every", [1, 16])
def test_static_cache_matches_the_dynamic_cache(model, sync_every, monkeypatch):
    """The preallocated cache attends over zero-filled, masked slots too: the same tokens,
    logprobs to rounding."""
    ours, ref, (g_ours, g_ref) = run_both(model, SOME_RUN_ON, sync_every, monkeypatch, static_cache=True)
    assert torch.equal(ours.response_ids, ref[0]) and torch.equal(ours.response_mask, ref[1])
    torch.testing.assert_close(ours.logprobs, ref[2], rtol=0, atol=1e-5)
    assert torch.equal(torch.rand(4, generator=g_ours), torch.rand(4, generator=g_ref))


def test_descending_order_is_torch_stable_sort_with_ties():
    """The CPU numpy path gives torch's stable descending permutation, ties in index order:
    repeated values, +0.0 and -0.0 (equal as floats, different bits), bf16-rounded logits
    (many exact ties), infinities."""
    z = torch.randn(6, 4099)
    z[0, ::3] = 0.5
    z[1, 1::7], z[1, 2::7] = -0.0, 0.0
    z[2] = z[2].bfloat16().float()
    z[3, :10] = float("-inf")
    z[3, 10:12] = float("inf")
    z[4] = 0.0
    z[5, ::2] = -3.25
    expected = z.sort(dim=-1, descending=True, stable=True).indices
    assert torch.equal(sampling.descending_order(z), expected)


def test_unset_generator_draws_from_the_default_stream():
    policy = tiny_llama(0.0)
    ids, mask = prompts([3, 4])
    config = SamplingConfig(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(11)
    a = generate(policy, ids, mask, config)
    after_a = torch.rand(3)
    b = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.response_ids, b.response_ids)
    torch.manual_seed(11)
    reference_generate(policy, ids, mask, config, None)
    assert torch.equal(after_a, torch.rand(3))


def test_sampling_config_speed_options_are_checked():
    with pytest.raises(TypeError, match="static_cache"):
        SamplingConfig(static_cache=1)
    with pytest.raises(TypeError, match="drop_finished_rows"):
        SamplingConfig(drop_finished_rows="yes")
    with pytest.raises(ValueError, match="compile_decode"):
        SamplingConfig(compile_decode=True)


@pytest.mark.gpu
def test_compiled_static_decode_on_cuda_matches_eager():
    """CUDA graphs of the decode step (compiled once, reused by the second call): the same
    tokens as the eager dynamic-cache path on the same CPU generator's draws."""
    policy = tiny_llama(0.0).cuda()
    ids, mask = prompts(LENGTHS, seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    base = dict(max_new_tokens=20, temperature=0.9, eos_token_id=EOS, pad_token_id=PAD)
    eager = generate(policy, ids, mask, SamplingConfig(**base), generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        compiled = generate(
            policy, ids, mask, SamplingConfig(**base, static_cache=True, compile_decode=True),
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        assert torch.equal(compiled.response_ids, eager.response_ids)
        assert torch.equal(compiled.response_mask, eager.response_mask)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, rtol=0, atol=1e-4)
