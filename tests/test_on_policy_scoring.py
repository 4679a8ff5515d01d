"""No extra forward in scoring: an on-policy update (one epoch, one minibatch of the whole
rollout, no KL in the reward) takes its old logprobs from its own forward, detached, and
``score`` skips the policy's no-grad pass (TRL's ``num_iterations=1`` rule, see
``RLConfig.old_logprob_pass``).

The runs compare the skip with the forced recompute (``recompute_old_logprobs=True``) from
the same weights: the two differ only in where ``old_logp`` comes from (the scoring pass or
the update's own forward, equal up to fp32 rounding), so the parameters must agree to
rounding. The policy's forwards are counted with a hook on its transformer body.
"""

import copy
import dataclasses

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine.algos.config import config_from_dict
from rlhf_engine.algos.grpo import grpo_config
from rlhf_engine.algos.rl import RLConfig, RLTrainer
from rlhf_engine.algos.rloo import rloo_config
from rlhf_engine.memory.estimate import RoleSpec, estimate
from rlhf_engine.memory.run_specs import role_specs, workload
from rlhf_engine.memory.shapes import ModelShape
from rlhf_engine.models import PolicyModel, llama_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, PAD, BOS, EOS, TARGET = 12, 0, 1, 2, 7
PROMPTS, GROUP, WIDTH = 4, 3, 5  # 12 rollout rows
ON_POLICY = dict(prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=WIDTH, epochs=1, minibatch_size=PROMPTS * GROUP)


def fresh_seed() -> int:
    return int(torch.randint(2**31 - 1, ()))


def model_config():
    return llama_config("tiny", VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def prompts(n: int, generator: torch.Generator) -> list[list[int]]:
    return torch.randint(3, VOCAB, (n, 3), generator=generator).tolist()


def target_fraction(prompts, responses) -> torch.Tensor:
    return torch.tensor([sum(t == TARGET for t in r) / len(r) for r in responses], dtype=torch.float32)


class PolicyForwards:
    """Counts the passes of ``policy``'s transformer body (every forward of the policy goes
    through it: scoring, update, the reference's pass only when the reference is the policy)."""

    def __init__(self, policy: PolicyModel):
        self.count = 0
        policy.lm.base_model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


def trainer_from(models: dict, config: RLConfig) -> RLTrainer:
    """A trainer on copies of ``models``, with plain SGD: AdamW's first steps divide each
    gradient element by its own magnitude, so an element whose gradient is ~0 would turn fp32
    rounding into a move the size of lr; SGD's step is linear in the gradient."""
    models = copy.deepcopy(models)
    trainer = RLTrainer(config, policy=models["policy"], reference=models["reference"], prompts=prompts,
                        pad_token_id=PAD, eos_token_id=EOS, reward_fn=target_fraction)  # fmt: skip
    trainer.optimizer = torch.optim.SGD(trainer.policy.parameters(), lr=0.5)
    return trainer


def tiny_models(seed: int) -> dict:
    # The reference differs from the policy, so the KL term of the loss is not 0.
    return {"policy": PolicyModel.from_config(model_config(), seed=seed),
            "reference": PolicyModel.from_config(model_config(), seed=seed + 1)}  # fmt: skip


def run_steps_counting(trainer: RLTrainer, steps: int) -> tuple[list[dict], list[int]]:
    """``steps`` RL steps; -> (metrics per step, policy forwards in each step's score phase)."""
    forwards = PolicyForwards(trainer.policy)
    score = trainer.score
    in_score = []

    def counted_score(rollout):
        before = forwards.count
        out = score(rollout)
        in_score.append(forwards.count - before)
        return out

    trainer.score = counted_score
    return [trainer.step(k) for k in range(steps)], in_score


# -- the config rule -----------------------------------------------------------------------
def test_the_rule_skips_only_an_on_policy_update_without_kl_in_the_reward():
    grpo = grpo_config(**ON_POLICY)
    assert grpo.on_policy_update and not grpo.reward_kl and not grpo.old_logprob_pass
    # Several epochs, or several minibatches: the later steps are off-policy.
    assert grpo_config(**{**ON_POLICY, "epochs": 2}).old_logprob_pass
    assert grpo_config(**{**ON_POLICY, "minibatch_size": PROMPTS * GROUP - 1}).old_logprob_pass
    # Micro-batches of the one minibatch all see the policy before its step: still on-policy.
    assert not grpo_config(**ON_POLICY, micro_batch_size=5).old_logprob_pass
    # The KL in the reward needs the old logprobs before the update (TRL's RLOO computes them
    # always); with β = 0 it does not.
    assert rloo_config(**ON_POLICY).old_logprob_pass
    assert not rloo_config(**ON_POLICY, kl_coef=0.0).old_logprob_pass
    # Forced either way where it is valid.
    assert grpo_config(**ON_POLICY, recompute_old_logprobs=True).old_logprob_pass
    assert not grpo_config(**ON_POLICY, recompute_old_logprobs=False).old_logprob_pass


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_recompute_old_logprobs_must_be_a_bool_or_none(value):
    with pytest.raises(ValueError, match="RLConfig.recompute_old_logprobs must be true, false or null"):
        RLConfig(**ON_POLICY, recompute_old_logprobs=value)
    with pytest.raises(ValueError, match="recompute_old_logprobs must be bool"):
        config_from_dict(RLConfig, {"recompute_old_logprobs": value})


@pytest.mark.parametrize("change", [dict(epochs=2), dict(minibatch_size=6), dict(kl_in_reward=True, kl_coef=0.1)],
                         ids=["epochs", "minibatches", "kl_in_reward"])  # fmt: skip
def test_skipping_is_refused_where_the_old_logprobs_are_needed(change):
    with pytest.raises(ValueError, match="RLConfig.recompute_old_logprobs must be true or null unless the update is on-policy"):
        RLConfig(**{**ON_POLICY, **change}, recompute_old_logprobs=False)


# -- the trainer ---------------------------------------------------------------------------
@pytest.mark.parametrize("micro", [None, 5], ids=["one_micro_batch", "micro_batches"])
def test_on_policy_skip_updates_like_the_forced_recompute_without_the_scoring_forward(micro):
    seed = fresh_seed()
    models = tiny_models(seed)
    # KL in the loss (GRPO), an entropy bonus, a clip range that the ratio must not leave.
    config = grpo_config(**ON_POLICY, seed=seed, kl_coef=0.1, entropy_coef=0.01, micro_batch_size=micro)
    skip = trainer_from(models, config)
    recompute = trainer_from(models, dataclasses.replace(config, recompute_old_logprobs=True))
    skipped, skipped_scores = run_steps_counting(skip, 2)
    recomputed, recomputed_scores = run_steps_counting(recompute, 2)
    assert skipped_scores == [0, 0] and recomputed_scores == [1, 1]

    expected = recompute.policy.state_dict()
    moved = max(float((v - models["policy"].state_dict()[k]).abs().max()) for k, v in expected.items())
    assert moved > 1e-3, "the update moved nothing"
    for k, v in skip.policy.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-5 * moved, msg=lambda m: f"{k}: {m}")
    for mine, theirs in zip(skipped, recomputed):
        # The gap metric and the step's KL come from the update's own logprobs instead.
        assert mine["logprob_gap_max"] <= 1e-5 and theirs["logprob_gap_max"] <= 1e-5
        # exp(lp - sg(lp)) is exactly 1; the micro-batches' token shares add up to 1 to rounding.
        assert mine["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and mine["clipfrac"] == mine["approx_kl"] == 0.0
        for key in ("kl", "policy_loss", "entropy", "reward_mean"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


def test_update_policy_fills_the_old_logprobs_score_would_have():
    seed = fresh_seed()
    models = tiny_models(seed)
    config = grpo_config(**ON_POLICY, seed=seed, micro_batch_size=5)
    trainer = trainer_from(models, config)
    rollout, metrics = trainer.score(trainer.generate(0))
    assert rollout.old_logprobs is None and "logprob_gap_max" not in metrics
    scored, _ = trainer_from(models, dataclasses.replace(config, recompute_old_logprobs=True)).score(rollout)
    advantages, _ = trainer.advantages(rollout)
    update = trainer.update_policy(rollout, advantages, 0)
    torch.testing.assert_close(rollout.old_logprobs, scored.old_logprobs, rtol=1e-5, atol=1e-6)
    assert torch.all(rollout.old_logprobs[~rollout.response_mask] == 0)
    gap = float(((scored.old_logprobs - rollout.logprobs).abs() * rollout.response_mask).max())
    assert update["logprob_gap_max"] == pytest.approx(gap, abs=2e-6)


def test_several_epochs_still_recompute_in_score():
    seed = fresh_seed()
    trainer = trainer_from(tiny_models(seed), grpo_config(**{**ON_POLICY, "epochs": 2}, seed=seed))
    history, in_score = run_steps_counting(trainer, 1)
    assert in_score == [1] and history[0]["logprob_gap_max"] <= 1e-5


def test_an_off_policy_update_refuses_a_rollout_without_old_logprobs():
    seed = fresh_seed()
    models = tiny_models(seed)
    on_policy = trainer_from(models, grpo_config(**ON_POLICY, seed=seed))
    rollout, _ = on_policy.score(on_policy.generate(0))
    trainer = trainer_from(models, grpo_config(**{**ON_POLICY, "minibatch_size": 6}, seed=seed))
    advantages, _ = trainer.advantages(rollout)
    with pytest.raises(ValueError, match="rollout.old_logprobs is None .on-policy., which holds for one epoch with one minibatch"):
        trainer.update_policy(rollout, advantages, 0)


# -- the op --------------------------------------------------------------------------------
def test_policy_loss_without_old_logp_is_the_detached_current_logp():
    gen = torch.Generator().manual_seed(fresh_seed())
    logp = (-torch.rand(3, 7, generator=gen)).requires_grad_()
    advantages, mask = torch.randn(3, generator=gen), torch.rand(3, 7, generator=gen) < 0.8
    options = dict(kl_coef=0.1, ref_logp=-torch.rand(3, 7, generator=gen), aggregation="seq-mean-token-mean", backend="torch")
    loss, metrics = ops.policy_loss(logp, None, advantages, mask, **options)
    (grad,) = torch.autograd.grad(loss, logp)
    expected, expected_metrics = ops.policy_loss(logp, logp.detach(), advantages, mask, **options)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad) and grad.abs().sum() > 0
    assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in expected_metrics.items()}
    assert float(metrics["ratio_mean"]) == 1.0
    with pytest.raises(TypeError, match="policy_loss: old_logp must be a torch.Tensor or None"):
        ops.policy_loss(logp, 0.0, advantages, mask)


def test_fused_linear_policy_loss_without_old_logp_uses_its_own_logprobs():
    gen = torch.Generator().manual_seed(fresh_seed())
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, 8, generator=gen)
    labels, mask = torch.randint(VOCAB, (2, 5), generator=gen), torch.rand(2, 5, generator=gen) < 0.8
    advantages = torch.randn(2, generator=gen)
    loss, _, logp, _ = ops.fused_linear_policy_loss(hidden, weight, labels, None, advantages, mask, return_logprobs=True, backend="torch")
    (grad,) = torch.autograd.grad(loss, hidden)
    own = ops.fused_linear_logprobs(hidden, weight, labels, backend="torch").detach()
    expected, _ = ops.fused_linear_policy_loss(hidden, weight, labels, own, advantages, mask, backend="torch")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert torch.equal(logp, own)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


# -- the planner ---------------------------------------------------------------------------
SMALL = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, vocab_size=1000)  # fmt: skip


def transient(phase_estimate, role: str) -> int:
    return phase_estimate.roles[role]["activations"] + phase_estimate.roles[role]["logits"]


def test_the_plan_counts_no_policy_pass_in_score_when_the_trainer_skips_it():
    # An fp32 policy and a bf16 reference: the policy's pass is the larger, so it sets the score peak.
    skip = grpo_config(**ON_POLICY, dtype="fp32", frozen_dtype="bf16")
    recompute = grpo_config(**ON_POLICY, dtype="fp32", frozen_dtype="bf16", recompute_old_logprobs=True)
    assert workload(recompute, 16).score_policy_pass and not workload(skip, 16).score_policy_pass
    specs = role_specs("grpo", skip, SMALL)
    with_pass, without = estimate(specs, workload(recompute, 16))["score"], estimate(specs, workload(skip, 16))["score"]
    # Only the largest pass counts (one model at a time): the policy's, or without it the reference's.
    assert transient(with_pass, "policy") > 0 and transient(with_pass, "reference") == 0
    assert transient(without, "policy") == 0 and 0 < transient(without, "reference") < transient(with_pass, "policy")
    assert without.roles["policy"]["weights"] == with_pass.roles["policy"]["weights"] > 0  # resident for update_policy
    assert without.peak_bytes == with_pass.peak_bytes - transient(with_pass, "policy") + transient(without, "reference")
    # The other phases do not change.
    for phase in ("generate", "update_policy"):
        assert estimate(specs, workload(skip, 16))[phase].peak_bytes == estimate(specs, workload(recompute, 16))[phase].peak_bytes


def test_a_lora_policy_still_runs_the_reference_pass_in_score():
    shape = ModelShape.from_config(SMALL)
    specs = {"policy": RoleSpec(SMALL, shape, "lm", "fp32", True, lora_rank=8),
             "reference": RoleSpec(SMALL, shape, "lm", "fp32", False, is_adapter_view=True)}  # fmt: skip
    skip = grpo_config(**ON_POLICY, lora_rank=8)
    recompute = grpo_config(**ON_POLICY, lora_rank=8, recompute_old_logprobs=True)
    assert estimate(specs, workload(skip, 16))["score"].peak_bytes == estimate(specs, workload(recompute, 16))["score"].peak_bytes


def test_workload_rejects_a_non_bool_score_policy_pass():
    with pytest.raises(ValueError, match="Workload.score_policy_pass must be a bool"):
        dataclasses.replace(workload(grpo_config(**ON_POLICY), 16), score_policy_pass=1)
