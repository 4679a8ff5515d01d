"""A few rows of an RL step's rollout, as plain Python values, for the samples log.

``RLTrainer(log_samples=k)`` keeps the last step's ``k`` samples in ``trainer.samples``;
``rlhf-engine train`` decodes them into ``samples.jsonl`` (``rlhf_engine.samplelog``).
"""

from __future__ import annotations

import torch

from rlhf_engine.rollout import Rollout


def pick_samples(rollout: Rollout, advantages: torch.Tensor, k: int) -> list[dict]:
    """``k`` rows of a scored rollout spread evenly over it (row ``i * B // k``: one per group
    when ``k`` is the number of prompts), each ``{"row", "prompt_ids", "response_ids", "reward",
    "advantage"}``: token ids without padding (the response keeps its EOS), the sequence score,
    and the advantage (``advantages`` ``[B]`` per sequence, or for ``[B, R]`` per token the mean
    over the response's tokens). All ``B`` rows when ``k >= B``.

    Costs one gather of ``k`` rows and a few small device-to-host copies; nothing of the whole
    batch leaves the device.
    """
    rows = rollout.response_ids.shape[0]
    k = min(k, rows)
    chosen = [i * rows // k for i in range(k)]
    index = torch.tensor(chosen, device=rollout.response_ids.device)
    picked = rollout.select(index)
    prompts, responses = picked.token_lists()
    advantage = advantages[index]
    if advantage.dim() == 2:
        mask = picked.response_mask
        advantage = (advantage * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return [
        {"row": row, "prompt_ids": p, "response_ids": r, "reward": score, "advantage": a}
        for row, p, r, score, a in zip(chosen, prompts, responses, picked.scores.tolist(), advantage.tolist())
    ]
