"""Batched sampling with a KV cache; logprobs captured as training will recompute them."""

from __future__ import annotations

import weakref

import numpy as np
import torch
from transformers import StaticCache

from rlhf_engine.distributed.group import SINGLE, DataParallel
from rlhf_engine.models.inputs import check_token_batch, position_ids_from_mask
from rlhf_engine.models.policy import PolicyModel
from rlhf_engine.torch_backend.aggregation import host_readable
from rlhf_engine.rollout.types import Rollout, SamplingConfig

# Decode steps between host checks of "have all rows stopped?" (and of dropping finished
# rows). Off the CPU the check is a device-to-host sync that stalls the launch queue, so it
# runs every SYNC_EVERY steps and up to SYNC_EVERY - 1 steps may run past the end (their
# results are trimmed, their random draws replayed away). On the CPU the "sync" is free and
# an extra step is not, so it runs every step.
SYNC_EVERY = 16
CPU_SYNC_EVERY = 1

# The compiled decode step and its StaticCache per policy (see SamplingConfig.compile_decode).
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def descending_order(z: torch.Tensor) -> torch.Tensor:
    """long ``[B, V]``: ``z.sort(dim=-1, descending=True, stable=True).indices``.

    On the CPU the same permutation comes from numpy's vectorized sort of unique int64 keys,
    about 5x faster than ``torch.sort`` there: the high 32 bits are the float's bits mapped
    to a signed int that decreases as ``z`` grows (``-0.0`` folded into ``+0.0`` first, as the
    float comparison does), the low 32 bits the column index, so ties keep index order
    whatever the sort algorithm. Finite ``z`` (NaN orders differently).

    Args:
        z: fp32 ``[B, V]``.
    """
    # Fake tensors (a memory trace of a GPU run) take the sort a GPU runs: no data for numpy.
    if not host_readable(z) or z.dtype != torch.float32:
        return z.sort(dim=-1, descending=True, stable=True).indices
    bits = (z + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # increases with the float value
    keys = ((~ordered).long() << 32) | torch.arange(z.shape[-1], dtype=torch.long)
    return torch.from_numpy(np.sort(keys.numpy(), axis=-1)) & 0xFFFFFFFF


def sample_from_uniform(z: torch.Tensor, top_k: int, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """:func:`sample_tokens` with its uniforms given: long ``[B]`` from fp32 ``z`` ``[B, V]``
    and fp32 ``u`` ``[B, 1]`` in ``[0, 1)`` on ``z``'s device."""
    order = descending_order(z)
    probs = torch.softmax(z.gather(1, order), dim=-1)
    if top_k > 0:
        probs[:, top_k:] = 0
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if top_p < 1:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0)
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # Rounding can put u * total on the last boundary; the answer is then the last token
    # with mass (the positive probabilities are a prefix of the sorted order).
    index = torch.minimum(index, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, index).squeeze(1)


def draw_uniforms(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """fp32 ``[batch, 1]`` on ``device``: one uniform per row from ``generator`` (drawn on the
    generator's own device, so a CPU generator drives sampling on any device reproducibly)."""
    where = generator.device if generator is not None else device
    return torch.rand(batch, 1, generator=generator, device=where, dtype=torch.float32).to(device)


def sample_tokens(z: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from ``softmax(z)`` restricted by top-k and top-p.

    Args:
        z: fp32 ``[B, V]`` tempered logits.
        top_k: keep the ``top_k`` largest (0: all). top_p: then keep the shortest prefix of
            the sorted, renormalized distribution whose mass reaches ``top_p`` (always at
            least one token).
        generator: draws one uniform per row (:func:`draw_uniforms`).

    Returns:
        long ``[B]``. Inverse-CDF sampling over the sorted, truncated probabilities.
    """
    return sample_from_uniform(z, top_k, top_p, draw_uniforms(z.shape[0], generator, z.device))


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator ``torch.rand(..., generator=None, device=device)`` draws from."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    raise ValueError(f"generate: pass generator= for prompts on {device} (the default generator is known for cpu and cuda only)")


def _next_logits(policy: PolicyModel, cache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 ``[b, V]``: one ``next_token_logits`` step that updates ``cache`` in place."""
    return policy.next_token_logits(ids, mask, positions, cache)[0]


class _Decoder:
    """The model side of :func:`generate`: prefill, one-token decode steps, row dropping.

    ``mask`` arguments are the attention mask of every position so far (dynamic cache) or
    of every position of the preallocated cache (static: columns not yet written are False,
    so the cache and the mask keep one shape from the first step to the last).
    """

    def __init__(self, policy: PolicyModel, config: SamplingConfig, batch: int, width: int, device: torch.device):
        self.policy, self.compiled, self.cuda_graphs = policy, None, False
        self.cache = None  # a DynamicCache, made by the prefill
        if not config.static_cache:
            return
        if not config.compile_decode:
            # StaticCache(config=, max_cache_len=) in transformers 5.17 and 5.24 alike; its
            # layers allocate [B, heads, width, head_dim] at the first (prefill) update.
            self.cache = StaticCache(config=policy.config, max_cache_len=width)
            return
        # Compiling costs seconds to minutes, so the compiled step and the cache whose
        # tensors it was traced on are kept for the next call of the same shape.
        key = (batch, width, device, policy.lm_head_weight.dtype)
        saved = _COMPILED_STEPS.get(policy)
        if saved is None or saved[0] != key:
            mode = "reduce-overhead" if device.type == "cuda" else None
            saved = (key, StaticCache(config=policy.config, max_cache_len=width), torch.compile(_next_logits, mode=mode, dynamic=False))
            _COMPILED_STEPS[policy] = saved
        _, self.cache, self.compiled = saved
        self.cuda_graphs = device.type == "cuda"
        self.cache.reset()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """fp32 ``[b, V]`` logits after the prompt; always eager (its length varies per call)."""
        logits, self.cache = self.policy.next_token_logits(ids, mask, positions, self.cache)
        return logits

    def decode(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """fp32 ``[b, V]`` logits after one more token per row (``ids`` ``[b, 1]``)."""
        if self.compiled is None:
            return self.prefill(ids, mask, positions)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            # The next replay overwrites this output buffer: keep a copy.
            return self.compiled(self.policy, self.cache, ids, mask, positions).clone()
        return self.compiled(self.policy, self.cache, ids, mask, positions)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop every batch row of the cache but ``keep`` (long ``[b']``)."""
        self.cache.batch_select_indices(keep)


def generate(
    policy: PolicyModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    parallel: DataParallel = SINGLE,
) -> Rollout:
    """Sample one response per prompt row, batched, with the KV cache.

    Each step feeds only the new tokens; position ids count real tokens
    (``position_ids_from_mask``), so left padding does not shift positions. A row stops
    after its EOS (later tokens are ``pad_token_id``, masked out); generation stops when all
    rows stopped or after ``config.max_new_tokens`` steps.

    ``logprobs[b, s] = log_softmax(logits / temperature)[token]`` of the untruncated tempered
    distribution in fp32: what ``PolicyModel.response_logprobs`` recomputes, even when
    top-k / top-p shaped the sampling.

    Random stream: step ``s`` draws one uniform per row of the whole batch (``[B, 1]``, see
    :func:`sample_tokens`), rows that stopped included, for every step up to the last one
    returned, so ``generator`` ends in the same state whatever ``config``'s speed options.
    Host syncs: one per :data:`SYNC_EVERY` steps (every step on the CPU); steps run past
    the end before a sync sees it are trimmed and their draws undone. With
    ``config.drop_finished_rows``, stopped rows leave the batch at those syncs.

    Data-parallel (``parallel`` distributed): the rows are this rank's share
    (``parallel.rows``) of a global batch of ``B · world_size`` rows; each step draws the global
    batch's uniforms and keeps this rank's, every rank runs the same number of steps (they
    agree on "every row of every rank stopped"; rows are not dropped, except in a world of
    one), and the responses are padded to the global longest, so each rank's rows are
    exactly those one process sampling the global batch gets, whatever the number of ranks.

    Args:
        policy: the model (its train/eval mode is left as is; no gradients are recorded).
        prompt_ids: long ``[B, P]``, left-padded. prompt_mask: ``[B, P]``, at least one real
            token per row.
        generator: makes the samples reproducible (any device; see :func:`sample_tokens`).
            None: the default generator of the prompts' device (cpu or cuda).

    Returns:
        :class:`Rollout` with ``response_ids`` / ``response_mask`` / ``logprobs`` ``[B, R]``,
        ``R <= max_new_tokens`` the last step at which some row had not stopped.
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

    device, (batch, prompt_len), steps = prompt_ids.device, prompt_ids.shape, config.max_new_tokens
    rng = generator if generator is not None else _default_generator(device)
    every = CPU_SYNC_EVERY if device.type == "cpu" else SYNC_EVERY
    # Ranks of a larger world keep their rows: they stay the rows one process sampling the global
    # batch computes, whatever the number of ranks. A world of one has no other rank to match.
    drop_rows = config.drop_finished_rows and not config.static_cache and parallel.alone
    # The global batch's rows and this rank's among them (all of them in one process).
    total, mine = batch * parallel.world_size, slice(parallel.rank * batch, (parallel.rank + 1) * batch)
    response_ids = torch.full((batch, steps), config.pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(batch, steps, dtype=torch.bool, device=device)
    logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    # The attention mask of every position; column P + s is filled when step s samples.
    attention = torch.zeros(batch, prompt_len + steps, dtype=torch.bool, device=device)
    attention[:, :prompt_len] = mask
    decoder = _Decoder(policy, config, batch, prompt_len + steps, device)
    rows = None  # output rows of the batch being computed; None: all of them, in order
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    seen = mask.long().sum(dim=1)  # real tokens so far: the next token's position
    step_ids, positions = prompt_ids, position_ids_from_mask(mask)
    start, finished = 0, False
    with torch.no_grad():
        while start < steps and not finished:
            count = min(every, steps - start)
            rng_state = rng.get_state()
            # The whole batch's draws for the chunk, in today's per-step order.
            uniforms = [draw_uniforms(total, rng, device)[mine] for _ in range(count)]
            chunk_tokens, chunk_logprobs, chunk_alive = [], [], []
            for s in range(start, start + count):
                width = attention.shape[1] if config.static_cache else prompt_len + s
                step = decoder.prefill if s == 0 else decoder.decode
                z = step(step_ids, attention[:, :width], positions) / config.temperature
                u = uniforms[s - start] if rows is None else uniforms[s - start][rows]
                token = sample_from_uniform(z, config.top_k, config.top_p, u)
                logp = z.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
                alive = ~done
                token = torch.where(alive, token, config.pad_token_id)
                chunk_tokens.append(token)
                chunk_logprobs.append(torch.where(alive, logp, 0.0))
                chunk_alive.append(alive)
                done = done | (token == config.eos_token_id)
                attention[:, prompt_len + s] = alive
                # The new token sits after every real token so far (the cumsum rule).
                step_ids, positions, seen = token[:, None], seen[:, None], seen + alive
            where = slice(None) if rows is None else rows
            response_ids[where, start : start + count] = torch.stack(chunk_tokens, dim=1)
            logprobs[where, start : start + count] = torch.stack(chunk_logprobs, dim=1)
            response_mask[where, start : start + count] = torch.stack(chunk_alive, dim=1)
            start += count
            stopped = int(done.sum())  # the host sync
            finished = stopped == done.shape[0] if parallel.alone else int(parallel.sum(done.sum())) == total
            if drop_rows and not finished and 2 * stopped >= done.shape[0] and stopped > 0:
                keep = (~done).nonzero().squeeze(1)
                decoder.keep_rows(keep)
                rows = keep if rows is None else rows[keep]
                attention, done, seen, step_ids, positions = (t[keep] for t in (attention, done, seen, step_ids, positions))
        length = int(parallel.max(response_mask.sum(dim=1).max()))
        if length < start:
            # Steps past the end drew uniforms today's loop never drew: undo them.
            rng.set_state(rng_state)
            for _ in range(length - (start - count)):
                draw_uniforms(total, rng, device)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=mask,
        response_ids=response_ids[:, :length].contiguous(),
        response_mask=response_mask[:, :length].contiguous(),
        logprobs=logprobs[:, :length].contiguous(),
    )
