"""Generation (batched, KV cache, logprobs captured on the fly) and scoring."""

from rlhf_engine.rollout.sampling import generate, sample_tokens
from rlhf_engine.rollout.scoring import response_logprobs, score_rollout
from rlhf_engine.rollout.types import Rollout, SamplingConfig

__all__ = ["Rollout", "SamplingConfig", "generate", "response_logprobs", "sample_tokens", "score_rollout"]
