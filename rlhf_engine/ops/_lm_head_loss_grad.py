"""The one-pass path of ``fused_linear_policy_loss``: the lm_head's gradients made in the
forward, three GEMMs per token chunk instead of four.

``policy_loss``'s gradient w.r.t. a token's logprob is ``w_b(t) · g_t``: ``g_t = m_t ·
d l_t / d lp_t`` depends on that token's own inputs (its logprob, old logprob, advantage,
reference logprob, IS weight) for every loss but GSPO, and the aggregation weight ``w_b =
d loss / d L_b`` of its sequence depends on the mask (and the normalizer) only
(``reference/aggregation.py``). Both are known as soon as a chunk's logprobs are, so the
chunk's ``dz = d loss / d logits`` is made from the logits the forward GEMM just wrote
(:func:`rlhf_engine.ops._lm_head_chunks.chunked_logprobs_with_grads`), and the backward
only scales the saved ``d hidden`` / ``d weight`` / ``d bias`` by the loss's upstream
gradient (1 for ``loss.backward()``: exact).

Which losses take which path (:func:`one_pass_applies`):

* one pass: ``ppo``, ``cispo``, ``cispo-trl``, ``sapo``, ``reinforce``, ``dppo_tv``,
  ``dppo_kl``, with every
  aggregation, KL estimator, entropy bonus, IS weights and normalizer, when a gradient is
  wanted (grad mode on and ``hidden`` / ``weight`` / ``bias`` requiring it);
* recompute (forward, then the backward recomputes the logits per vocabulary tile):
  ``gspo`` and ``geo_mean``, whose per-token coefficient needs the whole sequence's mean
  log-ratio first,
  and any call without a gradient (scoring, evaluation: the forward alone, on the Triton
  backend the GEMM kernel that holds no logits).

The loss value and the metrics are ``policy_loss`` itself on the detached logprobs, so
they are the recompute path's exactly; the gradient joins the graph through a 0-d zero
added to the loss.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_engine._backend import eager_torch
from rlhf_engine.ops._lm_head_chunks import chunked_logprobs_with_grads
from rlhf_engine.ops.logprobs import _BWD as _EPILOGUE_BWD
from rlhf_engine.ops.logprobs import _FWD as _EPILOGUE_FWD
from rlhf_engine.ops.policy_loss import _policy_loss_forward, entropy_token_mean_weights
from rlhf_engine.reference.policy_loss import SEQUENCE_LEVEL_LOSSES
from rlhf_engine.torch_backend.aggregation import Segments, aggregate_partials, fp32, numeric



def one_pass_applies(loss: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``fused_linear_policy_loss`` makes its gradients in the forward (see the module docstring)."""
    if loss in SEQUENCE_LEVEL_LOSSES or not torch.is_grad_enabled():
        return False
    # getattr: the arguments are not validated yet (either path raises for a non-tensor).
    return any(getattr(t, "requires_grad", False) for t in (hidden, weight, bias))


def token_weights(
    mask, seg: Segments, cu_seqlens, normalizer, aggregation: str, normalizer_const: float, count_empty_seqs: bool
) -> torch.Tensor:
    """fp32 ``[N]``: each token's ``w_b = d loss / d L_b`` of its sequence (mask and normalizer only)."""
    counts = seg.sum(fp32(numeric(seg.tokens(mask))))
    _, w = aggregate_partials(
        torch.zeros_like(counts), counts, aggregation, cu_seqlens, seg.seq_len, normalizer, normalizer_const,
        count_empty_seqs=count_empty_seqs,
    )
    return _per_token(w, seg)


def _per_token(w: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Per-sequence ``[S]`` -> flat ``[N]`` (always per sequence, even when S == N)."""
    return seg.expand(w).expand(seg.shape).reshape(-1)


def _flat_per_token(x: torch.Tensor | None, seg: Segments) -> torch.Tensor | None:
    """A per-token (``[N]`` or ``[S, T]``) or per-sequence (``[S]``) input as flat ``[N]``
    (per token when ``N == S``, the ops' rule)."""
    if x is None or x.numel() == seg.num_tokens:
        return None if x is None else x.reshape(-1)
    # contiguous(): with one sequence the reshape is a stride-0 view, which the kernels
    # (flat pointers) would read past its single element.
    return seg.expand(x).expand(seg.shape).reshape(-1).contiguous()


def _one_sequence(rows: int, device: torch.device) -> torch.Tensor:
    """int32 ``cu_seqlens = [0, rows]`` made on the device (a host list copied there would wait
    for the stream)."""
    return torch.arange(0, 2 * rows, rows, dtype=torch.int32, device=device)


def _loss_grad_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    old_logp: Optional[torch.Tensor], advantages: torch.Tensor, mask: torch.Tensor, ref_logp: Optional[torch.Tensor],
    is_weights: Optional[torch.Tensor], token_weight: torch.Tensor, entropy_weight: torch.Tensor, temperature: float,
    ignore_index: int, with_entropy: bool, chunk_rows: int, need_dhidden: bool, need_dweight: bool, loss: str,
    clip_low: float, clip_high: float, dual_clip: Optional[float], delta: Optional[float], log_ratio_min: float,
    log_ratio_max: float, sapo_tau_pos: float, sapo_tau_neg: float, kl_coef: float, kl_estimator: str,
    kl_clamp: bool, kl_ratio_weight: bool, entropy_coef: float, lm_head_backend: str, loss_backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, labels and the per-token inputs ``[N]`` -> ``(logp [N], entropy [N]
    or [0], d hidden [N, H] or [0], d weight [V, H] or [0], d bias [V] or [0])`` for an
    upstream gradient of 1. ``old_logp`` None: on-policy, each chunk's own logprobs are its
    old ones. ``token_weight`` / ``entropy_weight``: each token's ``d loss / d L_b`` for the
    loss and for the entropy bonus (the same, or ``1 / sum m`` for
    ``entropy_aggregation="token-mean"``). The body of
    ``rlhf_engine::fused_linear_policy_loss_grad``."""
    whole = _one_sequence(chunk_rows, hidden.device)
    last_rows = hidden.shape[0] % chunk_rows
    last = _one_sequence(last_rows, hidden.device) if last_rows else whole

    def token_grads(start: int, stop: int, logp_c: torch.Tensor, _entropy_c):
        def cut(x):
            return None if x is None else x[start:stop]

        # The chunk as one packed sequence summed token by token: its g = m dl/dlp per token.
        _, _, g, _ = _policy_loss_forward(
            logp_c, logp_c if old_logp is None else cut(old_logp), cut(advantages), cut(mask), whole if stop - start == chunk_rows else last,
            cut(ref_logp), None, cut(is_weights), None, loss, clip_low, clip_high, dual_clip, delta, log_ratio_min,
            log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, kl_estimator, kl_clamp, kl_ratio_weight, 0.0, False,
            "token-sum", False, 0.0, 0, loss_backend,
        )  # fmt: skip
        # l -= c_H H: d loss / d H_t = -c_H w_b m_t
        grad_entropy = None
        if entropy_coef != 0.0:
            grad_entropy = entropy_weight[start:stop] * fp32(numeric(mask[start:stop])) * -entropy_coef
        return g * token_weight[start:stop], grad_entropy

    logp, entropy, dhidden, dweight, dbias = chunked_logprobs_with_grads(
        hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_rows, need_dhidden, need_dweight,
        token_grads, _EPILOGUE_FWD[lm_head_backend], _EPILOGUE_BWD[lm_head_backend],
    )  # fmt: skip
    return logp, entropy, dhidden, dweight, weight.new_empty(0) if dbias is None else dbias


_loss_grad_op = torch.library.custom_op(
    "rlhf_engine::fused_linear_policy_loss_grad", _loss_grad_forward, mutates_args=()
)


@_loss_grad_op.register_fake
def _(hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp, is_weights, token_weight, entropy_weight,
      temperature, ignore_index, with_entropy, chunk_rows, need_dhidden, need_dweight, *rest):  # fmt: skip
    n, f32 = hidden.shape[0], torch.float32
    return (
        hidden.new_empty(n, dtype=f32), hidden.new_empty(n if with_entropy else 0, dtype=f32),
        torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_dweight else weight.new_empty(0),
        torch.empty_like(bias) if need_dweight and bias is not None else weight.new_empty(0),
    )  # fmt: skip


# Positions in the op's 33 arguments (the signature of _loss_grad_forward)
_HIDDEN, _WEIGHT, _BIAS, _LM_HEAD_BACKEND, _LOSS_BACKEND = 0, 1, 2, 31, 32


class _OnePassGrad(torch.autograd.Function):
    """``(hidden, weight, bias, op_args) -> (zero 0-d, logp, entropy)``: the logprobs (not
    differentiable) and a zero whose gradient is the lm_head's, made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, op_args):
        # The body directly only when both of its backends are torch: a kernel backend of
        # the loss (cpp, say, beside a torch lm_head) must go through the custom op, whose
        # fake kernel is what runs on FakeTensors.
        eager = eager_torch(op_args[_LM_HEAD_BACKEND]) and eager_torch(op_args[_LOSS_BACKEND])
        body = _loss_grad_forward if eager else _loss_grad_op
        logp, entropy, dhidden, dweight, dbias = body(*op_args)
        ctx.mark_non_differentiable(logp, entropy)
        ctx.save_for_backward(dhidden, dweight, dbias)
        return hidden.new_zeros((), dtype=torch.float32), logp, entropy

    @staticmethod
    def backward(ctx, grad_zero, _grad_logp, _grad_entropy):
        dhidden, dweight, dbias = ctx.saved_tensors
        need = ctx.needs_input_grad

        def scaled(g):  # grad_zero is 1 for loss.backward(): the product is exact
            return (g * grad_zero).to(g.dtype)

        return (
            scaled(dhidden) if need[0] else None,
            scaled(dweight) if need[1] else None,
            scaled(dbias) if need[2] else None,
            None,
        )


def one_pass_logprobs(
    hidden2d, weight, bias, labels1d, temperature, ignore_index, with_entropy, chunk_rows, lm_head_backend,
    policy_args: tuple, on_policy: bool,
):
    """``(zero, logp [N], entropy [N] or [0])`` with the lm_head's gradient on ``zero``.

    ``policy_args``: :func:`rlhf_engine.ops.policy_loss.policy_loss_args` for the call
    (validated; its ``logp`` a stand-in of the labels' shape, and its ``old_logp`` too when
    ``on_policy``: the loss's ``old_logp=None``)."""
    (stand_in, old, adv, mask, cu, ref, _entropy, isw, norm_tensor, loss, clip_low, clip_high, dual_clip, delta,
     log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, kl_estimator, kl_clamp, kl_ratio_weight,
     entropy_coef, entropy_token_mean, aggregation, count_empty_seqs, norm_const, seq_len,
     loss_backend) = policy_args  # fmt: skip
    seg = Segments(cu, stand_in.numel(), seq_len)  # one sequence-id map for the uses below
    weights = token_weights(mask, seg, cu, norm_tensor, aggregation, norm_const, count_empty_seqs)
    entropy_weights = weights
    if entropy_token_mean:
        entropy_weights = _per_token(entropy_token_mean_weights(mask, seg.num_seqs), seg)
    op_args = (
        hidden2d, weight, bias, labels1d, None if on_policy else old.reshape(-1), _flat_per_token(adv, seg), mask.reshape(-1),
        None if ref is None else ref.reshape(-1), _flat_per_token(isw, seg), weights, entropy_weights, temperature,
        ignore_index, with_entropy, chunk_rows, hidden2d.requires_grad,
        weight.requires_grad or (bias is not None and bias.requires_grad), loss, clip_low, clip_high, dual_clip, delta,
        log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, kl_estimator, kl_clamp, kl_ratio_weight,
        entropy_coef, lm_head_backend, loss_backend,
    )  # fmt: skip
    return _OnePassGrad.apply(hidden2d, weight, bias, op_args)
