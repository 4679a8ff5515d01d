"""Evaluating a policy: mean score of its samples, and its KL to a reference."""

from __future__ import annotations

import torch

from rlhf_engine.algos.common import sample_responses
from rlhf_engine.algos.rl import ScoreFn
from rlhf_engine.models import PolicyModel
from rlhf_engine.rollout import SamplingConfig, response_logprobs


def evaluate_policy(
    policy: PolicyModel, prompts: list[list[int]], score_fn: ScoreFn, sampling: SamplingConfig, *,
    reference: PolicyModel | None = None, generator: torch.Generator | None = None,
) -> dict[str, float]:  # fmt: skip
    """One sample per prompt at the policy's sampling settings.

    Returns ``score`` (mean of ``score_fn``) and, with a ``reference``, ``kl``: the mean over
    samples of ``Σ_t (lp_t − ref_t)``, the Monte-Carlo estimate of KL(policy ‖ reference)
    per sequence.
    """
    rollout = sample_responses(policy, prompts, 1, sampling, generator)
    with torch.no_grad():
        out = {"score": float(score_fn(*rollout.token_lists()).float().mean())}
        if reference is not None:
            reference.eval()
            ref = response_logprobs(reference, rollout, temperature=sampling.temperature)
            out["kl"] = float(((rollout.logprobs - ref) * rollout.response_mask).sum(dim=1).mean())
    return out
