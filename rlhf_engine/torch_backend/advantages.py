"""Torch backend of the group advantages and masked whitening (spec:
``rlhf_engine/reference/advantages.py``).

Vectorized: segment reductions instead of loops, fp32 accumulation, no host sync, so it
also runs on CUDA tensors and inside ``torch.compile`` / CUDA graphs.
"""

from __future__ import annotations

import torch

from rlhf_engine.torch_backend.aggregation import at_least, host_readable, host_scalar, numeric


# Written for few full-size passes: statistics and the per-preset rules are computed
# per group (or as 0-d tensors), and the per-sample work is one affine map
# ``(s − base_g)·scale_g``. 0-d tensor arithmetic instead of Python branching keeps the
# GPU path free of host syncs.


def masked_whiten_torch(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Vectorized :func:`rlhf_engine.reference.advantages.masked_whiten_ref`; fp32 output of ``x``'s shape.

    The mask is applied by multiplying with the weights (several times cheaper on the CPU
    than ``where``/``masked_fill`` with a bool mask), so a non-finite value at a masked
    position turns the result into NaN (loudly) instead of being ignored.
    """
    w = numeric(mask.reshape(-1)).to(torch.float32)
    xf = x.reshape(-1).to(torch.float32)
    # The scalar chain runs on host floats for CPU tensors (reading one is free there, and
    # each op on a 0-d tensor costs about a microsecond), on 0-d tensors elsewhere (no sync).
    n = host_scalar(w.sum())
    weighted = xf * w
    mean = host_scalar(weighted.sum()) / at_least(n, 1e-30)  # 0 when n = 0
    if mask.dtype == torch.bool:
        # w is 0 or 1, so x·w − μ·w is exactly (x − μ)·w: the centered values, already 0
        # where masked, in one pass and no new tensor
        centered = weighted.sub_(w, alpha=mean) if isinstance(mean, float) else weighted.sub_(w * mean)
        spread = centered
    else:
        centered = xf - mean
        spread = torch.mul(centered, w, out=weighted)  # (x − μ)·w
    # Not torch.dot: MKL's multithreaded sdot stalls for milliseconds on some inputs (seen
    # with 0/1 vectors). With a bool mask the spread is the centered values themselves, and
    # their squared norm is one pass with no temporary (a fresh multi-MB one is page-faulted
    # in on the CPU at about the cost of the op).
    if spread is centered:
        sq = host_scalar(torch.linalg.vector_norm(centered)) ** 2
    else:
        sq = host_scalar((spread * centered).sum())
    # unbiased var = sq / (n − 1); Σw ≤ 1 leaves the spread unknown, so every valid value
    # maps to the mean (scale 0)
    inv_std = (sq / at_least(n - 1, 1e-30) + eps) ** -0.5 * (n > 1)
    out = centered.mul_(inv_std)
    if mask.dtype != torch.bool:
        out.mul_(w != 0)
    if not shift_mean:
        out = (out + mean).mul_(w != 0)
    return out.view(x.shape)


def _group_stats(s, group_ids, group_size, num_groups, lengths, need_lmean):
    """Per-group ``(n, μ, var, length-weighted μ or None)``, fp32 ``[num_groups]``, and the
    centered scores ``s − μ_g`` (``[S]``, or ``[num_groups, group_size]``). With
    ``group_size`` the statistics are ``[num_groups, 1]`` and ``n`` is the size itself (a
    Python number: the singleton rule is then decided without a select)."""
    if group_ids is None:
        sg = s.view(num_groups, group_size)
        n = float(group_size)
        mean = sg.mean(dim=1, keepdim=True)
        centered = sg - mean
        # two-pass, unbiased; a singleton's variance is 0 (undefined, unused). Not
        # torch.var_mean / std: along a short inner dim they are a scalar loop on the CPU,
        # 10x slower from a few hundred groups.
        var = (centered * centered).sum(dim=1, keepdim=True).div_(max(group_size - 1, 1))
        lmean = None
        if need_lmean:
            lg = lengths.to(torch.float32).view(num_groups, group_size)
            lsum = lg.sum(dim=1, keepdim=True)
            lmean = torch.where(lsum > 0, (lg * sg).sum(dim=1, keepdim=True) / lsum.clamp_min(1e-30), mean)
        return n, mean, var, lmean, centered

    def segment_sum(values):
        return torch.zeros(num_groups, dtype=torch.float32, device=s.device).index_add_(0, group_ids, values)

    # One counting pass where the ids can be read (bincount would sync on CUDA: it reads the
    # max; its output size depends on the values, which a fake tensor does not have).
    if host_readable(group_ids):
        n = torch.bincount(group_ids, minlength=num_groups).to(torch.float32)
    else:
        n = segment_sum(torch.ones_like(s))
    mean = segment_sum(s) / n.clamp_min(1.0)  # empty groups own no sample; avoid 0/0 there
    centered = s - mean.index_select(0, group_ids)
    var = segment_sum(centered * centered) / (n - 1).clamp_min(1.0)
    lmean = None
    if need_lmean:
        lf = lengths.to(torch.float32)
        lsum = segment_sum(lf)
        lmean = torch.where(lsum > 0, segment_sum(lf * s) / lsum.clamp_min(1e-30), mean)
    return n, mean, var, lmean, centered


def _baseline_and_scale(s, n, mean, var, lmean, method, scale, eps, verl):
    """Per-group ``(base, scale)`` with ``A = (s − base)·scale`` before any whitening.

    Singletons: trl keeps ``base = μ = s`` and sets scale 0 (advantage 0); verl uses
    base 0 and scale 1 (``1/(1+ε)`` for GRPO with group scaling).
    """
    base = lmean if method == "opo" else mean
    if method == "rloo":  # s − (n·μ − s)/(n − 1) = n/(n − 1)·(s − μ)
        factor = n / at_least(n - 1, 1.0)
    elif method == "grpo" and scale == "group":
        factor = var.sqrt().add_(eps).reciprocal_()
    elif method == "grpo" and scale == "batch":
        # The batch size is a host number: no device tensor for it (a copy, and a sync on
        # CUDA), no select. One sample has no spread: verl's std is then 1, TRL's 0.
        count = s.numel()
        if count < 2:
            factor = 1.0 / ((1.0 if verl else 0.0) + eps)
        else:
            batch_centered = s - s.sum() / count
            factor = 1.0 / (((batch_centered * batch_centered).sum() / (count - 1)).sqrt() + eps)  # 0-d
    else:
        factor = 1.0
    if not verl and base is mean:
        # a singleton's s − μ is exactly 0 (μ = s/1), so its advantage is 0 at any scale
        return base, factor
    single = n < 2  # a bool when n is the (Python) group size
    if verl:
        lone_factor = 1.0 / (1.0 + eps) if method == "grpo" and scale == "group" else factor
        return _select(single, 0.0, base), _select(single, lone_factor, factor)
    return base, _select(single, 0.0, factor)


def _per_sample(x, ids):
    """A per-group ``[num_groups]`` tensor gathered to the samples; a number or a 0-d tensor
    (one value for every group) as it is."""
    return x.index_select(0, ids) if isinstance(x, torch.Tensor) and x.dim() else x


def _select(cond, a, b):
    """``torch.where(cond, a, b)``, or ``a if cond else b`` for a Python bool."""
    if isinstance(cond, bool):
        return a if cond else b
    return torch.where(cond, a, b)


def group_advantages_torch(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    lengths: torch.Tensor | None,
    group_size: int,
    num_groups: int,
    method: str,
    scale: str,
    eps: float,
    preset: str,
) -> torch.Tensor:
    """Vectorized :func:`rlhf_engine.reference.advantages.group_advantages_ref`: fp32 ``[S]``.

    Groups are ``group_size`` consecutive samples when ``group_ids`` is None, else given
    by ``group_ids`` (values in ``[0, num_groups)``).
    """
    s = scores.to(torch.float32)
    if s.numel() == 0:
        return s.clone()
    ids = None if group_ids is None else group_ids.long()
    n, mean, var, lmean, centered = _group_stats(s, ids, group_size, num_groups, lengths, method == "opo")
    base, factor = _baseline_and_scale(s, n, mean, var, lmean, method, scale, eps, preset == "verl")
    if ids is None:
        diff = centered if base is mean else s.view(num_groups, group_size) - base
        adv = (diff * factor).view(-1)
    else:
        diff = centered if base is mean else s - base.index_select(0, ids)
        adv = diff * _per_sample(factor, ids)
    if method == "reinforce_pp_baseline":
        adv = masked_whiten_torch(adv, torch.ones_like(s) if lengths is None else lengths, True, eps)
    return adv
