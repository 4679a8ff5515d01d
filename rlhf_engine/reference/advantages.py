"""Group-relative advantages and masked whitening in plain PyTorch.

Two implementations of the same semantics live here:

* ``*_ref``: the executable spec. Python loops over groups, written to be read; tests
  evaluate it in float64 as the ground truth. It computes in the dtype of its inputs, so
  the same function on bf16 inputs is the "plain PyTorch in the input dtype" baseline of
  the tolerance rule.
* ``*_torch``: the vectorized ``"torch"`` backend (the CPU path): segment reductions
  instead of loops, fp32 accumulation, no host sync, so it also runs on CUDA tensors
  and inside ``torch.compile`` / CUDA graphs.

Semantics (see ``rlhf_engine.ops.advantages`` for the user-facing docstring):

* Group statistics: ``μ_g`` mean, ``σ_g`` unbiased std (centered, two-pass).
* Singleton groups (one sample): preset ``"trl"`` gives advantage 0 (the sample is its
  own baseline; TRL itself requires two generations per prompt). Preset ``"verl"`` uses
  baseline 0 and scale 1, as verl's per-group loops do, so the sample keeps its score
  (``s/(1+ε)`` for GRPO with group scaling, ``s`` for Dr. GRPO, RLOO, OPO).
* A std over fewer than two values (``scale="batch"`` with one sequence) is 0 under
  ``"trl"`` and 1 under ``"verl"``, the same rule.
* Whitening: weights ``w`` (a mask, or token counts), ``μ = Σwx/Σw``,
  ``var = Σw(x−μ)²/(Σw−1)`` (unbiased), ``(x−μ)·rsqrt(var+ε)`` (0 when ``Σw ≤ 1``: no spread is known),
  and 0 wherever ``w == 0`` (``x`` must be finite there: the torch backend multiplies
  by the mask, so NaN padding gives NaN).
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.aggregation import at_least, host_readable, host_scalar, numeric

METHODS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo")
SCALES = ("group", "batch", "none")
PRESETS = ("trl", "verl")


# --------------------------------------------------------------------------- spec


def masked_whiten_ref(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` over the positions where ``mask != 0`` (``mask`` used as weights)."""
    w = mask.to(x.dtype)
    xs = torch.where(w != 0, x, torch.zeros_like(x))
    n = float(w.sum())
    mean = (w * xs).sum() / n if n > 0 else x.new_zeros(())
    var = (w * (xs - mean) ** 2).sum() / (n - 1) if n > 1 else x.new_zeros(())
    # Σw ≤ 1: no spread is known, so every valid value maps to the mean.
    out = (xs - mean) * (torch.rsqrt(var + eps) if n > 1 else 0.0)
    if not shift_mean:
        out = out + mean
    return torch.where(w != 0, out, torch.zeros_like(out))


def group_advantages_ref(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    method: str = "grpo",
    scale: str = "group",
    eps: float = 1e-4,
    preset: str = "trl",
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages ``[S]`` (dtype of ``scores``) for sequences grouped by ``group_ids``."""
    verl = preset == "verl"
    out = torch.empty_like(scores)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        members.setdefault(g, []).append(i)

    if scale == "batch" and method == "grpo":
        batch_std = scores.std() if scores.numel() > 1 else scores.new_tensor(1.0 if verl else 0.0)

    for idx in members.values():
        s = scores[idx]
        n = len(idx)
        if method == "rloo":
            if n == 1:
                out[idx] = s if verl else torch.zeros_like(s)
            else:
                loo_mean = (s.sum() - s) / (n - 1)  # mean of the other samples
                out[idx] = s - loo_mean
            continue
        if n == 1:
            baseline = torch.zeros_like(s) if verl else s
        elif method == "opo":
            length = lengths[idx].to(scores.dtype)
            baseline = (length * s).sum() / length.sum() if float(length.sum()) > 0 else s.mean()
        else:
            baseline = s.mean()
        adv = s - baseline
        if method == "grpo" and scale == "group":
            std = s.std() if n > 1 else s.new_tensor(1.0 if verl else 0.0)
            adv = adv / (std + eps)
        elif method == "grpo" and scale == "batch":
            adv = adv / (batch_std + eps)
        out[idx] = adv

    if method == "reinforce_pp_baseline":
        weights = torch.ones_like(scores) if lengths is None else lengths.to(scores.dtype)
        out = masked_whiten_ref(out, weights, True, eps)
    return out


# --------------------------------------------------------------------- torch backend
#
# Written for few full-size passes: statistics and the per-preset rules are computed
# per group (or as 0-d tensors), and the per-sample work is one affine map
# ``(s − base_g)·scale_g``. 0-d tensor arithmetic instead of Python branching keeps the
# GPU path free of host syncs.


def masked_whiten_torch(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Vectorized :func:`masked_whiten_ref`; fp32 output of ``x``'s shape.

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
    """Vectorized :func:`group_advantages_ref`: fp32 ``[S]``.

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
