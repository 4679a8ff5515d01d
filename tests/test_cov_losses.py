"""clip_cov_loss / kl_cov_loss: every backend against the float64 reference (loss, metrics,
gradients) over every aggregation and awkward layouts; hand-computed cases pinning which
tokens are picked; the draw's generator; gradcheck of the reference; input validation.

The selection is a discontinuous function of the inputs (a comparison, a top-k), so the
tests run on fp32 inputs, where the op's fp32 pre-pass and the fp32 baseline pick what the
float64 reference picks (bf16 rounding would move tokens across the window's bounds)."""

import math

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine.reference.aggregation import AGGREGATIONS
from rlhf_engine.reference.cov_losses import clip_cov_ref, kl_cov_ref
from tests.test_policy_loss import make_batch as policy_batch
from tests.tolerance import assert_within_tolerance

NATIVE_BACKENDS = True  # the backend tests also run on cpp (CPU) / cuda (GPU)

# Windows and ratios that pick several tokens of a few dozen (the tests assert they do).
OPTIONS = {
    "clip_cov": dict(clip_low=0.2, clip_high=0.28, clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=2.0),
    "kl_cov": dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5),
}
OPS = {"clip_cov": ops.clip_cov_loss, "kl_cov": ops.kl_cov_loss}
REFS = {"clip_cov": clip_cov_ref, "kl_cov": kl_cov_ref}
METRICS = {"clip_cov": {"clipfrac", "ppo_kl"}, "kl_cov": {"ppo_kl"}}


def make_batch(device, **layout):
    """test_policy_loss's random inputs (padded or packed), without the reference and entropy
    the covariance losses do not take."""
    batch = policy_batch(device, **layout)
    del batch["ref_logp"], batch["entropy"]
    return batch


def _with_draw(name, kw, seed):
    """clip_cov's options with a fresh generator seeded ``seed``: every evaluation draws alike."""
    return dict(kw, generator=torch.Generator().manual_seed(seed)) if name == "clip_cov" else kw


def run_ours(name, batch, backend, seed=0, **kw):
    args = {k: (v.detach().clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in batch.items()}  # fmt: skip
    lp = args["logp"].requires_grad_()
    loss, metrics = OPS[name](**args, **_with_draw(name, kw, seed), backend=backend)
    loss.backward()
    return loss, metrics, lp.grad


def run_ref(name, batch, compute, seed=0, **kw):
    args = {k: (v.detach().to(compute).clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in batch.items()}  # fmt: skip
    lp = args["logp"].requires_grad_()
    loss, metrics = REFS[name](**args, **_with_draw(name, kw, seed))
    loss.backward()
    return loss, metrics, lp.grad


def assert_matches(name, backend, batch, **kw):
    """-> our metrics, after checking loss, metrics and gradient against the reference."""
    loss, metrics, grad = run_ours(name, batch, backend, **kw)
    r_loss, r_metrics, r_grad = run_ref(name, batch, torch.float64, **kw)
    b_loss, b_metrics, b_grad = run_ref(name, batch, torch.float32, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert set(metrics) == METRICS[name] == set(r_metrics)
    assert_within_tolerance(loss, r_loss, b_loss, torch.float32, "loss")
    for key in metrics:
        assert metrics[key].dtype == torch.float32 and metrics[key].dim() == 0
        assert_within_tolerance(metrics[key], r_metrics[key], b_metrics[key], torch.float32, key)
    assert grad.dtype == torch.float32
    assert_within_tolerance(grad, r_grad, b_grad, torch.float32, "d/d logp")
    return metrics


def _picked_some(name, metrics):
    """clip_cov dropped a token (else the case is plain PPO); kl_cov always picks >= 1."""
    if name == "clip_cov":
        assert metrics["clipfrac"] > 0, "the inputs must put a candidate in the window"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", OPS)
def test_matches_reference(backend, device, name, aggregation, packed):
    # Per-sequence advantages / IS weights when packed, with an empty sequence and float mask
    # weights; padded has a fully masked row and per-token ones (both must add nothing).
    if packed:
        batch = make_batch(device, lengths=[5, 0, 23, 9, 14], per_seq=True, float_mask=True)
    else:
        batch = make_batch(device, shape=(4, 19), all_masked_row=2)
    kw = dict(OPTIONS[name], aggregation=aggregation)
    _picked_some(name, assert_matches(name, backend, batch, **kw))


@pytest.mark.parametrize("normalizer", ["number", "tensor"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", OPS)
def test_normalizer_matches_reference(backend, device, name, aggregation, normalizer):
    # A global denominator (data parallelism) replaces the local one in the op's loss and in
    # kl_cov's penalty alike; the reference takes it as a number.
    batch = make_batch(device, shape=(4, 19), all_masked_row=2)
    value = 23.0 if normalizer == "number" else torch.tensor(23.0, device=device)
    loss, _, grad = run_ours(name, batch, backend, **OPTIONS[name], aggregation=aggregation, normalizer=value)
    r_loss, _, r_grad = run_ref(name, batch, torch.float64, **OPTIONS[name], aggregation=aggregation, normalizer=23.0)
    b_loss, _, b_grad = run_ref(name, batch, torch.float32, **OPTIONS[name], aggregation=aggregation, normalizer=23.0)
    assert_within_tolerance(loss, r_loss, b_loss, torch.float32, "loss")
    assert_within_tolerance(grad, r_grad, b_grad, torch.float32, "d/d logp")


@pytest.mark.parametrize(
    "layout",
    [
        dict(shape=(1, 1)),  # one token: the covariance is 0, kl_cov still penalizes it
        dict(shape=(2, 1100)),  # rows longer than the kernels' 1024-token block
        dict(lengths=[0, 3, 70, 1]),  # packed: empty first sequence, a long one, a single token
    ],
    ids=["B1T1", "T1100", "packed-empty-long"],
)
@pytest.mark.parametrize("name", OPS)
def test_awkward_layouts_match_reference(backend, device, name, layout):
    batch = make_batch(device, **layout)
    assert_matches(name, backend, batch, **OPTIONS[name], aggregation="seq-mean-token-mean")


@pytest.mark.parametrize("ratio", [0.001, 1.0], ids=["one", "all"])
def test_clip_cov_ratio_sets_how_many_are_dropped(backend, device, ratio):
    # max(int(ratio * sum m), 1) of the candidates (one of ~150 valid tokens at 0.001), or
    # every candidate when there are fewer (ratio 1)
    batch = make_batch(device, shape=(4, 50))
    metrics = assert_matches("clip_cov", backend, batch, **dict(OPTIONS["clip_cov"], clip_cov_ratio=ratio))
    dropped = round(metrics["clipfrac"].item() * batch["mask"].sum().item())
    assert dropped == 1 if ratio == 0.001 else dropped > 1


def test_clip_cov_without_a_candidate_is_ppo_on_the_unclamped_ratio(backend, device):
    batch = make_batch(device, shape=(3, 37), all_masked_row=1)
    batch["logp"][0, 3] = batch["old_logp"][0, 3] + 25.0  # r = e^25: beyond policy_loss' default clamp
    kw = dict(OPTIONS["clip_cov"], clip_cov_lb=100.0, clip_cov_ub=200.0)
    loss, metrics, grad = run_ours("clip_cov", batch, backend, **kw)
    assert metrics["clipfrac"].item() == 0.0
    lp = batch["logp"].clone().requires_grad_()
    args = {k: v for k, v in batch.items() if k != "logp"}
    ppo, ppo_metrics = ops.policy_loss(lp, **args, loss="ppo", clip_low=0.2, clip_high=0.28, log_ratio_min=None,
                                       log_ratio_max=None, backend=backend)  # fmt: skip
    ppo.backward()
    torch.testing.assert_close(loss, ppo)
    torch.testing.assert_close(grad, lp.grad)
    torch.testing.assert_close(metrics["ppo_kl"], ppo_metrics["ppo_kl"])


@pytest.mark.parametrize("name", OPS)
def test_bf16_non_contiguous_logp_and_int_mask(backend, device, name):
    # The pre-pass reads any float dtype, strides and mask dtype as the op does: computed
    # in fp32 (the loss as the float64 reference on the rounded inputs, to fp32 rounding),
    # the gradient returned in bf16.
    batch = make_batch(device, shape=(4, 30))
    strided = torch.empty(4, 60, dtype=torch.bfloat16, device=device)[:, ::2].copy_(batch["logp"])
    batch = dict(batch, logp=strided, old_logp=batch["old_logp"].bfloat16(), mask=batch["mask"].long())
    lp = strided.detach().clone().requires_grad_()
    assert not strided.is_contiguous()
    args = {k: v for k, v in batch.items() if k != "logp"}
    loss, metrics = OPS[name](strided.requires_grad_(), **args, **_with_draw(name, OPTIONS[name], 0), backend=backend)
    loss.backward()
    ref_args = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in args.items()}  # fmt: skip
    lp64 = lp.detach().double().requires_grad_()
    r_loss, r_metrics = REFS[name](lp64, **ref_args, **_with_draw(name, OPTIONS[name], 0))
    r_loss.backward()
    assert strided.grad.dtype == torch.bfloat16 and strided.grad.shape == strided.shape
    torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-6)
    for key in metrics:
        torch.testing.assert_close(metrics[key].double(), r_metrics[key], rtol=1e-5, atol=1e-6)
    # kl_cov's two gradient terms (the op's and the penalty's) reach logp each rounded to
    # bf16 and autograd sums them in bf16: an ulp of the largest, not of their sum
    torch.testing.assert_close(strided.grad.double(), lp64.grad, rtol=2**-7, atol=2**-8 * lp64.grad.abs().max().item())


def _by_hand_batch(device):
    # r = 1 except on token 0 (delta = 0.5); mean A = 0.5, mean lp = -2.5, so
    # cov = (0.75, -0.75, 0.25, -2.25): token 0 alone lies in (0.5, 1) and has the top cov.
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], device=device)
    old = lp - torch.tensor([[0.5, 0.0, 0.0, 0.0]], device=device)
    adv = torch.tensor([[1.0, -1.0, 0.0, 2.0]], device=device)
    return lp, old, adv, torch.ones_like(lp, dtype=torch.bool)


def test_clip_cov_by_hand(backend, device):
    lp, old, adv, mask = _by_hand_batch(device)
    lp.requires_grad_()
    # token 0: r = e^0.5 > 1.28 with A > 0 is clipped by PPO, so no candidate
    _, metrics = ops.clip_cov_loss(lp, old, adv, mask, clip_high=0.28, clip_cov_ratio=0.25, clip_cov_lb=0.5,
                                   clip_cov_ub=1.0, backend=backend)  # fmt: skip
    assert metrics["clipfrac"].item() == 0.0
    # with a clip range wide enough, it is the one candidate and is dropped: l = (0, 1, 0, -2)
    loss, metrics = ops.clip_cov_loss(lp, old, adv, mask, clip_low=0.2, clip_high=1.0, clip_cov_ratio=0.25,
                                      clip_cov_lb=0.5, clip_cov_ub=1.0, backend=backend)  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-0.25)
    assert metrics["clipfrac"].item() == pytest.approx(0.25)
    assert metrics["ppo_kl"].item() == pytest.approx(-0.125)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.25, 0.0, -0.5]], device=device))


def test_kl_cov_by_hand(backend, device):
    lp, old, adv, mask = _by_hand_batch(device)
    lp.requires_grad_()
    # k = max(1, int(4 * 0.25)) = 1: token 0 (top cov) gets + 2 |0.5|; l = (-e^0.5 + 1, 1, 0, -2)
    loss, metrics = ops.kl_cov_loss(lp, old, adv, mask, kl_cov_ratio=0.25, ppo_kl_coef=2.0, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(-math.exp(0.5) / 4)
    assert metrics["ppo_kl"].item() == pytest.approx(0.125)
    expected = torch.tensor([[(2.0 - math.exp(0.5)) / 4, 0.25, 0.0, -0.5]], device=device)
    torch.testing.assert_close(lp.grad, expected)


@pytest.mark.parametrize("name", OPS)
def test_all_masked_batch_gives_zero_loss_and_metrics(backend, device, name):
    batch = make_batch(device, shape=(3, 8))
    batch["mask"][:] = False
    for aggregation in AGGREGATIONS:
        loss, metrics, grad = run_ours(name, batch, backend, **OPTIONS[name], aggregation=aggregation)
        assert loss.item() == 0.0, aggregation
        assert all(v.item() == 0.0 for v in metrics.values()), metrics
        assert not grad.any()


# NaN / inf arithmetic on the masked tokens is the point (numpy warns under the interpreter)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", OPS)
def test_non_finite_values_on_masked_tokens_change_nothing(backend, device, name):
    # Padding often holds garbage: it must move neither the covariance's means nor the pick.
    batch = make_batch(device, shape=(3, 37), all_masked_row=1)
    dirty = dict(batch)
    masked = ~batch["mask"]
    for key, bad in (("logp", float("-inf")), ("old_logp", float("nan")), ("advantages", float("inf")),
                     ("is_weights", float("nan"))):  # fmt: skip
        dirty[key] = batch[key].masked_fill(masked, bad)
    clean_out = run_ours(name, batch, backend, **OPTIONS[name])
    dirty_out = run_ours(name, dirty, backend, **OPTIONS[name])
    torch.testing.assert_close(dirty_out[0], clean_out[0])
    torch.testing.assert_close(dirty_out[1], clean_out[1])
    torch.testing.assert_close(dirty_out[2], clean_out[2])
    assert not dirty_out[2][masked].any()


def test_clip_cov_draws_like_randperm_on_the_default_generator(device):
    batch = make_batch(device, shape=(4, 50))
    args = {k: v for k, v in batch.items()}
    state = torch.get_rng_state()
    # an explicit generator leaves torch's default one alone
    seeded, _ = ops.clip_cov_loss(**args, **OPTIONS["clip_cov"], generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    default, metrics = ops.clip_cov_loss(**args, **OPTIONS["clip_cov"])
    assert default.item() == seeded.item() and metrics["clipfrac"] > 0
    # another seed drops other tokens (a 5-of-dozens draw repeats with negligible odds)
    other = {ops.clip_cov_loss(**args, **OPTIONS["clip_cov"], generator=torch.Generator().manual_seed(s))[0].item()
             for s in range(8, 12)}  # fmt: skip
    assert other != {default.item()}


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes on the graph breaks and lru_cache
def test_torch_compile_gives_the_eager_result(device):
    # Not fullgraph: the picks read values on the host (Tensor.item, nonzero), so dynamo
    # breaks the graph there and compiles the rest (the fused op stays one opaque node).
    batch = make_batch(device, shape=(4, 19), all_masked_row=2)
    args = {k: v for k, v in batch.items() if k != "logp"}

    def both(lp):
        clip, _ = ops.clip_cov_loss(lp, **args, **_with_draw("clip_cov", OPTIONS["clip_cov"], 0), backend="torch")
        kl, _ = ops.kl_cov_loss(lp, **args, **OPTIONS["kl_cov"], backend="torch")
        return clip + 2 * kl

    eager_lp, compiled_lp = (batch["logp"].clone().requires_grad_() for _ in range(2))
    eager, compiled = both(eager_lp), torch.compile(both)(compiled_lp)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_lp.grad, eager_lp.grad)


@pytest.mark.parametrize("name", OPS)
def test_reference_gradcheck(name):
    batch = make_batch(torch.device("cpu"), lengths=[6, 0, 9], per_seq=True)
    args = {k: (v.double() if v.is_floating_point() else v) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items() if k != "logp"}  # fmt: skip
    kw = dict(OPTIONS[name], aggregation="seq-mean-token-mean")

    def loss(lp):
        return REFS[name](lp, **args, **_with_draw(name, kw, 0))[0]

    assert torch.autograd.gradcheck(loss, (batch["logp"].double().requires_grad_(),))


def test_bad_inputs_raise_clearly():
    lp, old, adv, mask = _by_hand_batch(torch.device("cpu"))
    clip, kl = ops.clip_cov_loss, ops.kl_cov_loss
    with pytest.raises(ValueError, match=r"clip_cov_loss: clip_cov_ratio must be in \(0, 1\]"):
        clip(lp, old, adv, mask, clip_cov_ratio=0.0)
    with pytest.raises(ValueError, match=r"kl_cov_loss: kl_cov_ratio must be in \(0, 1\]"):
        kl(lp, old, adv, mask, kl_cov_ratio=1.5)
    with pytest.raises(ValueError, match="clip_cov_lb must be < clip_cov_ub"):
        clip(lp, old, adv, mask, clip_cov_lb=5.0, clip_cov_ub=1.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        clip(lp, old, adv, mask, generator=7)
    with pytest.raises(ValueError, match="ppo_kl_coef must be >= 0"):
        kl(lp, old, adv, mask, ppo_kl_coef=-1.0)
    with pytest.raises(TypeError, match="clip_low must be a number"):
        clip(lp, old, adv, mask, clip_low="0.2")
    with pytest.raises(ValueError, match="advantages must have the shape of the tokens"):
        kl(lp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="old_logp must have the shape of logp"):
        clip(lp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="aggregation"):
        kl(lp, old, adv, mask, aggregation="seq-mean")
    with pytest.raises(TypeError, match="mask must have dtype"):
        clip(lp, old, adv, mask.to(torch.complex64))
