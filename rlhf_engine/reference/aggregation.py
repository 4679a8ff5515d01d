"""Loss aggregation (ALGORITHMS.md section 4): per-token losses -> one scalar.

With ``L_b = sum_t l_t m_t`` (the masked loss sum of sequence b), ``M_b = sum_t m_t``,
``S`` sequences and ``L_max`` the padded length (the longest sequence when packed):

===========================  =====================================  ==========================
aggregation                  loss                                   local denominator D
===========================  =====================================  ==========================
``token-mean``               ``sum_b L_b / D``                      ``sum_b M_b``
``seq-mean-token-mean``      ``sum_{b: M_b>0} (L_b / M_b) / D``     sequences with ``M_b > 0``
``seq-mean-token-sum``       ``sum_b L_b / D``                      sequences with ``M_b > 0``
``seq-mean-token-sum-norm``  ``sum_b L_b / D``                      ``S * L_max``
``token-sum``                ``sum_b L_b / D``                      ``1``
===========================  =====================================  ==========================

A sequence with no active token contributes nothing: not to the numerator and, for the
sequence means, not to the count either (verl's current rule; TRL's ``grpo`` divides by
all B, which a caller gets by passing ``normalizer=B``). ``normalizer`` replaces D (the
global token or sequence count under data parallelism / gradient accumulation). D = 0
(an all-masked batch) gives loss 0.

Every mode is linear in the per-sequence sums: ``loss = sum_b w_b L_b`` with ``w_b =
d loss / d L_b``, which is what the fused ops save for backward.

Three things live here: :func:`aggregate_ref` (the spec, per token, differentiable),
:class:`Segments` (vectorized per-sequence sums over a flat token axis, for the torch
backends) and :func:`aggregate_partials` (per-sequence sums -> loss and ``w``, shared by
every backend).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
SEQ_COUNT_AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum")


def aggregate_ref(loss_tok: torch.Tensor, mask: torch.Tensor, bounds: list, aggregation: str, normalizer=None, max_len=None) -> torch.Tensor:
    """The spec: ``loss_tok``, ``mask`` flat ``[N]``; ``bounds`` the ``(start, end)`` of each
    sequence; ``max_len`` the padded length (default: the longest sequence)."""
    active = mask != 0
    masked = torch.where(active, loss_tok * mask.to(loss_tok.dtype), torch.zeros_like(loss_tok))
    sums = [masked[s:e].sum() for s, e in bounds]
    counts = [mask[s:e].to(loss_tok.dtype).sum() for s, e in bounds]
    if aggregation == "token-mean":
        numerator, local = sum(sums), sum(counts)
    elif aggregation == "seq-mean-token-mean":
        numerator = sum(s / c for s, c in zip(sums, counts) if c > 0)
        local = sum(1 for c in counts if c > 0)
    elif aggregation == "seq-mean-token-sum":
        numerator, local = sum(sums), sum(1 for c in counts if c > 0)
    elif aggregation == "seq-mean-token-sum-norm":
        longest = max((e - s for s, e in bounds), default=0)
        numerator, local = sum(sums), len(bounds) * (longest if max_len is None else max_len)
    else:
        numerator, local = sum(sums), 1
    denominator = float(normalizer) if normalizer is not None else float(local)
    if denominator == 0:
        return loss_tok.new_zeros(()) + 0 * loss_tok.sum()
    return loss_tok.new_zeros(()) + numerator / denominator


class Segments:
    """Per-sequence reductions over a flat token axis ``[N]`` without Python loops.

    ``seq_len > 0``: a padded batch, ``N = S * seq_len`` (reshape-and-reduce, the fast
    path). ``seq_len == 0``: packed, sequence b is ``[cu_seqlens[b], cu_seqlens[b+1])``.
    """

    def __init__(self, cu_seqlens: torch.Tensor, num_tokens: int, seq_len: int):
        self.num_seqs = cu_seqlens.numel() - 1
        self.seq_len = seq_len
        if not seq_len:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            seq_ids = torch.arange(self.num_seqs, device=cu_seqlens.device)
            self.ids = torch.repeat_interleave(seq_ids, lengths, output_size=num_tokens)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(self.num_seqs, self.seq_len)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.seq_len:
            return self._rows(x).sum(1)
        return x.new_zeros(self.num_seqs).index_add_(0, self.ids, x)

    def amin(self, x: torch.Tensor) -> torch.Tensor:
        """Minimum per sequence; +inf for an empty one (callers mask with +inf)."""
        if self.seq_len:
            return self._rows(x).amin(1)
        return x.new_full((self.num_seqs,), float("inf")).scatter_reduce_(0, self.ids, x, "amin")

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        if self.seq_len:
            return self._rows(x).amax(1)
        return x.new_full((self.num_seqs,), float("-inf")).scatter_reduce_(0, self.ids, x, "amax")

    def expand(self, per_seq: torch.Tensor) -> torch.Tensor:
        """``[S]`` -> ``[N]``: each sequence's value on each of its tokens."""
        if self.seq_len:
            return per_seq[:, None].expand(self.num_seqs, self.seq_len).reshape(-1)
        return per_seq[self.ids]


def aggregate_partials(loss_sums, counts, aggregation, cu_seqlens, seq_len, normalizer, normalizer_const):
    """Per-sequence ``L_b``, ``M_b`` (fp32 ``[S]``) -> ``(loss 0-d, w [S])``, no host sync.

    ``seq_len``: the padded length, 0 when packed. ``normalizer``: a tensor denominator or
    None; ``normalizer_const``: a number denominator, or 0 for none.
    """
    if aggregation == "token-mean":
        local = counts.sum()
    elif aggregation in SEQ_COUNT_AGGREGATIONS:
        local = (counts > 0).sum().to(torch.float32)
    elif aggregation == "seq-mean-token-sum-norm":
        longest = seq_len if seq_len else (cu_seqlens[1:] - cu_seqlens[:-1]).amax().to(torch.float32)
        local = counts.numel() * longest
    else:
        local = 1.0
    if normalizer is not None:
        denominator = normalizer.to(torch.float32)
    elif normalizer_const > 0:
        denominator = normalizer_const
    else:
        denominator = local
    if isinstance(denominator, torch.Tensor):
        inverse = torch.where(denominator > 0, denominator.reciprocal(), 0.0)
    else:
        inverse = 1.0 / denominator if denominator > 0 else 0.0
    if aggregation == "seq-mean-token-mean":
        w = torch.where(counts > 0, counts.reciprocal(), 0.0) * inverse
    else:
        w = torch.full_like(counts, 1.0) * inverse
    return (w * loss_sums).sum(), w
