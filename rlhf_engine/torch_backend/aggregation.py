"""Torch backend helpers shared by the op families: loss aggregation and small-call tools.

The spec of the aggregation modes is ``rlhf_engine/reference/aggregation.py``
(:func:`~rlhf_engine.reference.aggregation.aggregate_ref`). Here: :class:`Segments`
(vectorized per-sequence sums over a flat token axis), :class:`TokenMask` /
:class:`Where` (exact selects, without ``torch.where``'s scalar loop on large CPU
tensors) and the small-call helpers (:func:`scalar`, :func:`host_scalar`,
:func:`numeric`, ...: at a few thousand tokens the number of ops is the cost;
:func:`host_readable` says where the CPU shortcuts that read values apply); and
:func:`aggregate_partials` (per-sequence sums -> loss and ``w``, shared by every backend;
:func:`aggregate_sums` wraps it for the torch backend's row buffers).
"""

from __future__ import annotations

import functools

import torch
from torch._subclasses.fake_tensor import FakeTensor

from rlhf_engine.reference.aggregation import SEQ_COUNT_AGGREGATIONS, counts_empty_seqs


class Segments:
    """Per-sequence views and reductions over the flat token axis ``[N]``, without Python loops.

    ``seq_len > 0``: a padded batch, ``N = S * seq_len``: tokens are viewed as ``[S, T]``,
    a per-sequence value broadcasts as ``[S, 1]`` and sums reduce the last axis (no copy,
    no index). ``seq_len == 0``: packed, sequence b is ``[cu_seqlens[b], cu_seqlens[b+1])``;
    tokens stay ``[N]`` and per-sequence values are gathered by sequence id.
    """

    def __init__(self, cu_seqlens: torch.Tensor, num_tokens: int, seq_len: int):
        self.num_seqs = cu_seqlens.numel() - 1
        self.num_tokens = num_tokens
        self.seq_len = seq_len
        self.shape = (self.num_seqs, seq_len) if seq_len else (num_tokens,)
        if not seq_len:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            seq_ids = torch.arange(self.num_seqs, device=cu_seqlens.device)
            self.ids = torch.repeat_interleave(seq_ids, lengths, output_size=num_tokens)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Contiguous tokens (``[N]``, or ``[S, T]`` when padded) -> ``[S, T]`` (padded) or
        ``[N]`` (packed): a view, or ``x`` itself when it has that shape."""
        return x if x.shape == self.shape else x.view(self.shape)

    def expand(self, per_seq: torch.Tensor) -> torch.Tensor:
        """``[S]`` -> each sequence's value on its tokens, broadcasting against :meth:`tokens`
        (``[S, 1]`` when padded, gathered ``[N]`` when packed)."""
        return per_seq[:, None] if self.seq_len else per_seq.index_select(0, self.ids)

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        """``[N]`` (per token; wins when ``N == S``) or ``[S]`` (per sequence), as :meth:`tokens`
        or :meth:`expand` give it."""
        return self.tokens(x) if x.numel() == self.num_tokens else self.expand(x)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of ``[..., *shape]`` -> ``[..., S]``."""
        if self.seq_len:
            return x.sum(-1)
        return x.new_zeros(x.shape[:-1] + (self.num_seqs,)).index_add_(x.dim() - 1, self.ids, x)

    def amin(self, x: torch.Tensor) -> torch.Tensor:
        """Minimum per sequence; +inf for an empty one (callers mask with +inf)."""
        if self.seq_len:
            return x.amin(-1)
        return x.new_full((self.num_seqs,), float("inf")).scatter_reduce_(0, self.ids, x, "amin")

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        if self.seq_len:
            return x.amax(-1)
        return x.new_full((self.num_seqs,), float("-inf")).scatter_reduce_(0, self.ids, x, "amax")


# Tokens per pass of a torch backend over a large CPU batch: a pass allocates a few dozen
# temporaries the size of its tokens; at 128 KiB each they come from the heap's free lists
# and stay in L2. Whole-batch temporaries of a million tokens are fresh pages the OS
# faults in at every call (glibc returns freed memory to it), which costs as much as the
# op itself and depends on what the process did before.
CPU_PASS_TOKENS = 1 << 15


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host, for free: a CPU tensor outside
    torch.compile, with data. A ``FakeTensor`` has a shape, a dtype and a device but no
    data (a memory planner traces whole training steps on them under ``FakeTensorMode``,
    where reading a value raises): it takes the path of device tensors, which read nothing.
    """
    return t.is_cpu and not torch.compiler.is_compiling() and not isinstance(t, FakeTensor)


def token_passes(cu_seqlens: torch.Tensor, num_tokens: int, seq_len: int) -> list[tuple[slice, slice]]:
    """``(token slice, sequence slice)`` pairs covering the batch in whole sequences, about
    :data:`CPU_PASS_TOKENS` tokens each (at least one sequence), for CPU tensors with values
    (:func:`host_readable`: packed passes read ``cu_seqlens``); one pair for the whole batch
    otherwise. ``seq_len``: the padded length, 0 when packed."""
    num_seqs = cu_seqlens.numel() - 1
    if num_tokens <= CPU_PASS_TOKENS or not host_readable(cu_seqlens):
        return [(slice(0, num_tokens), slice(0, num_seqs))]
    if seq_len:
        step = max(1, CPU_PASS_TOKENS // seq_len)
        return [
            (slice(b * seq_len, min(b + step, num_seqs) * seq_len), slice(b, min(b + step, num_seqs)))
            for b in range(0, num_seqs, step)
        ]
    cu = cu_seqlens.tolist()
    passes, first = [], 0
    for b in range(1, num_seqs + 1):
        if cu[b] - cu[first] >= CPU_PASS_TOKENS or b == num_seqs:
            passes.append((slice(cu[first], cu[b]), slice(first, b)))
            first = b
    return passes


# Selecting without torch.where's cost. On the CPU, torch.where (and masked_fill) is a
# scalar loop: ~3 ns an element, ~2 ms per 1M fp32 elements, 25x a vectorized elementwise
# op. A condition turned once into int32 lanes (-1 where true, 0 where false) selects fp32
# values exactly with vectorized bitwise ops: NaN / inf where the condition is false still
# become +0.0 (or the other operand), values where it holds are untouched bit for bit. That
# takes 2-5 ops where torch.where takes one, and at a few thousand elements the number of
# ops is the cost (each ~1-2 us), so small selections, and every non-CPU one, use
# torch.where. The size that decides is the selection's (the condition broadcast against
# its operands): one mask of a few thousand tokens applied to a [rows, tokens] buffer is
# a large selection.
WHERE_MAX_CPU = 8192  # elements; measured crossover 8K-16K fp32 on a 1-thread EPYC


def scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d fp32 tensor on ``like``'s device, an operand for ``torch.where``
    (``out=`` takes no number), ``addcmul`` and elementwise ops: cached for the CPU, where
    a Python number costs a scalar-tensor conversion per call (~1 us, as much as the op
    over a few thousand tokens); made per call elsewhere, and for a ``FakeTensor`` (the
    cache must hold real tensors only: a fake one made under ``FakeTensorMode`` would be
    handed to later real calls). Never written to."""
    if not like.is_cpu or isinstance(like, FakeTensor):
        return like.new_full((), value, dtype=torch.float32)
    return _cpu_scalar(value)


@functools.lru_cache(maxsize=64)  # bounded: options such as clip ranges may follow a schedule
def _cpu_scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def numeric(mask: torch.Tensor) -> torch.Tensor:
    """A mask ready to convert to numbers: a bool tensor's bytes as uint8 (0 / 1), other
    dtypes as they are. On the CPU a bool -> fp32 cast or copy is a scalar loop, about 6x
    slower than the vectorized uint8 -> fp32 one (0.34 ms vs 0.05 ms at 1M tokens)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as fp32: itself when it already is (a no-op ``.to`` is still a call, ~0.4 us)."""
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def half_square(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x * x / 2`` in one op (the halving is exact)."""
    return torch.addcmul(scalar(0.0, x), x, x, value=0.5, out=out)


def host_scalar(t: torch.Tensor):
    """A 0-d tensor as a Python float where :func:`host_readable` (a CPU tensor with data,
    outside torch.compile), else itself.

    Reading a CPU tensor syncs nothing, and arithmetic on a 0-d tensor costs about a
    microsecond an op, as much as an elementwise op over a few thousand tokens: scalar
    chains (counts, means, denominators) run on host floats there and on 0-d tensors on
    other devices (no sync) and on fake tensors (no value to read)."""
    if host_readable(t):
        return t.item()
    return t


def at_least(x, low: float):
    """``max(x, low)`` for a host float or a 0-d tensor (see :func:`host_scalar`)."""
    return max(x, low) if isinstance(x, float) else x.clamp_min(low)


def if_counted(x: torch.Tensor, count) -> torch.Tensor:
    """``x`` where ``count`` > 0, else zeros (the metrics of an all-masked batch); ``count``
    a host float or a 0-d tensor (see :func:`host_scalar`)."""
    if isinstance(count, float):
        return x if count > 0 else torch.zeros_like(x)
    return torch.where(count > 0, x, scalar(0.0, x))


class Where:
    """A bool condition selecting fp32 tensors exactly like ``torch.where``, as int32 lanes
    on large CPU selections (see above)."""

    def __init__(self, cond: torch.Tensor):
        self.cond = cond
        self._lanes = None

    def lanes(self, size: int) -> torch.Tensor | None:
        """The condition's int32 lanes when a selection of ``size`` elements (the condition
        broadcast against the operands) is a large CPU one (built then, once), or when they
        exist already (a select is then one to three bitwise ops), else None."""
        if self._lanes is None:
            if not self.cond.is_cpu or size <= WHERE_MAX_CPU:
                return None
            self._lanes = self.cond.to(torch.int32).neg_()
        return self._lanes

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.where(cond, x, 0.0)``."""
        lanes = self.lanes(max(self.cond.numel(), x.numel()))
        if lanes is None:
            return torch.where(self.cond, x, scalar(0.0, x))
        return (_bits(x) & lanes).view(torch.float32)

    def select(self, a: torch.Tensor, b) -> torch.Tensor:
        """``torch.where(cond, a, b)``; ``b`` a tensor or a number."""
        b = b if isinstance(b, torch.Tensor) else scalar(b, a)
        lanes = self.lanes(max(self.cond.numel(), a.numel(), b.numel()))
        if lanes is None:
            return torch.where(self.cond, a, b)
        b_bits = _bits(b)
        # a & lanes broadcasts (not in place): the operands may be smaller than the condition
        return ((_bits(a) ^ b_bits) & lanes).bitwise_xor_(b_bits).view(torch.float32)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


class TokenMask:
    """A loss mask (bool, or float / int weights ``m``; ``m != 0`` is active) for the torch
    backends: :meth:`apply` is ``where(m != 0, x * m, 0)``, so masked tokens contribute
    exactly 0 even where their values are NaN or inf."""

    def __init__(self, mask: torch.Tensor):
        self.active = Where(mask if mask.dtype == torch.bool else mask != 0)
        # A bool mask weighs every active token 1: x * 1 is x, so no multiply.
        self.weights = None if mask.dtype == torch.bool else mask.to(torch.float32)

    def weigh(self, x: torch.Tensor) -> torch.Tensor:
        """``x * m`` for float weights, ``x`` itself for a bool mask (no select: for values
        already 0 where the mask is)."""
        return x if self.weights is None else x * self.weights

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Masked fp32 ``x`` (a new tensor unless ``x`` broadcasts to it)."""
        return self.active.keep(self.weigh(x))

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """In place on a fp32 ``[..., *token shape]`` buffer."""
        if self.weights is not None:
            x.mul_(self.weights)
        lanes = self.active.lanes(x.numel())
        if lanes is None:
            return torch.where(self.active.cond, x, scalar(0.0, x), out=x)
        _bits(x).bitwise_and_(lanes)
        return x


def aggregate_sums(sums, aggregation, cu_seqlens, seq_len, normalizer, normalizer_const, count_empty_seqs=None):
    """The torch backends' masked per-sequence sums ``[rows, S]`` (row 0 the loss, row 1
    the token count) -> ``(loss 0-d, w [S], totals [rows], count)``: the batch total of
    every row for the metrics, and the token count (as :func:`host_scalar` gives it)
    reduced once for the denominator and the means."""
    totals = sums.sum(-1)
    count = host_scalar(totals[1])
    total, w = aggregate_partials(
        sums[0], sums[1], aggregation, cu_seqlens, seq_len, normalizer, normalizer_const, count, count_empty_seqs
    )
    return total, w, totals, count


def aggregate_partials(
    loss_sums, counts, aggregation, cu_seqlens, seq_len, normalizer, normalizer_const, count=None,
    count_empty_seqs=None,
):
    """Per-sequence ``L_b``, ``M_b`` (fp32 ``[S]``) -> ``(loss 0-d, w [S])``, no device sync
    (the denominator is a host float for CPU tensors, see :func:`host_scalar`).

    ``seq_len``: the padded length, 0 when packed. ``normalizer``: a tensor denominator or
    None; ``normalizer_const``: a number denominator, or 0 for none. ``count``: ``sum_b
    M_b`` when the caller has it already (as :func:`host_scalar` gives it).
    ``count_empty_seqs``: whether the sequence means count sequences without a valid token
    (None: the aggregation's default, ``reference.aggregation.counts_empty_seqs``).
    """
    every_seq = counts_empty_seqs(aggregation, count_empty_seqs)
    if normalizer is not None:
        denominator = host_scalar(normalizer.to(torch.float32))
    elif normalizer_const > 0:
        denominator = normalizer_const
    elif aggregation == "token-mean":
        denominator = host_scalar(counts.sum()) if count is None else count
    elif aggregation in SEQ_COUNT_AGGREGATIONS + ("seq-mean-token-sum-norm",):
        sequences = float(counts.numel()) if every_seq else host_scalar((counts > 0).sum().to(torch.float32))
        if aggregation == "seq-mean-token-sum-norm":
            longest = seq_len if seq_len else host_scalar((cu_seqlens[1:] - cu_seqlens[:-1]).amax().to(torch.float32))
            denominator = sequences * longest
        else:
            denominator = sequences
    else:
        denominator = 1.0
    if isinstance(denominator, torch.Tensor):
        inverse = torch.where(denominator > 0, denominator.reciprocal(), scalar(0.0, denominator))
    else:
        inverse = 1.0 / denominator if denominator > 0 else 0.0
    if aggregation == "seq-mean-token-mean":
        # 1 / M_b, and 0 for a sequence without a valid token (1 / inf)
        w = torch.where(counts > 0, counts, scalar(float("inf"), counts)).reciprocal_().mul_(inverse)
    elif isinstance(inverse, float):
        w = torch.full_like(counts, inverse)
    else:
        w = torch.full_like(counts, 1.0) * inverse
    return torch.dot(w, loss_sums), w
