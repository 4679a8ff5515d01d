"""Loss aggregation: per-token losses -> one scalar.

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

A sequence with no active token contributes nothing to the numerator; the sequence
means' count takes it or not by ``count_empty_seqs``: by default not for
``seq-mean-token-mean`` / ``-sum`` (verl's rule) and yes for ``seq-mean-token-sum-norm``
(``S * L_max``); ``count_empty_seqs=True`` counts every sequence (TRL's ``grpo`` divides by
all B), ``False`` only those with a valid token (verl's ``-norm``: non-empty sequences
times ``L_max``). ``normalizer`` replaces D (the
global token or sequence count under data parallelism / gradient accumulation). D = 0
(an all-masked batch) gives loss 0.

Every mode is linear in the per-sequence sums: ``loss = sum_b w_b L_b`` with ``w_b =
d loss / d L_b``, which is what the fused ops save for backward.

:func:`aggregate_ref` is the spec (per token, differentiable). The backends' version,
from per-sequence sums (``aggregate_partials``), and the torch backend's helpers live in
``rlhf_engine/torch_backend/aggregation.py``.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
SEQ_COUNT_AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum")


def counts_empty_seqs(aggregation: str, count_empty_seqs) -> bool:
    """Whether the sequence means count sequences without a valid token: ``count_empty_seqs``,
    or by default as the table above (only ``seq-mean-token-sum-norm`` counts them)."""
    return aggregation == "seq-mean-token-sum-norm" if count_empty_seqs is None else count_empty_seqs


def aggregate_ref(
    loss_tok: torch.Tensor, mask: torch.Tensor, bounds: list, aggregation: str, normalizer=None, max_len=None,
    count_empty_seqs=None,
) -> torch.Tensor:
    """The spec: ``loss_tok``, ``mask`` flat ``[N]``; ``bounds`` the ``(start, end)`` of each
    sequence; ``max_len`` the padded length (default: the longest sequence);
    ``count_empty_seqs`` see :func:`counts_empty_seqs`."""
    active = mask != 0
    masked = torch.where(active, loss_tok * mask.to(loss_tok.dtype), torch.zeros_like(loss_tok))
    sums = [masked[s:e].sum() for s, e in bounds]
    counts = [mask[s:e].to(loss_tok.dtype).sum() for s, e in bounds]
    sequences = len(bounds) if counts_empty_seqs(aggregation, count_empty_seqs) else sum(1 for c in counts if c > 0)
    if aggregation == "token-mean":
        numerator, local = sum(sums), sum(counts)
    elif aggregation == "seq-mean-token-mean":
        numerator = sum(s / c for s, c in zip(sums, counts) if c > 0)
        local = sequences
    elif aggregation == "seq-mean-token-sum":
        numerator, local = sum(sums), sequences
    elif aggregation == "seq-mean-token-sum-norm":
        longest = max((e - s for s, e in bounds), default=0)
        numerator, local = sum(sums), sequences * (longest if max_len is None else max_len)
    else:
        numerator, local = sum(sums), 1
    denominator = float(normalizer) if normalizer is not None else float(local)
    if denominator == 0:
        return loss_tok.new_zeros(()) + 0 * loss_tok.sum()
    return loss_tok.new_zeros(()) + numerator / denominator
