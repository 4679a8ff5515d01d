"""Public functional API: the fused RL ops.

Each op validates its inputs, dispatches to a backend (``"triton"`` on CUDA, ``"torch"``
anywhere; see ``rlhf_engine._backend``) and is registered with ``torch.library`` so it
composes with ``torch.compile(fullgraph=True)``.

Every op also runs forward and backward on fake tensors (``FakeTensorMode``: shapes, no
data), so a memory planner can trace whole steps at real size with ``MemTracker``. A fake
tensor takes the path of device tensors (``torch_backend.aggregation.host_readable``): no
value is read, and validation that reads values (label range, ``cu_seqlens``, group ids)
is skipped while the shape / dtype checks run. ``"auto"`` picks triton for fake CUDA
tensors as for real ones; on that backend only the custom ops' fake functions run. Their
outputs are what ``MemTracker`` sees of those ops: a fused lm_head op's internal chunk of
logits (and its backward's fp32 ``d hidden``) is not in the trace. On a CPU-only torch
build, autograd through fake CUDA tensors aborts the process (no CUDA device guard):
trace with fake CPU tensors there. Tests: ``tests/test_fake_tensor.py``.
"""

from rlhf_engine.ops.advantages import group_advantages, masked_whiten
from rlhf_engine.ops.cov_losses import clip_cov_loss, kl_cov_loss
from rlhf_engine.ops.fused_linear import fused_linear_logprobs, fused_linear_policy_loss, sequence_logprobs
from rlhf_engine.ops.gae import discounted_returns, gae
from rlhf_engine.ops.kl import kl_penalty
from rlhf_engine.ops.logprobs import token_logprobs
from rlhf_engine.ops.policy_loss import policy_loss
from rlhf_engine.ops.value_loss import value_loss

__all__ = [
    "clip_cov_loss",
    "discounted_returns",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "gae",
    "group_advantages",
    "kl_cov_loss",
    "kl_penalty",
    "masked_whiten",
    "policy_loss",
    "sequence_logprobs",
    "token_logprobs",
    "value_loss",
]
