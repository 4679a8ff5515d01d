"""Public fused lm_head ops: logprobs, policy loss and sequence logprobs straight from
hidden states, without ever holding the full ``[N, V]`` logits.

Layers: validation and the public functions here; two ``torch.library`` custom ops
(``rlhf_engine::fused_linear_logprobs_fwd`` / ``_bwd``) dispatching through ``_FWD`` /
``_BWD``:

* forward, ``"triton"``: one GEMM kernel with an online-logsumexp epilogue
  (``rlhf_engine.kernels.fused_linear``): no logits in memory at all;
  ``"torch"``: the chunk schedule of ``rlhf_engine.ops._lm_head_chunks`` (dense GEMM per
  token chunk, then the torch token_logprobs epilogue);
* backward, both: the chunk schedule over vocabulary tiles (recompute GEMM, the
  backend's token_logprobs backward epilogue, then the d hidden / d weight GEMMs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from rlhf_engine._backend import lazy, resolve_backend
from rlhf_engine._checks import INDEX_DTYPES, check_cu_seqlens, check_number, check_same_device, check_tensor
from rlhf_engine.ops._lm_head_chunks import chunked_logprobs_bwd, chunked_logprobs_fwd, default_chunk_rows
from rlhf_engine.ops.logprobs import _BWD as _EPILOGUE_BWD
from rlhf_engine.ops.logprobs import _FWD as _EPILOGUE_FWD
from rlhf_engine.ops.logprobs import LOGITS_DTYPES, _check_labels_in_range
from rlhf_engine.ops._lm_head_loss_grad import one_pass_applies, one_pass_logprobs
from rlhf_engine.ops.policy_loss import policy_loss, policy_loss_args
from rlhf_engine.reference.policy_loss import LOG_RATIO_CLAMP, SAPO_TAU_NEG, SAPO_TAU_POS
from rlhf_engine.torch_backend.aggregation import host_readable

OP = "fused_linear_logprobs"


def _chunked_fwd_torch(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_rows):
    return chunked_logprobs_fwd(
        hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_rows, _EPILOGUE_FWD["torch"]
    )


_fused_gemm_fwd_triton = lazy("rlhf_engine.kernels.fused_linear", "fused_linear_logprobs_fwd")


def _fused_fwd_triton(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_rows):
    # The fused GEMM holds no logits, so it needs no chunking.
    return _fused_gemm_fwd_triton(hidden, weight, bias, labels, temperature, ignore_index, with_entropy)


_FWD = {"torch": _chunked_fwd_torch, "triton": _fused_fwd_triton}


@torch.library.custom_op("rlhf_engine::fused_linear_logprobs_fwd", mutates_args=())
def _fused_linear_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk_rows: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, labels ``[N]`` -> fp32 ``(logp [N], entropy [N] or [0], lse [N])``."""
    if host_readable(labels):
        _check_labels_in_range(labels, weight.shape[0], ignore_index)
    return _FWD[backend](hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_rows)


@_fused_linear_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_rows, backend):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(n, **f32), hidden.new_empty(n if with_entropy else 0, **f32), hidden.new_empty(n, **f32)


@torch.library.custom_op("rlhf_engine::fused_linear_logprobs_bwd", mutates_args=())
def _fused_linear_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    chunk_rows: int,
    need_dweight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d hidden [N, H], d weight [V, H], d bias [V] or [0] without bias)``; ``d weight``
    and ``d bias`` are ``[0]`` when not ``need_dweight`` (a frozen lm_head)."""
    dhidden, dweight, dbias = chunked_logprobs_bwd(
        grad_logp.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(),
        hidden,
        weight,
        bias,
        labels,
        lse,
        entropy,
        temperature,
        ignore_index,
        chunk_rows,
        _EPILOGUE_BWD[backend],
        need_dweight,
    )
    return dhidden, dweight, weight.new_empty(0) if dbias is None else dbias


@_fused_linear_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, chunk_rows,
      need_dweight, backend):  # fmt: skip
    if not need_dweight:
        return torch.empty_like(hidden), weight.new_empty(0), weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty(0) if bias is None else torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_rows, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.config = (temperature, ignore_index, with_entropy, chunk_rows, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, with_entropy, chunk_rows, backend = ctx.config
    dhidden, dweight, dbias = _fused_linear_bwd(
        grad_logp,
        grad_entropy if with_entropy else None,
        hidden,
        weight,
        bias,
        labels,
        lse,
        entropy if with_entropy else None,
        temperature,
        ignore_index,
        chunk_rows,
        ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]),
        backend,
    )
    dweight = dweight if ctx.needs_input_grad[1] else None
    dbias = dbias if bias is not None and ctx.needs_input_grad[2] else None
    return dhidden, dweight, dbias, None, None, None, None, None, None


_fused_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(op, hidden, weight, labels, bias, temperature, ignore_index, chunk_size) -> float:
    check_tensor(op, "hidden", hidden, LOGITS_DTYPES)
    check_tensor(op, "weight", weight, LOGITS_DTYPES)
    check_tensor(op, "labels", labels, INDEX_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{op}: hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"{op}: weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if bias is not None:
        check_tensor(op, "bias", bias, LOGITS_DTYPES)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{op}: bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    check_same_device(op, "hidden", hidden, weight=weight, labels=labels, bias=bias)
    temperature = check_number(op, "temperature", temperature, positive=True)
    if temperature == math.inf:
        raise ValueError(f"{op}: temperature must be finite, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be None or a positive int (tokens per chunk), got {chunk_size!r}")
    return temperature


def _run(op, hidden, weight, labels, bias, temperature, ignore_index, with_entropy, chunk_size, backend):
    temperature = _validate(op, hidden, weight, labels, bias, temperature, ignore_index, chunk_size)
    resolved = resolve_backend(op, backend, hidden.device)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    n, vocab = hidden2d.shape[0], weight.shape[0]
    chunk_rows = chunk_size or default_chunk_rows(n, vocab, hidden.dtype, hidden.device)
    logp, entropy, _ = _fused_linear_fwd(
        hidden2d, weight, bias, labels1d, temperature, ignore_index, with_entropy, chunk_rows, resolved
    )
    return logp.view(labels.shape), entropy.view(labels.shape) if with_entropy else None


def _run_one_pass(
    op, hidden, weight, labels, bias, temperature, ignore_index, with_entropy, chunk_size, backend, old_logp,
    advantages, mask, loss_options,
):
    """The one-pass path of :func:`fused_linear_policy_loss` (``_lm_head_loss_grad``):
    every argument validated before the first GEMM -> ``(logp, entropy or None, zero)``."""
    temperature = _validate(op, hidden, weight, labels, bias, temperature, ignore_index, chunk_size)
    resolved = resolve_backend(op, backend, hidden.device)
    # policy_loss validates its arguments against a logp of the labels' shape.
    stand_in = hidden.new_empty(labels.shape, dtype=torch.float32)
    entropy_stand_in = stand_in if loss_options["entropy_coef"] != 0.0 else None
    on_policy = old_logp is None  # policy_loss's on-policy old_logp = sg(logp)
    old_stand_in = stand_in if on_policy else old_logp
    policy_args = policy_loss_args(stand_in, old_stand_in, advantages, mask, entropy=entropy_stand_in, **loss_options)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    if host_readable(labels1d):
        _check_labels_in_range(labels1d, weight.shape[0], ignore_index)
    n, vocab = hidden2d.shape[0], weight.shape[0]
    chunk_rows = chunk_size or default_chunk_rows(n, vocab, hidden.dtype, hidden.device)
    zero, logp, entropy = one_pass_logprobs(
        hidden2d, weight, bias, labels1d, temperature, ignore_index, with_entropy, chunk_rows, resolved, policy_args,
        on_policy,
    )
    return logp.view(labels.shape), entropy.view(labels.shape) if with_entropy else None, zero


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    """Per-token logprobs (and entropy) of ``labels`` under the lm_head ``weight``,
    without materializing the ``[N, V]`` logits.

    With ``z = (hidden @ weight.T + bias) / temperature`` (the spec: ``rlhf_engine/reference/logprobs.py``)::

        logp    = z[label] - logsumexp(z)
        entropy = logsumexp(z) - sum(softmax(z) * z)

    Args:
        hidden: ``[..., H]`` float16 / bfloat16 / float32 (the last hidden states).
        weight: ``[V, H]``, the lm_head weight, same dtype as ``hidden``.
        labels: ``[...]`` = ``hidden.shape[:-1]``, int64 / int32, in ``[0, V)`` or equal to
            ``ignore_index`` (those positions give 0 and no gradient).
        bias: optional ``[V]``, same dtype.
        temperature: ``> 0``; the sampling temperature, so training matches rollout.
        return_entropy: also return the (differentiable) entropy.
        chunk_size: bounds the logits held at once to ``chunk_size * V``: the torch
            forward runs ``chunk_size`` tokens at a time (the Triton forward holds no
            logits at all), and both backwards work on vocabulary tiles of that many
            logits. None: about 512 MiB of logits on CUDA, 16 MiB on the CPU.
        backend: ``"auto"`` (triton on CUDA, torch otherwise), ``"triton"``, ``"torch"``.

    Returns:
        fp32 ``logp [...]``, or ``(logp, entropy)``. The backward gives ``d hidden``,
        ``d weight`` and ``d bias`` in their own dtypes; ``d weight`` is one GEMM per
        vocabulary tile over all tokens (fp32 accumulation inside the GEMM) and ``d
        hidden`` is summed over tiles in fp32. FLOPs: ``2·N·H·V`` forward, ``6·N·H·V``
        backward (the logits are recomputed).

    Raises:
        TypeError / ValueError naming the argument. Labels out of range raise on CPU
        tensors; on CUDA they give NaN (no host sync).
    """
    logp, entropy = _run(
        OP, hidden, weight, labels, bias, temperature, ignore_index, return_entropy, chunk_size, backend
    )
    return (logp, entropy) if return_entropy else logp


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Summed logprob of each sequence, ``Σ_t logp_t · mask_t`` (DPO, reward models).

    Padded: ``hidden [B, T, H]``, ``labels``/``mask`` ``[B, T]`` -> fp32 ``[B]``. Packed:
    ``hidden [N, H]``, ``labels``/``mask`` ``[N]`` and ``cu_seqlens`` (``[S + 1]``, from 0
    to N) -> fp32 ``[S]``. ``mask`` is bool or float (weights). Other arguments and the
    gradients as :func:`fused_linear_logprobs`: the backward recomputes the logits
    (``8·N·H·V``), because a DPO or reward-model loss of these sums gives each token's
    coefficient only once its whole sequence is summed, after the forward, and ``d weight``
    sums over sequences with different coefficients (the one-pass path of
    :func:`fused_linear_policy_loss` needs the coefficient per chunk).
    """
    op = "sequence_logprobs"
    check_tensor(op, "mask", mask, (torch.bool,) + LOGITS_DTYPES + (torch.float64,))
    if mask.shape != labels.shape:
        raise ValueError(f"{op}: mask must have the shape of labels {tuple(labels.shape)}, got {tuple(mask.shape)}")
    if cu_seqlens is None and labels.dim() != 2:
        raise ValueError(f"{op}: padded inputs need labels [B, T] (or pass cu_seqlens), got {tuple(labels.shape)}")
    if cu_seqlens is not None:
        if labels.dim() != 1:
            raise ValueError(f"{op}: packed inputs (cu_seqlens given) need labels [N], got {tuple(labels.shape)}")
        check_cu_seqlens(op, cu_seqlens, labels.shape[0], labels.device)
    logp, _ = _run(op, hidden, weight, labels, bias, temperature, ignore_index, False, chunk_size, backend)
    weighted = logp * mask.to(torch.float32)
    if cu_seqlens is None:
        return weighted.sum(dim=-1)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_of_token = torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=labels.device), lengths, output_size=labels.shape[0]
    )
    return torch.zeros(lengths.shape[0], dtype=torch.float32, device=labels.device).index_add(0, seq_of_token, weighted)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_logprobs: bool = False,
    loss: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    delta: float | None = None,
    log_ratio_min: float | None = -LOG_RATIO_CLAMP,
    log_ratio_max: float | None = LOG_RATIO_CLAMP,
    sapo_tau_pos: float = SAPO_TAU_POS,
    sapo_tau_neg: float = SAPO_TAU_NEG,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: bool = False,
    kl_ratio_weight: bool = False,
    entropy_coef: float = 0.0,
    entropy_aggregation: str | None = None,
    is_weights: torch.Tensor | None = None,
    is_weights_per_sequence: bool = False,
    aggregation: str = "token-mean",
    count_empty_seqs: bool | None = None,
    normalizer=None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
):
    """The policy loss computed straight from hidden states.

    Equal to ``policy_loss(fused_linear_logprobs(hidden, weight, labels, ...), old_logp,
    advantages, mask, ...)`` with the entropy computed in the same pass when
    ``entropy_coef`` is non-zero or ``return_logprobs`` is set. ``hidden`` is ``[B, T, H]``
    (padded) or ``[N, H]`` (packed, with ``cu_seqlens``); every other per-token tensor has
    the shape of ``labels``. All loss options are those of
    :func:`rlhf_engine.ops.policy_loss` (``old_logp=None``: on-policy, ``old_logp =
    sg(logp)``, no second forward); the lm_head options those of
    :func:`fused_linear_logprobs`. Only one chunk of logits exists at a time.

    Two paths (``rlhf_engine/ops/_lm_head_loss_grad.py``). When a gradient is wanted and
    the loss is token-level (every loss but ``gspo`` and ``geo_mean``), one pass over token chunks makes
    the logits once and the gradients with them: three GEMMs, ``6·N·H·V`` FLOPs, the
    backward only scales them; ``d weight`` of a 16-bit lm_head is summed over chunks in
    an fp32 ``[V, H]`` buffer when there are several (4 bytes per lm_head parameter
    during the call). ``gspo`` and ``geo_mean`` (the coefficient needs the sequence's mean log-ratio
    first) and calls without a gradient run the forward, and the backward recomputes the
    logits per vocabulary tile (``8·N·H·V``). A frozen lm_head (LoRA) gets no ``d weight``
    GEMM on either path.

    Returns:
        ``(loss, metrics)``; with ``return_logprobs``, ``(loss, metrics, logp, entropy)``
        where ``logp`` and ``entropy`` are detached fp32 per-token tensors for logging
        (e.g. the rollout/training logprob gap).
    """
    op = "fused_linear_policy_loss"
    with_entropy = entropy_coef != 0.0 or return_logprobs
    loss_options = dict(
        loss=loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, delta=delta,
        log_ratio_min=log_ratio_min, log_ratio_max=log_ratio_max, sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
        kl_ratio_weight=kl_ratio_weight, entropy_coef=entropy_coef, entropy_aggregation=entropy_aggregation,
        is_weights=is_weights, is_weights_per_sequence=is_weights_per_sequence, aggregation=aggregation,
        count_empty_seqs=count_empty_seqs, normalizer=normalizer, cu_seqlens=cu_seqlens, backend=backend,
    )  # fmt: skip
    if one_pass_applies(loss, hidden, weight, bias):
        logp, entropy, zero = _run_one_pass(
            op, hidden, weight, labels, bias, temperature, ignore_index, with_entropy, chunk_size, backend,
            old_logp, advantages, mask, loss_options,
        )  # fmt: skip
        with torch.no_grad():  # the value and metrics only: the gradient is on zero
            value, metrics = policy_loss(
                logp, old_logp, advantages, mask, entropy=entropy if entropy_coef != 0.0 else None, **loss_options
            )
        value = value + zero
    else:
        logp, entropy = _run(op, hidden, weight, labels, bias, temperature, ignore_index, with_entropy, chunk_size, backend)
        value, metrics = policy_loss(
            logp, old_logp, advantages, mask, entropy=entropy if entropy_coef != 0.0 else None, **loss_options
        )
    if return_logprobs:
        return value, metrics, logp.detach(), entropy.detach()
    return value, metrics
