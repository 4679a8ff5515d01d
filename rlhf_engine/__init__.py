"""rlhf_engine: a performance-first RLHF engine for PyTorch.

``from rlhf_engine import ops`` gives the fused RL ops (per-token logprobs, KL penalties,
PPO/GRPO-family losses, advantages). Importing touches no GPU and needs no CUDA.
"""

from rlhf_engine import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
