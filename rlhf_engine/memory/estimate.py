"""``estimate``: the GPU bytes each role needs in each phase of an RL step, from configs alone.

Pure arithmetic over :class:`~rlhf_engine.memory.shapes.ModelShape`, dtypes, LoRA rank,
checkpointing and the workload; no model is built and no GPU is touched. The formulas
count what the trainer's own code path allocates (``PolicyModel`` / ``ScalarHeadModel``
on ``transformers`` Llama-family blocks, ``ops.fused_linear_policy_loss``, AdamW); each
term's origin is given where it is computed. They are checked against traced peaks of
the real phases (:mod:`rlhf_engine.memory.trace`): within 10% on real-size shapes.

Notation: ``a`` bytes per activation / weight element of the role (2 for bf16, 4 for
fp32), ``H`` hidden, ``I`` intermediate, ``q = heads·d``, ``L`` layers, ``V`` vocabulary,
``T = P + R`` tokens per sequence (prompt + response), ``n`` sequences per pass.

Per role and phase the bytes come as kinds:

* ``weights``: parameters × ``a`` (LoRA adapters included, in the weights' dtype).
* ``optimizer``: AdamW's two moments in fp32, 8 B per trained parameter, and for bf16
  roles the fp32 master copy, 4 B more (``rlhf_engine.algos.precision``). Resident in
  every phase unless the plan offloads it.
* ``grads``: trained parameters × ``a`` in the role's update phase.
* ``activations``: what the forward keeps for backward (update phases) or the working set
  of a no-grad pass (score, generate), see :func:`layer_activation_bytes`.
* ``kv_cache``: ``n·T·2·L·kv_heads·d·a`` while generating (the cache at its final length).
* ``logits``: the fused lm_head's chunk of logits and its fp32 buffers, or the
  ``[n, V]`` logits of a decode step and the sampler's temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf_engine.memory.shapes import ModelShape
from rlhf_engine.ops._lm_head_chunks import chunk_rows_for

PHASES = ("generate", "score", "update_policy", "update_critic")
ROLES = ("policy", "reference", "critic", "reward_model")
KINDS = ("weights", "grads", "optimizer", "activations", "kv_cache", "logits")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# Residencies whose bytes are on the GPU during the phase.
ON_DEVICE = ("device", "prefetch")


@dataclass(frozen=True)
class RoleSpec:
    """One model of the run.

    Attributes:
        config: the Hugging Face config (``PretrainedConfig``; the tracer builds from it).
        shape: its :class:`ModelShape`. head: ``"lm"`` (policy, reference) or ``"scalar"``
            (critic, reward model). dtype: ``"fp32"`` or ``"bf16"``. trained: has an optimizer.
        lora_rank: 0 for full fine-tuning. checkpointing: gradient checkpointing in its update.
        is_adapter_view: the reference of a LoRA policy, the base with the adapter disabled
            (no weights of its own).
    """

    config: Any
    shape: ModelShape
    head: str
    dtype: str
    trained: bool
    lora_rank: int = 0
    checkpointing: bool = False
    is_adapter_view: bool = False

    def __post_init__(self):
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"RoleSpec.head must be 'lm' or 'scalar', got {self.head!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"RoleSpec.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"RoleSpec.lora_rank must be an int >= 0, got {self.lora_rank!r}")

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]

    @property
    def parameters(self) -> int:
        """Every parameter the role's module holds (adapters included)."""
        if self.is_adapter_view:
            return 0
        lora = self.shape.lora_parameters(self.lora_rank) if self.lora_rank else 0
        return self.shape.parameters(self.head) + lora

    @property
    def trainable_parameters(self) -> int:
        """Parameters with gradients and optimizer state: all of them, or with LoRA the
        adapters (and a scalar head's ``score`` row)."""
        if not self.trained:
            return 0
        if not self.lora_rank:
            return self.parameters
        return self.shape.lora_parameters(self.lora_rank) + (self.shape.hidden_size if self.head == "scalar" else 0)


@dataclass(frozen=True)
class Workload:
    """One RL step's sizes. ``rollout_batch = prompts_per_step · group_size`` sequences of
    ``prompt_length + response_length`` tokens; the update runs minibatches of
    ``minibatch_size`` sequences; each phase runs its passes over micro-batches of the given
    number of sequences (None: the whole batch / minibatch at once).

    ``score_policy_pass``: whether score runs the policy's no-grad pass for the old logprobs
    (False: an on-policy update takes them from its own forward, ``RLConfig.old_logprob_pass``).
    Without it the policy still has its weights on the GPU in score (update_policy follows,
    so an offload there would be a prefetch that lowers no peak) but no pass of its own,
    unless it is the reference of a LoRA run (the adapter-disabled pass).

    ``lm_head_one_pass``: whether the policy loss makes the lm_head's gradients in its
    forward (every loss but GSPO, ``rlhf_engine/ops/_lm_head_loss_grad.py``) or recomputes
    the logits in the backward (GSPO). ``lm_head_chunk_rows``: tokens per chunk of the
    fused lm_head in the update (None: the op's rule for the device, see
    ``rlhf_engine/ops/_lm_head_chunks.py``)."""

    prompts_per_step: int
    group_size: int
    prompt_length: int
    response_length: int
    minibatch_size: int
    generate_micro_batch: int | None = None
    score_micro_batch: int | None = None
    update_micro_batch: int | None = None
    score_policy_pass: bool = True
    lm_head_one_pass: bool = True
    lm_head_chunk_rows: int | None = None

    def __post_init__(self):
        for name in ("prompts_per_step", "group_size", "prompt_length", "response_length", "minibatch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name} must be an int >= 1, got {value!r}")
        for name in ("generate_micro_batch", "score_micro_batch", "update_micro_batch", "lm_head_chunk_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Workload.{name} must be an int >= 1 or None, got {value!r}")
        for name in ("score_policy_pass", "lm_head_one_pass"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Workload.{name} must be a bool, got {getattr(self, name)!r}")
        # Normalize: None means the whole batch.
        object.__setattr__(self, "generate_micro_batch", min(self.generate_micro_batch or self.rollout_batch, self.rollout_batch))
        object.__setattr__(self, "score_micro_batch", min(self.score_micro_batch or self.rollout_batch, self.rollout_batch))
        object.__setattr__(self, "update_micro_batch", min(self.update_micro_batch or self.update_rows, self.update_rows))

    @property
    def rollout_batch(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def update_rows(self) -> int:
        """Sequences in one minibatch (the last one may be smaller; the first is the largest)."""
        return min(self.minibatch_size, self.rollout_batch)

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.response_length


@dataclass
class PhaseEstimate:
    """Bytes per role and kind in one phase, and the phase's peak (their sum)."""

    roles: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.roles.values())

    def role_bytes(self, role: str) -> int:
        return sum(self.roles.get(role, {}).values())


def phase_roles(phase: str, specs: dict[str, RoleSpec]) -> tuple[str, ...]:
    """The roles a phase computes with (the others only need to be somewhere)."""
    used = {
        "generate": ("policy",),
        "score": ("policy", "reference", "critic", "reward_model"),
        "update_policy": ("policy",),
        "update_critic": ("critic",),
    }[phase]
    return tuple(role for role in used if role in specs)


# -- the terms ---------------------------------------------------------------------------
def layer_activation_bytes(shape: ModelShape, a: int, tokens_per_sequence: int) -> int:
    """Bytes one block keeps for backward, per token (transformers' Llama / Qwen2 block,
    SDPA attention), counted tensor by tensor and confirmed with MemTracker:

    * two RMSNorms: the fp32 upcast of the input (bf16 models: 4 B per H), the normalized
      input and the scaled output, ``(6a [+4])·H``, and fp32 ``rsqrt`` per token;
    * attention: q after RoPE, k and v expanded to every head (``repeat_kv``), the output
      and its contiguous copy for ``o_proj``: ``4a·q``; the softmax logsumexp, fp32 per head;
      and the ``[n, 1, T, T]`` attention mask in the model dtype: ``a·T`` per token;
    * MLP: gate, SiLU(gate), up and their product: ``4a·I``.
    """
    h_bytes = 6 * a + (4 if a < 4 else 0)
    const = 8 if a < 4 else 64
    return (
        4 * a * shape.intermediate_size + h_bytes * shape.hidden_size + 4 * a * shape.q_size
        + 4 * shape.num_heads + a * tokens_per_sequence + const
    )  # fmt: skip


def backward_transient_bytes(shape: ModelShape, a: int) -> int:
    """Per token, what the last block's backward holds on top of the saved activations at
    the update's peak (the gradients of its MLP activations, ``3a·I``, and of its input
    and normed input), less what that block has freed by then (MemTracker: ``≈ 3a·I −
    2.8a·H``)."""
    return 3 * a * shape.intermediate_size - (28 * a * shape.hidden_size) // 10


def no_grad_bytes(shape: ModelShape, a: int, tokens_per_sequence: int) -> int:
    """Per token, the peak of a forward without gradients (score, prefill), counted by
    MemTracker on transformers' blocks: the MLP's gate, up and product alive at once
    (``3a·I``), the residual stream and the normed input (``2a·H``), each block's output
    hidden state, which ``transformers`` keeps until the forward returns (``L·a·H``), and
    the attention mask (``a·T/2`` per token, with a 256 B allowance for the rest)."""
    return (
        3 * a * shape.intermediate_size + (2 + shape.num_layers) * a * shape.hidden_size
        + a * tokens_per_sequence // 2 + 256
    )  # fmt: skip


def lm_head_chunk_rows(tokens: int, vocab: int, a: int, rows: int | None = None) -> int:
    """Rows of the fused lm_head's logits chunk on CUDA: ``rows`` when the run sets them
    (``Workload.lm_head_chunk_rows``), else the op's own rule
    (``rlhf_engine.ops._lm_head_chunks.chunk_rows_for``)."""
    return max(1, min(tokens, rows)) if rows else chunk_rows_for(tokens, vocab, a, "cuda")


def lm_head_backward_workspace(tokens: int, shape: ModelShape, a: int, rows: int | None = None) -> int:
    """Inside the fused lm_head's backward custom op (invisible to a fake trace): the fp32
    ``d hidden`` accumulator ``[N, H]``, one recomputed vocabulary tile of logits (as many
    logits as a forward chunk, in the model dtype) and, for bf16, the fp32 product of
    ``dz_t @ weight_t`` before it is added (``[N, H]`` fp32)."""
    tile = lm_head_chunk_rows(tokens, shape.vocab_size, a, rows) * shape.vocab_size * a
    return tokens * shape.hidden_size * 4 * (2 if a < 4 else 1) + tile


def lm_head_one_pass_workspace(tokens: int, shape: ModelShape, a: int, head_trained: bool, rows: int | None = None) -> int:
    """Inside the one-pass policy loss's custom op (invisible to a fake trace): one chunk of
    logits (model dtype, turned into ``dz`` in place) and, for a trained 16-bit lm_head over
    several chunks, the fp32 ``[V, H]`` sum of ``d weight`` (its bf16 result is an output
    the trace sees)."""
    rows = lm_head_chunk_rows(tokens, shape.vocab_size, a, rows)
    fp32_sum = shape.vocab_size * shape.hidden_size * 4 if head_trained and a < 4 and tokens > rows else 0
    return rows * shape.vocab_size * a + fp32_sum


def lm_head_workspace(phase: str, specs: dict[str, RoleSpec], work: Workload) -> int:
    """The lm_head workspace of ``phase`` that a fake trace cannot see: in the update, the
    one-pass loss's (:func:`lm_head_one_pass_workspace`) or, for GSPO, the recompute
    backward's; the no-grad scoring pass runs the Triton GEMM with its logsumexp epilogue,
    which holds no logits."""
    if phase != "update_policy" or "policy" not in specs:
        return 0
    spec = specs["policy"]
    tokens = work.update_micro_batch * work.response_length
    rows = work.lm_head_chunk_rows
    if work.lm_head_one_pass:
        return lm_head_one_pass_workspace(tokens, spec.shape, spec.element_bytes, not spec.lora_rank, rows)
    return lm_head_backward_workspace(tokens, spec.shape, spec.element_bytes, rows)


def weights_bytes(spec: RoleSpec) -> int:
    return spec.parameters * spec.element_bytes


def optimizer_bytes(spec: RoleSpec) -> int:
    """AdamW's fp32 moments (8 B per trained parameter) and, for bf16, the fp32 master (4 B)."""
    per_param = 8 + (4 if spec.dtype != "fp32" else 0)
    return spec.trainable_parameters * per_param


def grads_bytes(spec: RoleSpec) -> int:
    return spec.trainable_parameters * spec.element_bytes


def generate_bytes(spec: RoleSpec, work: Workload) -> dict[str, int]:
    """The policy's transient bytes while generating: the KV cache of ``n`` sequences at
    length ``T``; the larger of the prompt prefill's block working set and the decode step's
    logits (``[n, V]`` in the model dtype, then fp32 copies for temperature, sort values and
    int64 indices, softmax, cumsum and logsumexp: ``a + 30`` B per entry, as traced)."""
    shape, a, n = spec.shape, spec.element_bytes, work.generate_micro_batch
    kv = n * work.sequence_length * shape.kv_bytes_per_token(a)
    prefill = n * work.prompt_length * no_grad_bytes(shape, a, work.prompt_length)
    decode = n * shape.vocab_size * (a + 30)
    return {"kv_cache": kv, "activations": prefill if prefill > decode else 0, "logits": decode if decode >= prefill else 0}


def score_bytes(spec: RoleSpec, work: Workload, role: str) -> dict[str, int]:
    """One no-grad pass over ``n`` sequences of ``T`` tokens (:func:`no_grad_bytes`); for lm roles the fp32 logprobs / logsumexp / entropy of the
    response tokens (the Triton forward holds no logits)."""
    shape, a, n, t = spec.shape, spec.element_bytes, work.score_micro_batch, work.sequence_length
    activations = n * t * no_grad_bytes(shape, a, t)
    logits = n * work.response_length * 4 * 3 if spec.head == "lm" else n * t * 4
    return {"activations": activations, "logits": logits}


def update_bytes(spec: RoleSpec, work: Workload) -> dict[str, int]:
    """The trained role's update (:func:`update_pass_bytes`), or its optimizer step when that
    is the higher point: fused AdamW has no temporaries, but it holds fp32 gradients, 4 B per
    trained parameter (a bf16 role's move to its fp32 masters), and no activations."""
    passes = update_pass_bytes(spec, work)
    step = spec.trainable_parameters * 4
    if step > sum(passes.values()):
        return {"grads": step, "activations": 0, "logits": 0}
    return passes


def update_pass_bytes(spec: RoleSpec, work: Workload) -> dict[str, int]:
    """The trained role's forward and backward over one minibatch in micro-batches of ``n`` sequences.

    Saved activations of every block (with checkpointing only each block's input, ``a·H``
    per token), then the higher of two moments of the backward: at the lm_head, a trained
    lm_head's (or tied embedding's) fresh gradient ``V·H·a`` and, once a first micro-batch
    has left one, its accumulated sum (as much again); in the blocks, the last block's
    backward transient (and with checkpointing its recomputed activations); a frozen
    lm_head (LoRA) gets no ``d weight``. Gradients: all
    of them once a first micro-batch has run; with one micro-batch only the lm_head's, as
    the blocks' gradients appear while their activations are freed. For the policy, the
    fused lm_head's workspace (:func:`lm_head_workspace`)."""
    shape, a = spec.shape, spec.element_bytes
    terms = update_terms(spec, work)
    several = work.update_micro_batch < work.update_rows
    head = shape.vocab_size * shape.hidden_size if spec.head == "lm" else shape.hidden_size
    head_trained = spec.trained and not spec.lora_rank
    at_head = head * a * (2 if several else 1) if head_trained else 0
    activations = terms["saved"] + max(terms["blocks"], at_head)
    if several or spec.lora_rank:
        grads = grads_bytes(spec)
    else:
        grads = min(grads_bytes(spec), head * a)
    logits = terms["logits"]
    return {"grads": grads, "activations": activations, "logits": logits}


def update_terms(spec: RoleSpec, work: Workload) -> dict[str, int]:
    """The update's activation terms for a micro-batch of ``n`` sequences: ``saved``, what
    every block keeps for backward (with checkpointing each block's input, ``a·H`` per
    token); ``blocks``, the last block's backward transient on top (with checkpointing its
    recomputed activations too); ``logits``, the fused lm_head's workspace (lm roles)."""
    shape, a, n, t = spec.shape, spec.element_bytes, work.update_micro_batch, work.sequence_length
    tokens = n * t
    per_layer = layer_activation_bytes(shape, a, t)
    if spec.checkpointing:
        saved = tokens * shape.num_layers * a * shape.hidden_size
        blocks = tokens * (per_layer + backward_transient_bytes(shape, a))
    else:
        saved = tokens * shape.num_layers * per_layer
        blocks = tokens * backward_transient_bytes(shape, a)
    logits = 0
    if spec.head == "lm":
        tokens_out = n * work.response_length
        head_trained = spec.trained and not spec.lora_rank
        if work.lm_head_one_pass:
            logits = lm_head_one_pass_workspace(tokens_out, shape, a, head_trained, work.lm_head_chunk_rows)
        else:
            logits = lm_head_backward_workspace(tokens_out, shape, a, work.lm_head_chunk_rows)
    return {"saved": saved, "blocks": blocks, "logits": logits}


def estimate(
    specs: dict[str, RoleSpec], work: Workload, residency: dict[str, dict[str, str]] | None = None,
    phases: tuple[str, ...] | None = None,
) -> dict[str, PhaseEstimate]:
    """Bytes on the GPU per phase, role and kind, on one GPU (per rank under FSDP2:
    :func:`rlhf_engine.memory.fsdp.estimate_per_rank`).

    Args:
        specs: the run's roles (``policy`` required; ``reference``, ``critic``,
            ``reward_model`` when present).
        work: the step's sizes and micro-batches.
        residency: per phase, per role, where its weights are (``"device"``, ``"offload"``,
            ``"prefetch"`` (offloaded, being copied in for the next phase: on the device),
            ``"swap"``, ``"adapter"``; see :mod:`rlhf_engine.memory.plan`) and, under the key
            ``"<role>.optimizer"``, where its optimizer state is. None: everything on the
            device (``--plan off``).
        phases: only these (default: every phase the run has).

    Returns:
        ``{phase: PhaseEstimate}`` for the phases the run has (``update_critic`` only with a critic).
    """
    if "policy" not in specs:
        raise ValueError("estimate: specs must include a 'policy'")
    unknown = sorted(set(specs) - set(ROLES))
    if unknown:
        raise ValueError(f"estimate: unknown roles {unknown}; expected some of {ROLES}")
    run_phases = [p for p in PHASES if p != "update_critic" or "critic" in specs]
    phases = run_phases if phases is None else [p for p in phases if p in run_phases]
    out = {}
    for phase in phases:
        where = (residency or {}).get(phase, {})
        result = PhaseEstimate()
        for role, spec in specs.items():
            kinds = dict.fromkeys(KINDS, 0)
            if where.get(role, "device") in ON_DEVICE:
                kinds["weights"] = weights_bytes(spec)
            if spec.trained and where.get(f"{role}.optimizer", "device") in ON_DEVICE:
                kinds["optimizer"] = optimizer_bytes(spec)
            if role in phase_roles(phase, specs) and not spec.is_adapter_view:
                if phase == "generate":
                    kinds.update(generate_bytes(spec, work))
                elif phase == "score":
                    if role != "policy" or _policy_passes_in_score(specs, work):
                        kinds.update(score_bytes(spec, work, role))
                else:
                    kinds.update(update_bytes(spec, work))
            result.roles[role] = kinds
        if phase == "score":
            _score_one_pass_at_a_time(result, specs)
        out[phase] = result
    return out


def _policy_passes_in_score(specs: dict[str, RoleSpec], work: Workload) -> bool:
    """Whether score runs a pass on the policy: for its old logprobs, or as the reference of a
    LoRA policy (whose adapter-disabled pass the policy's row counts)."""
    reference = specs.get("reference")
    return work.score_policy_pass or (reference is not None and reference.is_adapter_view)


def _score_one_pass_at_a_time(result: PhaseEstimate, specs: dict[str, RoleSpec]) -> None:
    """Scoring runs one model at a time: only the largest pass's transient counts."""
    transient = ("activations", "logits")
    largest = max(specs, key=lambda role: sum(result.roles[role][k] for k in transient))
    for role in specs:
        if role != largest:
            for kind in transient:
                result.roles[role][kind] = 0
