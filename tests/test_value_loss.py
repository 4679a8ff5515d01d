"""value_loss: every backend against the float64 reference over aggregations and awkward
layouts, hand-computed clipping, gradcheck, torch.compile and input validation."""

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine.reference.aggregation import AGGREGATIONS
from rlhf_engine.reference.value_loss import value_loss_ref
from tests.tolerance import assert_within_tolerance


def make_batch(device, *, shape=None, lengths=None, float_mask=False):
    if lengths is not None:
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
        shape = (sum(lengths),)
    else:
        cu = None
    old = torch.randn(shape, device=device)
    mask = torch.rand(shape, device=device) > 0.25
    batch = dict(
        values=old + torch.randn(shape, device=device) * 0.3,  # inside and outside the clip range
        old_values=old,
        returns=old + torch.randn(shape, device=device),
        mask=mask * torch.rand(shape, device=device) if float_mask else mask,
        cu_seqlens=cu,
    )
    return batch


def _cast(v, dtype):
    return v.detach().to(dtype).clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _run(fn, batch, dtype, compute, **kw):
    args = {k: (_cast(_cast(v, dtype), compute) if k != "mask" else v) for k, v in batch.items()}
    args["values"].requires_grad_()
    loss, metrics = fn(**args, **kw)
    loss.backward()
    return loss, metrics, args["values"].grad


def assert_matches(backend, batch, dtype=torch.float32, **kw):
    loss, metrics, grad = _run(ops.value_loss, batch, dtype, dtype, backend=backend, **kw)
    r_loss, r_metrics, r_grad = _run(value_loss_ref, batch, dtype, torch.float64, **kw)
    b_loss, b_metrics, b_grad = _run(value_loss_ref, batch, dtype, dtype, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and grad.dtype == dtype
    assert set(metrics) == set(r_metrics) == {"clipfrac", "values_mean"}
    assert_within_tolerance(loss, r_loss, b_loss, dtype, "loss")
    for name in metrics:
        assert_within_tolerance(metrics[name], r_metrics[name], b_metrics[name], dtype, name)
    assert_within_tolerance(grad, r_grad, b_grad, dtype, "d/d values")


@pytest.mark.parametrize("clip", [0.2, None])
def test_non_finite_values_on_masked_tokens_change_nothing(backend, device, clip):
    batch = make_batch(device, shape=(3, 37))
    masked = ~batch["mask"]
    dirty = dict(batch, values=batch["values"].masked_fill(masked, float("nan")),
                 old_values=batch["old_values"].masked_fill(masked, float("inf")),
                 returns=batch["returns"].masked_fill(masked, float("-inf")))
    clean_out = _run(ops.value_loss, batch, torch.float32, torch.float32, backend=backend, clip=clip)
    dirty_out = _run(ops.value_loss, dirty, torch.float32, torch.float32, backend=backend, clip=clip)
    torch.testing.assert_close(dirty_out, clean_out)
    assert not dirty_out[2][masked].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_matches_reference(backend, device, aggregation, clip, dtype):
    # T = 37 is off every block size; row 1 fully masked (contributes nothing).
    batch = make_batch(device, shape=(3, 37))
    batch["mask"][1] = False
    assert_matches(backend, batch, dtype, clip=clip, aggregation=aggregation)


@pytest.mark.parametrize(
    "layout",
    [
        dict(shape=(1, 1)),  # B = 1, T = 1: one program, one token
        dict(shape=(2, 1100)),  # rows longer than the 1024-token block: the loop runs twice
        dict(lengths=[0, 3, 70, 1], float_mask=True),  # packed, empty first sequence, float mask weights
    ],
    ids=["B1T1", "T1100", "packed-empty-long"],
)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_awkward_layouts_match_reference(backend, device, layout, aggregation):
    assert_matches(backend, make_batch(device, **layout), aggregation=aggregation)


def test_hand_computed_clipping(backend, device):
    # token 0: V = 1.0, V_old = 0, R = 2: clip(V) = 0.2, (0.2-2)^2 = 3.24 > (1-2)^2 = 1 ->
    #   clipped term wins: l = 1.62, gradient 0 (V outside the clip range).
    # token 1: V = 1.0, V_old = 0, R = 0: clipped (0.2)^2 < 1 -> l = 0.5, gradient V - R = 1.
    # token 2: masked. token-mean over 2 tokens.
    values = torch.tensor([[1.0, 1.0, 7.0]], device=device, requires_grad=True)
    old = torch.zeros(1, 3, device=device)
    returns = torch.tensor([[2.0, 0.0, 0.0]], device=device)
    mask = torch.tensor([[True, True, False]], device=device)
    loss, metrics = ops.value_loss(values, old, returns, mask, clip=0.2, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx((1.62 + 0.5) / 2, rel=1e-6)
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.5, 0.0], abs=1e-7)
    assert metrics["clipfrac"].item() == pytest.approx(0.5)
    assert metrics["values_mean"].item() == pytest.approx(1.0)


def test_all_masked_batch(backend, device):
    batch = make_batch(device, shape=(2, 6))
    batch["mask"][:] = False
    for aggregation in AGGREGATIONS:
        loss, metrics, grad = _run(ops.value_loss, batch, torch.float32, torch.float32, backend=backend, aggregation=aggregation)
        assert loss.item() == 0.0 and not grad.any()
        assert all(v.item() == 0.0 for v in metrics.values())


def test_normalizer(backend, device):
    batch = make_batch(device, shape=(3, 8))
    summed, _ = ops.value_loss(**batch, aggregation="token-sum", backend=backend)
    for normalizer in (12.0, torch.tensor(12, device=device)):
        loss, _ = ops.value_loss(**batch, aggregation="token-mean", normalizer=normalizer, backend=backend)
        torch.testing.assert_close(loss, summed / 12)


def test_reference_gradcheck():
    batch = make_batch(torch.device("cpu"), shape=(2, 5))
    args = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}
    values = args.pop("values").requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: value_loss_ref(v, **args, clip=0.2, aggregation="seq-mean-token-mean")[0], (values,)
    )


def test_compile_fullgraph(backend, device):
    batch = make_batch(device, shape=(3, 12))
    values = batch.pop("values").requires_grad_()

    def f(v):
        loss, metrics = ops.value_loss(v, **batch, clip=0.2, backend=backend)
        return loss, metrics["clipfrac"]

    loss, clipfrac = torch.compile(f, fullgraph=True, backend="aot_eager")(values)
    loss.backward()
    grad = values.grad.clone()
    values.grad = None
    eager_loss, eager_clipfrac = f(values)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(clipfrac, eager_clipfrac)
    torch.testing.assert_close(grad, values.grad)


def test_old_values_and_returns_get_no_gradient(backend, device):
    batch = make_batch(device, shape=(2, 4))
    batch["old_values"].requires_grad_()
    batch["returns"].requires_grad_()
    batch["values"].requires_grad_()
    loss, _ = ops.value_loss(**batch, backend=backend)
    loss.backward()
    assert batch["values"].grad is not None
    assert batch["old_values"].grad is None and batch["returns"].grad is None


def test_bad_inputs_name_the_argument(device):
    b = make_batch(device, shape=(2, 5))
    cases = [
        (ValueError, "returns must have the shape of values", dict(returns=b["returns"][:, :4])),
        (TypeError, "old_values must have dtype", dict(old_values=b["old_values"].long())),
        (TypeError, "mask must be a torch.Tensor", dict(mask=[1, 0])),
        (ValueError, "aggregation must be one of", dict(aggregation="seq-mean")),
        (ValueError, "clip must be >= 0", dict(clip=-1.0)),
        (ValueError, "mask is on meta", dict(mask=torch.ones(2, 5, device="meta"))),
        (ValueError, "normalizer must be > 0", dict(normalizer=-2.0)),
    ]
    for error, message, override in cases:
        with pytest.raises(error, match=message):
            ops.value_loss(**{**b, **override})
    flat = {k: v.reshape(-1) for k, v in b.items() if k != "cu_seqlens"}
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        ops.value_loss(**flat, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="values must be 1-D"):
        ops.value_loss(**{**b, "cu_seqlens": torch.tensor([0, 10], dtype=torch.int32, device=device)})
