"""Public op ``token_logprobs``: per-token logprobs (and entropy) from logits.

Layers: validation and the public function here; two ``torch.library`` custom ops
(``rlhf_engine::token_logprobs_fwd`` and ``rlhf_engine::token_logprobs_bwd``) that dispatch
to a backend through ``_FWD`` / ``_BWD``; the backends themselves live in
``rlhf_engine.kernels.logprobs`` (Triton), ``rlhf_engine.torch_backend.logprobs`` (torch) and
``rlhf_engine.native.logprobs`` (cuda / cpp, in ``rlhf_engine._C``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from rlhf_engine._backend import eager_torch, lazy, resolve_backend
from rlhf_engine._checks import INDEX_DTYPES, check_number, check_same_device, check_tensor
from rlhf_engine.torch_backend.aggregation import host_readable
from rlhf_engine.torch_backend.logprobs import token_logprobs_bwd_torch, token_logprobs_fwd_torch

OP = "token_logprobs"
LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_FWD = {
    "torch": token_logprobs_fwd_torch,
    "triton": lazy("rlhf_engine.kernels.logprobs", "token_logprobs_fwd"),
    "cuda": lazy("rlhf_engine.native.logprobs", "token_logprobs_fwd"),
    "cpp": lazy("rlhf_engine.native.logprobs", "token_logprobs_fwd"),
}
_BWD = {
    "torch": token_logprobs_bwd_torch,
    "triton": lazy("rlhf_engine.kernels.logprobs", "token_logprobs_bwd"),
    "cuda": lazy("rlhf_engine.native.logprobs", "token_logprobs_bwd"),
    "cpp": lazy("rlhf_engine.native.logprobs", "token_logprobs_bwd"),
}


def _rows_view(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t [..., V]`` as a ``[D0, D1, V]`` view with ``stride(-1) == 1``, and whether it
    had to be copied.

    Leading dimensions of size 1 are dropped and neighbours that are contiguous with each
    other are merged; slices like ``logits[:, :-1]`` of a contiguous ``[B, T, V]`` then
    need two (size, stride) pairs and are read in place. A last dimension with stride != 1,
    or leading dimensions that still need more than two pairs, fall back to a copy
    (``.contiguous()`` / ``.reshape``).
    """
    vocab = t.shape[-1]
    copied = False
    if t.stride(-1) != 1 and vocab > 1:
        t, copied = t.contiguous(), True
    dims: list[tuple[int, int]] = []  # (size, stride), outermost first
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 2:
        t, copied = t.reshape(-1, vocab), True
        dims = [(t.shape[0], t.stride(0))]
    dims = [(1, 0)] * (2 - len(dims)) + dims
    (d0, s0), (d1, s1) = dims
    return t.as_strided((d0, d1, vocab), (s0, s1, 1), t.storage_offset()), copied


def _flat_labels(labels: torch.Tensor) -> torch.Tensor:
    return labels.reshape(-1).contiguous()


def _check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """For labels whose values are free to read (``host_readable``: CPU, with data). On
    CUDA this would be a host sync, so the kernels give NaN rows instead; fake tensors
    have no values to check."""
    if labels.numel():
        lo, hi = torch.aminmax(labels)  # one pass; the common all-in-range case stops here
        if int(lo) >= 0 and int(hi) < vocab:
            return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"{OP}: labels must be in [0, {vocab}) or equal ignore_index ({ignore_index}); "
            f"found {first} ({int(bad.sum())} such labels)"
        )


def _token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns fp32 ``(logp [...], entropy [...] or [0], lse [...])``. ``inplace_backward``
    is only recorded for the backward."""
    if host_readable(labels):
        _check_labels_in_range(labels, logits.shape[-1], ignore_index)
    rows, _ = _rows_view(logits)
    logp, entropy, lse = _FWD[backend](rows, _flat_labels(labels), temperature, ignore_index, with_entropy)
    return logp.view(labels.shape), entropy.view(labels.shape) if with_entropy else entropy, lse.view(labels.shape)


_token_logprobs_fwd = torch.library.custom_op(
    "rlhf_engine::token_logprobs_fwd", _token_logprobs_forward, mutates_args=()
)


@_token_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, inplace_backward, backend):
    f32 = dict(dtype=torch.float32)
    entropy = logits.new_empty(labels.shape if with_entropy else (0,), **f32)
    return logits.new_empty(labels.shape, **f32), entropy, logits.new_empty(labels.shape, **f32)


def _token_logprobs_backward(
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],
    dlogits: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> None:
    """Writes the gradient of ``logp`` (and of ``entropy`` when ``grad_entropy`` is given)
    with respect to ``logits`` into ``dlogits`` (same shape as ``logits``; may be it)."""
    rows, _ = _rows_view(logits)
    # Both backends get dlogits folded like logits (same [D0, D1]): a fresh contiguous
    # buffer can take any folding; in place, dlogits is logits and folds the same way.
    if dlogits.is_contiguous():
        out, copied = dlogits.view(rows.shape), False
    else:
        out, copied = _rows_view(dlogits)
    _BWD[backend](
        grad_logp.reshape(-1),
        None if grad_entropy is None else grad_entropy.reshape(-1),
        rows,
        _flat_labels(labels),
        lse.reshape(-1),
        None if entropy is None else entropy.reshape(-1),
        out,
        temperature,
        ignore_index,
    )
    if copied:  # only for in-place on a layout that could not be addressed directly
        dlogits.copy_(out.reshape(dlogits.shape))


_token_logprobs_bwd = torch.library.custom_op(
    "rlhf_engine::token_logprobs_bwd", _token_logprobs_backward, mutates_args=("dlogits",)
)


@_token_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, logits, labels, lse, entropy, dlogits, temperature, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, inplace_backward, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.config = (temperature, ignore_index, with_entropy, inplace_backward, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    return _run_backward(ctx, grad_logp, grad_entropy, _token_logprobs_bwd)


def _run_backward(ctx, grad_logp, grad_entropy, bwd):
    """The backward through ``bwd``: the custom op, or its body in eager (``eager_torch``)."""
    logits, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, with_entropy, inplace_backward, backend = ctx.config
    if inplace_backward:
        dlogits = logits
    else:
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    # For an entropy nobody used, the custom op's autograd passes zeros (the term adds
    # exactly 0) and the eager Function, which does not materialize gradients, None (the
    # term is skipped).
    bwd(
        grad_logp,
        grad_entropy if with_entropy else None,
        logits,
        labels,
        lse,
        entropy if with_entropy else None,
        dlogits,
        temperature,
        ignore_index,
        backend,
    )
    return dlogits, None, None, None, None, None, None


_token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerTokenLogprobs(torch.autograd.Function):
    """The custom op's body, context and backward as a classic Function (see ``eager_torch``).
    It returns only what the caller gets (``logp``, and ``entropy`` when asked for): every
    output autograd tracks costs it time. In place, the backward's write into the logits
    bumps their version counter, so autograd still raises if another node saved them."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _token_logprobs_forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)
        logp, entropy, _ = output
        with_entropy = ctx.config[2]
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        if grad_logp is None:  # only the entropy was used
            grad_logp = torch.zeros_like(ctx.saved_tensors[2])
        return _run_backward(ctx, grad_logp, grad_entropy, _token_logprobs_backward)


def _validate(logits, labels, temperature, ignore_index, return_entropy, inplace_backward) -> float:
    check_tensor(OP, "logits", logits, LOGITS_DTYPES)
    check_tensor(OP, "labels", labels, INDEX_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{OP}: logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{OP}: labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    check_same_device(OP, "logits", logits, labels=labels)
    temperature = check_number(OP, "temperature", temperature, positive=True)
    if temperature == math.inf:  # not math.isfinite: Dynamo cannot trace it on a symbolic float
        raise ValueError(f"{OP}: temperature must be finite, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, flag in (("return_entropy", return_entropy), ("inplace_backward", inplace_backward)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {type(flag).__name__}")
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        # The gradient would be the leaf's own storage: its .grad would alias its data.
        raise ValueError(f"{OP}: inplace_backward needs logits computed in the graph, not a leaf tensor")
    return temperature


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str | None = "auto",
):
    """Log-probability of each label token, and optionally the entropy of each row.

    With ``z = logits / temperature`` (the spec: ``rlhf_engine/reference/logprobs.py``)::

        logp    = z[label] - logsumexp(z)
        entropy = logsumexp(z) - sum(softmax(z) * z)

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32. May be a strided view such as
            ``logits[:, :-1]`` of a contiguous ``[B, T, V]``: it is read in place. (A last
            dimension with stride != 1, or leading dimensions that cannot be described by
            two (size, stride) pairs, are copied first.)
        labels: ``[...]`` = ``logits.shape[:-1]``, int64 / int32, in ``[0, V)`` or equal to
            ``ignore_index``.
        temperature: ``> 0``; use the sampling temperature so training logprobs match
            rollout logprobs.
        ignore_index: label value whose position gives ``logp = entropy = 0`` and a zero
            gradient row; its logits are never used.
        return_entropy: also return the entropy (differentiable).
        inplace_backward: the backward writes the logits gradient into the logits
            tensor's storage and returns it, saving one ``[..., V]`` buffer. **The logits
            are overwritten** during backward: nothing else may use them afterwards (the
            custom op marks them mutated, so autograd raises if another node saved them).
            ``logits`` must not be a leaf tensor.
        backend: ``"auto"`` (triton for CUDA tensors, torch otherwise), ``"triton"``,
            ``"torch"``, ``"cuda"`` / ``"cpp"`` (the kernels of ``rlhf_engine._C``, on
            CUDA / CPU tensors), or None (the ``RLHF_ENGINE_BACKEND`` environment
            variable, else auto). A backend that cannot run here raises.

    Returns:
        ``logp`` fp32 ``[...]``, or ``(logp, entropy)`` (both fp32 ``[...]``) when
        ``return_entropy``. Reductions accumulate in fp32; the gradient
        ``dlogits = (softmax(z) - onehot(label)) * (-dlogp) / T
        - dentropy * softmax(z) * (z - E_p[z]) / T`` is computed in fp32 and cast to the
        logits dtype. No fp32 ``[..., V]`` buffer is allocated.

    Raises:
        TypeError / ValueError naming the argument for bad input. Labels outside
        ``[0, V)`` (other than ``ignore_index``) raise ``ValueError`` on CPU tensors; on
        CUDA they are not checked (that would be a host sync): those rows give NaN
        logp, entropy and gradient.
    """
    temperature = _validate(logits, labels, temperature, ignore_index, return_entropy, inplace_backward)
    resolved = resolve_backend(OP, backend, logits.device)
    args = (logits, labels, temperature, ignore_index, return_entropy, inplace_backward, resolved)
    if eager_torch(resolved):
        return _EagerTokenLogprobs.apply(*args)
    logp, entropy, _ = _token_logprobs_fwd(*args)
    return (logp, entropy) if return_entropy else logp
