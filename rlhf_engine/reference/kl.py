"""Per-token KL estimators between the policy and the reference.

With ``lp`` the policy logprob of the sampled token, ``ref`` the reference logprob and
``kappa = ref - lp`` (Schulman, "Approximating KL divergence", 2020):

====================  ==========================  ==========================
name (verl alias)     value                       d value / d lp
====================  ==========================  ==========================
``k1`` (``kl``)       ``lp - ref``                ``1``
``abs``               ``|lp - ref|``              ``sign(lp - ref)``
``k2`` (``mse``)      ``(lp - ref)^2 / 2``        ``lp - ref``
``k3`` (low_var_kl)   ``exp(kappa) - kappa - 1``  ``1 - exp(kappa)``
``k1+``, ``k3+``,     value of k1 / k3 / abs      gradient of k2 (straight-through)
``abs+``
``k2+`` (``mse+``)    k2 (its own gradient)       ``lp - ref``
====================  ==========================  ==========================

``clamp=True`` is verl's clamping, which verl applies to ``k3`` only: ``kappa`` is
clamped to [-20, 20] and the k3 value to [-10, 10] (zero gradient where a clamp is
active). It does not change ``k1``, ``abs`` or ``k2``. TRL does not clamp.

Every estimator is a function of ``lp - ref``, so ``d/d ref = -d/d lp``.

:func:`kl_penalty_ref` is the spec, written for autograd, on :func:`kl_estimate` (the
value). The torch backend's value and derivative written out:
``rlhf_engine/torch_backend/kl.py``.
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
    # verl strips any "+" and takes k2's gradient: for k2 / mse that is k2 itself.
    "abs+": ("abs", True),
    "k2+": ("k2", True),
    "mse+": ("k2", True),
}

KAPPA_CLAMP = 20.0  # verl: clamp ref - lp before exp
K3_CLAMP = 10.0  # verl: clamp the k3 value


def kl_estimate(lp: torch.Tensor, ref: torch.Tensor, estimator: str, clamp: bool) -> torch.Tensor:
    """Value of ``estimator`` elementwise, in the inputs' (promoted) dtype."""
    base = ESTIMATORS[estimator][0]
    if base == "k3":
        kappa = ref - lp
        if clamp:
            kappa = kappa.clamp(-KAPPA_CLAMP, KAPPA_CLAMP)
        value = torch.expm1(kappa) - kappa  # exp(kappa) - kappa - 1, without the cancellation near 0
        return value.clamp(-K3_CLAMP, K3_CLAMP) if clamp else value
    diff = lp - ref
    if base == "k1":
        return diff
    return diff.abs() if base == "abs" else 0.5 * diff.square()


def kl_penalty_ref(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: bool = False) -> torch.Tensor:
    """Per-token KL estimate, same shape and dtype as the (promoted) inputs; differentiable."""
    value = kl_estimate(logp, ref_logp, estimator, clamp)
    if ESTIMATORS[estimator][1]:
        k2 = kl_estimate(logp, ref_logp, "k2", clamp)
        value = k2 - k2.detach() + value.detach()
    return value
