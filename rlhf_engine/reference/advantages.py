"""Group-relative advantages and masked whitening: the spec.

``*_ref``: Python loops over groups, written to be read; tests evaluate it in float64 as
the ground truth. It computes in the dtype of its inputs, so the same function on bf16
inputs is the "plain PyTorch in the input dtype" baseline of the tolerance rule. The
vectorized torch backend is ``rlhf_engine/torch_backend/advantages.py``.

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

METHODS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo")
SCALES = ("group", "batch", "none")
PRESETS = ("trl", "verl")


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
