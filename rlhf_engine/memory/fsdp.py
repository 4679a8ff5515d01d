"""The estimate per rank under FSDP2: each role's bytes on one of ``N`` GPUs.

The convention is the trainer's under torchrun (``rlhf_engine/distributed/sharding.py``):
every trained role is ``fully_shard``-ed per decoder layer, then at its root (the wrapper:
embeddings, final norm, lm_head or scalar head); its parameters are fp32 (the masters
AdamW steps, no separate copy) and a bf16 role computes in bf16 through
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``. A frozen role is either
replicated (a full copy per rank) or sharded like a trained one in its own dtype, its root
resharded after each pass (:class:`Sharding`). Everything stays resident (the offload
executor is for one GPU). Each rank takes ``1/N`` of the step's sequences
(:func:`per_rank_workload`), so activations, KV cache and logits are the single-GPU terms
of :mod:`rlhf_engine.memory.estimate` at the rank's share, in the compute dtype.

The FSDP terms, per role, and where FSDP2 allocates them (torch 2.13,
``torch/distributed/fsdp/_fully_shard/``):

* ``weights``: the sharded parameters. ``FSDPParam._init_sharded_param`` chunks each
  parameter on dim 0 into ``N`` and pads every chunk to ``ceil(rows / N)`` rows
  (``_sharded_param_data``), so rank 0 holds ``ceil(rows / N) · (numel / rows)`` elements
  of every parameter (the padding counted), 4 B each for a trained role. A replicated
  frozen role: its full weights.
* ``optimizer``: AdamW's two fp32 moments of the trainable sharded parameters
  (``zeros_like`` of the local shard: 8 B per element of it).
* ``grads``: the sharded fp32 gradients (``FSDPParamGroup.post_backward``'s reduce-scatter
  output, accumulated into ``sharded_param.grad``) once a micro-batch has run; the head's
  unsharded ``d weight`` in the compute dtype (the one-pass lm_head loss makes it in the
  forward; it is reduced with the root, last); a layer's unsharded gradients during its
  backward; at the end, the root's.
* ``unsharded``: a trained role's root all-gathered in the compute dtype, padded
  (``foreach_all_gather`` output, ``N · ceil(rows / N)`` rows a parameter): a root is not
  resharded after its forward (``reshard_after_forward`` is False for a root), so it stays
  for the phase, and after a no-grad pass until the role's next backward
  (:func:`carried_roots`).
* ``all_gather``: the decoder layers all-gathered at once, the one in compute and the next
  (FSDP2's default prefetch of one layer: issued ahead on the all-gather stream in the
  forward, explicitly in the backward), in the compute dtype, padded; while the root's
  all-gather is copied out (``foreach_all_gather_copy_out``), its flat output beside its
  parameters; a sharded frozen role's root.
* ``reduce_scatter``: the fp32 reduce-scatter input (``foreach_reduce``'s flat buffer of
  ``N · ceil(rows / N)`` rows a parameter) of a layer, or of the root at the end of the
  backward.

A pass is the highest of its moments (:func:`_forward_moments`, :func:`_update_moments`),
not the sum of every term.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rlhf_engine.memory.estimate import (
    KINDS, PHASES, PhaseEstimate, RoleSpec, Workload, no_grad_bytes, phase_roles, score_bytes, update_terms,
    _policy_passes_in_score,
)  # fmt: skip
from rlhf_engine.memory.shapes import ModelShape

FROZEN_PLACEMENTS = ("replicate", "shard")
FSDP_KINDS = ("unsharded", "all_gather", "reduce_scatter")
PER_RANK_KINDS = KINDS + FSDP_KINDS
# Decoder layers gathered at once: the one computing and the one prefetched.
GATHERED_LAYERS = 2


@dataclass(frozen=True)
class Sharding:
    """``world_size`` ranks (FSDP2 over all of them) and where the frozen roles are:
    ``"replicate"`` (a full copy per rank) or ``"shard"`` (sharded per layer like the
    trained roles, all-gathered for each forward)."""

    world_size: int
    frozen: str = "replicate"

    def __post_init__(self):
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Sharding.world_size must be an int >= 1, got {self.world_size!r}")
        if self.frozen not in FROZEN_PLACEMENTS:
            raise ValueError(f"Sharding.frozen must be one of {FROZEN_PLACEMENTS}, got {self.frozen!r}")


def per_rank_workload(work: Workload, world_size: int) -> Workload:
    """One rank's share of a step of ``work`` (the global batch), as the trainer splits it
    under torchrun (``rlhf_engine/distributed/batches.py``): ``prompts_per_step / N`` prompts
    with their whole groups, ``minibatch_size / N`` sequences of every minibatch (one
    minibatch of the whole rollout when it is at least the rollout), and each rank sampling
    its share in one batch. Micro-batches are per rank.

    Raises:
        ValueError naming the field ``world_size`` does not divide."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--gpus must be an int >= 1, got {world_size!r}")
    fields = ["prompts_per_step"] + (["minibatch_size"] if work.minibatch_size < work.rollout_batch else [])
    for name in fields:
        value = getattr(work, name)
        if value % world_size:
            raise ValueError(
                f"--gpus {world_size} does not divide {name} = {value}: each rank takes "
                + ("whole prompt groups" if name == "prompts_per_step" else "an equal share of every minibatch")
                + f" (world sizes that divide it: {', '.join(str(d) for d in divisors(value))})"
            )
    prompts = work.prompts_per_step // world_size
    minibatch = work.minibatch_size // world_size if "minibatch_size" in fields else prompts * work.group_size
    return dataclasses.replace(work, prompts_per_step=prompts, minibatch_size=minibatch, generate_micro_batch=None)


def divisors(value: int, limit: int = 1024) -> list[int]:
    """The world sizes up to ``limit`` that divide ``value``."""
    return [d for d in range(1, min(value, limit) + 1) if value % d == 0]


def world_sizes(work: Workload, limit: int = 1024) -> list[int]:
    """Every world size up to ``limit`` the trainer can split ``work`` over (see
    :func:`per_rank_workload`), ascending."""
    sizes = divisors(work.prompts_per_step, limit)
    if work.minibatch_size < work.rollout_batch:
        sizes = [d for d in sizes if work.minibatch_size % d == 0]
    return sizes


# -- the parameters FSDP2 shards -------------------------------------------------------
def unit_parameters(shape: ModelShape, head: str, lora_rank: int = 0) -> dict[str, list[tuple[int, int, bool]]]:
    """``{"root": [...], "layer": [...]}``: ``(rows, numel, trainable_with_lora)`` of every
    parameter of the root unit and of one decoder layer, in ``transformers``' layouts
    (``nn.Linear.weight`` is ``[out, in]``; peft's ``lora_A`` ``[r, in]``, ``lora_B``
    ``[out, r]``)."""
    h, v = shape.hidden_size, shape.vocab_size
    root = [(v, v * h, False), (h, h, False)]
    if head == "lm" and not shape.tied_embeddings:
        root.append((v, v * h, False))
    if head == "scalar":
        root.append((1, h, True))  # the score row is trained under LoRA too
    layer = [(out, out * inp, False) for inp, out in shape.linear_shapes()]
    vectors = [h, h] + ([shape.head_dim] * 2 if shape.qk_norm else [])
    vectors += [shape.q_size, shape.kv_size, shape.kv_size] if shape.qkv_bias else []
    vectors += [h] if shape.o_bias else []
    vectors += [shape.intermediate_size, shape.intermediate_size, h] if shape.mlp_bias else []
    layer += [(n, n, False) for n in vectors]
    if lora_rank:
        for inp, out in shape.linear_shapes():
            layer += [(lora_rank, lora_rank * inp, True), (out, out * lora_rank, True)]
    return {"root": root, "layer": layer}


def shard_elements(params, world_size: int, trainable_only: bool = False, lora: bool = False) -> int:
    """Rank 0's elements of ``params`` sharded over ``world_size``: ``ceil(rows / N)`` rows each."""
    return sum(-(-rows // world_size) * (numel // rows) for rows, numel, lora_trained in params
               if not trainable_only or not lora or lora_trained)  # fmt: skip


def unsharded_elements(params, world_size: int, trainable_only: bool = False, lora: bool = False) -> int:
    """Elements of ``params`` all-gathered over ``world_size``, padding included."""
    return world_size * shard_elements(params, world_size, trainable_only, lora)


def _head_parameter(spec: RoleSpec) -> tuple[int, int, bool]:
    """The root's output head: the lm_head (the embedding when tied) or the score row."""
    root = unit_parameters(spec.shape, spec.head, spec.lora_rank)["root"]
    return root[0] if spec.head == "lm" and spec.shape.tied_embeddings else root[-1]


def _all_params(spec: RoleSpec) -> list:
    units = unit_parameters(spec.shape, spec.head, spec.lora_rank)
    return units["root"] + units["layer"] * spec.shape.num_layers


def sharded_role_bytes(spec: RoleSpec, world_size: int) -> dict[str, int]:
    """Rank 0's resident bytes of a sharded role: its weights (fp32 for a trained role, else
    its dtype) and, trained, AdamW's fp32 moments of the trainable ones."""
    params = _all_params(spec)
    weight_bytes = 4 if spec.trained else spec.element_bytes
    out = {"weights": shard_elements(params, world_size) * weight_bytes, "optimizer": 0}
    if spec.trained:
        out["optimizer"] = 8 * shard_elements(params, world_size, trainable_only=True, lora=bool(spec.lora_rank))
    return out


# -- the estimate ------------------------------------------------------------------------
def estimate_per_rank(specs: dict[str, RoleSpec], work: Workload, sharding: Sharding,
                      phases: tuple[str, ...] | None = None) -> dict[str, PhaseEstimate]:
    """Bytes on rank 0 per phase, role and kind (:data:`PER_RANK_KINDS`) with every role
    resident; ``work`` is one rank's share (:func:`per_rank_workload`)."""
    n = sharding.world_size
    run_phases = [p for p in PHASES if p != "update_critic" or "critic" in specs]
    phases = run_phases if phases is None else [p for p in phases if p in run_phases]
    out = {}
    for phase in phases:
        result, carried = PhaseEstimate(), carried_roots(phase, specs, work)
        for role, spec in specs.items():
            kinds = dict.fromkeys(PER_RANK_KINDS, 0)
            sharded = spec.trained or sharding.frozen == "shard"
            if sharded and not spec.is_adapter_view:
                kinds.update(sharded_role_bytes(spec, n))
            elif not sharded:
                kinds["weights"] = spec.parameters * spec.element_bytes  # an adapter view: 0
            if role in phase_roles(phase, specs) and not spec.is_adapter_view and _passes(phase, role, specs, work):
                kinds.update(_pass_bytes(phase, role, spec, work, n if sharded else 0))
            elif role in carried:
                kinds["unsharded"] = _unit_bytes(spec, n)[0]
            result.roles[role] = kinds
        if phase == "score":
            _one_pass_at_a_time(result, specs)
        out[phase] = result
    return out


def carried_roots(phase: str, specs: dict[str, RoleSpec], work: Workload) -> list[str]:
    """The trained roles whose root is still all-gathered when ``phase`` starts without the
    phase computing with them first: FSDP2 reshards a root in its post-backward, and a
    no-grad forward has none, so the policy's root stays from generate into score (counted
    here when score runs no policy pass) and a critic's from its score pass into
    update_policy. The trainer could reshard them (``FSDPModule.reshard()``); it does not."""
    if phase == "score" and "policy" in specs and not _passes("score", "policy", specs, work):
        return ["policy"]
    if phase == "update_policy" and "critic" in specs:
        return ["critic"]
    return []


def _passes(phase: str, role: str, specs, work: Workload) -> bool:
    return phase != "score" or role != "policy" or _policy_passes_in_score(specs, work)


def _pass_bytes(phase: str, role: str, spec: RoleSpec, work: Workload, world_size: int) -> dict[str, int]:
    """The role's pass in ``phase``: for a replicated frozen role (``world_size`` 0; it only
    scores) the single-GPU pass at the rank's share; for a sharded one the highest of the
    pass's moments with FSDP's buffers (:func:`_forward_moments`, :func:`_update_moments`)."""
    if not world_size:
        return score_bytes(spec, work, role)
    moments = _update_moments(spec, work, world_size) if phase.startswith("update") else _forward_moments(phase, role, spec, work, world_size)
    return max(moments, key=lambda kinds: sum(kinds.values()))


def _unit_bytes(spec: RoleSpec, world_size: int, trainable_only: bool = False) -> tuple[int, int]:
    """``(root, layer)``: the all-gathered bytes of the root and of one decoder layer in the
    compute dtype, padding included (``trainable_only``: of their trainable parameters)."""
    units = unit_parameters(spec.shape, spec.head, spec.lora_rank)
    lora = bool(spec.lora_rank)
    return tuple(unsharded_elements(units[u], world_size, trainable_only, lora) * spec.element_bytes for u in ("root", "layer"))


def _forward_moments(phase: str, role: str, spec: RoleSpec, work: Workload, world_size: int) -> list[dict[str, int]]:
    """A no-grad pass (generate, score) of a sharded role has these high points: computing
    (the single-GPU activations / logits / KV cache with the units :func:`_gathered`; for
    generation the prefill and the last decode step apart), and the root's all-gather at
    the pass's start (:func:`_copying_root`). A trained
    role's root stays unsharded after its forward (``unsharded``, for the phase); a frozen
    sharded role's is resharded after its pass (``all_gather``, transient)."""
    gathered, copying = _gathered(spec, world_size), _copying_root(spec, world_size)
    if phase == "score":
        return [{**score_bytes(spec, work, role), **gathered}, copying]
    return [{**kinds, **gathered} for kinds in _generate_moments(spec, work)] + [copying]


def _generate_moments(spec: RoleSpec, work: Workload) -> list[dict[str, int]]:
    """Generation's two computing moments, apart (``estimate.generate_bytes`` adds the final
    cache to the larger of them): the prompt's prefill beside the prompt's KV
    cache, and the last decode step's logits beside the cache at its final length. The
    root's all-gather comes first, before any cache exists (a trained root then stays
    gathered for the whole generation)."""
    shape, a, n = spec.shape, spec.element_bytes, work.generate_micro_batch
    per_token = shape.kv_bytes_per_token(a)
    prefill = n * work.prompt_length * no_grad_bytes(shape, a, work.prompt_length)
    return [{"activations": prefill, "kv_cache": n * work.prompt_length * per_token},
            {"logits": n * shape.vocab_size * (a + 30), "kv_cache": n * work.sequence_length * per_token}]  # fmt: skip


def _gathered(spec: RoleSpec, world_size: int) -> dict[str, int]:
    """While a sharded role computes: its root unsharded and :data:`GATHERED_LAYERS` layers."""
    root, layer = _unit_bytes(spec, world_size)
    if spec.trained:
        return {"unsharded": root, "all_gather": GATHERED_LAYERS * layer}
    return {"all_gather": root + GATHERED_LAYERS * layer}


def _copying_root(spec: RoleSpec, world_size: int) -> dict[str, int]:
    """While the root's all-gather is copied out (``foreach_all_gather_copy_out``): its flat
    all-gather output and its unsharded parameters at once, and a layer's all-gather output
    and parameters (FSDP2 keeps the last all-gather result until the next one is done)."""
    root, layer = _unit_bytes(spec, world_size)
    if spec.trained:
        return {"unsharded": root, "all_gather": root + GATHERED_LAYERS * layer}
    return {"all_gather": 2 * root + GATHERED_LAYERS * layer}


def _update_moments(spec: RoleSpec, work: Workload, world_size: int) -> list[dict[str, int]]:
    """The high points of an update micro-batch of a sharded role (``prior``: the sharded
    fp32 gradients the earlier micro-batches left, when there are several; with LoRA the
    adapters' are counted throughout, they are small):

    * the root's all-gather at the start of the forward (:func:`_copying_root`);
    * the end of the lm_head loss's forward: the saved activations, the fused lm_head's
      workspace, the root unsharded and a trained head's gradient ``d weight`` (the one-pass
      loss makes it in the forward);
    * the start of the backward: the workspace freed, ``d weight`` and its scaled copy
      (``2·V·H·a``; FSDP reduces each micro-batch, so no unsharded sum is kept);
    * in the last block's backward: its transient on the saved activations, the root and
      :data:`GATHERED_LAYERS` layers gathered, ``d weight`` (reduced with the root, last) and
      the layer's unsharded gradients in the compute dtype;
    * that layer's reduce-scatter (``FSDPParamGroup.post_backward``), its transient freed: the
      same plus the fp32 reduce-scatter input;
    * the root's reduce-scatter at the end of the backward (activations freed, the root's
      parameters resharded): every sharded gradient, the root's unsharded gradients and its
      fp32 reduce-scatter input."""
    a = spec.element_bytes
    terms = update_terms(spec, work)
    lora = bool(spec.lora_rank)
    several = work.update_micro_batch < work.update_rows
    trainable = shard_elements(_all_params(spec), world_size, trainable_only=True, lora=lora) * 4
    prior = trainable if several or lora else 0
    root, _ = _unit_bytes(spec, world_size)
    root_grad, layer_grad = _unit_bytes(spec, world_size, trainable_only=True)
    head_grad = 0 if lora and spec.head == "lm" else unsharded_elements([_head_parameter(spec)], world_size) * a
    gathering = {"grads": prior, **_copying_root(spec, world_size)}
    head_end = {"activations": terms["saved"], "logits": terms["logits"], "unsharded": root, "grads": prior + head_grad}
    head_backward = {"activations": terms["saved"], "unsharded": root, "grads": prior + 2 * head_grad}
    in_blocks = {"activations": terms["saved"] + terms["blocks"], "grads": prior + head_grad + layer_grad,
                 **_gathered(spec, world_size)}  # fmt: skip
    layer_reduce = {**in_blocks, "activations": terms["saved"], "reduce_scatter": layer_grad * 4 // a}
    root_reduce = {"grads": trainable + root_grad, "reduce_scatter": root_grad * 4 // a}
    return [gathering, head_end, head_backward, in_blocks, layer_reduce, root_reduce]


def _one_pass_at_a_time(result: PhaseEstimate, specs) -> None:
    """Score runs one model at a time, in :func:`phase_roles` order: during a role's pass
    only its transients (activations, logits, gathered units) are alive, beside the roots
    of the trained roles that ran before it (a root stays unsharded after its forward) and
    its own. The peak is the highest of those passes; the others' bytes are set to what is
    alive then."""
    transient = ("activations", "logits", "all_gather")
    order = list(phase_roles("score", specs))

    def alive(k: int, role: str, kind: str) -> int:
        i = order.index(role)
        if kind in transient:
            return result.roles[role][kind] if i == k else 0
        return result.roles[role][kind] if kind != "unsharded" or i <= k else 0

    def total(k: int) -> int:
        return sum(alive(k, role, kind) for role in order for kind in result.roles[role])

    peak = max(range(len(order)), key=total)
    result.roles = {role: {kind: alive(peak, role, kind) for kind in kinds} for role, kinds in result.roles.items()}


__all__ = ["FROZEN_PLACEMENTS", "FSDP_KINDS", "PER_RANK_KINDS", "Sharding", "estimate_per_rank", "per_rank_workload",
           "carried_roots", "sharded_role_bytes", "unit_parameters", "world_sizes"]
