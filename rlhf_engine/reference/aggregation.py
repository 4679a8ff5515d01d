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

A sequence with no active token contributes nothing: not to the numerator and, for the
sequence means, not to the count either (verl's current rule; TRL's ``grpo`` divides by
all B, which a caller gets by passing ``normalizer=B``). ``normalizer`` replaces D (the
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
