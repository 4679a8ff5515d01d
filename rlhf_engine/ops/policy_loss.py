"""``policy_loss``: fused PPO / GSPO / CISPO / SAPO / REINFORCE loss with aggregation and metrics."""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_engine import _checks
from rlhf_engine._backend import eager_torch, lazy, resolve_backend
from rlhf_engine.ops._seq_loss import dense, normalizer_args, per_token_or_seq, seq_loss_backward, token_layout
from rlhf_engine.reference.aggregation import AGGREGATIONS, counts_empty_seqs
from rlhf_engine.reference.kl import ESTIMATORS
from rlhf_engine.reference.policy_loss import (
    ENTROPY_AGGREGATIONS, LOG_RATIO_CLAMP, LOSSES, METRICS, PARTIALS, SAPO_TAU_NEG, SAPO_TAU_POS, log_ratio_bounds,
)
from rlhf_engine.torch_backend.aggregation import Segments, TokenMask, aggregate_partials, fp32, numeric
from rlhf_engine.torch_backend.policy_loss import policy_loss_torch

OP = "policy_loss"

# The fused forward of each kernel backend: (g, partials [S, len(PARTIALS)]), aggregated
# below; the torch backend computes the whole op itself (policy_loss_torch).
_FWD = {
    "triton": lazy("rlhf_engine.kernels.policy_loss", "policy_loss_fwd"),
    "cuda": lazy("rlhf_engine.native.policy_loss", "policy_loss_fwd"),
    "cpp": lazy("rlhf_engine.native.policy_loss", "policy_loss_fwd"),
}

_RATIO_MIN, _RATIO_MAX = PARTIALS.index("ratio_min"), PARTIALS.index("ratio_max")
_ENTROPY_METRIC = METRICS.index("entropy")
# METRICS[i] comes from PARTIALS[2 + i]: the masked mean of a sum, or ratio_min / ratio_max.
assert len(METRICS) == len(PARTIALS) - 2 and METRICS[_RATIO_MIN - 2:_RATIO_MAX - 1] == PARTIALS[_RATIO_MIN:_RATIO_MAX + 1]


def _metrics(partials: torch.Tensor) -> torch.Tensor:
    """The kernel's ``[S, len(PARTIALS)]`` -> fp32 ``[len(METRICS)]`` masked token means
    over the batch (0 for an all-masked batch), without a host sync.

    Built from slices of the column totals (a handful of tiny ops): ratio_min / ratio_max
    are the extremes over sequences, every other metric a total over the token count.
    """
    totals = partials.sum(0)
    count = totals[PARTIALS.index("count")]
    valid = count > 0
    means = torch.where(valid, totals / count, 0.0)
    extremes = torch.stack([partials[:, _RATIO_MIN].amin(), partials[:, _RATIO_MAX].amax()])
    return torch.cat([means[2:_RATIO_MIN], torch.where(valid, extremes, 0.0), means[_RATIO_MAX + 1:]])


def _policy_loss_forward(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor,
    ref_logp: Optional[torch.Tensor], entropy: Optional[torch.Tensor], is_weights: Optional[torch.Tensor],
    normalizer: Optional[torch.Tensor], loss: str, clip_low: float, clip_high: float, dual_clip: Optional[float],
    delta: Optional[float], log_ratio_min: float, log_ratio_max: float, sapo_tau_pos: float, sapo_tau_neg: float,
    kl_coef: float, kl_estimator: str, kl_clamp: bool, kl_ratio_weight: bool, entropy_coef: float,
    entropy_token_mean: bool, aggregation: str, count_empty_seqs: bool, normalizer_const: float, seq_len: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(loss 0-d, metrics [len(METRICS)], g (logp's shape), w [S])``, all fp32; ``g``, ``w`` are
    saved for backward. The body of ``rlhf_engine::policy_loss_fwd``.

    ``entropy_token_mean``: the entropy bonus is ``-c_H`` times the batch's masked token
    mean of the entropy (the ``entropy`` metric) rather than a per-token term aggregated
    with the loss, so the kernels run without it."""
    options = dict(
        loss=loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, delta=delta,
        log_ratio_min=log_ratio_min, log_ratio_max=log_ratio_max, sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
        kl_ratio_weight=kl_ratio_weight, entropy_coef=0.0 if entropy_token_mean else entropy_coef, seq_len=seq_len,
    )
    if backend == "torch":
        total, metrics, g, w = policy_loss_torch(
            logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, normalizer,
            aggregation=aggregation, count_empty_seqs=count_empty_seqs, normalizer_const=normalizer_const, **options,
        )
    else:
        g, partials = _FWD[backend](
            logp, old_logp, advantages, mask, cu_seqlens, ref_logp, entropy, is_weights, **options
        )
        total, w = aggregate_partials(
            partials[:, PARTIALS.index("loss")], partials[:, PARTIALS.index("count")], aggregation, cu_seqlens,
            seq_len, normalizer, normalizer_const, count_empty_seqs=count_empty_seqs,
        )
        metrics = _metrics(partials)
    if entropy_token_mean and entropy is not None and entropy_coef != 0.0:
        total = total - entropy_coef * metrics[_ENTROPY_METRIC]
    return total, metrics, g, w


_policy_loss_fwd = torch.library.custom_op("rlhf_engine::policy_loss_fwd", _policy_loss_forward, mutates_args=())


@_policy_loss_fwd.register_fake
def _(logp, old_logp, advantages, mask, cu_seqlens, *args):
    f32 = torch.float32
    return (
        logp.new_empty((), dtype=f32), logp.new_empty(len(METRICS), dtype=f32), logp.new_empty(logp.shape, dtype=f32),
        logp.new_empty(cu_seqlens.shape[0] - 1, dtype=f32),
    )


# Positions in the op's 29 arguments (the signature of _policy_loss_forward)
_MASK, _CU, _ENTROPY, _ENTROPY_COEF, _ENTROPY_TOKEN_MEAN, _SEQ_LEN, _BACKEND = 3, 4, 6, 22, 23, 27, 28


class _PolicyLoss(torch.autograd.Function):
    """Autograd around the custom op: ``(logp, entropy, op_args) -> (loss, metrics)``, with
    ``op_args`` the op's 29 arguments (``logp`` and ``entropy`` among them) in one tuple.

    A Function rather than the op's ``register_autograd``: that path re-reads the op's
    schema once per argument on every call (quadratic in its 29 arguments: ~0.09 ms of
    Python, about half of what the whole eager loss takes at a few thousand tokens). Only
    the two differentiable inputs are the Function's own: autograd handles each input of
    ``apply`` on every call (~0.2 us each). torch.compile traces the Function and still
    sees the op as one opaque node; the eager torch backend calls the op's body directly
    (``eager_torch``).
    """

    @staticmethod
    def forward(ctx, logp, entropy, op_args):
        ctx.eager = eager_torch(op_args[_BACKEND])
        total, metrics, g, w = (_policy_loss_forward if ctx.eager else _policy_loss_fwd)(*op_args)
        ctx.mark_non_differentiable(metrics)
        ctx.save_for_backward(g, w, op_args[_CU], op_args[_MASK])
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        ctx.entropy_coef, ctx.seq_len, ctx.backend = op_args[_ENTROPY_COEF], op_args[_SEQ_LEN], op_args[_BACKEND]
        ctx.entropy_token_mean = op_args[_ENTROPY_TOKEN_MEAN]
        return total, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        g, w, cu_seqlens, mask = ctx.saved_tensors
        grad_logp = grad_entropy = None
        if ctx.needs_input_grad[0]:
            grad_logp = seq_loss_backward(
                grad_loss, w, g, cu_seqlens, 1.0, ctx.seq_len, ctx.dtypes[0], ctx.backend, ctx.eager
            )
        if ctx.needs_input_grad[1]:
            # l -= c_H H: d loss / d H_t = -c_H w_b m_t; for the token mean, w_b = 1 / sum m
            entropy_w = entropy_token_mean_weights(mask, w.numel()) if ctx.entropy_token_mean else w
            grad_entropy = seq_loss_backward(
                grad_loss, entropy_w, mask, cu_seqlens, -ctx.entropy_coef, ctx.seq_len, ctx.dtypes[1], ctx.backend,
                ctx.eager,
            )
        return grad_logp, grad_entropy, None


def entropy_token_mean_weights(mask: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """fp32 ``[num_seqs]``, every entry ``1 / sum(m)`` (0 for an all-masked batch): the
    per-sequence weights ``w_b`` of a batch token mean (``entropy_aggregation="token-mean"``)."""
    count = fp32(numeric(mask)).sum()
    inverse = torch.where(count > 0, count.reciprocal(), 0.0)
    return inverse.expand(num_seqs).contiguous()


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *, loss: str = "ppo",
    clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None, delta: float | None = None,
    log_ratio_min: float | None = -LOG_RATIO_CLAMP, log_ratio_max: float | None = LOG_RATIO_CLAMP,
    sapo_tau_pos: float = SAPO_TAU_POS, sapo_tau_neg: float = SAPO_TAU_NEG, ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0, kl_estimator: str = "k3", kl_clamp: bool = False, kl_ratio_weight: bool = False,
    entropy: torch.Tensor | None = None, entropy_coef: float = 0.0, entropy_aggregation: str | None = None,
    is_weights: torch.Tensor | None = None, is_weights_per_sequence: bool = False, aggregation: str = "token-mean",
    count_empty_seqs: bool | None = None, normalizer=None, cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """Policy-gradient loss, fused: per-token loss, aggregation and metrics in one kernel.

    Layout: padded, ``logp`` ``[B, T]``; or packed, ``logp`` ``[N]`` with ``cu_seqlens``
    (int32/int64 ``[S+1]``, rising from 0 to N; sequence b is ``[cu[b], cu[b+1])``).
    ``old_logp``, ``mask`` (bool or float weights), ``ref_logp``, ``entropy`` have the
    shape of ``logp``; ``advantages`` and ``is_weights`` have it too (per token) or are
    ``[S]`` (per sequence, broadcast over its tokens; when packed with ``N == S`` the
    per-token reading wins). Any float dtype; computed and returned in fp32.

    ``old_logp=None`` means on-policy: the samples come from the very policy being
    updated (one epoch, one optimizer step per rollout; TRL's ``num_iterations=1``), so
    ``old_logp = sg(logp)``: ``delta = 0``, ``r = 1`` with the gradient of ``logp``,
    without a second forward to compute the old logprobs.

    Per-token loss ``l`` (``delta = lp - old``, ``r = exp(clamp(delta, log_ratio_min,
    log_ratio_max))``, default ``[-20, 20]`` as verl, ``None`` for no bound on that side as
    TRL; no gradient where the clamp is active; details and papers in
    ``rlhf_engine/reference/policy_loss.py``):

    * ``"ppo"``: ``max(-A min(r, delta?), -A clip(r, 1-clip_low, 1+clip_high))``; with
      ``dual_clip=c``, for ``A < 0``: ``min(l, -A c)``. ``delta`` (INTELLECT-2) bounds r in
      the unclipped term. ``clip_high`` defaults to ``clip_low``.
    * ``"gspo"``: the same on the sequence ratio ``exp(mean_t delta)`` (sg trick per token),
      the clamp on the sequence's log-ratio (verl: ``log_ratio_min=None, log_ratio_max=10``).
    * ``"cispo"`` (paper / verl): ``-sg(clip(r, 1-clip_low, 1+clip_high)) A lp``.
    * ``"cispo-trl"`` (TRL): ``-sg(min(r, clip_high)) A lp``; ``clip_high`` is the raw bound
      on the weight (e.g. 5.0) and must be passed.
    * ``"sapo"``: ``-A sigmoid(tau (r-1)) 4/tau``, tau ``sapo_tau_pos`` (1.0) for ``A > 0``,
      ``sapo_tau_neg`` (1.05) otherwise.
    * ``"reinforce"``: ``-A lp``.
    * ``"dppo_tv"`` / ``"dppo_kl"`` (DPPO-Binary, verl): ``-A sg(min(r, delta)) lp v`` (``delta``
      None: no cap), ``v`` 1 where the token's probability moved less than ``clip_high``
      (``A > 0``) / ``clip_low`` (otherwise) in total variation / binary KL.
    * ``"geo_mean"`` (GMPO, verl): ``-mean_t(A) exp(mean_t dmin)`` on each token of the
      sequence, ``dmin`` the log-ratio capped at ``clip_high`` where ``A > 0``, at
      ``-clip_low`` where ``A < 0`` (sg trick per token like gspo; verl: aggregation
      ``seq-mean-token-mean`` with ``count_empty_seqs=True``, ``log_ratio_*=None``).

    then ``l = is_weights * l + kl_coef * KL(lp, ref_logp) - entropy_coef * entropy``
    (``kl_estimator`` / ``kl_clamp`` as in :func:`kl_penalty`; KL only when ``ref_logp`` is
    given). ``kl_ratio_weight=True`` makes the KL term ``kl_coef * r * KL`` with ``r``
    differentiable (TRL's ``use_bias_correction_kl``; for gspo ``r`` is the sequence ratio,
    a function of all its tokens). ``is_weights_per_sequence=True`` replaces per-token
    ``is_weights`` by their masked mean per sequence (TRL's sequence-level importance
    sampling). ``entropy_aggregation="token-mean"`` takes the entropy term out of ``l``: the
    loss gets ``- entropy_coef * sum(H m) / sum(m)`` over the batch (TRL's rule, whatever
    ``aggregation`` and ``normalizer``); None (default) aggregates it with ``l`` (verl's).

    Aggregation (``reference/aggregation.py``): ``token-mean`` (sum / tokens),
    ``seq-mean-token-mean``, ``seq-mean-token-sum`` (over sequences with a valid token),
    ``seq-mean-token-sum-norm`` (sum / (S * T), T the padded or longest length),
    ``token-sum``. ``normalizer`` (a number or a 1-element tensor, e.g. the all-reduced
    global count) replaces the denominator. Sequences without a valid token contribute
    nothing to the numerator; ``count_empty_seqs`` says whether the sequence means count
    them (None: not for ``seq-mean-token-mean`` / ``-sum``, yes for ``-sum-norm``; True:
    always, TRL's ``grpo``; False: never, verl's ``-sum-norm``). An all-masked batch gives
    loss 0.

    Gradients flow to ``logp`` and ``entropy`` only: ``old_logp``, ``advantages``,
    ``ref_logp``, ``is_weights`` and ``normalizer`` are constants.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d fp32 tensor; ``metrics`` a dict of 0-d fp32
        tensors (no host sync): ``clipfrac``, ``clipfrac_lower``, ``approx_kl`` (mean
        ``delta^2/2``), ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``ppo_kl`` (verl's: mean
        ``old - lp``, clamped like ``r``'s argument except for gspo / geo_mean), ``cispo_clip_ratio``
        (TRL's: capped weights with ``A > 0``; 0 for the non-cispo losses) (masked over
        valid tokens; 0 when none), plus ``kl`` (``r KL`` with ``kl_ratio_weight``) /
        ``entropy`` when given.
    """
    if old_logp is None:
        old_logp = logp.detach()
    elif not isinstance(old_logp, torch.Tensor):
        raise TypeError(f"{OP}: old_logp must be a torch.Tensor or None (on-policy), got {type(old_logp).__name__}")
    op_args = policy_loss_args(
        logp, old_logp, advantages, mask, loss=loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        delta=delta, log_ratio_min=log_ratio_min, log_ratio_max=log_ratio_max, sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
        kl_ratio_weight=kl_ratio_weight, entropy=entropy, entropy_coef=entropy_coef,
        entropy_aggregation=entropy_aggregation, is_weights=is_weights,
        is_weights_per_sequence=is_weights_per_sequence, aggregation=aggregation, count_empty_seqs=count_empty_seqs,
        normalizer=normalizer, cu_seqlens=cu_seqlens, backend=backend,
    )  # fmt: skip
    total, metrics = _PolicyLoss.apply(op_args[0], op_args[_ENTROPY], op_args)
    values = dict(zip(METRICS, metrics.unbind(0)))
    if ref_logp is None:
        del values["kl"]
    if entropy is None:
        del values["entropy"]
    return total, values


def policy_loss_args(
    logp, old_logp, advantages, mask, *, loss, clip_low, clip_high, dual_clip, delta, log_ratio_min, log_ratio_max,
    sapo_tau_pos, sapo_tau_neg, ref_logp, kl_coef, kl_estimator, kl_clamp, kl_ratio_weight, entropy, entropy_coef,
    entropy_aggregation, is_weights, is_weights_per_sequence, aggregation, count_empty_seqs, normalizer, cu_seqlens,
    backend,
) -> tuple:
    """Validate :func:`policy_loss`'s arguments -> the 29 arguments of
    ``rlhf_engine::policy_loss_fwd`` (dense tensors, the layout's ``cu_seqlens`` and
    ``seq_len``, the resolved backend). Raises what :func:`policy_loss` documents.
    ``old_logp`` must be a tensor here: :func:`policy_loss` resolves its on-policy ``None``
    to ``logp.detach()`` first, which a caller validating against a stand-in for ``logp``
    cannot do."""
    _checks.check_tensor(OP, "logp", logp)
    layout = token_layout(OP, "logp", logp, cu_seqlens)
    if old_logp is None:
        raise TypeError(f"{OP}: old_logp=None (on-policy) must be resolved to the real logp.detach() before policy_loss_args")
    _checks.check_tensor(OP, "old_logp", old_logp)
    _checks.check_tensor(OP, "mask", mask, _checks.MASK_DTYPES)
    _checks.check_optional_tensor(OP, "ref_logp", ref_logp)
    _checks.check_optional_tensor(OP, "entropy", entropy)
    _checks.check_same_shape(OP, "logp", logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp, entropy=entropy)
    _checks.check_same_device(OP, "logp", logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp, entropy=entropy)
    adv = per_token_or_seq(OP, "advantages", advantages, logp, layout.num_seqs)
    isw = per_token_or_seq(OP, "is_weights", is_weights, logp, layout.num_seqs)
    _checks.check_choice(OP, "loss", loss, LOSSES)
    _checks.check_choice(OP, "aggregation", aggregation, AGGREGATIONS)
    _checks.check_choice(OP, "kl_estimator", kl_estimator, ESTIMATORS)
    for name, flag in (("kl_clamp", kl_clamp), ("kl_ratio_weight", kl_ratio_weight),
                       ("is_weights_per_sequence", is_weights_per_sequence)):  # fmt: skip
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {type(flag).__name__}")
    if count_empty_seqs is not None and not isinstance(count_empty_seqs, bool):
        raise TypeError(f"{OP}: count_empty_seqs must be None or a bool, got {type(count_empty_seqs).__name__}")
    _checks.check_choice(OP, "entropy_aggregation", entropy_aggregation, ENTROPY_AGGREGATIONS)
    bounds = [None if b is None else _checks.check_number(OP, name, b)
              for name, b in (("log_ratio_min", log_ratio_min), ("log_ratio_max", log_ratio_max))]  # fmt: skip
    log_ratio_min, log_ratio_max = log_ratio_bounds(*bounds)
    if not log_ratio_min < log_ratio_max:
        raise ValueError(f"{OP}: log_ratio_min must be < log_ratio_max, got {log_ratio_min} and {log_ratio_max}")
    sapo_tau_pos = _checks.check_number(OP, "sapo_tau_pos", sapo_tau_pos, positive=True)
    sapo_tau_neg = _checks.check_number(OP, "sapo_tau_neg", sapo_tau_neg, positive=True)
    clip_low = _checks.check_number(OP, "clip_low", clip_low, nonnegative=True)
    if loss == "cispo-trl" and clip_high is None:
        raise ValueError(f"{OP}: loss='cispo-trl' needs clip_high, the raw upper bound on the IS weight (TRL uses e.g. 5.0)")
    clip_high = clip_low if clip_high is None else _checks.check_number(OP, "clip_high", clip_high, nonnegative=True)
    if dual_clip is not None:
        dual_clip = _checks.check_number(OP, "dual_clip", dual_clip)
        if not dual_clip > 1:
            raise ValueError(f"{OP}: dual_clip must be > 1, got {dual_clip}")
    if delta is not None:
        delta = _checks.check_number(OP, "delta", delta, positive=True)
    kl_coef = _checks.check_number(OP, "kl_coef", kl_coef)
    entropy_coef = _checks.check_number(OP, "entropy_coef", entropy_coef)
    norm_tensor, norm_const = normalizer_args(OP, normalizer, logp.device)
    chosen = resolve_backend(OP, backend, logp.device)
    logp, entropy, mask = dense(logp), dense(entropy), dense(mask)
    if is_weights_per_sequence and isw is not None and isw.shape == logp.shape:
        isw = _per_sequence_means(isw, mask, layout)
    return (
        logp, dense(old_logp), adv, mask, layout.cu_seqlens, dense(ref_logp), entropy, isw, norm_tensor, loss,
        clip_low, clip_high, dual_clip, delta, log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef,
        kl_estimator, kl_clamp, kl_ratio_weight, entropy_coef, entropy_aggregation == "token-mean", aggregation,
        counts_empty_seqs(aggregation, count_empty_seqs), norm_const, layout.seq_len, chosen,
    )


def _per_sequence_means(x: torch.Tensor, mask: torch.Tensor, layout) -> torch.Tensor:
    """fp32 ``[S]``: each sequence's masked mean of the per-token ``x`` (``sum x m / sum m``,
    0 for a sequence without a valid token; NaN on masked tokens never reaches it)."""
    seg = Segments(layout.cu_seqlens, x.numel(), layout.seq_len)
    token_mask = TokenMask(seg.tokens(mask))
    sums = seg.sum(token_mask.apply(seg.tokens(fp32(x))))
    counts = seg.sum(fp32(numeric(seg.tokens(mask))))
    return torch.where(counts > 0, sums / torch.where(counts > 0, counts, 1.0), 0.0)
