"""A drop-in for TRL 1.16's ``trl.trainer.utils.add_fused_lm_head``, on
:func:`rlhf_engine.ops.fused_linear_logprobs`.

TRL's trainers never call the lm_head themselves: they patch the model once with
``add_fused_lm_head(model, outputs=...)`` and then run ``model(..., labels=labels,
fused_lm_head=True)``, which returns a ``trl.trainer.utils.FusedCausalLMOutput`` of
per-token fields (``[B, T - 1]``, zero where the label is -100). Everything the trainers
compute from it (sequence sums, losses, metrics) is TRL's own code. This module patches
the model the same way, with the same signature and the same output, so a trainer that
calls it instead of TRL's gets our kernels and keeps all of its own loss code.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types

import torch
from torch.distributed.tensor import DTensor

from rlhf_engine.ops import fused_linear_logprobs
from rlhf_engine.ops._lm_head_chunks import default_chunk_rows

# The per-token fields of FusedCausalLMOutput that TRL's trainers may ask for.
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Fields that need a statistic over the whole vocabulary besides logsumexp (an argmax, a mean,
# a second logsumexp): one extra no-grad pass computes them, a chunk of tokens at a time.
_STATISTICS = ("log_sum_sq_probs", "mean_logits", "is_top1")
# Text-config attributes with which a model transforms its logits before the softmax: a
# softcap (any value) and scales (any value but 1). TRL folds them into its kernel; our ops
# compute softmax((h W^T + b) / T) only, so such models are refused rather than trained on
# the logprobs of another distribution.
_LOGIT_SOFTCAP = "final_logit_softcapping"
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
IGNORE_INDEX = -100


# A trainer's __init__ looks add_fused_lm_head up in its module's globals; two trainers built
# at once from two threads must not see each other's replacement.
_SWAP_LOCK = threading.Lock()


@contextlib.contextmanager
def swapped_into(trainer_module, backend: str, chunk_size: int | None):
    """Within the block, ``trainer_module.add_fused_lm_head`` (a TRL trainer module's import
    of ``trl.trainer.utils.add_fused_lm_head``) is ours, with ``backend`` and ``chunk_size``."""
    with _SWAP_LOCK:
        original = trainer_module.add_fused_lm_head
        trainer_module.add_fused_lm_head = functools.partial(add_fused_lm_head, backend=backend, chunk_size=chunk_size)
        try:
            yield
        finally:
            trainer_module.add_fused_lm_head = original


def check_supported(model) -> None:
    """Raise ValueError, naming the setting, for a model whose fused-head forward our ops
    cannot compute exactly: a transformed logit (softcapping or a logit scale in the text
    config), MoE router logits requested by the config (TRL adds their load-balancing loss
    inside the head), or DeepSpeed ZeRO-3 (the backward recomputes the logits from
    ``lm_head.weight`` outside the module's gather hook)."""
    text_config = model.config.get_text_config()
    for name in (_LOGIT_SOFTCAP,) + _LOGIT_SCALES:
        value = getattr(text_config, name, None)
        if value is not None and (name == _LOGIT_SOFTCAP or value != 1.0):
            raise ValueError(
                f"rlhf_engine's fused lm_head computes softmax((hidden @ W.T + b) / temperature); this model's config "
                f"sets {name}={value!r}, a transform of the logits it does not apply. "
                "Use TRL's own trainer for this model."
            )
    if getattr(text_config, "output_router_logits", False):
        raise ValueError(
            "rlhf_engine's fused lm_head does not compute the MoE load-balancing loss: set the config's "
            "output_router_logits=False (and router_aux_loss_coef=0), or use TRL's own trainer"
        )
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "rlhf_engine's fused lm_head does not support DeepSpeed ZeRO-3 (its backward reads the sharded "
            "lm_head weight outside the module's gather hook); use ZeRO-1/2, FSDP2 or TRL's own trainer"
        )


def add_fused_lm_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> None:
    """Patch ``model.forward`` like TRL's ``add_fused_lm_head`` (same arguments, same
    ``FusedCausalLMOutput``), with the fields computed from the last hidden states
    ``h [n, H]`` of the ``n`` positions whose next-token label is not -100, and
    ``z = (h @ W.T + b) / temperature``:

    * ``log_probs = z[label] - logsumexp(z)`` and ``entropy = logsumexp(z) - Σ softmax(z) z``
      (fp32, differentiable): :func:`rlhf_engine.ops.fused_linear_logprobs`, which never
      holds more than one chunk of logits (none at all with the Triton forward);
    * ``mean_logits = Σ_v z_v / V``, ``is_top1 = (argmax_v z_v == label)`` (the first
      maximum, as TRL) and ``log_sum_sq_probs = log Σ_v softmax(z)_v²`` (fp32, no
      gradient), when asked for: one no-grad pass over chunks of ``chunk_size`` tokens
      (``[chunk, V]`` logits at a time), ``2·n·H·V`` more FLOPs.

    Without ``fused_lm_head=True`` the forward is the model's own (generation is
    unchanged). As with TRL's, patch the model before wrapping it with PEFT, or patch the
    PEFT model's base model. ``backend`` and ``chunk_size`` go to our op.

    One keyword beyond TRL's: ``head_fn=f`` makes the forward return ``f(h [n, H], w [V,
    H], b [V] or None, y [n], mask [B, T])`` (:func:`run_head_fn`) instead of the fields, so
    a trainer can compute its loss from the scored hidden states with a fused loss op.

    Raises:
        ValueError: ``outputs`` names an unknown field, or the model is one
            :func:`check_supported` refuses.
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"add_fused_lm_head: outputs must be among {OUTPUTS}, got {sorted(unknown)}")
    check_supported(model)
    from trl.trainer.utils import FusedCausalLMOutput

    original_forward = model.forward
    score = functools.partial(
        _score, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=tuple(outputs),
        backend=backend, chunk_size=chunk_size, output_cls=FusedCausalLMOutput,
    )

    # The same signature as the model's: generate() checks its keyword arguments against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                head_fn=None, **kwargs):  # fmt: skip
        if not fused_lm_head and head_fn is None:
            passed = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return original_forward(*args, **kwargs, **{k: v for k, v in passed.items() if v is not None})
        if kwargs.get("output_router_logits"):
            raise ValueError("rlhf_engine's fused lm_head does not compute the MoE load-balancing loss")
        kwargs["use_cache"] = False
        # Looked up on every call: FSDP and PEFT replace the backbone and the head after patching.
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t + 1
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:  # already shifted (context / sequence parallelism)
            targets = shift_labels
        if head_fn is not None:
            return run_head_fn(head_fn, self.get_output_embeddings(), hidden, targets, cast_lm_head_to_fp32)
        return score(self.get_output_embeddings(), hidden, targets, num_items_in_batch)

    model.forward = types.MethodType(forward, model)


def _scored_rows(head, hidden, targets, cast_lm_head_to_fp32):
    """``hidden [B, T, H]`` and next-token ``targets [B, T]`` -> ``(h [n, H], w [V, H], b [V]
    or None, y [n], mask [B, T])``: the ``n`` positions whose label is not -100, in row-major
    order, and the head in the dtype it runs in (see :func:`_compute_dtype`)."""
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):  # FSDP2: a differentiable all-gather of the head
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    hidden, targets = hidden.to(weight.device), targets.to(weight.device)
    mask = targets != IGNORE_INDEX
    dtype = _compute_dtype(hidden, cast_lm_head_to_fp32)
    # Only the scored positions go through the head: prompt and padding cost nothing.
    h, y = hidden[mask].to(dtype), targets[mask]
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    return h, w, b, y, mask


def run_head_fn(head_fn, head, hidden, targets, cast_lm_head_to_fp32):
    """``head_fn(h, w, b, y, mask)`` on :func:`_scored_rows`, autocast off (the dtype is chosen
    already): the seam through which a trainer computes its whole loss from the hidden
    states inside the model's forward (so DDP, FSDP2 and PEFT see an ordinary forward)."""
    h, w, b, y, mask = _scored_rows(head, hidden, targets, cast_lm_head_to_fp32)
    with torch.autocast(h.device.type, enabled=False):
        return head_fn(h, w, b, y, mask)


def _score(head, hidden, targets, num_items_in_batch, *, temperature, cast_lm_head_to_fp32, outputs, backend,
           chunk_size, output_cls):  # fmt: skip
    """The fused head on ``hidden [B, T, H]`` and next-token ``targets [B, T]`` -> a
    ``FusedCausalLMOutput`` whose requested per-token fields are ``[B, T]``, 0 at -100."""
    h, w, b, y, mask = _scored_rows(head, hidden, targets, cast_lm_head_to_fp32)
    # The dtype is chosen above; autocast must not change it inside the statistics pass.
    with torch.autocast(h.device.type, enabled=False):
        fields = dict.fromkeys(OUTPUTS)
        with_entropy = "entropy" in outputs
        result = fused_linear_logprobs(
            h, w, y, bias=b, temperature=temperature, return_entropy=with_entropy, chunk_size=chunk_size,
            backend=backend,
        )
        fields["log_probs"], fields["entropy"] = result if with_entropy else (result, None)
        statistics = tuple(name for name in _STATISTICS if name in outputs)
        if statistics:
            fields.update(vocabulary_statistics(h, w, b, y, temperature, statistics, chunk_size))
    # masked_scatter keeps the outputs attached to the graph even when no label is scored,
    # so an all-masked micro-batch backpropagates a zero instead of failing.
    per_token = {
        name: None if value is None else value.new_zeros(mask.shape).masked_scatter(mask, value)
        for name, value in fields.items()
    }
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return output_cls(loss=-per_token["log_probs"].sum() / count, label_mask=mask, **per_token)


def _compute_dtype(hidden: torch.Tensor, cast_lm_head_to_fp32: bool) -> torch.dtype:
    """The dtype the head runs in: fp32 when asked, else the autocast dtype under autocast
    (as the model's own lm_head would run), else the hidden states' dtype."""
    if cast_lm_head_to_fp32:
        return torch.float32
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


@torch.no_grad()
def vocabulary_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    names: tuple[str, ...],
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The no-grad per-token fields among ``names`` (``"mean_logits"``, ``"is_top1"``,
    ``"log_sum_sq_probs"``) for ``hidden [n, H]``, ``weight [V, H]``, ``bias [V]`` or None,
    ``labels [n]`` (all scored), with ``z = (hidden @ weight.T + bias) / temperature``
    computed ``chunk_size`` tokens at a time (the GEMM in the weight's dtype, the rest in
    fp32): fp32 ``[n]`` each, bool for ``is_top1``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_size or default_chunk_rows(n, vocab, weight.dtype, weight.device)
    parts = {name: [] for name in names}
    for start in range(0, n, rows):
        z = chunk_logits(hidden[start : start + rows], weight, bias).float() / temperature
        if "mean_logits" in parts:
            parts["mean_logits"].append(z.sum(dim=-1) / vocab)
        if "is_top1" in parts:
            parts["is_top1"].append(z.argmax(dim=-1) == labels[start : start + rows])
        if "log_sum_sq_probs" in parts:
            parts["log_sum_sq_probs"].append(torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1))
    empty = {"is_top1": torch.bool}
    return {
        name: torch.cat(chunks) if chunks else hidden.new_empty(0, dtype=empty.get(name, torch.float32))
        for name, chunks in parts.items()
    }


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden [c, H] @ weight.T + bias`` -> ``[c, V]``: the one place the statistics pass
    holds logits (a module-level function, so tests can watch the chunk sizes)."""
    return torch.nn.functional.linear(hidden, weight, bias)
