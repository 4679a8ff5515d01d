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


def row_slices(op: str, rows: int, micro_batch_size: int | None) -> list[slice]:
    """``[0, rows)`` as consecutive slices of ``micro_batch_size`` rows (the last one may be
    shorter); one slice of every row for None. TypeError / ValueError naming
    ``micro_batch_size`` unless it is None or an int >= 1."""
    if micro_batch_size is not None:
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
            raise TypeError(f"{op}: micro_batch_size must be an int or None, got {type(micro_batch_size).__name__}")
        if micro_batch_size < 1:
            raise ValueError(f"{op}: micro_batch_size must be >= 1 or None, got {micro_batch_size}")
    size = micro_batch_size or max(rows, 1)
    return [slice(i, i + size) for i in range(0, max(rows, 1), size)]


def _by_rows(fn: Callable, rows: list[slice], *batch: torch.Tensor):
    """``fn(*batch)`` computed on each row slice of the ``batch`` tensors and concatenated along
    dim 0 (``fn`` returns a tensor or a tuple of tensors). A slice keeps every column, so the
    padded width, and with it ``response_start``, is the whole batch's."""
    if len(rows) == 1:
        return fn(*batch)
    parts = [fn(*(t[r] for t in batch)) for r in rows]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)


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
    micro_batch_size: int | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """Fill the scoring fields of ``rollout`` (a new Rollout is returned; no gradients).

    - ``old_logprobs``, ``entropy`` (policy) and ``ref_logprobs`` (reference): fp32
      ``[B, R]`` at ``temperature``, 0 where masked.
    - ``values`` (critic): fp32 ``[B, R]``, ``critic.values`` at positions ``P-1 .. T-2``
      (the state before each response token), 0 where masked.
    - ``scores`` fp32 ``[B]``: ``reward_model.rewards`` on the full sequence (read at the
      last real token), or ``reward_fn(prompts, responses)`` on unpadded token-id lists
      (responses keep their EOS). At most one of the two.

    ``micro_batch_size``: rows per pass of each model (None: the whole batch in one pass).
    A pass is a row slice of the padded batch (every column kept), so the results equal the
    whole pass up to rounding.

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

    rows = row_slices("score_rollout", rollout.prompt_ids.shape[0], micro_batch_size)
    mask, start = rollout.response_mask, rollout.response_start
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    filled, metrics = {}, {}
    if policy is not None:
        old, entropy = _by_rows(
            lambda ids, am: policy.response_logprobs(ids, am, start, temperature=temperature, return_entropy=True),
            rows, input_ids, attention_mask,
        )  # fmt: skip
        filled.update(old_logprobs=old, entropy=entropy)
        tokens = mask.sum().clamp(min=1)
        metrics["logprob_gap_max"] = float(((old - rollout.logprobs).abs() * mask).max())
        metrics["entropy"] = float((entropy * mask).sum() / tokens)
    if reference is not None:
        filled["ref_logprobs"] = _by_rows(
            lambda ids, am: reference.response_logprobs(ids, am, start, temperature=temperature), rows, input_ids, attention_mask
        )
    if critic is not None:
        values = _by_rows(lambda ids, am: critic.values(ids, am)[:, start - 1 : -1], rows, input_ids, attention_mask)
        filled["values"] = values * mask
    if reward_model is not None:
        filled["scores"] = _by_rows(reward_model.rewards, rows, input_ids, attention_mask)
    if reward_fn is not None:
        scores = torch.as_tensor(reward_fn(*rollout.token_lists()), dtype=torch.float32).to(rollout.prompt_ids.device)
        if tuple(scores.shape) != (rollout.prompt_ids.shape[0],):
            raise ValueError(f"score_rollout: reward_fn must return [B={rollout.prompt_ids.shape[0]}] scores, got {tuple(scores.shape)}")
        filled["scores"] = scores
    return dataclasses.replace(rollout, **filled), metrics
