"""rlhf_engine.integrations.trl.FusedRLOOTrainer against TRL 1.16's own RLOOTrainer.

The loss step alone (``_compute_loss`` of both on one prepared batch with a padding-only
completion and off-policy old sequence logprobs: loss, gradients, metrics) over the
clipping options and in evaluation; end-to-end ``train()`` runs (the KL in the reward,
generation, SGD; one with PEFT LoRA) with the same history and final parameters; the
refusals; no ``[B, T, V]`` logits in the loss step. Tolerances as in
``tests/test_integration_trl_grpo.py`` (fp32 CPU, the head's rounding only).
"""

import math

import pytest
import torch

from tests import trl_support

trl = pytest.importorskip("trl", reason="needs trl==1.16.0: pip install 'rlhf-engine[trl]' (make install does)")

from rlhf_engine.integrations.trl import FusedRLOOTrainer  # noqa: E402
from rlhf_engine.integrations.trl import rloo as engine_rloo  # noqa: E402
from tests.test_integration_trl_grpo import _differences, _loss_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RTOL, ATOL = 1e-5, 1e-6
BATCH, PROMPT, COMPLETION = 4, 5, 7


def _trainer(trainer_cls, tmp_path, config, **kwargs):
    args = trl_support.trainer_args(
        trl.RLOOConfig, tmp_path / trainer_cls.__name__, per_device_train_batch_size=BATCH, num_generations=BATCH,
        max_completion_length=COMPLETION, model_init_kwargs=dict(dtype=torch.float32), **config,
    )  # fmt: skip
    trainer = trainer_cls(
        trl_support.tiny_causal_lm_dir(0), reward_funcs=trl_support.reward_length, args=args,
        train_dataset=trl_support.prompt_dataset(), processing_class=trl_support.tokenizer(), **kwargs,
    )  # fmt: skip
    trainer.model.train()
    return trainer


def _batch(trainer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocab = len(trl_support.tokenizer())
    prompt_ids = torch.randint(3, vocab, (BATCH, PROMPT), generator=generator)
    prompt_mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_ids = torch.randint(3, vocab, (BATCH, COMPLETION), generator=generator)
    completion_mask = (torch.arange(COMPLETION) < torch.tensor([[7], [3], [0], [5]])).long()  # row 2: padding only
    with torch.no_grad():
        logps, _, _ = trl.RLOOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), COMPLETION,
        )  # fmt: skip
    # Old sequence logprobs a little off the current ones, so the sequence ratios spread around 1 and some clip.
    old = (logps * completion_mask).sum(1) + 0.3 * torch.randn(BATCH, generator=generator)
    return dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, old_logps=old, advantages=torch.tensor([1.3, -0.7, 0.4, -1.1]),
    )  # fmt: skip


def _compare(tmp_path, config, evaluate=False, **our_kwargs):
    results, inputs = [], None
    for trainer_cls, kwargs in ((trl.RLOOTrainer, {}), (FusedRLOOTrainer, our_kwargs)):
        trainer = _trainer(trainer_cls, tmp_path, config, **kwargs)
        inputs = _batch(trainer) if inputs is None else inputs
        if evaluate:
            trainer.model.eval()
        with torch.set_grad_enabled(not evaluate):
            results.append(_loss_step(trainer, {k: v.clone() for k, v in inputs.items()}))
    return results


@pytest.mark.parametrize(
    "config", [dict(), dict(epsilon=0.1), dict(epsilon=0.05, epsilon_high=0.28), dict(beta=0.0, epsilon=0.3)],
    ids=["default", "epsilon", "clip-higher", "no-kl"],
)
def test_loss_step_matches_trl(tmp_path, config):
    expected, actual = _compare(tmp_path, config)
    assert expected[0].abs() > 1e-4 and set(expected[2]) == {"train"}
    assert not _differences(expected, actual, RTOL, ATOL)


def test_eval_loss_step_matches_trl(tmp_path):
    expected, actual = _compare(tmp_path, dict(epsilon=0.1), evaluate=True)
    assert set(expected[2]) == {"eval"}
    assert not _differences(expected, actual, RTOL, ATOL)


def test_loss_step_matches_trl_on_each_backend(tmp_path, backend):
    if backend != "torch" and torch.cuda.is_available():
        pytest.skip("these trainers run on the CPU, where triton needs the interpreter (set on CPU-only machines)")
    assert not _differences(*_compare(tmp_path, dict(epsilon=0.1), backend=backend), RTOL, ATOL)


def test_loss_check_catches_a_small_logprob_error(tmp_path, monkeypatch):
    exact = engine_rloo.fused_linear_logprobs

    def slightly_off(hidden, *args, **kwargs):
        return exact(hidden * (1 + 1e-4), *args, **kwargs)

    monkeypatch.setattr(engine_rloo, "fused_linear_logprobs", slightly_off)
    assert _differences(*_compare(tmp_path, dict(epsilon=0.1)), RTOL, ATOL)


def _train(trainer_cls, tmp_path, config, peft=False):
    args = trl_support.trainer_args(
        trl.RLOOConfig, tmp_path / trainer_cls.__name__, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, model_init_kwargs=dict(dtype=torch.float32), **config,
    )  # fmt: skip
    trainer = trainer_cls(
        trl_support.tiny_causal_lm_dir(0), reward_funcs=trl_support.reward_length, args=args,
        train_dataset=trl_support.prompt_dataset(), processing_class=trl_support.tokenizer(),
        peft_config=trl_support.lora_config() if peft else None,
    )  # fmt: skip
    initial = trl_support.trainable_parameters(trainer.model)
    trainer.train()
    final = trl_support.trainable_parameters(trainer.model)
    assert max((final[n] - initial[n]).abs().max().item() for n in final) > 1e-5
    history = [{k: v for k, v in entry.items() if k != "step_time"} for entry in trl_support.logged_history(trainer)]
    return history, final


@pytest.mark.parametrize(
    "config, peft",
    [
        pytest.param(dict(beta=0.1, num_iterations=2, epsilon=0.1, max_steps=3), False, id="kl-in-reward-iterations"),
        pytest.param(dict(beta=0.1, normalize_advantages=True, max_steps=2), True, id="lora"),
    ],
)
def test_training_matches_trl(tmp_path, config, peft):
    trl_history, trl_params = _train(trl.RLOOTrainer, tmp_path, config, peft)
    our_history, our_params = _train(FusedRLOOTrainer, tmp_path, config, peft)
    assert len([e for e in trl_history if "loss" in e]) == config["max_steps"]
    assert [sorted(e) for e in trl_history] == [sorted(e) for e in our_history] and "kl" in trl_history[0]
    for step, (want, got) in enumerate(zip(trl_history, our_history)):
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=RTOL, abs_tol=ATOL), (step, key, value, got[key])
    for name, want in trl_params.items():
        torch.testing.assert_close(our_params[name], want, rtol=RTOL, atol=ATOL, msg=name)


def test_moe_loss_and_vision_batches_are_refused(tmp_path):
    model = trl_support.tiny_causal_lm(0)
    model.config.output_router_logits = False
    args = trl_support.trainer_args(trl.RLOOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4,
                                    router_aux_loss_coef=0.01, beta=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        FusedRLOOTrainer(model, reward_funcs=trl_support.reward_length, args=args,
                         train_dataset=trl_support.prompt_dataset(), processing_class=trl_support.tokenizer())  # fmt: skip
    trainer = _trainer(FusedRLOOTrainer, tmp_path, {})
    inputs = _batch(trainer)
    inputs["image_grid_thw"] = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="image_grid_thw"):
        trainer._compute_loss(trainer.model, inputs)


def test_loss_step_builds_no_vocabulary_logits(tmp_path, monkeypatch):
    trainer = _trainer(FusedRLOOTrainer, tmp_path, {})
    inputs = _batch(trainer)
    shapes = trl_support.forbid_vocabulary_logits(monkeypatch, engine_rloo, "fused_linear_logprobs")
    loss, _, _ = _loss_step(trainer, inputs)
    assert shapes == [(int(inputs["completion_mask"].sum()), trainer.model.config.hidden_size)] and loss.abs() > 0
