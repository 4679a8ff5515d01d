"""Clipped value loss (PPO, Schulman et al. 2017, as in verl/TRL).

Per token, with ``V`` the critic's value, ``V_old`` the value at rollout time, ``R`` the
return and ``c`` the clip range:

    ``l = 1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``

(``clip=None``: ``l = 1/2 (V - R)^2``), aggregated like the policy loss
(``reference/aggregation.py``). Metrics, masked token means over the batch (0 when all
tokens are masked): ``clipfrac`` (the clipped term is strictly larger, verl's
``vf_clipfrac``) and ``values_mean``.

:func:`value_loss_ref` is the spec (autograd); the torch backend is
``rlhf_engine/torch_backend/value_loss.py``.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.aggregation import aggregate_ref
from rlhf_engine.reference.policy_loss import sequence_bounds

METRICS = ("clipfrac", "values_mean")
# Per-sequence masked sums both backends reduce (the Triton kernel returns them), in this
# column order.
PARTIALS = ("loss", "count", "clipped", "values")


def value_loss_ref(values, old_values, returns, mask, *, clip=0.2, aggregation="token-mean", normalizer=None, cu_seqlens=None):
    """The spec. Same arguments as ``ops.value_loss``; ``(loss, metrics)`` in the inputs'
    dtype, differentiable w.r.t. ``values``."""
    n = values.numel()
    bounds = sequence_bounds(n, values.shape, cu_seqlens)
    v = values.reshape(-1)
    old = old_values.reshape(-1).to(v.dtype)
    ret = returns.reshape(-1).to(v.dtype)
    m = mask.reshape(-1).to(v.dtype)
    active = mask.reshape(-1) != 0
    unclipped = (v - ret) ** 2
    if clip is None:
        loss_tok, clipped = 0.5 * unclipped, torch.zeros_like(active)
    else:
        v_clipped = torch.clamp(v, old - clip, old + clip)
        clipped_sq = (v_clipped - ret) ** 2
        loss_tok, clipped = 0.5 * torch.maximum(unclipped, clipped_sq), clipped_sq > unclipped
    max_len = values.shape[1] if (cu_seqlens is None and values.dim() == 2) else None
    total = aggregate_ref(loss_tok, m, bounds, aggregation, normalizer, max_len)
    with torch.no_grad():
        count = m[active].sum()

        def mean(x):
            return (x.to(v.dtype) * m)[active].sum() / count if count > 0 else v.new_zeros(())

        metrics = {"clipfrac": mean(clipped), "values_mean": mean(v)}
    return total, metrics
