"""What a rollout carries, and how to sample it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

_OPTIONAL = ("group_ids", "old_logprobs", "ref_logprobs", "values", "scores", "entropy")


@dataclass
class Rollout:
    """A batch of sampled responses and what scoring adds to it.

    Prompts are left-padded, responses right-padded after EOS; the full sequence is
    ``cat(prompt, response)`` along dim 1.

    Attributes:
        prompt_ids: long ``[B, P]``. prompt_mask: bool ``[B, P]``.
        response_ids: long ``[B, R]``. response_mask: bool ``[B, R]``, True for every
            generated token (the EOS included), False after it.
        logprobs: fp32 ``[B, R]``, the sampling logprobs ``log_softmax(logits / T)[token]``, 0
            where masked.
        group_ids: long ``[B]``, which prompt each sample came from.
        old_logprobs, ref_logprobs, entropy: fp32 ``[B, R]`` from the policy / reference at
            scoring, 0 where masked.
        values: fp32 ``[B, R]``, the critic's value of the state before each response token.
        scores: fp32 ``[B]``, the sequence reward.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    group_ids: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, torch.Tensor) or (value is None and field.name in _OPTIONAL)):
                raise TypeError(f"Rollout: {field.name} must be a torch.Tensor, got {type(value).__name__}")
        if self.prompt_ids.dim() != 2 or self.prompt_mask.shape != self.prompt_ids.shape:
            raise ValueError(
                f"Rollout: prompt_ids [B, P] and prompt_mask of the same shape expected, got "
                f"{tuple(self.prompt_ids.shape)} and {tuple(self.prompt_mask.shape)}"
            )
        batch = self.prompt_ids.shape[0]
        if self.response_ids.dim() != 2 or self.response_ids.shape[0] != batch:
            raise ValueError(f"Rollout: response_ids must have shape [B={batch}, R], got {tuple(self.response_ids.shape)}")
        per_token = {"response_mask": self.response_mask, "logprobs": self.logprobs, "old_logprobs": self.old_logprobs,
                     "ref_logprobs": self.ref_logprobs, "values": self.values, "entropy": self.entropy}  # fmt: skip
        for name, t in per_token.items():
            if t is not None and t.shape != self.response_ids.shape:
                raise ValueError(f"Rollout: {name} must have the shape of response_ids {tuple(self.response_ids.shape)}, got {tuple(t.shape)}")
        for name in ("group_ids", "scores"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (batch,):
                raise ValueError(f"Rollout: {name} must have shape [B={batch}], got {tuple(t.shape)}")

    @property
    def input_ids(self) -> torch.Tensor:
        """long ``[B, P + R]``: prompt then response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """bool ``[B, P + R]``."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_start(self) -> int:
        """``P``: the index of the first response token in ``input_ids``."""
        return self.prompt_ids.shape[1]

    @property
    def response_lengths(self) -> torch.Tensor:
        """long ``[B]``: generated tokens per row (EOS included)."""
        return self.response_mask.long().sum(dim=1)

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows ``index`` (long ``[b]`` or bool ``[B]``) of every tensor, e.g. a minibatch."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def token_lists(self) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, responses) as token-id lists without padding; responses keep their EOS."""
        prompts = [ids[mask].tolist() for ids, mask in zip(self.prompt_ids.cpu(), self.prompt_mask.cpu().bool())]
        responses = [ids[mask].tolist() for ids, mask in zip(self.response_ids.cpu(), self.response_mask.cpu().bool())]
        return prompts, responses


@dataclass
class SamplingConfig:
    """How :func:`rlhf_engine.rollout.generate` samples.

    Attributes:
        max_new_tokens: at most this many tokens per response (``>= 1``).
        temperature: ``> 0``; logits are divided by it before anything else.
        top_k: keep the ``top_k`` most likely tokens (0: off).
        top_p: keep the smallest set of most likely tokens whose probability reaches
            ``top_p`` (nucleus sampling, Holtzman et al. 2020), in ``(0, 1]`` (1: off).
        eos_token_id: a row stops after sampling it. pad_token_id: fills rows that stopped.
        drop_finished_rows: once at least half the rows in the batch have stopped, stop
            computing them (their KV cache rows are dropped). Same random draws per row, so
            the same samples; the smaller matmuls may round logits differently in the last
            bit (logprobs equal to ~1e-6; a token changes only if its uniform falls that
            close to a CDF boundary). False: bitwise what the full batch computes.
        static_cache: preallocate a ``transformers.StaticCache`` of ``prompt + max_new_tokens``
            positions instead of growing a ``DynamicCache`` by concatenation each step. The
            batch keeps its shape to the end (``drop_finished_rows`` does not apply), which
            is what a compiled or CUDA-graphed decode step needs.
        compile_decode: run the one-token decode step through ``torch.compile``
            (``mode="reduce-overhead"``, CUDA graphs, on CUDA; default mode elsewhere).
            Needs ``static_cache``. The compiled step and its cache are kept per policy and
            reused by later calls of the same batch size and length.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int = 2
    pad_token_id: int = 0
    drop_finished_rows: bool = True
    static_cache: bool = False
    compile_decode: bool = False

    def __post_init__(self):
        for name in ("drop_finished_rows", "static_cache", "compile_decode"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SamplingConfig: {name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.compile_decode and not self.static_cache:
            raise ValueError("SamplingConfig: compile_decode=True needs static_cache=True (a compiled step needs fixed shapes)")
        for name, low in (("max_new_tokens", 1), ("top_k", 0), ("eos_token_id", 0), ("pad_token_id", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SamplingConfig: {name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"SamplingConfig: {name} must be >= {low}, got {value}")
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise TypeError(f"SamplingConfig: {name} must be a number, got {type(getattr(self, name)).__name__}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingConfig: temperature must be finite and > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig: top_p must be in (0, 1], got {self.top_p}")
