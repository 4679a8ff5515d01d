"""``value_loss``: fused clipped value (critic) loss with aggregation and metrics."""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_engine import _checks
from rlhf_engine._backend import eager_torch, lazy, resolve_backend
from rlhf_engine.ops._seq_loss import dense, normalizer_args, seq_loss_backward, token_layout
from rlhf_engine.reference.aggregation import AGGREGATIONS
from rlhf_engine.reference.value_loss import METRICS, PARTIALS
from rlhf_engine.torch_backend.aggregation import aggregate_partials
from rlhf_engine.torch_backend.value_loss import value_loss_torch

OP = "value_loss"

_TRITON_FWD = lazy("rlhf_engine.kernels.value_loss", "value_loss_fwd")
# The METRICS are the masked means of these (adjacent) columns, a slice: no index tensor.
_METRIC_COLUMNS = slice(PARTIALS.index("clipped"), PARTIALS.index("values") + 1)
assert PARTIALS[_METRIC_COLUMNS] == ("clipped", "values") and METRICS == ("clipfrac", "values_mean")


def _value_loss_forward(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cu_seqlens: torch.Tensor, normalizer: Optional[torch.Tensor], clip: Optional[float], aggregation: str,
    normalizer_const: float, seq_len: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(loss 0-d, metrics [len(METRICS)], g (values' shape), w [S])``, all fp32. The body of
    ``rlhf_engine::value_loss_fwd``."""
    if backend == "torch":
        return value_loss_torch(
            values, old_values, returns, mask, cu_seqlens, normalizer, clip=clip, aggregation=aggregation,
            normalizer_const=normalizer_const, seq_len=seq_len,
        )
    g, partials = _TRITON_FWD(values, old_values, returns, mask, cu_seqlens, clip=clip, seq_len=seq_len)
    loss_sums, counts = partials[:, PARTIALS.index("loss")], partials[:, PARTIALS.index("count")]
    total, w = aggregate_partials(loss_sums, counts, aggregation, cu_seqlens, seq_len, normalizer, normalizer_const)
    totals = partials.sum(0)
    count = totals[PARTIALS.index("count")]
    metrics = torch.where(count > 0, totals[_METRIC_COLUMNS] / count, 0.0)
    return total, metrics, g, w


_value_loss_fwd = torch.library.custom_op("rlhf_engine::value_loss_fwd", _value_loss_forward, mutates_args=())


@_value_loss_fwd.register_fake
def _(values, old_values, returns, mask, cu_seqlens, *args):
    f32 = torch.float32
    return (
        values.new_empty((), dtype=f32), values.new_empty(len(METRICS), dtype=f32),
        values.new_empty(values.shape, dtype=f32), values.new_empty(cu_seqlens.shape[0] - 1, dtype=f32),
    )


# Positions in the op's 11 arguments (the signature of _value_loss_forward)
_CU, _SEQ_LEN, _BACKEND = 4, 9, 10


class _ValueLoss(torch.autograd.Function):
    """Autograd around the custom op: ``(values, op_args) -> (loss, metrics)``, with
    ``op_args`` the op's 11 arguments (``values`` among them) in one tuple; a Function
    with one differentiable input for the reasons given in ``ops/policy_loss.py``. The eager
    torch backend calls the op's body directly (``eager_torch``)."""

    @staticmethod
    def forward(ctx, values, op_args):
        ctx.eager = eager_torch(op_args[_BACKEND])
        total, metrics, g, w = (_value_loss_forward if ctx.eager else _value_loss_fwd)(*op_args)
        ctx.mark_non_differentiable(metrics)
        ctx.save_for_backward(g, w, op_args[_CU])
        ctx.dtype, ctx.seq_len, ctx.backend = values.dtype, op_args[_SEQ_LEN], op_args[_BACKEND]
        return total, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        g, w, cu_seqlens = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_values = seq_loss_backward(grad_loss, w, g, cu_seqlens, 1.0, ctx.seq_len, ctx.dtype, ctx.backend, ctx.eager)
        return grad_values, None


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
    clip: float | None = 0.2, aggregation: str = "token-mean", normalizer=None, cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (PPO), fused: per-token loss, aggregation and metrics in one kernel.

    ``l_t = 1/2 max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2)``; ``clip=None``
    drops the clipped term. Aggregation, ``normalizer`` and the treatment of masked
    sequences are those of :func:`policy_loss` (``reference/aggregation.py``).

    Args:
        values: ``[B, T]`` (padded) or ``[N]`` with ``cu_seqlens`` (packed), any float
            dtype: the critic's values. The only input that receives a gradient.
        old_values, returns: same shape, any float dtype: values at rollout time and the
            returns (e.g. ``A + V_old`` from GAE); constants.
        mask: same shape, bool or float weights.
        cu_seqlens: int32/int64 ``[S+1]`` sequence boundaries of a packed batch.

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d fp32; ``metrics`` a dict of 0-d fp32 tensors
        (no host sync): ``clipfrac`` (fraction of valid tokens where the clipped term is
        larger) and ``values_mean`` (masked mean of ``V``); 0 when every token is masked.
    """
    _checks.check_tensor(OP, "values", values)
    layout = token_layout(OP, "values", values, cu_seqlens)
    _checks.check_tensor(OP, "old_values", old_values)
    _checks.check_tensor(OP, "returns", returns)
    _checks.check_tensor(OP, "mask", mask, _checks.MASK_DTYPES)
    _checks.check_same_shape(OP, "values", values, old_values=old_values, returns=returns, mask=mask)
    _checks.check_same_device(OP, "values", values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None:
        clip = _checks.check_number(OP, "clip", clip, nonnegative=True)
    _checks.check_choice(OP, "aggregation", aggregation, AGGREGATIONS)
    norm_tensor, norm_const = normalizer_args(OP, normalizer, values.device)
    chosen = resolve_backend(OP, backend, values.device)
    values = dense(values)
    total, metrics = _ValueLoss.apply(values, (
        values, dense(old_values), dense(returns), dense(mask), layout.cu_seqlens, norm_tensor, clip, aggregation,
        norm_const, layout.seq_len, chosen,
    ))
    return total, dict(zip(METRICS, metrics.unbind(0)))
