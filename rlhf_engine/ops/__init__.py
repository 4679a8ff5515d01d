"""Public functional API: the fused RL ops.

Each op validates its inputs, dispatches to a backend (``"triton"`` on CUDA, ``"torch"``
anywhere; see ``rlhf_engine._backend``) and is registered with ``torch.library`` so it
composes with ``torch.compile(fullgraph=True)``.
"""

from rlhf_engine.ops.advantages import group_advantages, masked_whiten
from rlhf_engine.ops.fused_linear import fused_linear_logprobs, fused_linear_policy_loss, sequence_logprobs
from rlhf_engine.ops.gae import discounted_returns, gae
from rlhf_engine.ops.kl import kl_penalty
from rlhf_engine.ops.logprobs import token_logprobs
from rlhf_engine.ops.policy_loss import policy_loss
from rlhf_engine.ops.value_loss import value_loss

__all__ = [
    "discounted_returns",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_whiten",
    "policy_loss",
    "sequence_logprobs",
    "token_logprobs",
    "value_loss",
]
