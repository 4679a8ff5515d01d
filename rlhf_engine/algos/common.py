"""Pieces every trainer shares: token batches, optimizer steps, per-step random streams.

Resumable runs: every random choice of step ``k`` (which examples, which samples) comes
from ``step_generator(seed, k, stream)``, a generator seeded from the run seed, the step
and a stream name. A run resumed from the checkpoint after step ``k`` therefore draws
exactly what the uninterrupted run drew, with no RNG state to carry.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from rlhf_engine.algos import precision
from rlhf_engine.distributed.group import SINGLE, DataParallel
from rlhf_engine.models import PolicyModel
from rlhf_engine.rollout import Rollout, SamplingConfig, generate
from rlhf_engine.rollout.scoring import row_slices
from rlhf_engine.tasks.data import left_pad, right_pad


@dataclass
class SequenceBatch:
    """Prompts (left-padded) followed by responses (right-padded), as one token batch.

    ``input_ids``/``attention_mask`` ``[B, P + R]``; the response starts at column
    ``response_start = P``; ``response_mask`` ``[B, R]`` bool marks response tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start :]


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ValueError for an unknown name or a CUDA device
    this machine does not have."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live: the trainers build their batches there."""
    return next(model.parameters()).device


def prompt_batch(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(prompt_ids, prompt_mask)`` ``[B, P]`` on ``device``."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    return prompt_ids.to(device), prompt_mask.to(device)


def sample_responses(
    policy: PolicyModel, prompts: list[list[int]], n: int, sampling: SamplingConfig, generator: torch.Generator | None,
    micro_batch_size: int | None = None, *, parallel: DataParallel = SINGLE, prompt_width: int | None = None,
) -> Rollout:
    """``n`` samples per prompt, grouped consecutively (``group_ids`` = the prompt's index),
    from ``policy`` in eval mode without gradients, on the policy's device.

    ``micro_batch_size``: rows sampled at once, each chunk with its own KV cache (None: all
    rows, one stream exactly as :func:`rlhf_engine.rollout.generate` draws it). The prompts are
    left-padded over the whole batch, so every chunk keeps the same prompt columns. Chunks
    run in row order and draw from ``generator`` in turn: chunk k's uniforms are the ones that
    follow chunk k-1's last draw, so the samples depend on the seed and the chunk size only.
    Responses are right-padded (``pad_token_id``, masked, logprob 0) to the longest chunk.

    Data-parallel (``parallel``): ``prompts`` are this rank's share of the step's, left-padded to
    ``prompt_width`` (the longest of all the ranks' prompts), sampled as rows of the global
    batch (:func:`rlhf_engine.rollout.generate`), with global group ids.
    """
    rows = row_slices("sample_responses", len(prompts) * n, micro_batch_size)
    prompt_ids, prompt_mask = prompt_batch([p for p in prompts for _ in range(n)], sampling.pad_token_id, model_device(policy))
    if prompt_width is not None and prompt_width > prompt_ids.shape[1]:
        pad = (prompt_width - prompt_ids.shape[1], 0)
        prompt_ids = torch.nn.functional.pad(prompt_ids, pad, value=sampling.pad_token_id)
        prompt_mask = torch.nn.functional.pad(prompt_mask, pad, value=False)
    policy.eval()
    with torch.no_grad():
        parts = [generate(policy, prompt_ids[r], prompt_mask[r], sampling, generator=generator, parallel=parallel) for r in rows]
    rollout = parts[0] if len(parts) == 1 else concat_rollouts(parts, sampling.pad_token_id)
    first = parallel.rank * len(prompts)
    rollout.group_ids = torch.arange(first, first + len(prompts), device=prompt_ids.device).repeat_interleave(n)
    return rollout


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Unscored rollouts with the same prompt width stacked along the rows; responses
    right-padded to the widest part (``pad_token_id``, mask False, logprob 0)."""
    width = max(part.response_ids.shape[1] for part in parts)

    def stack(name: str, fill) -> torch.Tensor:
        tensors = [getattr(part, name) for part in parts]
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors])

    return Rollout(
        prompt_ids=torch.cat([part.prompt_ids for part in parts]),
        prompt_mask=torch.cat([part.prompt_mask for part in parts]),
        response_ids=stack("response_ids", pad_token_id),
        response_mask=stack("response_mask", False),
        logprobs=stack("logprobs", 0.0),
    )


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device | None = None) -> SequenceBatch:
    """One ``SequenceBatch`` from token lists (responses must be non-empty), on ``device``
    (default: the CPU)."""
    if len(prompts) != len(responses):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(responses)} responses")
    device = device or torch.device("cpu")
    prompt_ids, prompt_mask = prompt_batch(prompts, pad_id, device)
    response_ids, response_mask = (t.to(device) for t in right_pad(responses, pad_id))
    return SequenceBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_start=prompt_ids.shape[1],
        response_mask=response_mask,
    )


def pair_batch(records: list[dict], pad_id: int, device: torch.device) -> SequenceBatch:
    """``{"prompt", "chosen", "rejected"}`` records as one batch: the chosen responses in rows
    ``[0, B)``, the rejected ones in rows ``[B, 2B)``."""
    prompts = [r["prompt"] for r in records]
    return collate(prompts + prompts, [r["chosen"] for r in records] + [r["rejected"] for r in records], pad_id, device)


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, stream)`` (independent streams per step)."""
    digest = hashlib.sha256(f"{seed}/{step}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def minibatch_indices(n: int, size: int, generator: torch.Generator, device: torch.device | None = None) -> list[torch.Tensor]:
    """A random partition of ``range(n)`` into ``ceil(n / size)`` index tensors on ``device``
    (drawn on the CPU ``generator``, so the partition does not depend on the device)."""
    order = torch.randperm(n, generator=generator).to(device or torch.device("cpu"))
    return list(order.split(size))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of an fp32 ``model`` (``precision.make_optimizer``)."""
    return precision.make_optimizer(model, lr, weight_decay, dtype="fp32")


class SingleModelTrainer:
    """Base of the trainers that train one model: it and its AdamW optimizer under ``role``
    (what ``run_steps`` checkpoints and restores)."""

    role = "policy"

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, parallel: DataParallel = SINGLE):
        # Under torchrun the model is sharded (FSDP2) before its optimizer sees the parameters.
        self.parallel = parallel
        self.trained_model = parallel.shard(model)
        self.optimizer = make_optimizer(self.trained_model, lr, weight_decay)

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {self.role: self.trained_model}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {self.role: self.optimizer}


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    """Backward, then :func:`clip_and_step`. Returns the gradient norm as a 0-d tensor
    (reading it is a host sync: callers do it once per step)."""
    loss.backward()
    return clip_and_step(optimizer, grad_clip)


def clip_and_step(optimizer: torch.optim.Optimizer, grad_clip: float | None) -> torch.Tensor:
    """Clip the global norm of the gradients accumulated in ``optimizer``'s parameters (one
    backward, or the sum over the micro-batches of a minibatch) to ``grad_clip``, step, zero.
    Returns the norm before clipping as a 0-d tensor, without a host sync. A master-weight
    optimizer's gradients move to its fp32 masters first, so the clip sees fp32 gradients."""
    if isinstance(optimizer, precision.MasterWeightAdamW):
        optimizer.grads_to_masters()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: the global norm of the DTensor gradients, replicated
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient (reference models)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-d mean of ``x`` over ``mask`` (0 when the mask is empty), without a host sync."""
    return (x * mask).sum() / mask.sum().clamp(min=1)
