"""``kl_penalty``: per-token KL estimate between the policy and the reference model."""

from __future__ import annotations

import torch

from rlhf_engine import _checks
from rlhf_engine._backend import eager_torch, lazy, resolve_backend
from rlhf_engine.reference.kl import ESTIMATORS, kl_estimate
from rlhf_engine.torch_backend.kl import kl_estimate_and_grad

OP = "kl_penalty"


def _fwd_torch(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: bool, need_grad: bool):
    if not need_grad:
        return kl_estimate(logp.float(), ref_logp.float(), estimator, clamp), logp.new_empty(0)
    value, dvalue = kl_estimate_and_grad(logp, ref_logp, estimator, clamp)
    if value.dtype == torch.float64:
        # the value in fp32 as always, the derivative in float64 from the float64 inputs
        value = kl_estimate(logp.float(), ref_logp.float(), estimator, clamp)
    return value, dvalue


_FWD = {"torch": _fwd_torch, "triton": lazy("rlhf_engine.kernels.kl", "kl_penalty_fwd")}


def _grad_dtype(logp: torch.Tensor, ref_logp: torch.Tensor, backend: str) -> torch.dtype:
    """dtype of the forward's derivative output: fp32, but float64 from the torch backend
    for float64 inputs (the Triton kernel computes in fp32 whatever the input dtype)."""
    if backend == "torch" and torch.float64 in (logp.dtype, ref_logp.dtype):
        return torch.float64
    return torch.float32


@torch.library.custom_op("rlhf_engine::kl_penalty_fwd", mutates_args=())
def _kl_penalty_fwd(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: bool, backend: str, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp32 value, d value / d logp)``; the second output is computed in the same pass
    when ``need_grad``, else an empty ``[0]`` tensor (then the backward, if any, takes the
    derivative as 1: ``kl_penalty`` passes ``need_grad=False`` for k1)."""
    return _FWD[backend](logp, ref_logp, estimator, clamp, need_grad)


@_kl_penalty_fwd.register_fake
def _(logp, ref_logp, estimator, clamp, backend, need_grad):
    value = logp.new_empty(logp.shape, dtype=torch.float32)
    if not need_grad:
        return value, logp.new_empty(0, dtype=torch.float32)
    return value, logp.new_empty(logp.shape, dtype=_grad_dtype(logp, ref_logp, backend))


def _setup_context(ctx, inputs, output):
    logp, ref_logp = inputs[:2]
    dvalue = output[1]
    ctx.mark_non_differentiable(dvalue)
    ctx.set_materialize_grads(False)  # no zeros for the derivative output, which has no gradient
    ctx.save_for_backward(dvalue)
    ctx.dtypes = (logp.dtype, ref_logp.dtype)


def _backward(ctx, grad, _):
    (dvalue,) = ctx.saved_tensors
    lp_dtype, ref_dtype = ctx.dtypes
    need_lp, need_ref = ctx.needs_input_grad[:2]
    # One multiply (it handles the stride-0 gradient of a .sum()), none for k1 (derivative 1);
    # d/d ref is its negation. Rounded once to each input's dtype.
    dlp = torch.mul(grad, dvalue) if dvalue.numel() else grad
    return (
        dlp.to(lp_dtype) if need_lp else None,
        (dlp.neg() if need_lp or not dvalue.numel() else dlp.neg_()).to(ref_dtype) if need_ref else None,
        None,
        None,
        None,
        None,
    )


_kl_penalty_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerKLPenalty(torch.autograd.Function):
    """The torch backend outside torch.compile: the custom op's forward and backward
    without its dispatch. The op, and a Function with ``setup_context``, each cost ~20 us a
    call, as much as the whole eager k3 forward + backward at a few thousand tokens; this
    classic Function (one output, ``ctx`` in ``forward``) costs a few, and fewer with the
    options in one tuple (``apply`` pays per argument). torch.compile sees the custom op."""

    @staticmethod
    def forward(ctx, logp, ref_logp, options):
        value, dvalue = _fwd_torch(logp, ref_logp, *options)
        ctx.save_for_backward(dvalue)
        ctx.dtypes = (logp.dtype, ref_logp.dtype)
        return value

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, None)[:3]


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k3", clamp: bool = False, backend: str = "auto") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference (estimators: ``rlhf_engine/reference/kl.py``).

    Args:
        logp: ``[...]`` any float dtype: logprob of each sampled token under the policy.
        ref_logp: same shape as ``logp``, any float dtype: the same under the reference.
        estimator: with ``kappa = ref - lp`` (Schulman 2020, "Approximating KL divergence"):
            ``"k1"`` ``lp - ref``; ``"abs"`` ``|lp - ref|``; ``"k2"`` ``(lp - ref)^2 / 2``;
            ``"k3"`` ``exp(kappa) - kappa - 1``; ``"k1+"`` / ``"k3+"`` / ``"abs+"`` the
            value of k1 / k3 / abs with k2's gradient (straight-through; ``"k2+"`` is k2).
            verl's names ``"kl"``, ``"mse"``, ``"low_var_kl"`` (and ``"kl+"``, ``"mse+"``,
            ``"low_var_kl+"``) are aliases.
        clamp: verl's clamping of k3 (``kappa`` to [-20, 20], the value to [-10, 10]);
            no effect on k1 / abs / k2. TRL does not clamp (the default).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``rlhf_engine._backend``).

    Returns:
        fp32 tensor of ``logp``'s shape. Differentiable w.r.t. ``logp`` and ``ref_logp``
        (``d/d ref = -d/d lp``); computed in fp32 whatever the input dtype.
    """
    _checks.check_tensor(OP, "logp", logp)
    _checks.check_tensor(OP, "ref_logp", ref_logp)
    _checks.check_same_shape(OP, "logp", logp, ref_logp=ref_logp)
    _checks.check_same_device(OP, "logp", logp, ref_logp=ref_logp)
    _checks.check_choice(OP, "estimator", estimator, ESTIMATORS)
    if not isinstance(clamp, bool):
        raise TypeError(f"{OP}: clamp must be a bool, got {type(clamp).__name__}")
    chosen = resolve_backend(OP, backend, logp.device)
    logp, ref_logp = logp.contiguous(), ref_logp.contiguous()
    differentiable = torch.is_grad_enabled() and (logp.requires_grad or ref_logp.requires_grad)
    eager = eager_torch(chosen)
    if eager:
        # Eager torch backend: plain differentiable ops where they give the same value and
        # gradient: no gradient needed, or k1 / abs (autograd's own backward is the same one
        # multiply, ``grad`` or ``grad * sign(lp - ref)``, rounded once to each input's dtype).
        if not differentiable:
            return kl_estimate(logp.float(), ref_logp.float(), estimator, clamp)
        if ESTIMATORS[estimator] in (("k1", False), ("abs", False)) and torch.float64 not in (logp.dtype, ref_logp.dtype):
            return kl_estimate(logp.float(), ref_logp.float(), estimator, clamp)
    # k1's derivative is 1: its backward needs no second output
    need_grad = differentiable and ESTIMATORS[estimator] != ("k1", False)
    if eager:
        return _EagerKLPenalty.apply(logp, ref_logp, (estimator, clamp, need_grad))
    return _kl_penalty_fwd(logp, ref_logp, estimator, clamp, chosen, need_grad)[0]
