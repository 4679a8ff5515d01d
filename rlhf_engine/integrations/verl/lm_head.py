"""Drop-ins for verl's two fused lm_head logprob / entropy entry points, on
:func:`rlhf_engine.ops.fused_linear_logprobs`."""

from __future__ import annotations

import torch

from rlhf_engine.ops import fused_linear_logprobs

class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl's ``verl.utils.experimental.torch_functional.FusedLinearForPPO``
    (the ``fused_kernel_options.impl_backend="torch"|"liger"`` path), computed by
    :func:`rlhf_engine.ops.fused_linear_logprobs`.

    ``forward(hidden_states [T, H] or [B, T, H], vocab_weights [V, H], input_ids [T] or
    [B, T], temperature: float = 1.0) -> (log_probs, entropy)`` of ``input_ids``' shape,
    with ``z = hidden @ W.T / temperature``: ``log_probs = z[id] − logsumexp(z)`` (fp32)
    and ``entropy = logsumexp(z) − Σ softmax(z) z`` (in the hidden dtype, as verl's torch
    path returns it). Both are differentiable w.r.t. ``hidden_states`` and ``vocab_weights``.

    ``chunk_size`` bounds the logits held at once (tokens per chunk, as in verl);
    ``impl_backend`` ("torch" or "liger", verl's choice between its two kernels) is
    checked and then unused: ours replaces both. ``backend`` picks ours.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, backend: str = "auto"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"FusedLinearForPPO: impl_backend must be 'torch' or 'liger', got {impl_backend!r}")
        self.chunk_size, self.impl_backend, self.backend = chunk_size, impl_backend, backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() not in (2, 3):
            raise ValueError("FusedLinearForPPO: hidden_states must be a [T, H] or [B, T, H] tensor")
        log_probs, entropy = fused_linear_logprobs(
            hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=float(temperature),
            return_entropy=True, chunk_size=self.chunk_size, backend=self.backend,
        )
        return log_probs, entropy.to(hidden_states.dtype)


def linear_cross_entropy(hidden, weight, labels, temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None, *, backend: str = "auto"):
    """Drop-in for verl's ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
    (the ``impl_backend="triton"`` path): ``hidden [..., H]``, ``weight [V, H]``, ``labels
    [...]`` -> fp32 ``(log_probs [N], entropy [N])``, flattened like verl's (``N`` = the
    number of tokens), with the formulas of :class:`FusedLinearForPPO`.

    Only ``reduction="none"`` (what verl's models pass) and ``dist_process_group=None``
    (no vocabulary-parallel lm_head) are supported: anything else is a ValueError."""
    if reduction != "none":
        raise ValueError(f"linear_cross_entropy: only reduction='none' is supported, got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError("linear_cross_entropy: dist_process_group (a vocabulary-parallel lm_head) is not supported")
    log_probs, entropy = fused_linear_logprobs(
        hidden, weight, labels.to(torch.int64), temperature=float(temperature), return_entropy=True, backend=backend
    )
    return log_probs.reshape(-1), entropy.reshape(-1)


def patch_fused_linear() -> None:
    """Swap our :class:`FusedLinearForPPO` and :func:`linear_cross_entropy` into verl, for
    ``actor_rollout_ref.model.use_fused_kernels=True``: verl's HF model forwards import
    both at call time, so patching their modules suffices. Megatron's fused forwards
    import ``linear_cross_entropy`` at module load: those modules are patched too when
    they are already imported, so call this after building the model."""
    import sys

    import verl.utils.experimental.torch_functional as torch_functional
    import verl.utils.kernel.linear_cross_entropy as kernel_module

    torch_functional.FusedLinearForPPO = FusedLinearForPPO
    kernel_module.linear_cross_entropy = linear_cross_entropy
    for name in ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "linear_cross_entropy"):
            module.linear_cross_entropy = linear_cross_entropy
