"""Micro-batching in the RL trainer: ``micro_batch_size`` (update phases),
``score_micro_batch_size`` (scoring) and ``generate_micro_batch_size`` (sampling).

The updates must not depend on the micro-batch size: each minibatch is one optimizer step
on gradients accumulated over its micro-batches, each micro-batch's loss divided by the
minibatch's denominator. Every test compares against the whole-minibatch (whole-pass)
computation on the same inputs. The rollout is built by hand so that it has what makes
micro-batching go wrong: responses of different lengths, a fully masked response, prompts
of different lengths (left padding), and old logprobs away from the policy's so that
clipping (hence clipfrac) happens.
"""

import copy

import pytest
import torch

from rlhf_engine.algos.common import concat_rollouts, sample_responses, step_generator
from rlhf_engine.algos.rl import AGGREGATIONS, RLConfig, RLTrainer
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.rollout import Rollout, SamplingConfig, generate, score_rollout
from rlhf_engine.tasks.data import left_pad

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, PAD, BOS, EOS = 12, 0, 1, 2
PROMPTS, GROUP, WIDTH = 7, 2, 6  # 14 rows; minibatches of 7 (two optimizer steps), micro-batches of 3 do not divide 7
# Response lengths of the 14 rows: a fully masked one, short ones, full-width ones.
LENGTHS = [6, 0, 3, 1, 6, 5, 2, 4, 6, 1, 3, 6, 2, 5]
MICRO_SIZES = [1, 3, 7]  # one row, a size that does not divide the minibatch, the whole minibatch


def fresh_seed() -> int:
    return int(torch.randint(2**31 - 1, ()))


def model_config():
    return llama_config("tiny", VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def prompts(n: int, generator: torch.Generator) -> list[list[int]]:
    """``n`` prompts of 1 to 4 ordinary tokens (different lengths: left padding varies by row)."""
    lengths = torch.randint(1, 5, (n,), generator=generator).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=generator).tolist() for k in lengths]


def fraction_of_threes(prompts, responses) -> torch.Tensor:
    return torch.tensor([sum(t == 3 for t in r) / max(len(r), 1) for r in responses], dtype=torch.float32)


def build_trainer(models: dict, **config) -> RLTrainer:
    """A trainer on deep copies of ``models`` (so every run starts from the same weights)."""
    models = copy.deepcopy(models)
    scoring = {"reward_model": models["reward_model"]} if "reward_model" in models else {"reward_fn": fraction_of_threes}
    base = dict(prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=WIDTH, minibatch_size=PROMPTS, lr=1e-2)
    return RLTrainer(
        RLConfig(**{**base, **config}), policy=models["policy"], reference=models["reference"], prompts=prompts,
        pad_token_id=PAD, eos_token_id=EOS, critic=models.get("critic"), **scoring,
    )  # fmt: skip


def tiny_models(seed: int, *, critic: bool = False, reward_model: bool = False) -> dict:
    policy = PolicyModel.from_config(model_config(), seed=seed)
    # The reference differs from the policy, so the KL term of the loss is not 0.
    models = {"policy": policy, "reference": PolicyModel.from_config(model_config(), seed=seed + 1)}
    if critic:
        models["critic"] = ScalarHeadModel.from_policy(policy)
        torch.nn.init.normal_(models["critic"].head.weight, std=0.5)  # a zero head gives zero values
    if reward_model:
        models["reward_model"] = ScalarHeadModel.from_config(model_config(), seed=seed + 2)
        torch.nn.init.normal_(models["reward_model"].head.weight)
    return models


def hand_rollout(generator: torch.Generator) -> Rollout:
    """Unscored rollout: prompts of different lengths, responses of ``LENGTHS`` (one empty)."""
    prompt_ids, prompt_mask = left_pad(prompts(len(LENGTHS), generator), PAD)
    lengths = torch.tensor(LENGTHS)
    response_mask = torch.arange(WIDTH)[None, :] < lengths[:, None]
    response_ids = torch.where(response_mask, torch.randint(3, VOCAB, (len(LENGTHS), WIDTH), generator=generator), PAD)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), response_ids=response_ids,
                   response_mask=response_mask, logprobs=torch.zeros(len(LENGTHS), WIDTH))  # fmt: skip


def scored_rollout(trainer: RLTrainer, generator: torch.Generator) -> Rollout:
    """``hand_rollout`` scored by ``trainer``, with old logprobs moved off the policy's (by up to
    ~0.6 nats) so that ratios leave the clip range."""
    rollout, _ = trainer.score(hand_rollout(generator))
    noise = 0.3 * torch.randn(rollout.response_ids.shape, generator=generator)
    rollout.old_logprobs = (rollout.old_logprobs + noise) * rollout.response_mask
    return rollout


def deltas(before: dict, model: torch.nn.Module) -> dict:
    return {k: v.detach() - before[k] for k, v in model.state_dict().items()}


def assert_same_update(delta: dict, expected: dict) -> None:
    """Parameter deltas equal to rounding: 1e-5 of the largest expected update (fp32 rounding
    of gradients summed in another order), and at least one ulp of a parameter of magnitude
    up to 2 (a norm weight at 1.0 moves in steps of 1.2e-7 whatever its gradient: seen as a
    1-ulp difference with seed 513671731)."""
    scale = max(float(d.abs().max()) for d in expected.values())
    assert scale > 0, "the update moved nothing"
    atol = max(1e-5 * scale, 2 * torch.finfo(torch.float32).eps)
    for k in expected:
        torch.testing.assert_close(delta[k], expected[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


def run_update(models: dict, rollout: Rollout, phase: str, target: torch.Tensor, **config):
    """One ``update_policy`` / ``update_critic`` from ``models``; -> (parameter deltas, metrics)."""
    trainer = build_trainer(models, **config)
    model = trainer.policy if phase == "policy" else trainer.critic
    # SGD instead of the trainer's AdamW: AdamW's early steps divide each gradient element by
    # its own magnitude (g / (|g| + eps)), so an element whose gradient is ~0 turns fp32 rounding
    # into a move the size of lr; SGD's update is linear in the (clipped) accumulated gradient,
    # which is what micro-batching must leave unchanged. lr 1: a step of norm grad_clip, large
    # against the rounding of the parameters themselves (~2e-9 at their size).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    if phase == "policy":
        trainer.optimizer = optimizer
    else:
        trainer.critic_optimizer = optimizer
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update = trainer.update_policy if phase == "policy" else trainer.update_critic
    metrics = update(rollout, target, 0)
    return deltas(before, model), metrics


# -- the updates --------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["trl", "verl"])  # their loss semantics: algos/loss_semantics.py
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_update_over_micro_batches_equals_the_whole_minibatch_update(aggregation, preset):
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    models = tiny_models(seed)
    # KL in the loss and an entropy bonus: every term of the loss goes through the normalizer.
    # A small grad_clip so that clipping acts: it must act on the accumulated gradient.
    config = dict(aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01, grad_clip=0.05, advantage="grpo", seed=seed,
                  preset=preset)
    rollout = scored_rollout(build_trainer(models, **config), generator)
    advantages = torch.randn(rollout.response_ids.shape, generator=generator) * rollout.response_mask
    expected, expected_metrics = run_update(models, rollout, "policy", advantages, **config)
    assert expected_metrics["clipfrac"] > 0  # the weighting of the per-micro-batch means matters
    assert expected_metrics["grad_norm"] > config["grad_clip"]  # clipping acted
    for micro in MICRO_SIZES:
        delta, metrics = run_update(models, rollout, "policy", advantages, micro_batch_size=micro, **config)
        assert_same_update(delta, expected)
        assert metrics.keys() == expected_metrics.keys()
        for k, v in expected_metrics.items():
            assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (micro, k)
        if micro == PROMPTS:  # one micro-batch per minibatch: the very same computation
            assert all(torch.equal(delta[k], expected[k]) for k in expected) and metrics == expected_metrics


def test_policy_update_with_per_sequence_advantages_and_an_all_masked_minibatch():
    """Group advantages are ``[B]`` (indexed per micro-batch like the rows); a minibatch whose
    rows are all empty has normalizer 0: loss 0, metrics 0, no NaN from the token shares."""
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    models = tiny_models(seed)
    config = dict(aggregation="token-mean", kl_coef=0.0, advantage="grpo", seed=seed)
    rollout = scored_rollout(build_trainer(models, **config), generator)
    advantages = torch.randn(rollout.response_ids.shape[0], generator=generator)
    expected, expected_metrics = run_update(models, rollout, "policy", advantages, **config)
    delta, metrics = run_update(models, rollout, "policy", advantages, micro_batch_size=3, **config)
    assert_same_update(delta, expected)
    assert metrics == pytest.approx(expected_metrics, rel=1e-5, abs=1e-7)

    empty = rollout.select(torch.tensor([i for i, n in enumerate(LENGTHS) if n <= 1]))
    empty.response_mask = torch.zeros_like(empty.response_mask)
    for micro in (None, 1):
        _, metrics = run_update(models, empty, "policy", advantages[: empty.response_ids.shape[0]], micro_batch_size=micro,
                                **dict(config, minibatch_size=len(LENGTHS)))  # fmt: skip
        assert metrics == {k: 0.0 for k in metrics}, metrics


def test_critic_update_over_micro_batches_equals_the_whole_minibatch_update():
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    models = tiny_models(seed, critic=True)
    config = dict(advantage="gae", grad_clip=0.05, value_clip=0.2, seed=seed)
    trainer = build_trainer(models, **config)
    rollout = scored_rollout(trainer, generator)
    _, returns = trainer.advantages(rollout)
    returns = returns + torch.randn(returns.shape, generator=generator) * rollout.response_mask  # clip the value loss
    expected, expected_metrics = run_update(models, rollout, "critic", returns, **config)
    for micro in MICRO_SIZES:
        delta, metrics = run_update(models, rollout, "critic", returns, micro_batch_size=micro, **config)
        assert_same_update(delta, expected)
        assert metrics == pytest.approx(expected_metrics, rel=1e-5, abs=1e-7), micro


# -- scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("micro", [1, 3, 100])
def test_micro_batched_scoring_equals_the_whole_pass(micro):
    seed = fresh_seed()
    models = tiny_models(seed, critic=True, reward_model=True)
    whole_trainer = build_trainer(models, advantage="gae", seed=seed)
    micro_trainer = build_trainer(models, advantage="gae", seed=seed, score_micro_batch_size=micro)
    rollout = hand_rollout(torch.Generator().manual_seed(seed))
    expected, expected_metrics = whole_trainer.score(rollout)
    scored, metrics = micro_trainer.score(rollout)
    for name in ("old_logprobs", "entropy", "ref_logprobs", "values", "scores"):
        torch.testing.assert_close(getattr(scored, name), getattr(expected, name), rtol=1e-5, atol=1e-6, msg=name)
        if name != "scores":
            assert torch.all(getattr(scored, name)[~rollout.response_mask] == 0), name
    assert metrics == pytest.approx(expected_metrics, rel=1e-5, abs=1e-6)


def test_score_rollout_rejects_a_bad_micro_batch_size():
    policy = PolicyModel.from_config(model_config(), seed=0)
    rollout = hand_rollout(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="score_rollout: micro_batch_size must be >= 1"):
        score_rollout(rollout, temperature=1.0, policy=policy, micro_batch_size=0)
    with pytest.raises(TypeError, match="score_rollout: micro_batch_size must be an int"):
        score_rollout(rollout, temperature=1.0, policy=policy, micro_batch_size=2.0)


# -- generation ---------------------------------------------------------------------------
def whole_batch_prompts(trainer: RLTrainer, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts ``trainer.generate(step)`` samples from, left-padded over the whole batch."""
    cfg = trainer.config
    drawn = trainer.prompts(cfg.prompts_per_step, step_generator(cfg.seed, step, "prompts"))
    ids, mask = left_pad([p for p in drawn for _ in range(cfg.group_size)], PAD)
    return ids, mask.bool()


def test_generation_without_micro_batches_draws_todays_stream():
    seed = fresh_seed()
    models = tiny_models(seed)
    trainer = build_trainer(models, seed=seed)  # generate_micro_batch_size absent
    rollout = trainer.generate(3)
    # Today's computation: one generate over the whole batch on the step's "sample" stream.
    prompt_ids, prompt_mask = whole_batch_prompts(trainer, 3)
    sampling = SamplingConfig(max_new_tokens=WIDTH, eos_token_id=EOS, pad_token_id=PAD)
    expected = generate(models["policy"], prompt_ids, prompt_mask, sampling, generator=step_generator(seed, 3, "sample"))
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs"):
        assert torch.equal(getattr(rollout, name), getattr(expected, name)), name


@pytest.mark.parametrize("micro", [1, 3])
def test_chunked_generation_is_reproducible_and_draws_the_documented_stream(micro):
    seed = fresh_seed()
    models = tiny_models(seed)
    trainer = build_trainer(models, seed=seed, generate_micro_batch_size=micro)
    rollout = trainer.generate(2)
    again = build_trainer(models, seed=seed, generate_micro_batch_size=micro).generate(2)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs", "group_ids"):
        assert torch.equal(getattr(rollout, name), getattr(again, name)), name

    # Chunks in row order on the one "sample" stream, from the whole batch's padded prompts,
    # each right-padded to the widest chunk.
    prompt_ids, prompt_mask = whole_batch_prompts(trainer, 2)
    assert torch.equal(rollout.prompt_ids, prompt_ids) and torch.equal(rollout.prompt_mask, prompt_mask)
    sampling = SamplingConfig(max_new_tokens=WIDTH, eos_token_id=EOS, pad_token_id=PAD)
    stream = step_generator(seed, 2, "sample")
    for start in range(0, prompt_ids.shape[0], micro):
        rows = slice(start, start + micro)
        chunk = generate(models["policy"], prompt_ids[rows], prompt_mask[rows], sampling, generator=stream)
        width = chunk.response_ids.shape[1]
        assert torch.equal(rollout.response_ids[rows, :width], chunk.response_ids)
        assert torch.equal(rollout.response_mask[rows, :width], chunk.response_mask)
        assert torch.equal(rollout.logprobs[rows, :width], chunk.logprobs)
        assert not rollout.response_mask[rows, width:].any() and torch.all(rollout.response_ids[rows, width:] == PAD)
    # The merged rollout lines up with the training-side logprobs of the same policy.
    _, metrics = trainer.score(rollout)
    assert metrics["logprob_gap_max"] <= 1e-5


def test_concat_rollouts_pads_responses_to_the_widest_part():
    gen = torch.Generator().manual_seed(0)
    parts = []
    for rows, width in ((2, 3), (1, 5)):
        mask = torch.rand(rows, width, generator=gen) < 0.7
        parts.append(Rollout(
            prompt_ids=torch.randint(3, VOCAB, (rows, 4), generator=gen), prompt_mask=torch.ones(rows, 4, dtype=torch.bool),
            response_ids=torch.randint(3, VOCAB, (rows, width), generator=gen), response_mask=mask,
            logprobs=-torch.rand(rows, width, generator=gen) * mask,
        ))  # fmt: skip
    merged = concat_rollouts(parts, PAD)
    assert merged.response_ids.shape == (3, 5) and merged.response_mask.dtype == torch.bool
    assert torch.equal(merged.response_ids[:2, :3], parts[0].response_ids) and torch.all(merged.response_ids[:2, 3:] == PAD)
    assert not merged.response_mask[:2, 3:].any() and torch.all(merged.logprobs[:2, 3:] == 0)
    assert torch.equal(merged.response_ids[2:], parts[1].response_ids) and torch.equal(merged.logprobs[2:], parts[1].logprobs)
    assert torch.equal(merged.prompt_ids, torch.cat([p.prompt_ids for p in parts]))


def test_sample_responses_rejects_a_bad_micro_batch_size():
    policy = PolicyModel.from_config(model_config(), seed=0)
    sampling = SamplingConfig(max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="sample_responses: micro_batch_size must be >= 1"):
        sample_responses(policy, [[3, 4]], 2, sampling, None, micro_batch_size=0)


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["micro_batch_size", "score_micro_batch_size", "generate_micro_batch_size"])
@pytest.mark.parametrize("value", [0, -2])
def test_config_rejects_micro_batch_sizes_below_one_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"RLConfig.{field} must be >= 1 or null"):
        RLConfig(**{field: value})
    assert getattr(RLConfig(**{field: 5}), field) == 5 and getattr(RLConfig(), field) is None
