"""rlhf_engine.integrations.trl.FusedGRPOTrainer against TRL 1.16's own GRPOTrainer.

(a) The loss step alone: TRL's ``GRPOTrainer._compute_loss`` and ours on the same prepared
    batch (a padding-only completion, uneven lengths, off-policy old / reference / rollout
    logprobs, advantages of both signs, two accumulation steps) and equal models: loss,
    every parameter gradient and every logged metric, over every loss_type x
    importance_sampling_level x (beta 0 / beta > 0 with and without
    use_bias_correction_kl) x delta x top_entropy_quantile x entropy_coef, and the
    off-policy mask, vLLM's importance-sampling ratio (token and sequence modes), tool
    masks, adaptive entropy control, evaluation mode, the on-policy batch, PEFT LoRA.
(b) End-to-end ``train()`` runs (generation, scoring, the loss, SGD) with the same logged
    history and final parameters, one with PEFT LoRA.
(c) What is refused, and (d) that no ``[B, T, V]`` logits exist in the loss step.

Tolerance: fp32 on the CPU; the two sides differ only in how the lm_head's logsumexp is
summed (TRL: tiles with an online logsumexp; ours: the torch backend's chunks, or the
one-pass path), i.e. rounding. RTOL = 1e-5, ATOL = 1e-6 (``|ours - TRL| <= ATOL + RTOL
|TRL|``): measured over the two loss-step grids, the largest difference of a loss, a
gradient entry or a metric is 12% of that bound; it still catches the head's input off by
1e-4 relative (``test_loss_check_catches_a_small_logprob_error``).
"""

import math

import pytest
import torch

from tests import trl_support

trl = pytest.importorskip("trl", reason="needs trl==1.16.0: pip install 'rlhf-engine[trl]' (make install does)")

from rlhf_engine.integrations.trl import FusedGRPOTrainer  # noqa: E402
from rlhf_engine.integrations.trl import _grpo_loss  # noqa: E402
from rlhf_engine.integrations.trl import lm_head as engine_head  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RTOL, ATOL = 1e-5, 1e-6
BF16_RTOL, BF16_ATOL = 3e-2, 1e-3  # bf16 autocast: see test_bf16_autocast_loss_step_matches_trl
BATCH, PROMPT, COMPLETION = 4, 5, 7
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# cispo's epsilon_high is the raw cap on the weight (TRL suggests 5.0); 1.1 makes some weights capped here.
LOSS_OPTIONS = {"cispo": dict(epsilon_high=1.1)}
KL = {
    "beta0": dict(beta=0.0),
    "kl": dict(beta=0.1, use_bias_correction_kl=False),
    "kl-bias": dict(beta=0.1, use_bias_correction_kl=True),  # TRL's default
}
REFUSED = {("sapo", "sequence")} | {(loss, "sequence", "kl-bias") for loss in ("cispo", "vespo")}


def _grid():
    # Every loss type x level x KL variant, each with four combinations of the on/off options
    # (delta, top_entropy_quantile, entropy_coef): all 8 spread over a clipped loss's 6 cells
    # (each 3 times), all 4 in every cell of the others (which ignore delta).
    cases = []
    for loss in CLIPPED + ("cispo", "sapo", "vespo"):
        cells = [(level, kl) for level in ("token", "sequence") for kl in KL
                 if (loss, level) not in REFUSED and (loss, level, kl) not in REFUSED]  # fmt: skip
        for i, (level, kl) in enumerate(cells):
            for j in range(4):
                bits = (4 * i + j) % 8 if loss in CLIPPED else 2 * j
                delta = 1.3 if bits & 1 else None
                quantile = 0.5 if bits & 2 else 1.0
                entropy_coef = 0.05 if bits & 4 else 0.0
                config = dict(loss_type=loss, importance_sampling_level=level, delta=delta,
                              top_entropy_quantile=quantile, entropy_coef=entropy_coef, **KL[kl],
                              **LOSS_OPTIONS.get(loss, {}))  # fmt: skip
                name = f"{loss}-{level}-{kl}" + "-delta" * bool(delta) + "-top-entropy" * (quantile < 1)
                cases.append(pytest.param(config, id=name + "-entropy-bonus" * bool(entropy_coef)))
    return cases


def _trainer(trainer_cls, tmp_path, config, peft=False, **kwargs):
    args = trl_support.trainer_args(
        trl.GRPOConfig, tmp_path / trainer_cls.__name__, per_device_train_batch_size=BATCH, num_generations=BATCH,
        max_completion_length=COMPLETION + 2, model_init_kwargs=dict(dtype=torch.float32), **config,
    )  # fmt: skip
    trainer = trainer_cls(
        trl_support.tiny_causal_lm_dir(0), reward_funcs=trl_support.reward_length, args=args,
        train_dataset=trl_support.prompt_dataset(), processing_class=trl_support.tokenizer(),
        peft_config=trl_support.lora_config() if peft else None, **kwargs,
    )  # fmt: skip
    if peft:  # LoRA's B starts at 0, which would leave A without gradient
        torch.manual_seed(1)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop; the loss divides by it
    trainer.model.train()  # the loss step's mode (and its metrics' key) follows model.training
    return trainer


def _batch(trainer, seed=0, on_policy=False):
    """TRL's ``_compute_loss`` inputs: left-padded prompts, completions of lengths 7, 3, 0, 5
    (row 2 is padding only), logprobs of the policy perturbed into old / reference / rollout
    ones, advantages of both signs, vLLM's per-token ratio, num_items_in_batch of a
    generation batch of two accumulation steps."""
    generator = torch.Generator().manual_seed(seed)
    vocab = len(trl_support.tokenizer())
    prompt_ids = torch.randint(3, vocab, (BATCH, PROMPT), generator=generator)
    prompt_mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[3, :1] = 0
    completion_ids = torch.randint(3, vocab, (BATCH, COMPLETION), generator=generator)
    completion_mask = (torch.arange(COMPLETION) < torch.tensor([[7], [3], [0], [5]])).long()
    with torch.no_grad():
        logps, _, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), COMPLETION,
        )  # fmt: skip

    def perturbed(scale):
        return (logps + scale * torch.randn(logps.shape, generator=generator)) * completion_mask

    inputs = dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, advantages=torch.tensor([1.3, -0.7, 0.4, -1.1]),
        num_items_in_batch=completion_mask.sum() * 2, ref_per_token_logps=perturbed(0.3),
        sampling_per_token_logps=perturbed(0.3),
        importance_sampling_ratio=torch.exp(0.2 * torch.randn(logps.shape, generator=generator)).clamp(max=1.2),
    )  # fmt: skip
    if not on_policy:
        inputs["old_per_token_logps"] = perturbed(0.25)
    return inputs


def _loss_step(trainer, inputs):
    """One ``_compute_loss`` -> (loss, {param name: grad}, {metric: values})."""
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._metrics["eval"].clear()
    loss = trainer._compute_loss(trainer.model, inputs)
    if loss.requires_grad:
        loss.backward()
    grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {mode: dict(values) for mode, values in trainer._metrics.items() if values}
    return loss.detach(), grads, metrics


def _differences(expected, actual, rtol=RTOL, atol=ATOL):
    (want_loss, want_grads, want_metrics), (loss, grads, metrics) = expected, actual
    problems = []
    if not math.isclose(loss.item(), want_loss.item(), rel_tol=rtol, abs_tol=atol):
        problems.append(f"loss: TRL {want_loss.item()!r}, ours {loss.item()!r}")
    for name, want in want_grads.items():
        if (want is None) != (grads[name] is None):
            problems.append(f"grad {name}: TRL has one: {want is not None}, ours: {grads[name] is not None}")
        elif want is not None and not torch.allclose(grads[name], want, rtol=rtol, atol=atol):
            problems.append(f"grad {name}: max diff {(grads[name] - want).abs().max().item():.3g}")
    if {m: sorted(v) for m, v in want_metrics.items()} != {m: sorted(v) for m, v in metrics.items()}:
        return problems + [f"metric keys: TRL {want_metrics}, ours {metrics}"]
    for mode, values in want_metrics.items():
        for key, want in values.items():
            got = metrics[mode][key]
            if len(got) != len(want) or not all(
                math.isclose(g, w, rel_tol=rtol, abs_tol=atol) or (math.isnan(g) and math.isnan(w))
                for g, w in zip(got, want)
            ):
                problems.append(f"{mode} {key}: TRL {want}, ours {got}")
    return problems


def _compare(tmp_path, config, prepare=None, edit=None, on_policy=False, peft=False, **our_kwargs):
    """TRL's loss step and ours on one batch (built with TRL's trainer, so the logprobs the
    batch carries are TRL's) -> ``[TRL's (loss, grads, metrics), ours]``; ``prepare(trainer)``
    adjusts both trainers, ``edit(inputs)`` the batch."""
    results, inputs = [], None
    for trainer_cls, kwargs in ((trl.GRPOTrainer, {}), (FusedGRPOTrainer, our_kwargs)):
        trainer = _trainer(trainer_cls, tmp_path, config, peft, **kwargs)
        if prepare is not None:
            prepare(trainer)
        if inputs is None:
            inputs = _batch(trainer, on_policy=on_policy)
            inputs = edit(inputs) if edit is not None else inputs
        results.append(_loss_step(trainer, {k: v.clone() for k, v in inputs.items()}))
        if trainer.use_adaptive_entropy:  # the controller must move the same way
            results[-1][2]["train"]["controller"] = [trainer.entropy_coef, trainer._last_world_entropy]
    return results


@pytest.mark.parametrize("config", _grid())
def test_loss_step_matches_trl(tmp_path, config):
    expected, actual = _compare(tmp_path, config)
    assert expected[0].abs() > 1e-4 and any(g is not None and g.abs().max() > 0 for g in expected[1].values())
    assert not _differences(expected, actual)


def _vllm(mode):
    # No vLLM here: switch TRL's flags on after construction; the batch carries the ratio.
    def prepare(trainer):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        trainer.vllm_importance_sampling_mode = mode

    return prepare


def _sequence_ratio(inputs):
    inputs["importance_sampling_ratio"] = inputs["importance_sampling_ratio"][:, :1]
    return inputs


def _tool_mask(inputs):
    tool_mask = torch.ones_like(inputs["completion_mask"])
    tool_mask[0, 2:4] = 0
    tool_mask[1, :] = 0  # row 1: every token is a tool's output
    inputs["tool_mask"] = tool_mask
    return inputs


SPECIAL = [
    pytest.param(dict(loss_type="dapo", off_policy_mask_threshold=0.01), None, None, id="off-policy-mask"),
    pytest.param(dict(loss_type="grpo", importance_sampling_level="sequence", off_policy_mask_threshold=0.01,
                      top_entropy_quantile=0.5), None, None, id="off-policy-mask-sequence"),  # fmt: skip
    pytest.param(dict(loss_type="grpo", beta=0.1), _vllm("token_truncate"), None, id="vllm-token-ratio"),
    pytest.param(dict(loss_type="luspo", importance_sampling_level="sequence"), _vllm("token_mask"), None,
                 id="vllm-token-ratio-sequence-level"),
    pytest.param(dict(loss_type="cispo"), _vllm("sequence_truncate"), _sequence_ratio, id="vllm-sequence-ratio"),
    pytest.param(dict(loss_type="vespo"), _vllm("token_truncate"), None, id="vllm-ratio-in-vespo-weights"),
    pytest.param(dict(loss_type="bnpo", beta=0.1, entropy_coef=0.05), None, _tool_mask, id="tool-mask"),
    pytest.param(dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=100.0),
                 None, None, id="adaptive-entropy"),  # fmt: skip
    pytest.param(dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.05, top_entropy_quantile=0.5,
                      entropy_target=0.0), None, None, id="adaptive-entropy-gated-off"),  # fmt: skip
    pytest.param(dict(loss_type="dapo", steps_per_generation=4, beta=0.1, entropy_coef=0.05), None, None,
                 id="num-items-steps-per-generation"),
    # bf16 autocast with an fp32 head: both heads run in fp32 on the same bf16-rounded hidden states.
    pytest.param(dict(loss_type="dapo", beta=0.1, bf16=True, cast_lm_head_to_fp32=True), None, None,
                 id="bf16-fp32-head"),
]


@pytest.mark.parametrize("config, prepare, edit", SPECIAL)
def test_loss_step_options_match_trl(tmp_path, config, prepare, edit):
    assert not _differences(*_compare(tmp_path, config, prepare, edit))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo"])
def test_on_policy_and_eval_loss_match_trl(tmp_path, loss_type):
    config = dict(loss_type=loss_type, beta=0.1, entropy_coef=0.05)
    assert not _differences(*_compare(tmp_path, config, on_policy=True))
    # Evaluation: no accumulation scaling, no gradient, metrics under "eval".
    def evaluating(trainer):
        trainer.model.eval()

    with torch.no_grad():
        results = _compare(tmp_path, config, evaluating)
    assert set(results[0][2]) == {"eval"}
    assert not _differences(*results)


@pytest.mark.parametrize(
    "config",
    [dict(loss_type="grpo", beta=0.1, entropy_coef=0.05),
     dict(loss_type="dapo", importance_sampling_level="sequence", top_entropy_quantile=0.5)],
    ids=["grpo-kl-entropy", "dapo-sequence-top-entropy"],
)  # fmt: skip
def test_lora_loss_step_matches_trl(tmp_path, config):
    # The backbone's LoRA layers run inside our head_fn forward; the lm_head is frozen (no d weight).
    expected, actual = _compare(tmp_path, config, peft=True)
    trained = {name for name, grad in expected[1].items() if grad is not None and grad.abs().max() > 0}
    assert trained and all("lora_" in name for name in trained)
    assert not _differences(expected, actual)


def _all_padding(inputs):
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    return inputs


@pytest.mark.parametrize(
    "config",
    [dict(loss_type="grpo", importance_sampling_level="sequence"),
     dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.05), dict(loss_type="vespo")],
    ids=["grpo-sequence", "dapo-top-entropy-bonus", "vespo"],
)  # fmt: skip
def test_all_padding_batch_matches_trl(tmp_path, config):
    # No completion token at all (an accumulation step can get one): the op sees zero rows.
    expected, actual = _compare(tmp_path, dict(config, beta=0.1), edit=_all_padding)
    assert expected[0].item() == 0.0 and not _differences(expected, actual)


def test_bf16_autocast_loss_step_matches_trl(tmp_path, monkeypatch):
    # TRL's GRPOConfig defaults to bf16 autocast: both heads then run their GEMMs in bf16 (our
    # op gets bf16 hidden states and weight, as TRL's GEMM). Measured: loss and metrics within
    # 1e-6 relative (the same bf16 logits, fp32 reductions), gradients within 4e-4 absolute,
    # 1% of the largest entry (TRL returns the head's gradients accumulated in fp32, ours
    # rounds them to bf16 once, as the DPO drop-in).
    dtypes = []
    exact = _grpo_loss.fused_linear_policy_loss

    def watched(hidden, weight, *args, **kwargs):
        dtypes.append((hidden.dtype, weight.dtype))
        return exact(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(_grpo_loss, "fused_linear_policy_loss", watched)
    results = _compare(tmp_path, dict(loss_type="grpo", beta=0.1, entropy_coef=0.05, bf16=True))
    assert dtypes == [(torch.bfloat16, torch.bfloat16)]
    assert not _differences(*results, rtol=BF16_RTOL, atol=BF16_ATOL)


def test_loss_step_matches_trl_on_each_backend(tmp_path, backend):
    if backend != "torch" and torch.cuda.is_available():
        pytest.skip("these trainers run on the CPU, where triton needs the interpreter (set on CPU-only machines)")
    config = dict(loss_type="grpo", beta=0.1, entropy_coef=0.05, top_entropy_quantile=0.5)
    assert not _differences(*_compare(tmp_path, config, backend=backend))


def test_loss_check_catches_a_small_logprob_error(tmp_path, monkeypatch):
    # The hidden states scaled by 1 + 1e-4 inside our loss step must show.
    exact = _grpo_loss.fused_linear_policy_loss

    def slightly_off(hidden, *args, **kwargs):
        return exact(hidden * (1 + 1e-4), *args, **kwargs)

    monkeypatch.setattr(_grpo_loss, "fused_linear_policy_loss", slightly_off)
    assert _differences(*_compare(tmp_path, dict(loss_type="grpo", beta=0.1)))


# ------------------------------------------------------------------ end to end


def _train(trainer_cls, tmp_path, config, peft=False):
    config = dict(dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6), **config)
    args = trl_support.trainer_args(
        trl.GRPOConfig, tmp_path / trainer_cls.__name__, model_init_kwargs=dict(dtype=torch.float32), **config
    )
    trainer = trainer_cls(
        trl_support.tiny_causal_lm_dir(0), reward_funcs=trl_support.reward_length, args=args,
        train_dataset=trl_support.prompt_dataset(), processing_class=trl_support.tokenizer(),
        peft_config=trl_support.lora_config() if peft else None,
    )  # fmt: skip
    initial = trl_support.trainable_parameters(trainer.model)
    torch.manual_seed(0)  # generation samples: both runs draw the same completions
    trainer.train()
    final = trl_support.trainable_parameters(trainer.model)
    moved = max((final[name] - initial[name]).abs().max().item() for name in final)
    assert moved > 1e-5, f"{trainer_cls.__name__} did not train (largest parameter change {moved})"
    history = [{k: v for k, v in entry.items() if k != "step_time"} for entry in trl_support.logged_history(trainer)]
    return history, final


TRAIN_CASES = [
    # Two accumulation steps of a generation reused for two iterations: old logprobs exist, ratios move.
    pytest.param(dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True, entropy_coef=0.05,
                      gradient_accumulation_steps=2, per_device_train_batch_size=2, num_iterations=2,
                      max_steps=3), False, id="grpo-kl-entropy-accumulation-iterations"),  # fmt: skip
    pytest.param(dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.1, top_entropy_quantile=0.5,
                      num_iterations=2, max_steps=3), True, id="dapo-sequence-lora"),  # fmt: skip
    pytest.param(dict(loss_type="cispo", epsilon_high=1.1, off_policy_mask_threshold=0.01, num_iterations=2,
                      max_steps=3), False, id="cispo-off-policy-mask"),  # fmt: skip
    # The bonus over the high-entropy tokens (its own head pass) and adaptive control across steps.
    pytest.param(dict(loss_type="sapo", top_entropy_quantile=0.5, use_adaptive_entropy=True, entropy_coef=0.05,
                      entropy_target=100.0, num_iterations=2, max_steps=3), True,
                 id="sapo-top-entropy-adaptive-bonus-lora"),  # fmt: skip
    # vespo's loss value is a near-cancelling sum whose gamma weights amplify rounding: within 1e-6
    # here, but under LoRA its second step's loss is 2.6e-5 relative off TRL's (grad_norm and
    # parameters within 1e-5), where our own torch and triton backends differ by 8e-6: rounding.
    pytest.param(dict(loss_type="vespo", beta=0.1, num_iterations=2, max_steps=3), False, id="vespo"),
]


@pytest.mark.parametrize("config, peft", TRAIN_CASES)
def test_training_matches_trl(tmp_path, config, peft):
    trl_history, trl_params = _train(trl.GRPOTrainer, tmp_path, config, peft)
    our_history, our_params = _train(FusedGRPOTrainer, tmp_path, config, peft)
    steps = [entry for entry in trl_history if "loss" in entry]
    assert len(steps) == config["max_steps"] and {"entropy", "reward", "grad_norm"} <= set(steps[0])
    assert [sorted(e) for e in trl_history] == [sorted(e) for e in our_history]
    for step, (want, got) in enumerate(zip(trl_history, our_history)):
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=RTOL, abs_tol=ATOL), (step, key, value, got[key])
    for name, want in trl_params.items():
        torch.testing.assert_close(our_params[name], want, rtol=RTOL, atol=ATOL, msg=name)


# ------------------------------------------------------------------ refusals and the logits path


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(loss_type="sapo", importance_sampling_level="sequence"), "sapo.*importance_sampling_level='sequence'"),
        (dict(loss_type="cispo", importance_sampling_level="sequence", beta=0.1, use_bias_correction_kl=True),
         "use_bias_correction_kl"),
        (dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.1, use_bias_correction_kl=True),
         "use_bias_correction_kl"),
    ],
)  # fmt: skip
def test_inexpressible_options_are_refused_at_construction(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        _trainer(FusedGRPOTrainer, tmp_path, config)
    _trainer(trl.GRPOTrainer, tmp_path, config)  # TRL itself accepts them


def test_transformed_logits_and_moe_loss_are_refused(tmp_path):
    model = trl_support.tiny_causal_lm(0)
    model.config.final_logit_softcapping = 30.0
    args = trl_support.trainer_args(trl.GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        FusedGRPOTrainer(model, reward_funcs=trl_support.reward_length, args=args,
                         train_dataset=trl_support.prompt_dataset(), processing_class=trl_support.tokenizer())  # fmt: skip
    model = trl_support.tiny_causal_lm(0)
    model.config.output_router_logits = False
    args = trl_support.trainer_args(trl.GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4,
                                    router_aux_loss_coef=0.01)  # fmt: skip
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        FusedGRPOTrainer(model, reward_funcs=trl_support.reward_length, args=args,
                         train_dataset=trl_support.prompt_dataset(), processing_class=trl_support.tokenizer())  # fmt: skip


def test_vision_language_batch_is_refused(tmp_path):
    trainer = _trainer(FusedGRPOTrainer, tmp_path, dict(loss_type="grpo"))
    inputs = _batch(trainer)
    inputs["pixel_values"] = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="pixel_values"):
        trainer._compute_loss(trainer.model, inputs)


def test_loss_step_builds_no_vocabulary_logits(tmp_path, monkeypatch):
    # The loss step: TRL's chunked kernel and the lm_head module never run; our op gets the
    # scored rows only (15 completion tokens, not B x (P + T)).
    config = dict(loss_type="grpo", beta=0.1, entropy_coef=0.05, top_entropy_quantile=0.5)
    trainer = _trainer(FusedGRPOTrainer, tmp_path, config, chunk_size=4)
    inputs = _batch(trainer)

    shapes = trl_support.forbid_vocabulary_logits(monkeypatch, _grpo_loss, "fused_linear_policy_loss")
    loss, _, _ = _loss_step(trainer, inputs)
    assert shapes == [(int(inputs["completion_mask"].sum()), trainer.model.config.hidden_size)]
    assert loss.abs() > 0


def test_reference_and_old_logprobs_come_from_our_op(tmp_path, monkeypatch):
    calls = []
    exact = engine_head.fused_linear_logprobs

    def watched(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return exact(*args, **kwargs)

    monkeypatch.setattr(engine_head, "fused_linear_logprobs", watched)
    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", lambda *a, **k: pytest.fail("TRL's head"))
    _train(FusedGRPOTrainer, tmp_path, dict(loss_type="grpo", beta=0.1, num_iterations=2, max_steps=2))
    # One generation: old logprobs (num_iterations=2) and reference logprobs, without gradient.
    assert len(calls) == 2 and not any(calls)
