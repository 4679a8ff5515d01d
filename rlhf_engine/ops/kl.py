"""``kl_penalty``: per-token KL estimate between the policy and the reference model."""

from __future__ import annotations

import torch

from rlhf_engine import _checks
from rlhf_engine._backend import lazy, resolve_backend
from rlhf_engine.reference.kl import ESTIMATORS, kl_estimate, kl_grad

OP = "kl_penalty"


def _fwd_torch(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: bool) -> torch.Tensor:
    return kl_estimate(logp.float(), ref_logp.float(), estimator, clamp)


def _bwd_torch(grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return kl_grad(logp, ref_logp, estimator, clamp, upstream=grad).to(out_dtype)


_triton_bwd = lazy("rlhf_engine.kernels.kl", "kl_penalty_bwd")


def _bwd_triton(grad, logp, ref_logp, estimator, clamp, out_dtype):
    return _triton_bwd(grad, logp, ref_logp, estimator, clamp).to(out_dtype)


_FWD = {"torch": _fwd_torch, "triton": lazy("rlhf_engine.kernels.kl", "kl_penalty_fwd")}
_BWD = {"torch": _bwd_torch, "triton": _bwd_triton}


@torch.library.custom_op("rlhf_engine::kl_penalty_fwd", mutates_args=())
def _kl_penalty_fwd(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: bool, backend: str) -> torch.Tensor:
    return _FWD[backend](logp, ref_logp, estimator, clamp)


@_kl_penalty_fwd.register_fake
def _(logp, ref_logp, estimator, clamp, backend):
    return logp.new_empty(logp.shape, dtype=torch.float32)


@torch.library.custom_op("rlhf_engine::kl_penalty_bwd", mutates_args=())
def _kl_penalty_bwd(
    grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: bool, out_dtype: torch.dtype, backend: str
) -> torch.Tensor:
    return _BWD[backend](grad, logp, ref_logp, estimator, clamp, out_dtype)


@_kl_penalty_bwd.register_fake
def _(grad, logp, ref_logp, estimator, clamp, out_dtype, backend):
    return logp.new_empty(logp.shape, dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    logp, ref_logp, estimator, clamp, backend = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.args = (estimator, clamp, backend)


def _backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    estimator, clamp, backend = ctx.args
    need_lp, need_ref = ctx.needs_input_grad[:2]
    # One kernel gives d/d lp; d/d ref is its negation. Compute in fp32 only when the two
    # gradients are wanted in different dtypes, so neither is rounded twice.
    if need_lp and need_ref and logp.dtype != ref_logp.dtype:
        out_dtype = torch.float32
    else:
        out_dtype = logp.dtype if need_lp else ref_logp.dtype
    dlp = _kl_penalty_bwd(grad.contiguous(), logp, ref_logp, estimator, clamp, out_dtype, backend)
    return (
        dlp.to(logp.dtype) if need_lp else None,
        (-dlp).to(ref_logp.dtype) if need_ref else None,
        None,
        None,
        None,
    )


_kl_penalty_fwd.register_autograd(_backward, setup_context=_setup_context)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k3", clamp: bool = False, backend: str = "auto") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference (ALGORITHMS.md section 2).

    Args:
        logp: ``[...]`` any float dtype: logprob of each sampled token under the policy.
        ref_logp: same shape as ``logp``, any float dtype: the same under the reference.
        estimator: with ``kappa = ref - lp`` (Schulman 2020, "Approximating KL divergence"):
            ``"k1"`` ``lp - ref``; ``"abs"`` ``|lp - ref|``; ``"k2"`` ``(lp - ref)^2 / 2``;
            ``"k3"`` ``exp(kappa) - kappa - 1``; ``"k1+"`` / ``"k3+"`` the value of k1 / k3
            with k2's gradient (straight-through). verl's names ``"kl"``, ``"mse"``,
            ``"low_var_kl"`` (and ``"kl+"``, ``"low_var_kl+"``) are aliases.
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
    return _kl_penalty_fwd(logp.contiguous(), ref_logp.contiguous(), estimator, clamp, chosen)
