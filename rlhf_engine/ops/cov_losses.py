"""``clip_cov_loss`` / ``kl_cov_loss``: PRIME-RL's covariance-selected policy losses
(Cui et al. 2025; verl's ``clip_cov`` / ``kl_cov``), composed on the fused
:func:`~rlhf_engine.ops.policy_loss`, so every backend runs them through ``backend=``.

A pre-pass in plain torch (no gradient; ``torch_backend/cov_losses.py``) picks the tokens
by covariance; the fused op computes the per-token loss, its aggregation and gradient:

* clip_cov: the picked tokens get importance weight 0 (``is_weights = corr *
  is_weights``), which zeroes their loss and gradient inside the op.
* kl_cov: the op computes ``-A r`` for every token (PPO with an infinite clip range:
  ``max(-A r, -A clip(r, -inf, inf)) = -A r`` exactly, value and gradient); the
  ``ppo_kl_coef |delta|`` term touches only the k picked tokens and is added here in
  torch, weighted by the aggregation's ``w_b = d loss / d L_b``
  (``torch_backend.aggregation.aggregate_partials``, the op's own weights), so the sum is
  the exact, differentiable loss.

Unlike the other ops these read values on the host (one sync each, as verl's code does):
the number of tokens to pick and the draw depend on the data. So they are eager
functions, not custom ops, and torch.compile breaks the graph around the pre-pass. On
fake tensors (a memory planner's trace, ``tests/test_fake_tensor.py``) nothing is read
and no token is picked: the outputs' shapes are the real ones.
The spec: ``rlhf_engine/reference/cov_losses.py``.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine import _checks
from rlhf_engine.ops._seq_loss import normalizer_args, per_token_or_seq, token_layout
from rlhf_engine.ops.policy_loss import policy_loss
from rlhf_engine.reference.aggregation import AGGREGATIONS
from rlhf_engine.torch_backend.cov_losses import (
    CovTokens, clip_cov_weights, cov_tokens, kl_cov_penalty, kl_cov_top, masked_mean,
)


def _tokens(op, logp, old_logp, advantages, mask, is_weights, cu_seqlens, aggregation) -> CovTokens:
    """Validate the tensors shared with :func:`policy_loss` before the pre-pass reads them."""
    _checks.check_tensor(op, "logp", logp)
    layout = token_layout(op, "logp", logp, cu_seqlens)
    _checks.check_tensor(op, "old_logp", old_logp)
    _checks.check_tensor(op, "mask", mask, _checks.MASK_DTYPES)
    _checks.check_same_shape(op, "logp", logp, old_logp=old_logp, mask=mask)
    _checks.check_same_device(op, "logp", logp, old_logp=old_logp, mask=mask)
    adv = per_token_or_seq(op, "advantages", advantages, logp, layout.num_seqs)
    isw = per_token_or_seq(op, "is_weights", is_weights, logp, layout.num_seqs)
    _checks.check_choice(op, "aggregation", aggregation, AGGREGATIONS)
    return cov_tokens(logp, old_logp, adv, mask, isw, layout.cu_seqlens, layout.seq_len)


def _ratio(op: str, name: str, value) -> float:
    value = _checks.check_number(op, name, value)
    if not 0 < value <= 1:
        raise ValueError(f"{op}: {name} must be in (0, 1] (a fraction of the valid tokens), got {value}")
    return value


def clip_cov_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_low: float = 0.2, clip_high: float | None = None, clip_cov_ratio: float = 0.0002, clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0, is_weights: torch.Tensor | None = None, aggregation: str = "token-mean",
    count_empty_seqs: bool | None = None, normalizer=None, cu_seqlens: torch.Tensor | None = None,
    generator: torch.Generator | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """Clip-Cov (PRIME-RL, verl's ``clip_cov``): PPO's clipped loss with a random few
    high-covariance tokens dropped.

    Layout and dtypes as :func:`policy_loss`: padded ``logp`` ``[B, T]``, or packed ``[N]``
    with ``cu_seqlens``; ``old_logp``, ``mask`` (bool, or float weights) the shape of
    ``logp``; ``advantages`` / ``is_weights`` per token or per sequence ``[S]``; any float
    dtype, computed in fp32. With ``r = exp(lp - old)`` (unclamped) and, over the valid
    tokens (``m != 0``), mask-weighted means::

        l_t   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        cov_t = (A_t - mean(A)) (lp_t - mean(lp))

    Candidates: valid tokens PPO did not clip (``L2 > L1`` false) with ``clip_cov_lb <
    cov_t < clip_cov_ub``. ``max(int(clip_cov_ratio * sum(m)), 1)`` of them (or all, if
    fewer), the first of ``torch.randperm(#candidates, generator=generator)`` over the
    candidates in row-major order (verl's draw: the default CPU generator when None, so
    seeding torch reproduces verl's pick), get ``l_t = 0``. Then ``l * is_weights``,
    aggregated by ``aggregation`` / ``count_empty_seqs`` / ``normalizer`` as
    :func:`policy_loss`. ``clip_high`` defaults to ``clip_low``; ``clip_cov_ratio`` in
    (0, 1]; ``clip_cov_lb < clip_cov_ub``.

    Reads the candidate count on the host (one sync). Gradients flow to ``logp`` only.

    Returns:
        ``(loss, metrics)``: 0-d fp32 ``loss``; ``clipfrac`` (mask-weighted fraction of
        the valid tokens dropped; verl's ``pg_clipfrac``) and ``ppo_kl`` (mean ``old -
        lp``), 0-d fp32, 0 without a valid token.
    """
    op = "clip_cov_loss"
    t = _tokens(op, logp, old_logp, advantages, mask, is_weights, cu_seqlens, aggregation)
    clip_low = _checks.check_number(op, "clip_low", clip_low, nonnegative=True)
    clip_high = clip_low if clip_high is None else _checks.check_number(op, "clip_high", clip_high, nonnegative=True)
    clip_cov_ratio = _ratio(op, "clip_cov_ratio", clip_cov_ratio)
    lb = _checks.check_number(op, "clip_cov_lb", clip_cov_lb)
    ub = _checks.check_number(op, "clip_cov_ub", clip_cov_ub)
    if not lb < ub:
        raise ValueError(f"{op}: clip_cov_lb must be < clip_cov_ub, got {lb} and {ub}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")

    corr = clip_cov_weights(t, clip_low, clip_high, clip_cov_ratio, lb, ub, generator)
    weights = corr if t.isw is None else corr * t.isw
    loss, metrics = policy_loss(
        logp, old_logp, advantages, mask, loss="ppo", clip_low=clip_low, clip_high=clip_high, log_ratio_min=None,
        log_ratio_max=None, is_weights=weights.view(logp.shape), aggregation=aggregation,
        count_empty_seqs=count_empty_seqs, normalizer=normalizer, cu_seqlens=cu_seqlens, backend=backend,
    )
    return loss, {"clipfrac": masked_mean((corr == 0).to(torch.float32), t), "ppo_kl": metrics["ppo_kl"]}


def kl_cov_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    kl_cov_ratio: float = 0.0002, ppo_kl_coef: float = 0.1, is_weights: torch.Tensor | None = None,
    aggregation: str = "token-mean", count_empty_seqs: bool | None = None, normalizer=None,
    cu_seqlens: torch.Tensor | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """KL-Cov (PRIME-RL, verl's ``kl_cov``): the unclipped policy gradient plus an ``|lp -
    old|`` penalty on the highest-covariance tokens.

    Layout, dtypes and aggregation as :func:`clip_cov_loss`. With ``delta = lp - old``,
    ``r = exp(delta)`` (unclamped), and over the ``n`` valid tokens (``m != 0``) plain means
    (verl's; for a bool mask the same as mask-weighted ones)::

        cov_t = (A_t - mean(A)) (lp_t - mean(lp))
        l_t   = -A r + ppo_kl_coef |delta|  on the k = max(1, int(n * kl_cov_ratio)) tokens
                                            of largest cov_t (torch.topk; none if n = 0)
        l_t   = -A r                        elsewhere

    then ``l * is_weights`` (both terms, as verl) and the aggregation. ``kl_cov_ratio`` in
    (0, 1]; ``ppo_kl_coef >= 0`` (default 0.1, verl's ``PolicyLossConfig``).

    Reads the valid-token count on the host (one sync). Gradients flow to ``logp`` only.

    Returns:
        ``(loss, metrics)``: 0-d fp32 ``loss``; ``ppo_kl``: mask-weighted mean ``|delta|``
        (verl's name for it here), 0-d fp32, 0 without a valid token.
    """
    op = "kl_cov_loss"
    t = _tokens(op, logp, old_logp, advantages, mask, is_weights, cu_seqlens, aggregation)
    kl_cov_ratio = _ratio(op, "kl_cov_ratio", kl_cov_ratio)
    ppo_kl_coef = _checks.check_number(op, "ppo_kl_coef", ppo_kl_coef, nonnegative=True)

    norm_tensor, norm_const = normalizer_args(op, normalizer, logp.device)
    loss, _ = policy_loss(
        logp, old_logp, advantages, mask, loss="ppo", clip_low=math.inf, clip_high=math.inf, log_ratio_min=None,
        log_ratio_max=None, is_weights=is_weights, aggregation=aggregation, count_empty_seqs=count_empty_seqs,
        normalizer=normalizer, cu_seqlens=cu_seqlens, backend=backend,
    )
    top = kl_cov_top(t, kl_cov_ratio)
    if top is not None:
        loss = loss + kl_cov_penalty(logp, top, ppo_kl_coef, t, aggregation, count_empty_seqs, norm_tensor, norm_const)
    return loss, {"ppo_kl": masked_mean((t.lp - t.old).abs_(), t)}
