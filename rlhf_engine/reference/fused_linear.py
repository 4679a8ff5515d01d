"""Spec of the fused lm_head ops: the linear layer, then the token logprobs.

``logits = hidden @ weight.T + bias`` materialized in full, then
:func:`rlhf_engine.reference.logprobs.token_logprobs_ref`. Differentiable by autograd;
tests evaluate it in float64.
"""

from __future__ import annotations

import torch

from rlhf_engine.reference.logprobs import token_logprobs_ref


def fused_linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]`` or None, labels ``[...]`` ->
    ``logp [...]`` (and ``entropy [...]``), in fp32 (float64 for float64 inputs)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs_ref(logits, labels, temperature, ignore_index, return_entropy)


def sequence_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_t logp_t · mask_t`` per sequence: ``[B]`` for padded ``[B, T]`` inputs, or
    ``[S]`` for packed ``[N]`` inputs with ``cu_seqlens`` (``[S + 1]``)."""
    logp = fused_linear_logprobs_ref(hidden, weight, labels, bias, temperature, ignore_index)
    weighted = logp * mask.to(logp.dtype)
    if cu_seqlens is None:
        return weighted.sum(dim=-1)
    bounds = cu_seqlens.tolist()
    return torch.stack([weighted[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
