"""kl_penalty: every backend against the float64 reference, hand-computed values, clamping,
straight-through gradients, torch.compile and input validation."""

import math

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine.reference.kl import ESTIMATORS, kl_penalty_ref
from tests.tolerance import assert_within_tolerance

CANONICAL = ("k1", "abs", "k2", "k3", "k1+", "k3+")

SHAPES = [
    (1,),  # a single token: one program, almost all lanes masked off
    (3, 37),  # 2-D and not a multiple of any block size
    (2, 1100),  # crosses the 1024-token block: two programs, the second partly masked
]


def _inputs(shape, dtype, device):
    lp = -torch.rand(shape, device=device) * 4
    ref = lp + torch.randn(shape, device=device)
    # A few tokens far apart so verl's clamps (|kappa| > 20, k3 > 10) are active.
    lp.view(-1)[::7] -= 25.0
    ref.view(-1)[3::11] -= 25.0
    return lp.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("estimator", CANONICAL)
def test_matches_reference(backend, device, estimator, clamp, dtype, shape):
    lp, ref = _inputs(shape, dtype, device)
    lp_ours, ref_ours = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = ops.kl_penalty(lp_ours, ref_ours, estimator=estimator, clamp=clamp, backend=backend)
    assert out.dtype == torch.float32 and out.shape == lp.shape
    grad = torch.randn(shape, device=device)
    out.backward(grad)

    lp64, ref64 = lp.double().requires_grad_(), ref.double().requires_grad_()
    expected = kl_penalty_ref(lp64, ref64, estimator, clamp)
    expected.backward(grad.double())
    lp_b, ref_b = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    baseline = kl_penalty_ref(lp_b, ref_b, estimator, clamp)  # plain PyTorch in the input dtype
    baseline.backward(grad.to(dtype))

    assert_within_tolerance(out, expected, baseline, dtype, "value")
    assert lp_ours.grad.dtype == dtype and ref_ours.grad.dtype == dtype
    assert_within_tolerance(lp_ours.grad, lp64.grad, lp_b.grad, dtype, "d/d logp")
    assert_within_tolerance(ref_ours.grad, ref64.grad, ref_b.grad, dtype, "d/d ref_logp")


def test_verl_aliases_are_the_same_estimators(backend, device):
    lp, ref = _inputs((4, 9), torch.float32, device)
    for alias, canonical in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3"), ("low_var_kl+", "k3+"), ("kl+", "k1+"), ("mse+", "k2+")):
        a = ops.kl_penalty(lp, ref, estimator=alias, clamp=True, backend=backend)
        b = ops.kl_penalty(lp, ref, estimator=canonical, clamp=True, backend=backend)
        assert torch.equal(a, b), alias


@pytest.mark.parametrize(
    "estimator, value, grad",
    [
        # lp = 0, ref = log 2: kappa = log 2, exp(kappa) = 2
        ("k1", -math.log(2), 1.0),
        ("abs", math.log(2), -1.0),
        ("k2", 0.5 * math.log(2) ** 2, -math.log(2)),
        ("k3", 1 - math.log(2), -1.0),  # 2 - log 2 - 1; d/dlp = 1 - exp(kappa)
        ("k1+", -math.log(2), -math.log(2)),  # k1's value, k2's gradient
        ("k3+", 1 - math.log(2), -math.log(2)),
        ("abs+", math.log(2), -math.log(2)),  # verl's abs+: abs's value, k2's gradient
        ("k2+", 0.5 * math.log(2) ** 2, -math.log(2)),
    ],
)
def test_hand_computed(backend, device, estimator, value, grad):
    lp = torch.zeros(1, device=device, requires_grad=True)
    ref = torch.full((1,), math.log(2), device=device)
    out = ops.kl_penalty(lp, ref, estimator=estimator, backend=backend)
    out.sum().backward()
    assert out.item() == pytest.approx(value, abs=1e-6)
    assert lp.grad.item() == pytest.approx(grad, abs=1e-6)


def test_verl_clamp_caps_k3_and_zeroes_its_gradient(backend, device):
    # kappa = 30 (> 20): clamped to 20, then k3 = e^20 - 21 is capped at 10; gradient 0.
    # kappa = 3: k3 = e^3 - 4 = 16.09 > 10 is capped too; kappa = 1: untouched.
    lp = torch.tensor([-30.0, -3.0, -1.0], device=device, requires_grad=True)
    ref = torch.zeros(3, device=device)
    out = ops.kl_penalty(lp, ref, estimator="k3", clamp=True, backend=backend)
    out.sum().backward()
    assert out.tolist() == pytest.approx([10.0, 10.0, math.e - 2], rel=1e-6)
    assert lp.grad.tolist() == pytest.approx([0.0, 0.0, 1 - math.e], rel=1e-6)
    unclamped = ops.kl_penalty(lp, ref, estimator="k3", clamp=False, backend=backend)
    assert unclamped[0].item() == pytest.approx(math.exp(30) - 31, rel=1e-5)
    # clamp only concerns k3: k2 of the same inputs is unchanged
    assert torch.equal(
        ops.kl_penalty(lp, ref, estimator="k2", clamp=True, backend=backend),
        ops.kl_penalty(lp, ref, estimator="k2", clamp=False, backend=backend),
    )


def test_only_requested_gradients(backend, device):
    lp = torch.randn(5, device=device)
    ref = torch.randn(5, device=device, requires_grad=True)
    ops.kl_penalty(lp, ref, backend=backend).sum().backward()
    expected_ref = -(1 - torch.exp(ref.detach() - lp))  # d k3 / d ref = -(d k3 / d lp)
    torch.testing.assert_close(ref.grad, expected_ref)


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
@pytest.mark.parametrize("clamp", [False, True])
def test_reference_gradcheck(estimator, clamp):
    lp = (-torch.rand(6, dtype=torch.float64) * 3).requires_grad_()
    ref = (-torch.rand(6, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty_ref(a, b, estimator, clamp), (lp, ref))


@pytest.mark.parametrize("estimator", ["k1+", "k3+", "abs+", "k2+"])
def test_reference_straight_through_uses_k2_gradient(estimator):
    lp = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(6, dtype=torch.float64)
    kl_penalty_ref(lp, ref, estimator).sum().backward()
    torch.testing.assert_close(lp.grad, lp.detach() - ref)


def test_compile_fullgraph(backend, device):
    lp = torch.randn(3, 20, device=device, requires_grad=True)
    ref = torch.randn(3, 20, device=device)

    def f(a, b):
        return ops.kl_penalty(a, b, estimator="k3", clamp=True, backend=backend).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(lp, ref)
    out.backward()
    grad = lp.grad.clone()
    lp.grad = None
    eager = f(lp, ref)
    eager.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, lp.grad)


def test_bad_inputs_name_the_argument(device):
    lp = torch.randn(3, 4, device=device)
    with pytest.raises(ValueError, match="ref_logp must have the shape of logp"):
        ops.kl_penalty(lp, torch.randn(3, 5, device=device))
    with pytest.raises(TypeError, match="logp must have dtype"):
        ops.kl_penalty(lp.long(), lp)
    with pytest.raises(TypeError, match="ref_logp must be a torch.Tensor"):
        ops.kl_penalty(lp, 0.5)
    with pytest.raises(ValueError, match="estimator must be one of"):
        ops.kl_penalty(lp, lp, estimator="k4")
    with pytest.raises(TypeError, match="clamp must be a bool"):
        ops.kl_penalty(lp, lp, clamp="yes")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.kl_penalty(lp, lp, backend="cuda-magic")
    with pytest.raises(ValueError, match="ref_logp is on meta"):
        ops.kl_penalty(lp, torch.empty(3, 4, device="meta"))


def test_every_estimator_name_is_accepted(device):
    lp = torch.randn(4, device=device)
    for name in ESTIMATORS:
        assert torch.isfinite(ops.kl_penalty(lp, lp + 0.5, estimator=name)).all(), name
