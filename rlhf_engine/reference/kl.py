"""Per-token KL estimators between the policy and the reference (ALGORITHMS.md section 2).

With ``lp`` the policy logprob of the sampled token, ``ref`` the reference logprob and
``kappa = ref - lp`` (Schulman, "Approximating KL divergence", 2020):

====================  ==========================  ==========================
name (verl alias)     value                       d value / d lp
====================  ==========================  ==========================
``k1`` (``kl``)       ``lp - ref``                ``1``
``abs``               ``|lp - ref|``              ``sign(lp - ref)``
``k2`` (``mse``)      ``(lp - ref)^2 / 2``        ``lp - ref``
``k3`` (low_var_kl)   ``exp(kappa) - kappa - 1``  ``1 - exp(kappa)``
``k1+``, ``k3+``      value of k1 / k3            gradient of k2 (straight-through)
====================  ==========================  ==========================

``clamp=True`` is verl's clamping, which verl applies to ``k3`` only: ``kappa`` is
clamped to [-20, 20] and the k3 value to [-10, 10] (zero gradient where a clamp is
active). It does not change ``k1``, ``abs`` or ``k2``. TRL does not clamp.

Every estimator is a function of ``lp - ref``, so ``d/d ref = -d/d lp``.

:func:`kl_penalty_ref` is the spec, written for autograd. :func:`kl_estimate` (the value)
and :func:`kl_estimate_and_grad` (the value and the derivative written out) are the
torch backend of ``ops.kl_penalty`` and the KL term of the torch policy loss.
"""

from __future__ import annotations

import torch

# name -> (base estimator, straight-through)
ESTIMATORS = {
    "k1": ("k1", False),
    "abs": ("abs", False),
    "k2": ("k2", False),
    "k3": ("k3", False),
    "k1+": ("k1", True),
    "k3+": ("k3", True),
    "kl": ("k1", False),
    "mse": ("k2", False),
    "low_var_kl": ("k3", False),
    "kl+": ("k1", True),
    "low_var_kl+": ("k3", True),
}

KAPPA_CLAMP = 20.0  # verl: clamp ref - lp before exp
K3_CLAMP = 10.0  # verl: clamp the k3 value


def kl_estimate(lp: torch.Tensor, ref: torch.Tensor, estimator: str, clamp: bool) -> torch.Tensor:
    """Value of ``estimator`` elementwise, in the inputs' (promoted) dtype."""
    base = ESTIMATORS[estimator][0]
    diff = lp - ref
    if base == "k1":
        return diff
    if base == "abs":
        return diff.abs()
    if base == "k2":
        return 0.5 * diff.square()
    kappa = -diff
    if clamp:
        kappa = kappa.clamp(-KAPPA_CLAMP, KAPPA_CLAMP)
    value = torch.exp(kappa) - kappa - 1
    return value.clamp(-K3_CLAMP, K3_CLAMP) if clamp else value


def kl_penalty_ref(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: bool = False) -> torch.Tensor:
    """Per-token KL estimate, same shape and dtype as the (promoted) inputs; differentiable."""
    value = kl_estimate(logp, ref_logp, estimator, clamp)
    if ESTIMATORS[estimator][1]:
        k2 = kl_estimate(logp, ref_logp, "k2", clamp)
        value = k2 - k2.detach() + value.detach()
    return value


def kl_estimate_and_grad(lp: torch.Tensor, ref: torch.Tensor, estimator: str, clamp: bool):
    """``(value, d value / d lp)`` in fp32 (or float64 for float64 inputs), elementwise."""
    dtype = torch.promote_types(torch.promote_types(lp.dtype, ref.dtype), torch.float32)
    diff = lp.to(dtype) - ref.to(dtype)
    base, straight_through = ESTIMATORS[estimator]
    if base == "k1":
        value, grad = diff, torch.ones_like(diff)
    elif base == "abs":
        value, grad = diff.abs(), diff.sign()
    elif base == "k2":
        value, grad = 0.5 * diff.square(), diff
    else:
        kappa = -diff
        if clamp:
            kappa_c = kappa.clamp(-KAPPA_CLAMP, KAPPA_CLAMP)
            e = torch.exp(kappa_c)
            raw = e - kappa_c - 1
            value = raw.clamp(-K3_CLAMP, K3_CLAMP)
            live = (kappa.abs() <= KAPPA_CLAMP) & (raw.abs() <= K3_CLAMP)
            grad = torch.where(live, 1 - e, torch.zeros_like(e))
        else:
            e = torch.exp(kappa)
            value, grad = e - kappa - 1, 1 - e
    if straight_through:
        grad = diff
    return value, grad
