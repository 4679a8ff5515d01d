"""Scoring a rollout: policy and reference logprobs, critic values, rewards."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from rlhf_engine.models.heads import ScalarHeadModel
from rlhf_engine.models.policy import PolicyModel
from rlhf_engine.rollout.types import Rollout


def response_logprobs(policy: PolicyModel, rollout: Rollout, *, temperature: float, return_entropy: bool = False):
    """Training-side logprobs of ``rollout``'s responses under ``policy`` at ``temperature``.

    Returns:
        fp32 ``[B, R]`` (and the entropy), 0 where ``response_mask`` is False; differentiable.
        For the policy that sampled the rollout this equals ``rollout.logprobs`` up to rounding.
    """
    if not isinstance(policy, PolicyModel):
        raise TypeError(f"response_logprobs: policy must be a PolicyModel, got {type(policy).__name__}")
    if not isinstance(rollout, Rollout):
        raise TypeError(f"response_logprobs: rollout must be a Rollout, got {type(rollout).__name__}")
    return policy.response_logprobs(
        rollout.input_ids, rollout.attention_mask, rollout.response_start, temperature=temperature,
        return_entropy=return_entropy,
    )  # fmt: skip


def _check_model(name: str, model, kind: type) -> None:
    if model is not None and not isinstance(model, kind):
        raise TypeError(f"score_rollout: {name} must be a {kind.__name__} or None, got {type(model).__name__}")


@torch.no_grad()
def score_rollout(
    rollout: Rollout,
    *,
    temperature: float,
    policy: PolicyModel | None = None,
    reference: PolicyModel | None = None,
    critic: ScalarHeadModel | None = None,
    reward_model: ScalarHeadModel | None = None,
    reward_fn: Callable[[list[list[int]], list[list[int]]], torch.Tensor] | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """Fill the scoring fields of ``rollout`` (a new Rollout is returned; no gradients).

    - ``old_logprobs``, ``entropy`` (policy) and ``ref_logprobs`` (reference): fp32
      ``[B, R]`` at ``temperature``, 0 where masked.
    - ``values`` (critic): fp32 ``[B, R]``, ``critic.values`` at positions ``P-1 .. T-2``
      (the state before each response token), 0 where masked.
    - ``scores`` fp32 ``[B]``: ``reward_model.rewards`` on the full sequence (read at the
      last real token), or ``reward_fn(prompts, responses)`` on unpadded token-id lists
      (responses keep their EOS). At most one of the two.

    Metrics (with a policy): ``logprob_gap_max`` = max ``|old_logprobs - logprobs|`` over
    response tokens (sampling vs training numerics; ~1e-6 in fp32), ``entropy`` = mean
    entropy per response token.
    """
    if not isinstance(rollout, Rollout):
        raise TypeError(f"score_rollout: rollout must be a Rollout, got {type(rollout).__name__}")
    for name, model, kind in (("policy", policy, PolicyModel), ("reference", reference, PolicyModel),
                              ("critic", critic, ScalarHeadModel), ("reward_model", reward_model, ScalarHeadModel)):  # fmt: skip
        _check_model(name, model, kind)
    if reward_fn is not None and not callable(reward_fn):
        raise TypeError(f"score_rollout: reward_fn must be callable, got {type(reward_fn).__name__}")
    if reward_fn is not None and reward_model is not None:
        raise ValueError("score_rollout: pass at most one of reward_model and reward_fn")

    mask = rollout.response_mask
    filled, metrics = {}, {}
    if policy is not None:
        old, entropy = response_logprobs(policy, rollout, temperature=temperature, return_entropy=True)
        filled.update(old_logprobs=old, entropy=entropy)
        tokens = mask.sum().clamp(min=1)
        metrics["logprob_gap_max"] = float(((old - rollout.logprobs).abs() * mask).max())
        metrics["entropy"] = float((entropy * mask).sum() / tokens)
    if reference is not None:
        filled["ref_logprobs"] = response_logprobs(reference, rollout, temperature=temperature)
    if critic is not None:
        start = rollout.response_start
        values = critic.values(rollout.input_ids, rollout.attention_mask)[:, start - 1 : -1]
        filled["values"] = values * mask
    if reward_model is not None:
        filled["scores"] = reward_model.rewards(rollout.input_ids, rollout.attention_mask)
    if reward_fn is not None:
        scores = torch.as_tensor(reward_fn(*rollout.token_lists()), dtype=torch.float32).to(rollout.prompt_ids.device)
        if tuple(scores.shape) != (rollout.prompt_ids.shape[0],):
            raise ValueError(f"score_rollout: reward_fn must return [B={rollout.prompt_ids.shape[0]}] scores, got {tuple(scores.shape)}")
        filled["scores"] = scores
    return dataclasses.replace(rollout, **filled), metrics
