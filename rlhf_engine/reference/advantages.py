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
  ``var = Σw(x−μ)²/(Σw−1)`` (unbiased; 0 when ``Σw ≤ 1``), ``(x−μ)·rsqrt(var+ε)``,
  and 0 wherever ``w == 0``.
"""

from __future__ import annotations

import torch

METHODS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo")
SCALES = ("group", "batch", "none")
PRESETS = ("trl", "verl")


# --------------------------------------------------------------------------- spec


def masked_whiten_ref(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` over the positions where ``mask != 0`` (``mask`` used as weights)."""
    w = mask.to(x.dtype)
    xs = torch.where(w != 0, x, torch.zeros_like(x))  # padding may hold anything, even NaN
    n = float(w.sum())
    mean = (w * xs).sum() / n if n > 0 else x.new_zeros(())
    var = (w * (xs - mean) ** 2).sum() / (n - 1) if n > 1 else x.new_zeros(())
    out = (xs - mean) * torch.rsqrt(var + eps)
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


def _weighted_stats(x: torch.Tensor, w: torch.Tensor):
    """``(Σw, μ, unbiased var)`` of fp32 ``x`` under weights ``w``, without host syncs."""
    n = w.sum()
    mean = (w * x).sum() / torch.where(n > 0, n, torch.ones_like(n))
    sq = (w * (x - mean) ** 2).sum()
    var = torch.where(n > 1, sq / torch.where(n > 1, n - 1, torch.ones_like(n)), torch.zeros_like(sq))
    return n, mean, var


def masked_whiten_torch(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Vectorized :func:`masked_whiten_ref`; fp32 output of ``x``'s shape."""
    w = mask.to(torch.float32)
    valid = w != 0
    xf = torch.where(valid, x.to(torch.float32), torch.zeros((), dtype=torch.float32, device=x.device))
    _, mean, var = _weighted_stats(xf, w)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, torch.zeros_like(out))


def _group_stats(s, group_ids, group_size, num_groups, lengths, need_lmean):
    """Per-sample ``(n_g, μ_g, var_g, length-weighted μ_g)`` of its group, fp32 ``[S]``."""
    if group_ids is None:
        sg = s.view(num_groups, group_size)
        n = torch.full_like(s, float(group_size))
        mean = sg.mean(dim=1, keepdim=True)
        var = ((sg - mean) ** 2).sum(dim=1, keepdim=True) / max(group_size - 1, 1)
        lmean = None
        if need_lmean:
            lg = lengths.to(torch.float32).view(num_groups, group_size)
            lsum = lg.sum(dim=1, keepdim=True)
            lmean = torch.where(lsum > 0, (lg * sg).sum(dim=1, keepdim=True) / lsum.clamp_min(1e-30), mean)
            lmean = lmean.expand_as(sg).reshape(-1)
        return n, mean.expand_as(sg).reshape(-1), var.expand_as(sg).reshape(-1), lmean

    ids = group_ids.long()

    def segment_sum(values):
        return torch.zeros(num_groups, dtype=torch.float32, device=s.device).index_add_(0, ids, values)

    count = segment_sum(torch.ones_like(s))
    safe_count = count.clamp_min(1.0)  # empty groups own no sample; avoid 0/0 there
    mean = segment_sum(s) / safe_count
    sq = segment_sum((s - mean[ids]) ** 2)
    var = sq / (count - 1).clamp_min(1.0)
    lmean = None
    if need_lmean:
        lf = lengths.to(torch.float32)
        lsum = segment_sum(lf)
        lmean = torch.where(lsum > 0, segment_sum(lf * s) / lsum.clamp_min(1e-30), mean)[ids]
    return count[ids], mean[ids], var[ids], lmean


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
    verl = preset == "verl"
    n, mean, var, lmean = _group_stats(s, group_ids, group_size, num_groups, lengths, method == "opo")
    single = n < 2
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    one = torch.ones((), dtype=torch.float32, device=s.device)

    if method == "rloo":
        # s − (n·μ − s)/(n − 1) = n/(n − 1)·(s − μ)
        loo = n / (n - 1).clamp_min(1.0) * (s - mean)
        return torch.where(single, s if verl else zero, loo)

    center = lmean if method == "opo" else mean
    adv = s - torch.where(single, zero if verl else s, center)
    if method == "grpo" and scale == "group":
        std = torch.where(single, one if verl else zero, var.sqrt())
        adv = adv / (std + eps)
    elif method == "grpo" and scale == "batch":
        count, _, batch_var = _weighted_stats(s, torch.ones_like(s))
        batch_std = torch.where(count < 2, one if verl else zero, batch_var.sqrt())
        adv = adv / (batch_std + eps)
    elif method == "reinforce_pp_baseline":
        weights = torch.ones_like(s) if lengths is None else lengths
        adv = masked_whiten_torch(adv, weights, True, eps)
    return adv
