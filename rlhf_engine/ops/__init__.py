"""Public functional API: the fused RL ops.

Each op validates its inputs, dispatches to a backend (``"triton"`` on CUDA, ``"torch"``
anywhere; see ``rlhf_engine._backend``) and is registered with ``torch.library`` so it
composes with ``torch.compile(fullgraph=True)``.
"""

from rlhf_engine.ops.kl import kl_penalty  # noqa: E402,F401

from rlhf_engine.ops.logprobs import token_logprobs  # noqa: E402,F401

from rlhf_engine.ops.advantages import group_advantages, masked_whiten  # noqa: E402,F401
from rlhf_engine.ops.gae import discounted_returns, gae  # noqa: E402,F401
from rlhf_engine.ops.policy_loss import policy_loss  # noqa: E402,F401
from rlhf_engine.ops.value_loss import value_loss  # noqa: E402,F401
