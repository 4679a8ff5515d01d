"""Batched sampling with a KV cache; logprobs captured as training will recompute them."""

from __future__ import annotations

import torch

from rlhf_engine.models.inputs import check_token_batch, position_ids_from_mask
from rlhf_engine.models.policy import PolicyModel
from rlhf_engine.rollout.types import Rollout, SamplingConfig


def sample_tokens(z: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from ``softmax(z)`` restricted by top-k and top-p.

    Args:
        z: fp32 ``[B, V]`` tempered logits.
        top_k: keep the ``top_k`` largest (0: all). top_p: then keep the shortest prefix of
            the sorted, renormalized distribution whose mass reaches ``top_p`` (always at
            least one token).
        generator: draws one uniform per row (on its own device, so a CPU generator drives
            sampling on any device reproducibly).

    Returns:
        long ``[B]``. Inverse-CDF sampling over the sorted, truncated probabilities.
    """
    sorted_z, order = z.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_z, dim=-1)
    if top_k > 0:
        probs[:, top_k:] = 0
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if top_p < 1:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0)
    cdf = probs.cumsum(dim=-1)
    device = generator.device if generator is not None else z.device
    u = torch.rand(z.shape[0], 1, generator=generator, device=device, dtype=torch.float32).to(z.device)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # Rounding can put u * total on the last boundary; the answer is then the last token
    # with mass (the positive probabilities are a prefix of the sorted order).
    index = torch.minimum(index, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, index).squeeze(1)


def generate(
    policy: PolicyModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one response per prompt row, batched, with the KV cache.

    Each step feeds only the new tokens; position ids count real tokens
    (``position_ids_from_mask``), so left padding does not shift positions. A row stops
    after its EOS (later tokens are ``pad_token_id``, masked out); the loop stops when all
    rows stopped or after ``config.max_new_tokens`` steps.

    ``logprobs[b, s] = log_softmax(logits / temperature)[token]`` of the untruncated tempered
    distribution in fp32: what ``PolicyModel.response_logprobs`` recomputes, even when
    top-k / top-p shaped the sampling.

    Args:
        policy: the model (its train/eval mode is left as is; no gradients are recorded).
        prompt_ids: long ``[B, P]``, left-padded. prompt_mask: ``[B, P]``, at least one real
            token per row.
        generator: makes the samples reproducible (any device; see :func:`sample_tokens`).

    Returns:
        :class:`Rollout` with ``response_ids`` / ``response_mask`` / ``logprobs`` ``[B, R]``,
        ``R <= max_new_tokens`` the number of steps run.
    """
    op = "generate"
    if not isinstance(policy, PolicyModel):
        raise TypeError(f"{op}: policy must be a PolicyModel, got {type(policy).__name__}")
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"{op}: config must be a SamplingConfig, got {type(config).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_token_batch(op, prompt_ids, prompt_mask, names=("prompt_ids", "prompt_mask"))
    vocab = policy.vocab_size
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(config, name) >= vocab:
            raise ValueError(f"{op}: config.{name} must be < vocab_size {vocab}, got {getattr(config, name)}")
    mask = prompt_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{op}: prompt_mask must have at least one real token in every row")

    batch = prompt_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs, alive_steps = [], [], []
    step_ids, step_positions, cache = prompt_ids, position_ids_from_mask(mask), None
    with torch.no_grad():
        for _ in range(config.max_new_tokens):
            logits, cache = policy.next_token_logits(step_ids, mask, step_positions, cache)
            z = logits / config.temperature
            token = sample_tokens(z, config.top_k, config.top_p, generator)
            logp = z.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
            alive = ~done
            token = torch.where(alive, token, config.pad_token_id)
            tokens.append(token)
            logprobs.append(torch.where(alive, logp, 0.0))
            alive_steps.append(alive)
            done = done | (token == config.eos_token_id)
            if bool(done.all()):
                break
            # The new token sits after every real token so far (the cumsum rule).
            step_ids, step_positions = token[:, None], mask.long().sum(dim=1, keepdim=True)
            mask = torch.cat([mask, alive[:, None]], dim=1)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask.bool(),
        response_ids=torch.stack(tokens, dim=1),
        response_mask=torch.stack(alive_steps, dim=1),
        logprobs=torch.stack(logprobs, dim=1),
    )
