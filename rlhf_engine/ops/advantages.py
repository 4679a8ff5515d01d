"""Group-relative advantages (GRPO family, RLOO, REINFORCE++-baseline, OPO) and masked
whitening.

These ops produce RL *targets*: they are not differentiable. The public functions treat
their inputs as constants (detached) and return tensors that carry no gradient, as TRL
and verl compute advantages under ``torch.no_grad()``.
"""

from typing import Optional

import torch

from rlhf_engine._backend import eager_torch, lazy, resolve_backend
from rlhf_engine._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    MASK_DTYPES,
    check_choice,
    check_number,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from rlhf_engine.reference.advantages import METHODS, PRESETS, SCALES
from rlhf_engine.torch_backend.advantages import group_advantages_torch, masked_whiten_torch
from rlhf_engine.torch_backend.aggregation import host_readable

# Default ε per preset for GRPO's division by the std (``rlhf_engine/reference/advantages.py``), and the
# whitening ε (inside the rsqrt) that REINFORCE++ uses under both presets.
GRPO_EPS = {"trl": 1e-4, "verl": 1e-6}
WHITEN_EPS = 1e-8

_GROUP_BACKENDS = {
    "torch": group_advantages_torch,
    "triton": lazy("rlhf_engine.kernels.advantages", "group_advantages_fwd"),
    "cuda": lazy("rlhf_engine.native.advantages", "group_advantages_fwd"),
    "cpp": lazy("rlhf_engine.native.advantages", "group_advantages_fwd"),
}
_WHITEN_BACKENDS = {
    "torch": masked_whiten_torch,
    "triton": lazy("rlhf_engine.kernels.advantages", "masked_whiten_fwd"),
    "cuda": lazy("rlhf_engine.native.advantages", "masked_whiten_fwd"),
    "cpp": lazy("rlhf_engine.native.advantages", "masked_whiten_fwd"),
}


@torch.library.custom_op("rlhf_engine::group_advantages", mutates_args=())
def _group_advantages_op(
    scores: torch.Tensor,
    group_ids: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    group_size: int,
    num_groups: int,
    method: str,
    scale: str,
    eps: float,
    preset: str,
    backend: str,
) -> torch.Tensor:
    return _GROUP_BACKENDS[backend](scores, group_ids, lengths, group_size, num_groups, method, scale, eps, preset)


@_group_advantages_op.register_fake
def _(scores, group_ids, lengths, group_size, num_groups, method, scale, eps, preset, backend):
    return scores.new_empty(scores.shape, dtype=torch.float32)


@torch.library.custom_op("rlhf_engine::masked_whiten", mutates_args=())
def _masked_whiten_op(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float, backend: str) -> torch.Tensor:
    return _WHITEN_BACKENDS[backend](x, mask, shift_mean, eps)


@_masked_whiten_op.register_fake
def _(x, mask, shift_mean, eps, backend):
    return x.new_empty(x.shape, dtype=torch.float32)


def _check_group_layout(op, S, device, group_size, group_ids, num_groups):
    """Validate the grouping; returns ``(group_ids or None, group_size, num_groups)``."""
    if (group_size is None) == (group_ids is None):
        raise ValueError(f"{op}: pass exactly one of group_size and group_ids")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{op}: group_size must be an int, got {type(group_size).__name__}")
        if group_size < 1 or S % group_size:
            raise ValueError(f"{op}: group_size must be >= 1 and divide the number of scores ({S}), got {group_size}")
        if num_groups is not None and num_groups != S // group_size:
            raise ValueError(f"{op}: num_groups must be len(scores) // group_size = {S // group_size}, got {num_groups}")
        return None, group_size, S // group_size
    check_tensor(op, "group_ids", group_ids, INDEX_DTYPES)
    if group_ids.shape != (S,):
        raise ValueError(f"{op}: group_ids must have shape ({S},) like scores, got {tuple(group_ids.shape)}")
    if group_ids.device != device:
        raise ValueError(f"{op}: group_ids is on {group_ids.device} but scores is on {device}")
    on_host = host_readable(group_ids)  # not on CUDA (a sync), under torch.compile or on fake tensors (no values)
    lo = hi = None
    if on_host and S:
        lo, hi = (int(v) for v in torch.aminmax(group_ids))  # one pass over the ids
    if num_groups is None:
        if not on_host:
            raise ValueError(
                f"{op}: num_groups is required unless group_ids is a CPU tensor with values (computing it would sync "
                f"on {device.type}; fake tensors have none)"
            )
        num_groups = hi + 1 if S else 0
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"{op}: num_groups must be a non-negative int, got {num_groups!r}")
    if on_host and S and (lo < 0 or hi >= num_groups):
        raise ValueError(f"{op}: group_ids must lie in [0, num_groups={num_groups})")
    return group_ids, 0, num_groups


def group_advantages(
    scores: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    method: str = "grpo",
    scale: str = "group",
    eps: Optional[float] = None,
    preset: str = "trl",
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Per-sequence advantages from per-sequence scores, relative to each prompt's group.

    Args:
        scores: ``[S]``, one scalar reward per sequence: any float dtype, or integer / bool
            (pass / fail rewards), read as fp32.
        group_size: ``G``: groups are ``G`` consecutive sequences (``S % G == 0``). Or
        group_ids: int32/int64 ``[S]``, the group of each sequence, in ``[0, num_groups)``.
        num_groups: number of groups with ``group_ids``; required on CUDA (computing it
            would be a host sync). Ids out of range are rejected on the CPU; on the GPU
            (no check: it would sync) the triton and cuda backends write NaN for those samples
            and the torch backend hits a device-side index assertion.
        method: with ``μ_g`` the group mean and ``σ_g`` its unbiased std,

            * ``"grpo"`` (DeepSeekMath, Shao et al. 2024): ``(s − μ_g)/(σ + ε)``;
              ``scale`` picks σ: ``"group"`` σ_g, ``"batch"`` the std of all ``S`` scores,
              ``"none"`` no division (TRL's ``scale_rewards``).
            * ``"dr_grpo"`` (Dr. GRPO, Liu et al. 2025): ``s − μ_g``.
            * ``"rloo"`` (Ahmadian et al. 2024): ``s − mean_{j≠i} s_j = G/(G−1)·(s − μ_g)``.
            * ``"reinforce_pp_baseline"`` (REINFORCE++, Hu 2025): ``s − μ_g``, then whitened
              over the batch: weighted mean/unbiased variance with weights ``lengths``
              (the tokens each value is broadcast over; 1 per sequence without lengths),
              ``(x − μ)·rsqrt(var + ε)``; a sequence of length 0 gets 0.
            * ``"opo"`` (OPO, Hao et al. 2025): ``s − b_g``, ``b_g = Σ_j L_j s_j / Σ_j L_j``
              (``lengths`` required; a group whose lengths are all 0 uses ``μ_g``).
        scale: ``"group"`` | ``"batch"`` | ``"none"``; only ``"grpo"`` divides, so other
            methods accept only the default.
        eps: ``None`` takes the default: for ``"grpo"`` the preset's (TRL 1e-4, verl
            1e-6; added to σ), for ``"reinforce_pp_baseline"`` 1e-8 (inside the rsqrt).
            Methods/scales that do not divide reject an explicit ``eps``.
        preset: ``"trl"`` or ``"verl"``; both use the unbiased std. They differ in ε and
            in singleton groups (one sequence): ``"trl"`` gives advantage 0 (the sample
            is its own baseline; TRL requires two generations per prompt), ``"verl"``
            uses baseline 0 and σ = 1, so the sample keeps its score (``s/(1+ε)`` for
            GRPO with group scaling, ``s`` for Dr. GRPO, RLOO, OPO; RLOO follows verl's
            per-group loop, not its vectorized path, which gives 0). A batch std over
            fewer than two scores is 0 (trl) or 1 (verl), by the same rule.
        lengths: ``[S]`` response lengths (int or float), for ``"opo"`` and
            ``"reinforce_pp_baseline"`` only.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``"cuda"`` | ``"cpp"``.

    Returns:
        fp32 ``[S]``, no gradient. A zero-variance group gives 0 (``0/(0+ε)``).
    """
    op = "group_advantages"
    if isinstance(scores, torch.Tensor) and (scores.dtype == torch.bool or not (scores.is_floating_point() or scores.is_complex())):
        scores = scores.to(torch.float32)  # integer or bool rewards (e.g. 0 / 1 for pass / fail)
    check_tensor(op, "scores", scores, FLOAT_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"{op}: scores must be 1-D [S], got shape {tuple(scores.shape)}")
    check_choice(op, "method", method, METHODS)
    check_choice(op, "scale", scale, SCALES)
    check_choice(op, "preset", preset, PRESETS)
    S = scores.numel()
    group_ids, group_size, num_groups = _check_group_layout(op, S, scores.device, group_size, group_ids, num_groups)
    if method != "grpo" and scale != "group":
        raise ValueError(f"{op}: scale applies to method='grpo' only (dr_grpo is grpo with scale='none'), got scale={scale!r} with method={method!r}")

    divides = (method == "grpo" and scale != "none") or method == "reinforce_pp_baseline"
    if eps is None:
        eps = WHITEN_EPS if method == "reinforce_pp_baseline" else GRPO_EPS[preset]
    elif not divides:
        raise ValueError(f"{op}: eps is unused by method={method!r} with scale={scale!r}; leave it None")
    eps = check_number(op, "eps", eps, nonnegative=True)

    if lengths is not None:
        if method not in ("opo", "reinforce_pp_baseline"):
            raise ValueError(f"{op}: lengths is used only by method='opo' and 'reinforce_pp_baseline', got method={method!r}")
        check_tensor(op, "lengths", lengths, INDEX_DTYPES + FLOAT_DTYPES)
        check_same_shape(op, "scores", scores, lengths=lengths)
        check_same_device(op, "scores", scores, lengths=lengths)
        lengths = lengths.detach()
    elif method == "opo":
        raise ValueError(f"{op}: method='opo' needs lengths (response lengths [S]) for its length-weighted baseline")

    backend = resolve_backend(op, backend, scores.device)
    # Eager torch backend: call it directly; the custom op (there for torch.compile and
    # the Triton kernel) only adds ~10 us of dispatch around the same function.
    args = (scores.detach(), None if group_ids is None else group_ids.detach(), lengths,
            group_size, num_groups, method, scale, eps, preset)
    if eager_torch(backend):
        return group_advantages_torch(*args)
    return _group_advantages_op(*args, backend)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Whiten ``x`` over the masked positions of the whole tensor.

    With weights ``w = mask`` (bool, or float used as weights; 0/1 is a mask) and
    ``n = Σw``: ``μ = Σ w·x / n``, ``var = Σ w·(x − μ)² / (n − 1)`` (unbiased, two-pass
    centered), ``out = (x − μ)·rsqrt(var + eps)``, plus ``μ`` when ``shift_mean=False``.

    Edge cases: positions with ``w == 0`` get 0 and do not count; ``x`` must still be
    finite there (the torch backend applies the mask by multiplication, as TRL and verl
    do, so a NaN in the padding makes the whole result NaN, never a silent wrong
    number); all positions masked gives all zeros; ``n ≤ 1`` (e.g. one valid token) leaves the
    unbiased variance undefined, so no spread is known and every valid position gets 0
    (``μ`` when ``shift_mean=False``: for one valid token, ``x`` itself).

    Args:
        x: any shape, any float dtype. mask: same shape, bool / int / float.
    Returns:
        fp32, shape of ``x``, no gradient.
    """
    op = "masked_whiten"
    check_tensor(op, "x", x, FLOAT_DTYPES)
    check_tensor(op, "mask", mask, MASK_DTYPES)
    check_same_shape(op, "x", x, mask=mask)
    check_same_device(op, "x", x, mask=mask)
    if not isinstance(shift_mean, bool):
        raise TypeError(f"{op}: shift_mean must be a bool, got {type(shift_mean).__name__}")
    eps = check_number(op, "eps", eps, nonnegative=True)
    backend = resolve_backend(op, backend, x.device)
    if eager_torch(backend):  # as in group_advantages: skip the custom op's dispatch
        return masked_whiten_torch(x.detach(), mask.detach(), shift_mean, eps)
    return _masked_whiten_op(x.detach(), mask.detach(), shift_mean, eps, backend)
