"""Torch backend of the KL estimators (spec: ``rlhf_engine/reference/kl.py``).

:func:`kl_estimate_and_grad` gives the value and the derivative written out, for
``ops.kl_penalty`` and the KL term of the torch policy loss; the value alone is the
spec's :func:`~rlhf_engine.reference.kl.kl_estimate`.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.kl import ESTIMATORS, K3_CLAMP, KAPPA_CLAMP


def kl_estimate_and_grad(lp: torch.Tensor, ref: torch.Tensor, estimator: str, clamp: bool):
    """``(value, d value / d lp)`` in fp32 (or float64 for float64 inputs), elementwise, sharing
    the intermediates (one ``expm1`` for k3: the gradient ``1 - exp(kappa)`` is ``-expm1(kappa)``)."""
    if lp.dtype != torch.float32 or ref.dtype != torch.float32:  # (a no-op .to costs ~0.7 us)
        dtype = torch.promote_types(torch.promote_types(lp.dtype, ref.dtype), torch.float32)
        lp, ref = lp.to(dtype), ref.to(dtype)
    base, straight_through = ESTIMATORS[estimator]
    if base == "k3":
        kappa = ref - lp
        if clamp:
            kappa_c = kappa.clamp(-KAPPA_CLAMP, KAPPA_CLAMP)
            em1 = torch.expm1(kappa_c)
            raw = em1 - kappa_c
            value = raw.clamp(-K3_CLAMP, K3_CLAMP)
            if straight_through:
                return value, kappa.neg_()
            # a clamp is active exactly where it changed its input (NaN compares unequal, as
            # |NaN| <= bound is false): zero gradient there
            dead = (kappa_c != kappa).logical_or_(value != raw)
            return value, em1.neg_().masked_fill_(dead, 0.0)
        em1 = torch.expm1(kappa)
        if straight_through:
            return em1.sub_(kappa), kappa.neg_()
        return torch.sub(em1, kappa, out=kappa), em1.neg_()  # in place: kappa and em1 are fresh
    diff = lp - ref
    if base == "k1":
        return diff, (diff.clone() if straight_through else torch.ones_like(diff))
    if base == "abs":
        return diff.abs(), (diff if straight_through else diff.sign_())
    return diff.square().mul_(0.5), diff  # k2's gradient is its own: k2+ is k2
