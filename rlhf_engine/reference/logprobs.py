"""Per-token logprobs and entropy: the spec.

:func:`token_logprobs_ref`: short, differentiable by autograd, used by the tests in
float64. The torch backend (row chunks, no fp32 copy of the whole logits) is
``rlhf_engine/torch_backend/logprobs.py``.
"""

from __future__ import annotations

import torch


def token_logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Spec of ``token_logprobs``.

    logits ``[..., V]`` (any float dtype), labels ``[...]`` integer with values in
    ``[0, V)`` or ``ignore_index``. With ``z = logits / temperature``:
    ``logp = z[label] - logsumexp(z)``, ``entropy = logsumexp(z) - sum(softmax(z) * z)``;
    both 0 where ``label == ignore_index``. Computed in fp32, or in float64 for float64
    logits; returns ``logp`` or ``(logp, entropy)`` in that dtype.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    ignored = labels == ignore_index
    safe_labels = torch.where(ignored, torch.zeros_like(labels), labels).long()
    logp = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - lse
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not return_entropy:
        return logp
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
    return logp, torch.where(ignored, torch.zeros_like(entropy), entropy)
