"""Backends ``cpp`` / ``cuda`` of the logprobs family: ``token_logprobs_fwd`` and
``token_logprobs_bwd`` (spec: ``rlhf_engine/reference/logprobs.py``; kernels:
``csrc/cpp/logprobs.cpp``, ``csrc/cuda/logprobs.cu``; contract: ``csrc/include/rlhf/logprobs.h``).

Same signatures, return values and semantics as the Triton launchers of
``rlhf_engine.kernels.logprobs``: logits arrive as a ``[D0, D1, V]`` view with unit stride
along ``V``, read in place through its two leading strides.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine.native.library import ABSENT, launch, ref

_LOG2E = math.log2(math.e)


def token_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher.

    logits: ``[D0, D1, V]`` fp32/bf16/fp16, ``stride(-1) == 1``, any leading strides.
    labels: ``[N = D0 * D1]`` int32/int64, contiguous.
    Returns fp32 ``logp [N]``, ``entropy [N]`` (``[0]`` unless ``with_entropy``) and
    ``lse [N]`` (logsumexp of ``logits / temperature``, 0 on ignored rows).
    """
    d0, d1, vocab = logits.shape
    n = d0 * d1
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    lse = torch.empty(n, **f32)
    if n == 0:
        return logp, entropy, lse
    launch(
        "token_logprobs_fwd", logits.device,
        ref(logits), d1, logits.stride(0), logits.stride(1), n, vocab, ref(labels),
        logp.data_ptr(), entropy.data_ptr() if with_entropy else 0, lse.data_ptr(),
        _LOG2E / temperature, 1.0 / temperature, ignore_index,
    )  # fmt: skip
    return logp, entropy, lse


def token_logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    dlogits: torch.Tensor,
    temperature: float,
    ignore_index: int,
    label_offset: int = 0,
) -> None:
    """Backward launcher: writes the logits gradient into ``dlogits``.

    grad_logp, grad_entropy (or None: no entropy term), lse, entropy: fp32 ``[N]``, any
    stride for the two grads; lse and entropy contiguous. logits, dlogits: ``[D0, D1, V]``
    views with ``stride(-1) == 1``, dlogits in the logits dtype (it may be ``logits``
    itself). labels: ``[N]`` contiguous. label_offset: the vocabulary id of column 0; a
    label outside ``[label_offset, label_offset + V)`` adds no one-hot term.
    """
    d0, d1, vocab = logits.shape
    n = d0 * d1
    if n == 0:
        return
    with_entropy = grad_entropy is not None
    launch(
        "token_logprobs_bwd", logits.device,
        ref(grad_logp), grad_logp.stride(0),
        ref(grad_entropy) if with_entropy else ABSENT, grad_entropy.stride(0) if with_entropy else 0,
        ref(logits), d1, logits.stride(0), logits.stride(1),
        ref(dlogits), dlogits.shape[1], dlogits.stride(0), dlogits.stride(1),
        n, vocab, ref(labels), lse.data_ptr(), entropy.data_ptr() if with_entropy else 0,
        _LOG2E / temperature, 1.0 / temperature, ignore_index, label_offset,
    )  # fmt: skip
