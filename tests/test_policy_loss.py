"""policy_loss: every backend against the float64 reference (loss, metrics, gradients) over
every loss / aggregation / KL estimator and awkward layouts; hand-computed cases pinning
the semantics; gradcheck of the reference; torch.compile; input validation."""

import math

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine._backend import triton_runs_on
from rlhf_engine.native import library
from rlhf_engine.native import policy_loss as native_policy_loss
from rlhf_engine.torch_backend import aggregation as aggregation_module
from rlhf_engine.reference.aggregation import AGGREGATIONS
from rlhf_engine.reference.policy_loss import LOSSES, PARTIALS, policy_loss_ref
from tests.tolerance import assert_within_tolerance

NATIVE_BACKENDS = True  # the backend tests also run on cpp (CPU) / cuda (GPU)

# Options that switch on every term of the per-token loss, per loss.
LOSS_OPTIONS = {
    "ppo": dict(clip_high=0.28, dual_clip=3.0, delta=1.5),
    "gspo": dict(clip_low=0.02, clip_high=0.03, dual_clip=1.01),
    "cispo": dict(clip_high=0.28),
    "cispo-trl": dict(clip_high=1.3),
    "sapo": {},
    "reinforce": {},
    # divergence bounds that keep tokens on both sides (probabilities move by ~0.1 here)
    "dppo_tv": dict(clip_low=0.05, clip_high=0.08, delta=1.5),
    "dppo_kl": dict(clip_low=0.01, clip_high=0.02, delta=1.5),
    "geo_mean": dict(clip_low=0.2, clip_high=0.25),
}


def make_batch(device, *, shape=None, lengths=None, per_seq=False, float_mask=False, all_masked_row=None):
    """Random inputs, padded ``[B, T]`` (``shape``) or packed (``lengths``)."""
    if lengths is not None:
        n = sum(lengths)
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
        token_shape, num_seqs = (n,), len(lengths)
    else:
        cu, token_shape, num_seqs = None, shape, shape[0]
    lp = -torch.rand(token_shape, device=device) * 2 - 0.1
    batch = dict(
        logp=lp,
        old_logp=lp + torch.randn(token_shape, device=device) * 0.3,  # ratios on both sides of the clip range
        advantages=torch.randn(num_seqs if per_seq else token_shape, device=device),
        mask=torch.rand(token_shape, device=device) > 0.25,
        ref_logp=lp + torch.randn(token_shape, device=device) * 0.2,
        entropy=torch.rand(token_shape, device=device) * 2,
        is_weights=torch.rand(num_seqs if per_seq else token_shape, device=device) + 0.5,
        cu_seqlens=cu,
    )
    if float_mask:
        batch["mask"] = batch["mask"] * torch.rand(token_shape, device=device)
    if all_masked_row is not None:
        batch["mask"][all_masked_row] = 0
    return batch


def _cast(v, dtype):
    """A fresh copy of a float tensor in ``dtype``; masks, indices and None unchanged."""
    return v.detach().to(dtype).clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def run_ours(batch, dtype, backend, **kw):
    args = {k: (_cast(v, dtype) if k != "mask" else v) for k, v in batch.items()}
    lp, ent = args["logp"].requires_grad_(), args["entropy"].requires_grad_()
    loss, metrics = ops.policy_loss(**args, **kw, backend=backend)
    loss.backward()
    return loss, metrics, lp.grad, ent.grad


def run_ref(batch, dtype, **kw):
    """The reference on the inputs rounded to ``dtype``, evaluated in ``compute`` dtype."""
    out = {}
    for name, compute in (("ref64", torch.float64), ("baseline", dtype)):
        args = {k: (_cast(_cast(v, dtype), compute) if k != "mask" else v) for k, v in batch.items()}
        args["logp"] = args["logp"].requires_grad_()
        args["entropy"] = args["entropy"].requires_grad_()
        loss, metrics = policy_loss_ref(**args, **kw)
        loss.backward()
        out[name] = (loss, metrics, args["logp"].grad, args["entropy"].grad)
    return out


def assert_matches(backend, batch, dtype=torch.float32, **kw):
    loss, metrics, dlp, dent = run_ours(batch, dtype, backend, **kw)
    ref = run_ref(batch, dtype, **kw)
    (r_loss, r_metrics, r_dlp, r_dent), (b_loss, b_metrics, b_dlp, b_dent) = ref["ref64"], ref["baseline"]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert set(metrics) == set(r_metrics)
    assert_within_tolerance(loss, r_loss, b_loss, dtype, "loss")
    for name in metrics:
        assert metrics[name].dtype == torch.float32 and metrics[name].dim() == 0
        assert_within_tolerance(metrics[name], r_metrics[name], b_metrics[name], dtype, name)
    assert dlp.dtype == dtype and dent.dtype == dtype
    assert_within_tolerance(dlp, r_dlp, b_dlp, dtype, "d/d logp")
    assert_within_tolerance(dent, r_dent, b_dent, dtype, "d/d entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_losses_match_reference(backend, device, loss, dtype):
    # T = 37 is off every block size; row 1 fully masked; every term (KL, entropy, IS) on.
    batch = make_batch(device, shape=(3, 37), all_masked_row=1)
    assert_matches(backend, batch, dtype, loss=loss, kl_coef=0.1, entropy_coef=0.01, **LOSS_OPTIONS[loss])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aggregations_match_reference(backend, device, aggregation, packed):
    # Per-sequence advantages / IS weights; packed has an empty sequence and float mask
    # weights; padded has a fully masked row (both must contribute nothing).
    if packed:
        batch = make_batch(device, lengths=[5, 0, 23, 9], per_seq=True, float_mask=True)
    else:
        batch = make_batch(device, shape=(4, 19), per_seq=True, all_masked_row=2)
    assert_matches(backend, batch, loss="ppo", entropy_coef=0.02, kl_coef=0.05, aggregation=aggregation)


@pytest.mark.parametrize(
    "layout",
    [
        dict(shape=(1, 1)),  # B = 1, T = 1: one program, one token
        dict(shape=(5, 1)),  # T = 1 with B > 1 (N == S: per-token and per-sequence coincide)
        dict(shape=(2, 1100)),  # rows longer than the 1024-token block: the per-sequence loop runs twice
        dict(lengths=[0, 3, 70, 1]),  # packed: empty first sequence; one 5x longer than the average block
        dict(lengths=[4, 4, 4]),  # packed with every sequence the same length (no empty one)
    ],
    ids=["B1T1", "T1", "T1100", "packed-empty-long", "packed-even"],
)
@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_awkward_layouts_match_reference(backend, device, layout, loss):
    batch = make_batch(device, **layout)
    assert_matches(backend, batch, loss=loss, kl_coef=0.1, entropy_coef=0.01, aggregation="seq-mean-token-mean")


@pytest.mark.parametrize(
    "layout",
    [dict(shape=(5, 9), all_masked_row=3), dict(lengths=[7, 0, 30, 3, 12, 9, 20], per_seq=True, float_mask=True)],
    ids=["padded", "packed"],
)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_torch_backend_in_passes_matches_reference(monkeypatch, layout, aggregation, loss):
    # Large CPU batches run in passes of whole sequences (torch_backend/aggregation.py
    # token_passes); passes of ~16 tokens here: several sequences per pass, a sequence
    # longer than a pass, an empty one, a fully masked one.
    monkeypatch.setattr(aggregation_module, "CPU_PASS_TOKENS", 16)
    cpu = torch.device("cpu")
    batch = make_batch(cpu, **layout)
    n = batch["logp"].numel()
    cu = batch["cu_seqlens"] if batch["cu_seqlens"] is not None else torch.arange(0, n + 1, 9, dtype=torch.int32)
    assert len(aggregation_module.token_passes(cu, n, 0 if batch["cu_seqlens"] is not None else 9)) >= 3
    assert_matches("torch", batch, loss=loss, kl_coef=0.1, entropy_coef=0.01, aggregation=aggregation,
                   **LOSS_OPTIONS[loss])


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "k1+", "k3+"])
@pytest.mark.parametrize("kl_clamp", [False, True])
def test_kl_estimators_in_the_loss(backend, device, estimator, kl_clamp):
    batch = make_batch(device, shape=(2, 21))
    batch["ref_logp"][0, :5] -= 25.0  # verl's clamps active on a few tokens
    assert_matches(backend, batch, loss="ppo", kl_coef=0.3, kl_estimator=estimator, kl_clamp=kl_clamp)


def test_all_masked_batch_gives_zero_loss_and_finite_metrics(backend, device):
    batch = make_batch(device, shape=(3, 8))
    batch["mask"][:] = False
    for aggregation in AGGREGATIONS:
        loss, metrics, dlp, dent = run_ours(batch, torch.float32, backend, loss="gspo", aggregation=aggregation, entropy_coef=0.1)
        assert loss.item() == 0.0, aggregation
        assert all(torch.isfinite(v) and v.item() == 0.0 for v in metrics.values()), metrics
        assert not dlp.any() and not dent.any()


# NaN / inf arithmetic on the masked tokens is the point (numpy warns under the interpreter)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("terms", ["pg", "pg+isw", "pg+isw+kl+entropy"])
@pytest.mark.parametrize("loss", LOSSES)
def test_non_finite_values_on_masked_tokens_change_nothing(backend, device, loss, terms):
    # Padding often holds garbage (-inf logprobs, NaN advantages): a masked token must add
    # exactly nothing to the loss, the metrics or any gradient, whatever its values. "pg"
    # is where the torch backend folds the mask into the gradient's select.
    batch = make_batch(device, shape=(3, 37), all_masked_row=1)
    dirty = dict(batch)
    masked = ~batch["mask"]
    for name, bad in (("logp", float("-inf")), ("old_logp", float("nan")), ("advantages", float("inf")),
                      ("ref_logp", float("nan")), ("entropy", float("inf")), ("is_weights", float("nan"))):
        dirty[name] = batch[name].masked_fill(masked, bad)
    kw = dict(loss=loss, **LOSS_OPTIONS[loss])
    if "kl" in terms:
        kw.update(kl_coef=0.1, entropy_coef=0.01)
    for b in (batch, dirty):
        b["ref_logp"] = b["ref_logp"] if "kl" in terms else None
        b["is_weights"] = b["is_weights"] if "isw" in terms else None
    clean_out, dirty_out = run_ours(batch, torch.float32, backend, **kw), run_ours(dirty, torch.float32, backend, **kw)
    torch.testing.assert_close(dirty_out[0], clean_out[0])
    torch.testing.assert_close(dirty_out[1], clean_out[1])
    for clean_grad, dirty_grad in zip(clean_out[2:], dirty_out[2:]):
        torch.testing.assert_close(dirty_grad, clean_grad)
        assert not dirty_grad[masked].any()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_masked_sequence_contributes_nothing(backend, device, aggregation):
    # Appending a fully masked sequence (packed) changes neither the loss nor the gradients
    # of the other tokens; its own tokens get zero gradient.
    batch = make_batch(device, lengths=[6, 9], per_seq=True)
    longer = {k: v for k, v in make_batch(device, lengths=[6, 9, 7], per_seq=True).items()}
    for name in ("logp", "old_logp", "mask", "ref_logp", "entropy"):
        longer[name] = torch.cat([batch[name], longer[name][15:]])
    for name in ("advantages", "is_weights"):
        longer[name] = torch.cat([batch[name], longer[name][2:]])
    longer["mask"][15:] = False
    kw = dict(loss="ppo", aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01)
    if aggregation == "seq-mean-token-sum-norm":
        kw["normalizer"] = 20.0  # S * L_max depends on the batch by definition
    loss, _, dlp, _ = run_ours(batch, torch.float32, backend, **kw)
    loss2, _, dlp2, _ = run_ours(longer, torch.float32, backend, **kw)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(dlp2[:15], dlp)
    assert not dlp2[15:].any()


def _one_seq(device, lp, old, adv, mask=None):
    lp = torch.tensor([lp], device=device, dtype=torch.float32).requires_grad_()
    old = torch.tensor([old], device=device, dtype=torch.float32)
    adv = torch.tensor([adv], device=device, dtype=torch.float32)
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor([mask], device=device)
    return lp, old, adv, mask


def test_hand_clipped_token(backend, device):
    # token 0: r = 1.5, A = 1: L1 = -1.5 < L2 = -1.2 -> clipped, loss -1.2, zero gradient.
    # token 1: r = 1, A = 1: loss -1, gradient -A r = -1; token-mean over 2 tokens.
    lp, old, adv, mask = _one_seq(device, [math.log(1.5), 0.0], [0.0, 0.0], [1.0, 1.0])
    loss, m = ops.policy_loss(lp, old, adv, mask, clip_low=0.2, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2, abs=1e-6)
    assert lp.grad[0].tolist() == pytest.approx([0.0, -0.5], abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(0.5) and m["clipfrac_lower"].item() == 0.0
    assert m["ratio_max"].item() == pytest.approx(1.5) and m["ratio_min"].item() == pytest.approx(1.0)
    assert m["approx_kl"].item() == pytest.approx(0.25 * math.log(1.5) ** 2, rel=1e-5)


def test_hand_dual_clipped_token(backend, device):
    # r = e^2, A = -1: L1 = e^2 > L2 = 1.2, so l = e^2; dual clip c = 3: min(e^2, 3) = 3,
    # counted in clipfrac_lower (not clipfrac), zero gradient. Without the dual clip the
    # gradient is -A r = e^2.
    lp, old, adv, mask = _one_seq(device, [2.0], [0.0], [-1.0])
    loss, m = ops.policy_loss(lp, old, adv, mask, dual_clip=3.0, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(3.0)
    assert lp.grad.item() == 0.0
    assert m["clipfrac_lower"].item() == 1.0 and m["clipfrac"].item() == 0.0
    lp.grad = None
    loss, _ = ops.policy_loss(lp, old, adv, mask, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(2), rel=1e-6)
    assert lp.grad.item() == pytest.approx(math.exp(2), rel=1e-6)


def test_hand_delta_bound(backend, device):
    # INTELLECT-2: r = 3, A = 1, delta = 2: L1 = -min(r, 2) = -2 < L2 = -1.2 -> loss -1.2;
    # with A = -1: L1 = min(r, 2) = 2 > L2 = -1.2 -> loss 2, gradient 0 (bound active).
    lp, old, adv, mask = _one_seq(device, [math.log(3.0)], [0.0], [-1.0])
    loss, _ = ops.policy_loss(lp, old, adv, mask, delta=2.0, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and lp.grad.item() == 0.0


def test_hand_gspo_sequence_ratio(backend, device):
    # delta = [0.1, 0.3, masked 5.0]: s = exp(mean(0.1, 0.3)) = exp(0.2) for every token.
    # A = 1, wide clip: l_t = -s; token-mean -> -s; d/dlp_t = -s / 2 on valid tokens.
    lp, old, adv, mask = _one_seq(device, [0.1, 0.3, 5.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [True, True, False])
    loss, m = ops.policy_loss(lp, old, adv, mask, loss="gspo", clip_low=0.5, backend=backend)
    loss.backward()
    s = math.exp(0.2)
    assert loss.item() == pytest.approx(-s, rel=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(s, rel=1e-6) == m["ratio_max"].item()
    assert lp.grad[0].tolist() == pytest.approx([-s / 2, -s / 2, 0.0], rel=1e-6)
    # a clip range below s clips every token of the sequence at once
    loss, m = ops.policy_loss(lp, old, adv, mask, loss="gspo", clip_low=0.1, backend=backend)
    assert loss.item() == pytest.approx(-1.1, rel=1e-6) and m["clipfrac"].item() == 1.0


@pytest.mark.parametrize(
    "loss, clip_high, weight, clipfrac",
    [
        ("cispo", 0.28, 1.28, 1.0),  # verl: w = clip(r, 1 - 0.2, 1 + 0.28) = 1.28
        ("cispo-trl", 5.0, 2.0, 0.0),  # TRL: w = min(r, 5) = 2 (raw bound, not 1 + eps)
        ("cispo-trl", 1.5, 1.5, 1.0),
    ],
)
def test_hand_cispo_modes(backend, device, loss, clip_high, weight, clipfrac):
    # r = 2, A = 1, lp = -1 + log 2: l = -sg(w) A lp, d l / d lp = -w (w is a constant).
    lp0 = -1.0 + math.log(2.0)
    lp, old, adv, mask = _one_seq(device, [lp0], [-1.0], [1.0])
    out, m = ops.policy_loss(lp, old, adv, mask, loss=loss, clip_high=clip_high, backend=backend)
    out.backward()
    assert out.item() == pytest.approx(-weight * lp0, rel=1e-6)
    assert lp.grad.item() == pytest.approx(-weight, rel=1e-6)
    assert m["clipfrac"].item() == clipfrac


def test_hand_sapo_and_reinforce(backend, device):
    # SAPO at r = 1: sigmoid(0) = 1/2, l = -A * 2 (tau = 1 for A > 0), dl/dlp = -A * 4 * 1/4.
    lp, old, adv, mask = _one_seq(device, [-0.5], [-0.5], [2.0])
    out, _ = ops.policy_loss(lp, old, adv, mask, loss="sapo", backend=backend)
    out.backward()
    assert out.item() == pytest.approx(-4.0) and lp.grad.item() == pytest.approx(-2.0)
    # A < 0 uses tau = 1.05: l = -A * 0.5 * 4 / 1.05, same gradient -A.
    out, _ = ops.policy_loss(lp, old, -adv, mask, loss="sapo", backend=backend)
    assert out.item() == pytest.approx(4.0 / 1.05, rel=1e-6)
    # REINFORCE with an IS weight of 0.5: l = -0.5 A lp.
    lp.grad = None
    out, _ = ops.policy_loss(lp, old, adv, mask, loss="reinforce", is_weights=torch.tensor([0.5], device=device), backend=backend)
    out.backward()
    assert out.item() == pytest.approx(0.5) and lp.grad.item() == pytest.approx(-1.0)


def test_normalizer_replaces_the_denominator(backend, device):
    batch = make_batch(device, shape=(3, 10), per_seq=True, all_masked_row=0)
    kw = dict(loss="ppo", backend=backend)
    base = {k: v for k, v in batch.items() if k in ("logp", "old_logp", "advantages", "mask")}
    tokens = batch["mask"].sum()
    token_sum, _ = ops.policy_loss(**base, aggregation="token-sum", **kw)
    for normalizer in (40.0, torch.tensor(40.0, device=device)):
        loss, _ = ops.policy_loss(**base, aggregation="token-mean", normalizer=normalizer, **kw)
        torch.testing.assert_close(loss, token_sum / 40)
    local, _ = ops.policy_loss(**base, aggregation="token-mean", **kw)
    torch.testing.assert_close(local, token_sum / tokens)
    # seq-mean-token-mean: by default the empty row is not counted (2 sequences); TRL's
    # grpo divides by B = 3, which normalizer=3 gives.
    verl, _ = ops.policy_loss(**base, aggregation="seq-mean-token-mean", **kw)
    trl, _ = ops.policy_loss(**base, aggregation="seq-mean-token-mean", normalizer=3, **kw)
    torch.testing.assert_close(trl, verl * 2 / 3)


def test_constants_get_no_gradient(backend, device):
    batch = make_batch(device, shape=(2, 5))
    old = batch["old_logp"].requires_grad_()
    adv = batch["advantages"].requires_grad_()
    lp = batch["logp"].requires_grad_()
    loss, metrics = ops.policy_loss(lp, old, adv, batch["mask"], ref_logp=batch["ref_logp"], kl_coef=0.1, backend=backend)
    loss.backward()
    assert lp.grad is not None and old.grad is None and adv.grad is None
    assert not metrics["clipfrac"].requires_grad


@pytest.mark.parametrize("loss", ["ppo", "sapo", "reinforce"])
def test_reference_gradcheck(loss):
    lp = (-torch.rand(2, 5, dtype=torch.float64) - 0.1).requires_grad_()
    ent = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    old = lp.detach() + torch.randn(2, 5, dtype=torch.float64) * 0.3
    adv = torch.randn(2, 5, dtype=torch.float64)
    ref = lp.detach() + 0.1
    mask = torch.rand(2, 5) > 0.3

    def f(a, h):
        return policy_loss_ref(a, old, adv, mask, loss=loss, ref_logp=ref, kl_coef=0.1, entropy=h, entropy_coef=0.1,
                               dual_clip=3.0, aggregation="seq-mean-token-mean")[0]

    assert torch.autograd.gradcheck(f, (lp, ent))


def test_reference_gradcheck_gspo_equals_the_sequence_objective():
    # With per-sequence advantages, no clipping and seq-mean-token-mean, the sg trick's
    # gradient is the gradient of the sequence-level objective -A s_b (GSPO paper).
    lp = (-torch.rand(2, 4, dtype=torch.float64) - 0.1).requires_grad_()
    old = lp.detach() + torch.randn(2, 4, dtype=torch.float64) * 0.1
    adv = torch.randn(2, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)

    def f(a):
        return policy_loss_ref(a, old, adv, mask, loss="gspo", clip_low=10.0, aggregation="seq-mean-token-mean")[0]

    assert torch.autograd.gradcheck(f, (lp,))


def test_compile_fullgraph(backend, device):
    batch = make_batch(device, shape=(3, 12), per_seq=True)
    lp = batch["logp"].requires_grad_()

    def f(a):
        loss, metrics = ops.policy_loss(a, batch["old_logp"], batch["advantages"], batch["mask"], loss="ppo",
                                        ref_logp=batch["ref_logp"], kl_coef=0.1, dual_clip=3.0, backend=backend)
        return loss, metrics["clipfrac"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, clipfrac = compiled(lp)
    loss.backward()
    grad = lp.grad.clone()
    lp.grad = None
    eager_loss, eager_clipfrac = f(lp)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(clipfrac, eager_clipfrac)
    torch.testing.assert_close(grad, lp.grad)


def test_bad_inputs_name_the_argument(device):
    b = make_batch(device, shape=(2, 5))
    lp, old, adv, mask = b["logp"], b["old_logp"], b["advantages"], b["mask"]
    cases = [
        (ValueError, "old_logp must have the shape of logp", dict(old_logp=old[:, :4])),
        (ValueError, "mask must have the shape of logp", dict(mask=mask[:1])),
        (TypeError, "logp must have dtype", dict(logp=lp.long())),
        (TypeError, "mask must have dtype", dict(mask=mask.to(torch.complex64))),
        (ValueError, "advantages must have the shape of the tokens", dict(advantages=adv[:, :3])),
        (ValueError, "is_weights must have the shape of the tokens", dict(is_weights=torch.ones(3, device=device))),
        (ValueError, "loss must be one of", dict(loss="trpo")),
        (ValueError, "aggregation must be one of", dict(aggregation="mean")),
        (ValueError, "kl_estimator must be one of", dict(kl_estimator="k4", ref_logp=lp)),
        (ValueError, "old_logp is on meta", dict(old_logp=torch.empty(2, 5, device="meta"))),
        (ValueError, "logp must be \\[B, T\\]", dict(logp=lp.reshape(-1), old_logp=old.reshape(-1), mask=mask.reshape(-1))),
        (ValueError, "cispo-trl' needs clip_high", dict(loss="cispo-trl")),
        (ValueError, "dual_clip must be > 1", dict(dual_clip=0.5)),
        (ValueError, "clip_low must be >= 0", dict(clip_low=-0.1)),
        (TypeError, "kl_coef must be a number", dict(kl_coef="0.1")),
        (ValueError, "normalizer must be > 0", dict(normalizer=0)),
        (ValueError, "normalizer must hold one value", dict(normalizer=torch.ones(2, device=device))),
        (ValueError, "backend must be one of", dict(backend="cuda-magic")),
    ]
    for error, message, override in cases:
        args = {**dict(logp=lp, old_logp=old, advantages=adv, mask=mask), **override}
        with pytest.raises(error, match=message):
            ops.policy_loss(**args)
    flat = dict(logp=lp.reshape(-1), old_logp=old.reshape(-1), advantages=adv.reshape(-1), mask=mask.reshape(-1))
    for cu, message in (
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), "cu_seqlens must rise from 0"),
        (torch.tensor([0, 6, 9], dtype=torch.int32), "cu_seqlens must rise from 0"),
        (torch.tensor([0, 10.0]), "cu_seqlens must have dtype"),
        (torch.tensor([[0, 10]]), "cu_seqlens must be 1-D"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            ops.policy_loss(**flat, cu_seqlens=cu.to(device))


# The options that make TRL's and verl's semantics exact, each switched on over every loss.
SEMANTICS_OPTIONS = {
    "unbounded-ratio": dict(log_ratio_min=None, log_ratio_max=None),
    # tight bounds: the clamp is active on many tokens (no ratio gradient there)
    "tight-bounds": dict(log_ratio_min=-0.15, log_ratio_max=0.1),
    "upper-bound-only": dict(log_ratio_min=None, log_ratio_max=0.1),
    "kl-ratio-weight": dict(kl_ratio_weight=True, kl_estimator="k3"),
    "kl-ratio-weight-bounded": dict(kl_ratio_weight=True, kl_estimator="k1+", log_ratio_min=-0.15, log_ratio_max=0.1),
    "sapo-taus": dict(sapo_tau_pos=0.5, sapo_tau_neg=2.0),
    "entropy-token-mean": dict(entropy_aggregation="token-mean", aggregation="seq-mean-token-sum", normalizer=7.0),
    "is-weights-per-sequence": dict(is_weights_per_sequence=True),
    "count-empty-seqs": dict(count_empty_seqs=True, aggregation="seq-mean-token-mean"),
    "norm-non-empty": dict(count_empty_seqs=False, aggregation="seq-mean-token-sum-norm"),
}


@pytest.mark.parametrize("layout", [dict(shape=(4, 21), all_masked_row=2), dict(lengths=[6, 0, 25, 3], float_mask=True)],
                         ids=["padded", "packed"])
@pytest.mark.parametrize("options", SEMANTICS_OPTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_semantics_options_match_reference(backend, device, loss, options, layout):
    # Per-token advantages and IS weights (is_weights_per_sequence averages them), every term on.
    batch = make_batch(device, **layout)
    assert_matches(backend, batch, loss=loss, kl_coef=0.1, entropy_coef=0.05, **{**LOSS_OPTIONS[loss],
                                                                              **SEMANTICS_OPTIONS[options]})


def test_semantics_options_match_reference_in_bf16(backend, device):
    batch = make_batch(device, shape=(3, 37), all_masked_row=1)
    for loss in ("ppo", "gspo", "cispo-trl"):
        assert_matches(backend, batch, torch.bfloat16, loss=loss, kl_coef=0.1, entropy_coef=0.05,
                       kl_ratio_weight=True, log_ratio_min=None, log_ratio_max=None, entropy_aggregation="token-mean",
                       count_empty_seqs=True, **LOSS_OPTIONS[loss])  # fmt: skip


def _trl_style_loss(lp, old, adv, mask, ref, entropy, *, sequence_level, beta, entropy_coef, eps_low, eps_high):
    """TRL 1.16's GRPO ``loss_type="grpo"`` written out in plain torch (no clamp, KL times the
    differentiable importance weight, token-mean entropy bonus, divide by all B): an
    independent check of the options' meaning (tests/test_integration_trl_grpo.py runs TRL)."""
    m = mask.to(lp.dtype)
    log_ratio = lp - old
    if sequence_level:
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    kl = (torch.exp(ref - lp) - (ref - lp) - 1) * coef_1
    per_token = per_token + beta * kl
    loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    return loss - entropy_coef * (entropy * m).sum() / m.sum().clamp(min=1.0)


@pytest.mark.parametrize("sequence_level", [False, True], ids=["token", "sequence"])
def test_trl_options_reproduce_trls_grpo_formula(backend, device, sequence_level):
    batch = make_batch(device, shape=(4, 13), per_seq=True, all_masked_row=3)
    args = {k: batch[k].double() for k in ("logp", "old_logp", "advantages", "ref_logp", "entropy")}
    lp, ent = args["logp"].requires_grad_(), args["entropy"].requires_grad_()
    expected = _trl_style_loss(lp, args["old_logp"], args["advantages"], batch["mask"], args["ref_logp"], ent,
                               sequence_level=sequence_level, beta=0.3, entropy_coef=0.05, eps_low=0.2, eps_high=0.28)
    expected.backward()
    lp32, ent32 = batch["logp"].clone().requires_grad_(), batch["entropy"].clone().requires_grad_()
    ours, _ = ops.policy_loss(
        lp32, batch["old_logp"], batch["advantages"], batch["mask"], loss="gspo" if sequence_level else "ppo",
        clip_low=0.2, clip_high=0.28, log_ratio_min=None, log_ratio_max=None, ref_logp=batch["ref_logp"], kl_coef=0.3,
        kl_ratio_weight=True, entropy=ent32, entropy_coef=0.05, entropy_aggregation="token-mean",
        aggregation="seq-mean-token-mean", count_empty_seqs=True, backend=backend,
    )  # fmt: skip
    ours.backward()
    torch.testing.assert_close(ours.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp32.grad.double(), lp.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ent32.grad.double(), ent.grad, rtol=1e-5, atol=1e-7)


def test_hand_ppo_kl_and_cispo_clip_ratio(backend, device):
    # One sequence of three valid tokens and a masked one: delta = 0.5, -0.1, 30 (clamped to 20).
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], device=device)
    old = torch.tensor([[-1.5, -0.9, -31.0, float("nan")]], device=device)
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]], device=device)
    mask = torch.tensor([[True, True, True, False]], device=device)
    _, metrics = ops.policy_loss(lp, old, adv, mask, loss="cispo-trl", clip_high=1.5, backend=backend)
    assert metrics["ppo_kl"].item() == pytest.approx(-(0.5 - 0.1 + 20.0) / 3, rel=1e-6)
    # r = e^0.5 = 1.65 > 1.5 with A > 0 counts; e^20 > 1.5 has A < 0; e^-0.1 is under the cap
    assert metrics["cispo_clip_ratio"].item() == pytest.approx(1 / 3, rel=1e-6)
    _, metrics = ops.policy_loss(lp, old, adv, mask, loss="cispo", clip_high=0.28, backend=backend)
    assert metrics["cispo_clip_ratio"].item() == pytest.approx(1 / 3, rel=1e-6)  # 1.65 > 1.28
    _, metrics = ops.policy_loss(lp, old, adv, mask, loss="ppo", log_ratio_min=None, log_ratio_max=None,
                                 backend=backend)  # fmt: skip
    assert metrics["ppo_kl"].item() == pytest.approx(-(0.5 - 0.1 + 30.0) / 3, rel=1e-6)
    assert metrics["cispo_clip_ratio"].item() == 0.0
    # gspo: verl reports the unclamped token mean whatever the sequence clamp
    _, metrics = ops.policy_loss(lp, old, adv, mask, loss="gspo", log_ratio_max=10.0, backend=backend)
    assert metrics["ppo_kl"].item() == pytest.approx(-(0.5 - 0.1 + 30.0) / 3, rel=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(10.0), rel=1e-6)


def test_hand_count_empty_seqs(backend, device):
    # Rows: loss sums 2 and 4 over 1 and 2 tokens (reinforce, -A lp with A = 1, lp = -2); row 3 empty.
    lp = torch.full((3, 2), -2.0, device=device)
    adv = torch.ones(3, device=device)
    mask = torch.tensor([[True, False], [True, True], [False, False]], device=device)

    def loss(aggregation, count_empty_seqs):
        value, _ = ops.policy_loss(lp, lp, adv, mask, loss="reinforce", aggregation=aggregation,
                                   count_empty_seqs=count_empty_seqs, backend=backend)  # fmt: skip
        return value.item()

    assert loss("seq-mean-token-mean", None) == pytest.approx((2 + 2) / 2)
    assert loss("seq-mean-token-mean", True) == pytest.approx((2 + 2) / 3)
    assert loss("seq-mean-token-sum", True) == pytest.approx((2 + 4) / 3)
    assert loss("seq-mean-token-sum-norm", None) == pytest.approx((2 + 4) / (3 * 2))
    assert loss("seq-mean-token-sum-norm", False) == pytest.approx((2 + 4) / (2 * 2))
    assert loss("token-mean", True) == pytest.approx(6 / 3)  # no sequence count to change


def test_hand_is_weights_per_sequence(backend, device):
    # reinforce, token-sum: l_t = -A lp w; the per-sequence mean of w = (1 + 3) / 2 on both valid tokens.
    lp = torch.tensor([[-1.0, -2.0, -3.0]], device=device, requires_grad=True)
    isw = torch.tensor([[1.0, 3.0, float("nan")]], device=device)
    mask = torch.tensor([[True, True, False]], device=device)
    value, _ = ops.policy_loss(lp, lp.detach(), torch.ones(1, device=device), mask, loss="reinforce", is_weights=isw,
                               is_weights_per_sequence=True, aggregation="token-sum", backend=backend)  # fmt: skip
    value.backward()
    assert value.item() == pytest.approx(2.0 * 3.0)
    assert lp.grad.tolist() == [[-2.0, -2.0, 0.0]]


def test_bad_semantics_options_name_the_argument(device):
    b = make_batch(device, shape=(2, 5))
    args = dict(logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"], mask=b["mask"])
    cases = [
        (ValueError, "log_ratio_min must be < log_ratio_max", dict(log_ratio_min=1.0, log_ratio_max=0.5)),
        (TypeError, "log_ratio_max must be a number", dict(log_ratio_max="10")),
        (ValueError, "sapo_tau_neg must be > 0", dict(sapo_tau_neg=0.0)),
        (TypeError, "kl_ratio_weight must be a bool", dict(kl_ratio_weight=1)),
        (TypeError, "is_weights_per_sequence must be a bool", dict(is_weights_per_sequence="yes")),
        (TypeError, "count_empty_seqs must be None or a bool", dict(count_empty_seqs=0)),
        (ValueError, "entropy_aggregation must be one of", dict(entropy_aggregation="seq-mean-token-mean")),
    ]
    for error, message, override in cases:
        with pytest.raises(error, match=message):
            ops.policy_loss(**{**args, **override})


@pytest.mark.gpu
def test_cuda_graph_capture_forward_backward():
    # Capturable only if nothing on the op path syncs with the host.
    device = torch.device("cuda")
    batch = make_batch(device, lengths=[100, 0, 300, 57], per_seq=True)
    lp = batch["logp"].requires_grad_()
    kw = dict(cu_seqlens=batch["cu_seqlens"], loss="gspo", ref_logp=batch["ref_logp"], kl_coef=0.1,
              aggregation="seq-mean-token-mean", normalizer=torch.tensor(4.0, device=device), backend="triton")
    args = (lp, batch["old_logp"], batch["advantages"], batch["mask"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        loss, _ = ops.policy_loss(*args, **kw)
        loss.backward()
    torch.cuda.current_stream().wait_stream(stream)
    lp.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, metrics = ops.policy_loss(*args, **kw)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    expected, _ = policy_loss_ref(*(a.detach().double() if a.is_floating_point() else a for a in args),
                                  **{k: v for k, v in kw.items() if k != "backend"})
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert torch.isfinite(lp.grad).all() and torch.isfinite(metrics["ratio_mean"])


# ------------------------------------------------------------------ native (cpp / cuda)

native_built = pytest.mark.skipif(not library.native_built(), reason="rlhf_engine._C is not built")


def _launcher_args(batch, **kw):
    """``batch`` (make_batch) -> the positional and keyword arguments of policy_loss_fwd."""
    cu = batch["cu_seqlens"]
    if cu is None:
        rows, cols = batch["logp"].shape
        cu = torch.arange(0, (rows + 1) * cols, cols, dtype=torch.int32, device=batch["logp"].device)
    options = dict(loss="ppo", clip_low=0.2, clip_high=0.28, dual_clip=3.0, delta=None, log_ratio_min=-20.0,
                   log_ratio_max=20.0, sapo_tau_pos=1.0, sapo_tau_neg=1.05, kl_coef=0.1, kl_estimator="k3",
                   kl_clamp=False, kl_ratio_weight=False, entropy_coef=0.01, seq_len=0)
    options.update(kw)
    args = (batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"], cu, batch["ref_logp"],
            batch["entropy"], batch["is_weights"])
    return args, options


@native_built
def test_native_constants_mirror_the_spec():
    from rlhf_engine.reference import kl as kl_ref
    from rlhf_engine.reference import policy_loss as spec

    constants = library.module().POLICY_LOSS_CONSTANTS
    assert constants["KAPPA_CLAMP"] == kl_ref.KAPPA_CLAMP and constants["K3_CLAMP"] == kl_ref.K3_CLAMP
    assert constants["DPPO_KL_EPS"] == pytest.approx(spec.DPPO_KL_EPS, rel=1e-7)  # an fp32 mirror
    assert constants["NUM_PARTIALS"] == len(spec.PARTIALS)
    assert constants["RATIO_MIN_COLUMN"] == spec.PARTIALS.index("ratio_min")
    assert constants["RATIO_MAX_COLUMN"] == spec.PARTIALS.index("ratio_max")
    assert constants["LOSS_CODES"] == native_policy_loss.LOSS_CODES == {name: i for i, name in enumerate(LOSSES)}
    assert constants["KL_BASE_CODES"] == native_policy_loss.KL_BASE_CODES
    assert {base for base, _ in kl_ref.ESTIMATORS.values()} == set(native_policy_loss.KL_BASE_CODES)


@pytest.mark.skipif(not (library.native_built() and triton_runs_on(torch.device("cpu"))),
                    reason="needs rlhf_engine._C and the Triton interpreter")
@pytest.mark.parametrize("loss", LOSSES)
def test_cpp_launcher_matches_the_triton_launcher(loss):
    # Same (g, partials) as kernels/policy_loss.py, the empty sequence's ratio_min / ratio_max
    # identities (+inf / -inf) included; also the codes the Triton launcher uses.
    from rlhf_engine.kernels import kl as triton_kl
    from rlhf_engine.kernels import policy_loss as triton_policy_loss

    assert triton_policy_loss.LOSS_CODES == native_policy_loss.LOSS_CODES
    assert triton_kl.BASE_CODES == native_policy_loss.KL_BASE_CODES
    batch = make_batch(torch.device("cpu"), lengths=[9, 0, 40, 3], per_seq=loss == "gspo", float_mask=True)
    args, options = _launcher_args(batch, **{**dict(clip_low=0.2), **LOSS_OPTIONS[loss]}, loss=loss,
                                   kl_estimator="k3+", kl_clamp=True)
    g, partials = native_policy_loss.policy_loss_fwd(*args, **options)
    g_triton, partials_triton = triton_policy_loss.policy_loss_fwd(*args, **options)
    assert partials[1, PARTIALS.index("ratio_min")].item() == math.inf
    assert partials[1, PARTIALS.index("ratio_max")].item() == -math.inf
    torch.testing.assert_close(partials, partials_triton, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(g, g_triton, rtol=2e-5, atol=1e-6)


@native_built
@pytest.mark.parametrize("loss", ["ppo", "gspo", "sapo"])
def test_cpp_results_do_not_depend_on_the_thread_count(loss):
    # Many sequences of uneven lengths and one long one: every output bit
    # is the same for 1 and 4 threads, forward and backward.
    lengths = [int(x) for x in torch.randint(0, 300, (61,))] + [20000]
    batch = make_batch(torch.device("cpu"), lengths=lengths, per_seq=True, float_mask=True)
    args, options = _launcher_args(batch, loss=loss, **LOSS_OPTIONS[loss])
    cu = args[4]
    w = torch.rand(len(lengths))
    grad = torch.tensor(0.75)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            g, partials = native_policy_loss.policy_loss_fwd(*args, **options)
            out = native_policy_loss.seq_scale_bwd(grad, w, g, cu, -0.5, 0, torch.bfloat16)
            results.append((g, partials, out))
    finally:
        torch.set_num_threads(previous)
    for one, four in zip(*results):
        assert torch.equal(one, four)


@native_built
def test_cpp_long_sequences_match_reference():
    # Sequences far longer than a CUDA block's stride or a host chunk, every term on.
    batch = make_batch(torch.device("cpu"), lengths=[5000, 1, 0, 12000], per_seq=True, float_mask=True)
    for loss in ("ppo", "gspo"):
        assert_matches("cpp", batch, loss=loss, kl_coef=0.1, entropy_coef=0.01, **LOSS_OPTIONS[loss])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_input_dtype_reads_as_its_fp32_value(backend, device, dtype):
    # Inputs of any float dtype (mixed too), masks and cu_seqlens of any allowed dtype: the
    # kernels compute on the fp32 values, so the result equals that of the inputs rounded to
    # fp32 first; gradients come back in their input's dtype.
    batch = make_batch(device, lengths=[6, 0, 17, 9], per_seq=True)
    rounded = {k: _cast(v, dtype) for k, v in batch.items()}
    mixed = dict(rounded, old_logp=rounded["old_logp"].float(), advantages=rounded["advantages"].double(),
                 mask=batch["mask"].to(torch.uint8), cu_seqlens=batch["cu_seqlens"].long())
    as_fp32 = {k: _cast(v, torch.float32) for k, v in rounded.items()}
    kw = dict(loss="gspo", kl_coef=0.1, entropy_coef=0.01, aggregation="seq-mean-token-mean")
    # The native kernels read each element as its fp32 value and round the gradient once:
    # bit for bit the fp32 run. The others may round in between.
    exact = dict(rtol=0, atol=0) if backend in ("cpp", "cuda") else dict(rtol=1e-2, atol=1e-6)
    loss32, metrics32, dlp32, dent32 = run_ours(as_fp32, torch.float32, backend, **kw)
    for mask_dtype in (torch.uint8, torch.float16, torch.int64):
        mixed["mask"] = batch["mask"].to(mask_dtype)
        loss, metrics, dlp, dent = run_ours(mixed, dtype, backend, **kw)
        torch.testing.assert_close(loss, loss32, **exact)
        for name in metrics:
            torch.testing.assert_close(metrics[name], metrics32[name], **exact)
        assert dlp.dtype == dtype and dent.dtype == dtype
        torch.testing.assert_close(dlp.float(), dlp32.to(dtype).float(), **exact)
        torch.testing.assert_close(dent.float(), dent32.to(dtype).float(), **exact)


def test_strided_inputs_match_contiguous(backend, device):
    # The op makes non-contiguous inputs dense before any backend reads them flat.
    batch = make_batch(device, shape=(3, 40), per_seq=True, all_masked_row=1)
    strided = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            wide = torch.zeros(3, 80, dtype=value.dtype, device=device)
            wide[:, ::2] = value
            strided[name] = wide[:, ::2]
            assert not strided[name].is_contiguous()
        else:
            strided[name] = value
    kw = dict(loss="ppo", kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    for a, b in zip(run_ours(strided, torch.float32, backend, **kw), run_ours(batch, torch.float32, backend, **kw)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@native_built
def test_seq_scale_bwd_rounds_like_torch():
    # The native launcher writes bf16 / fp16 directly, rounded to nearest even: the same
    # values as the fp32 result rounded by torch (what the Triton launcher does on the CPU).
    x = torch.randn(1000, dtype=torch.float64) * 100
    cu = torch.tensor([0, 300, 300, 1000])
    w = torch.rand(3)
    grad = torch.tensor(1.3)
    ref32 = native_policy_loss.seq_scale_bwd(grad, w, x, cu, 0.7, 0, torch.float32)
    coef = (0.7 * grad * w).repeat_interleave(cu.diff())
    torch.testing.assert_close(ref32, coef * x.float(), rtol=1e-6, atol=0)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(native_policy_loss.seq_scale_bwd(grad, w, x, cu, 0.7, 0, dtype), ref32.to(dtype))
    mask = x > 0  # a bool x (the entropy's gradient is -c_H w_b m_t)
    out = native_policy_loss.seq_scale_bwd(grad, w, mask, cu, -0.1, 0, torch.float32)
    torch.testing.assert_close(out, -0.1 * 1.3 * w.repeat_interleave(cu.diff()) * mask, rtol=1e-6, atol=0)


def test_backend_cuda_on_cpu_tensors_is_refused():
    b = make_batch(torch.device("cpu"), shape=(2, 5))
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ops.policy_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_backend_matches_reference_on_gpu(loss):
    # backend="cuda" against the float64 reference on a CUDA device: every term on, long
    # and empty sequences, a float mask; then the same inputs run twice give the same bits.
    device = torch.device("cuda")
    options = dict(kl_coef=0.1, entropy_coef=0.01, kl_estimator="k3+", kl_clamp=True, **LOSS_OPTIONS[loss])
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches("cuda", make_batch(device, shape=(3, 37), all_masked_row=1), dtype, loss=loss, **options)
    batch = make_batch(device, lengths=[700, 0, 3000, 1, 257], per_seq=True, float_mask=True)
    assert_matches("cuda", batch, loss=loss, aggregation="seq-mean-token-mean", **options)
    first, second = (run_ours(batch, torch.float32, "cuda", loss=loss, **options) for _ in range(2))
    for a, b in zip(first[2:], second[2:]):
        assert torch.equal(a, b)
    assert torch.equal(first[0], second[0])


@pytest.mark.gpu
def test_cuda_backend_captures_in_a_cuda_graph():
    # No host sync on the cuda backend's forward or backward (capture would fail).
    device = torch.device("cuda")
    batch = make_batch(device, lengths=[100, 0, 300, 57], per_seq=True)
    lp = batch["logp"].requires_grad_()
    kw = dict(cu_seqlens=batch["cu_seqlens"], loss="gspo", ref_logp=batch["ref_logp"], kl_coef=0.1,
              aggregation="seq-mean-token-mean", normalizer=torch.tensor(4.0, device=device), backend="cuda")
    args = (lp, batch["old_logp"], batch["advantages"], batch["mask"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loss, _ = ops.policy_loss(*args, **kw)
        loss.backward()
    torch.cuda.current_stream().wait_stream(stream)
    eager_grad = lp.grad.clone()
    lp.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, _ = ops.policy_loss(*args, **kw)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    expected, _ = policy_loss_ref(*(a.detach().double() if a.is_floating_point() else a for a in args),
                                  **{k: v for k, v in kw.items() if k != "backend"})
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(lp.grad, eager_grad)
