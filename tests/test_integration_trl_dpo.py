"""rlhf_engine.integrations.trl.FusedDPOTrainer against TRL 1.16's own DPOTrainer.

Each parity case trains the same tiny Qwen2 (same initial weights, same data, same seed,
same DPOConfig) for two SGD steps with ``trl.DPOTrainer`` and with ``FusedDPOTrainer``,
and compares every logged value of every step (loss, grad_norm, rewards/*, logps/*,
logits/*, entropy, mean_token_accuracy, ...) and the final trainable parameters. The grid
runs every TRL 1.16 loss type at least once, a weighted list of them, label smoothing,
the f-divergences, ld_alpha, WPO weighting, precomputed reference logprobs, evaluate(), tied
embeddings, and PEFT LoRA both ways TRL builds its reference (adapters disabled; a copied
``ref`` adapter), on backend "auto"; one case runs on every backend that runs here (triton
through the interpreter on a CPU-only machine) and one under bf16 autocast, TRL's default.
The head alone is compared with TRL's ``add_fused_lm_head`` field by field, gradients
included. Other tests: TRL's logits path never runs, and what cannot be computed exactly is
refused at construction.

Tolerance: both sides compute in fp32 on the CPU and differ only in how the lm_head
logprobs are summed (TRL: tiles with an online logsumexp; ours: the torch backend's
chunks). Measured over the grid: sequence logprobs (about -140 nats, whose fp32 spacing is
1.5e-5) within 1.2e-7 relative, losses and grad norms within 7e-7 relative, parameters
within 3e-7, rewards (beta times a difference of two such sums) within 1.2e-6 absolute.
RTOL = ATOL = 1e-5 leave a margin of about 10x over that and still catch a logprob
scaled by 1 + 1e-4 (``test_parity_check_catches_a_small_logprob_error``).

TRL is installed by ``make install`` (the ``trl`` extra); without it the file skips.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from tests import trl_support

trl = pytest.importorskip("trl", reason="needs trl==1.16.0: pip install 'rlhf-engine[trl]' (make install does)")

from rlhf_engine.integrations.trl import FusedDPOTrainer  # noqa: E402
from rlhf_engine.integrations.trl import lm_head as engine_head  # noqa: E402

# Tiny matmuls gain nothing from threads, and on a busy machine OpenMP spin-waiting slows them ~10x.
pytestmark = pytest.mark.usefixtures("one_torch_thread")
RTOL, ATOL = 1e-5, 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
# Options some loss types need: exo_pair requires label smoothing > 0; robust is defined for it.
LOSS_OPTIONS = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1)}

CASES = [pytest.param(dict(loss_type=[name], **LOSS_OPTIONS.get(name, {})), {}, id=name) for name in LOSS_TYPES] + [
    pytest.param(
        dict(loss_type=["sigmoid", "sft", "apo_zero"], loss_weights=[0.8, 0.3, 0.5]), {}, id="weighted-list"
    ),
    pytest.param(dict(loss_type=["sigmoid"], label_smoothing=0.2, beta=0.3), {}, id="label-smoothing"),
    pytest.param(dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"), {}, id="js-divergence"),
    pytest.param(
        dict(loss_type=["hinge"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5), {}, id="alpha"
    ),
    pytest.param(dict(loss_type=["sigmoid"], ld_alpha=0.5), {}, id="ld-alpha"),
    pytest.param(dict(loss_type=["sigmoid"], use_weighting=True), {}, id="wpo-weighting"),
    pytest.param(dict(loss_type=["ipo"], precompute_ref_log_probs=True), dict(ref="none"), id="precomputed-ref"),
    pytest.param(dict(loss_type=["sigmoid"]), dict(tied=True), id="tied-embeddings"),
    pytest.param(dict(loss_type=["sigmoid"], per_device_eval_batch_size=3), dict(evaluate=True), id="evaluate"),
    pytest.param(dict(loss_type=["sigmoid"]), dict(peft="config"), id="lora-adapters-disabled-ref"),
    pytest.param(dict(loss_type=["apo_down", "sft"]), dict(peft="model"), id="lora-ref-adapter"),
]


def _policy(seed, tied, peft):
    model = trl_support.tiny_causal_lm(seed, tie_word_embeddings=tied)
    if peft == "model":
        # A PEFT model passed in (no peft_config): TRL copies its adapter into a frozen "ref" adapter.
        from peft import get_peft_model

        torch.manual_seed(seed + 1)
        model = get_peft_model(model, trl_support.lora_config())
        # LoRA's B starts at 0; a non-zero B makes the adapter (and so policy and reference) differ from the base.
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    return model


def _train(trainer_cls, tmp_path, config, setup, **trainer_kwargs):
    """Train one run; return (logged history, final trainable parameters, trainer)."""
    tied, peft, ref = setup.get("tied", False), setup.get("peft"), setup.get("ref", "model")
    args = trl_support.trainer_args(trl.DPOConfig, tmp_path / trainer_cls.__name__, **config)
    use_ref_model = ref == "model" and peft is None
    trainer = trainer_cls(
        _policy(0, tied, peft),
        ref_model=trl_support.tiny_causal_lm(0, tie_word_embeddings=tied) if use_ref_model else None,
        args=args,
        train_dataset=trl_support.preference_dataset(),
        eval_dataset=trl_support.preference_dataset(rows=5, seed=3) if setup.get("evaluate") else None,
        processing_class=trl_support.tokenizer(),
        peft_config=trl_support.lora_config() if peft == "config" else None,
        **trainer_kwargs,
    )
    initial = trl_support.trainable_parameters(trainer.model)
    trainer.train()
    if setup.get("evaluate"):
        trainer.evaluate()  # logs eval_loss and TRL's eval_* metrics into the history
    final = trl_support.trainable_parameters(trainer.model)
    moved = max((final[name] - initial[name]).abs().max().item() for name in final)
    assert moved > 1e-4, f"{trainer_cls.__name__} did not train (largest parameter change {moved})"
    return trl_support.logged_history(trainer), final, trainer


def _mismatches(expected_history, actual_history, expected_params, actual_params, rtol=RTOL, atol=ATOL):
    """Every logged value and parameter of ``actual`` that is not within rtol / atol of TRL's."""
    problems = []
    if [sorted(e) for e in expected_history] != [sorted(a) for a in actual_history]:
        return [f"logged keys differ: {[sorted(e) for e in expected_history]} vs {[sorted(a) for a in actual_history]}"]
    for step, (expected, actual) in enumerate(zip(expected_history, actual_history)):
        for key, want in expected.items():
            got = actual[key]
            if not math.isclose(got, want, rel_tol=rtol, abs_tol=atol):
                problems.append(f"step {step} {key}: TRL {want!r}, ours {got!r}")
    for name, want in expected_params.items():
        if not torch.allclose(actual_params[name], want, rtol=rtol, atol=atol):
            problems.append(f"parameter {name}: max diff {(actual_params[name] - want).abs().max().item():.3g}")
    return problems


@pytest.mark.parametrize("config, setup", CASES)
def test_training_matches_trl(tmp_path, config, setup):
    trl_history, trl_params, _ = _train(trl.DPOTrainer, tmp_path, config, setup)
    our_history, our_params, _ = _train(FusedDPOTrainer, tmp_path, config, setup)
    # The training steps are all there, with TRL's metrics: the comparison below covers them.
    steps = [entry for entry in trl_history if "loss" in entry]
    assert len(steps) == 2 and {"rewards/margins", "logps/chosen", "mean_token_accuracy"} <= set(steps[0])
    if setup.get("evaluate"):
        assert {"eval_loss", "eval_rewards/margins", "eval_logps/rejected"} <= set(trl_history[-1])
    assert not _mismatches(trl_history, our_history, trl_params, our_params)


def test_training_matches_trl_on_each_backend(tmp_path, backend):
    # The grid runs backend="auto" (torch on the CPU); here each backend of our op that runs
    # here, e.g. triton through the interpreter on a CPU-only machine.
    if backend != "torch" and torch.cuda.is_available():
        pytest.skip("these trainers run on the CPU, where triton needs the interpreter (set on CPU-only machines)")
    config = dict(loss_type=["sigmoid"], use_weighting=True)
    trl_history, trl_params, _ = _train(trl.DPOTrainer, tmp_path, config, {})
    our_history, our_params, _ = _train(FusedDPOTrainer, tmp_path, config, {}, backend=backend)
    assert not _mismatches(trl_history, our_history, trl_params, our_params)


def test_bf16_autocast_matches_trl(tmp_path, monkeypatch):
    # TRL's DPOConfig defaults to bf16 autocast. Both heads then run their GEMMs in bf16 (the
    # backbone's ops are the same on both sides), so they agree to bf16 rounding of the head's
    # forward and backward, measured: 3e-4 relative on losses and grad norms, 1.4e-3 on logits/*,
    # 3e-4 absolute on rewards and parameters. Checked too: our op gets bf16 inputs, as TRL's GEMM.
    dtypes = []
    exact = engine_head.fused_linear_logprobs

    def watched(hidden, weight, *args, **kwargs):
        dtypes.append((hidden.dtype, weight.dtype))
        return exact(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(engine_head, "fused_linear_logprobs", watched)
    config = dict(loss_type=["sigmoid"], use_weighting=True, bf16=True)
    trl_history, trl_params, _ = _train(trl.DPOTrainer, tmp_path, config, {})
    our_history, our_params, _ = _train(FusedDPOTrainer, tmp_path, config, {})
    assert dtypes and set(dtypes) == {(torch.bfloat16, torch.bfloat16)}
    assert not _mismatches(trl_history, our_history, trl_params, our_params, rtol=3e-3, atol=1e-3)


def test_parity_check_catches_a_small_logprob_error(tmp_path, monkeypatch):
    # The tolerance is tight enough to see every logprob off by 1e-4 relative (0.014 nats on a sequence).
    config = dict(loss_type=["sigmoid"])
    trl_history, trl_params, _ = _train(trl.DPOTrainer, tmp_path, config, {})
    exact = engine_head.fused_linear_logprobs

    def slightly_off(*args, **kwargs):
        result = exact(*args, **kwargs)
        return (result[0] * (1 + 1e-4), result[1]) if isinstance(result, tuple) else result * (1 + 1e-4)

    monkeypatch.setattr(engine_head, "fused_linear_logprobs", slightly_off)
    our_history, our_params, _ = _train(FusedDPOTrainer, tmp_path, config, {})
    assert _mismatches(trl_history, our_history, trl_params, our_params)


def test_no_logits_path_runs(tmp_path, monkeypatch):
    # TRL's chunked kernel and the model's lm_head module must never run; our op scores only
    # completion positions; the no-grad statistics pass never holds more than chunk_size rows.
    def refuse(*args, **kwargs):
        raise AssertionError("TRL's logits path ran")

    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", refuse)
    monkeypatch.setattr(torch.nn.Linear, "forward", _linear_forward_refusing_the_vocabulary(torch.nn.Linear.forward))
    op_hidden_shapes, chunk_rows = [], []
    exact_op, exact_chunk = engine_head.fused_linear_logprobs, engine_head.chunk_logits

    def watched_op(hidden, *args, **kwargs):
        op_hidden_shapes.append(tuple(hidden.shape))
        return exact_op(hidden, *args, **kwargs)

    def watched_chunk(hidden, weight, bias):
        chunk_rows.append(hidden.shape[0])
        return exact_chunk(hidden, weight, bias)

    monkeypatch.setattr(engine_head, "fused_linear_logprobs", watched_op)
    monkeypatch.setattr(engine_head, "chunk_logits", watched_chunk)
    completion_tokens, batch_tokens = [], []
    exact_loss = FusedDPOTrainer.compute_loss

    def watched_loss(self, model, inputs, *args, **kwargs):
        # The labels are the next tokens of the completion: completion_mask shifted by one.
        completion_tokens.append(int(inputs["completion_mask"][:, 1:].sum()))
        batch_tokens.append(inputs["input_ids"].numel())
        return exact_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(FusedDPOTrainer, "compute_loss", watched_loss)
    _, _, trainer = _train(FusedDPOTrainer, tmp_path, dict(loss_type=["sigmoid"]), {}, chunk_size=8)
    hidden_size = trainer.model.config.hidden_size
    # Each step: one policy and one reference forward, each scoring exactly the completion tokens.
    assert op_hidden_shapes == [(n, hidden_size) for n in completion_tokens for _ in ("policy", "reference")]
    assert all(0 < n < total for n, total in zip(completion_tokens, batch_tokens))
    assert chunk_rows and max(chunk_rows) <= 8


def _linear_forward_refusing_the_vocabulary(forward):
    def guarded(self, x):
        if self.out_features == len(trl_support.tokenizer()):
            raise AssertionError("the lm_head module ran: the [B, T, V] logits were built")
        return forward(self, x)

    return guarded


def _refused(tmp_path, config=None, **config_attrs):
    model = trl_support.tiny_causal_lm(0)
    for name, value in config_attrs.items():
        setattr(model.config, name, value)
    args = trl_support.trainer_args(trl.DPOConfig, tmp_path, **(config or {}))
    return FusedDPOTrainer(
        model, ref_model=trl_support.tiny_causal_lm(0), args=args, train_dataset=trl_support.preference_dataset(),
        processing_class=trl_support.tokenizer(),
    )


@pytest.mark.parametrize("attribute, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.25)])
def test_transformed_logits_are_refused_at_construction(tmp_path, attribute, value):
    with pytest.raises(ValueError, match=attribute):
        _refused(tmp_path, **{attribute: value})


def test_identity_logit_scale_is_accepted():
    model = trl_support.tiny_causal_lm(0)
    model.config.logits_scaling = 1.0  # Granite's default: no transform
    engine_head.check_supported(model)


def test_moe_load_balancing_loss_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        _refused(tmp_path, dict(router_aux_loss_coef=0.01), output_router_logits=False)
    with pytest.raises(ValueError, match="output_router_logits"):
        _refused(tmp_path, output_router_logits=True)


def test_unknown_output_field_is_refused():
    with pytest.raises(ValueError, match="outputs"):
        engine_head.add_fused_lm_head(trl_support.tiny_causal_lm(0), outputs=("log_probs", "logits"))


def test_import_without_trl_names_the_install_command():
    code = "import sys; sys.modules['trl'] = None\nimport rlhf_engine.integrations.trl"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "pip install 'rlhf-engine[trl]'" in out.stderr


@pytest.mark.parametrize("shifted", [False, True], ids=["labels", "shift_labels"])
@pytest.mark.parametrize("cast_lm_head_to_fp32", [False, True], ids=["model-dtype", "fp32-head"])
def test_head_matches_trl_head(shifted, cast_lm_head_to_fp32):
    # The drop-in alone, beside TRL's add_fused_lm_head on equal models: every per-token field,
    # the loss and the parameter gradients of a loss using log_probs and entropy. One row has
    # no scored label at all (its fields must be 0 and its gradient flow must not fail).
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, len(trl_support.tokenizer()), (3, 11), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[2] = -100
    kwargs = dict(shift_labels=labels[:, 1:]) if shifted else dict(labels=labels)
    results = []
    for add in (trl_add_fused_lm_head, engine_head.add_fused_lm_head):
        model = trl_support.tiny_causal_lm(0)
        add(model, temperature=0.7, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=engine_head.OUTPUTS)
        out = model(input_ids=input_ids[:, :-1] if shifted else input_ids, fused_lm_head=True, **kwargs)
        weights = torch.linspace(-1, 1, out.log_probs.numel()).view_as(out.log_probs)
        ((out.log_probs + 0.1 * out.entropy) * weights).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((out, grads))
    (theirs, their_grads), (ours, our_grads) = results
    for name in engine_head.OUTPUTS + ("loss", "label_mask"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=RTOL, atol=ATOL, msg=name)
    assert (ours.log_probs[2] == 0).all() and ours.is_top1.dtype == torch.bool
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)


def test_head_leaves_the_ordinary_forward_alone():
    model = trl_support.tiny_causal_lm(0)
    input_ids = torch.randint(0, len(trl_support.tokenizer()), (2, 7), generator=torch.Generator().manual_seed(6))
    before = model(input_ids=input_ids, labels=input_ids)
    engine_head.add_fused_lm_head(model)
    after = model(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)
