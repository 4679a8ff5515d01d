"""The tolerance rule of the tests (docs/architecture.md, "Tests and checks").

A backend's error against the float64 reference may be at most twice the error of the
plain PyTorch computation done in the same input dtype, plus a small absolute slack and
one ulp of the largest reference value in the output's dtype: the output's own
rounding, which at large magnitudes (k3 of a 25-nat gap is ~1e11, fp32 ulp 8192) makes
"twice the baseline error" a coin flip between two roundings. One ulp, not half: two
implementations each a hair from the exact value before rounding (an exp within an ulp,
then a subtraction) can round to neighbours on either side of it, and where the baseline
happens to round the largest value exactly, half an ulp failed ~1 seed in 40 (k3).
"""

from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def max_abs_error(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref64.detach().double().cpu()).abs().max().item() if x.numel() else 0.0


def assert_within_tolerance(out, ref64, baseline, dtype: torch.dtype, what: str = "output") -> None:
    """``out``: the backend's result; ``ref64``: the float64 reference; ``baseline``: the
    plain PyTorch computation on inputs of ``dtype`` (its error sets the budget)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out.detach().double().cpu()[torch.isfinite(ref64.cpu())]).all(), f"{what}: non-finite values"
    finite = ref64.detach()[torch.isfinite(ref64)]
    largest = finite.abs().max().item() if finite.numel() else 0.0
    budget = 2.0 * max_abs_error(baseline, ref64) + ATOL[dtype] + torch.finfo(out.dtype).eps * largest
    err = max_abs_error(out, ref64)
    assert err <= budget, f"{what}: max |error| {err:.3e} exceeds budget {budget:.3e} ({dtype})"
