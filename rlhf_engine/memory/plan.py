"""``plan``: where each model lives in each phase, and how many sequences each pass takes.

Given the run's roles, its workload and a GPU memory budget, ``plan`` chooses:

* each role's **residency** per phase: ``"device"``; ``"offload"`` (pinned CPU memory
  while the phase does not use it, moved back before a phase that does); for the
  reference, ``"swap"`` (its weights stay in pinned CPU memory and are copied into the
  policy's own parameters for the reference pass, so the GPU never holds two copies) or,
  with a LoRA policy, ``"adapter"`` (the policy with its adapter disabled: nothing to move);
  and for the trained roles where their optimizer state is (``"<role>.optimizer"``);
* the **micro-batch** of each phase (sequences per forward), the largest that fits, and
  for the policy's update the fused lm_head's chunk (the op's rule, or its smallest chunk
  when that lets a larger micro-batch fit);
* **gradient checkpointing** of each trained role, when allowed.

Among the choices that fit, it takes the one that moves the fewest bytes per step, then
the one with fewer checkpointed roles, then the largest micro-batches. When nothing fits
it says what would, and by how much (:class:`Suggestion`).

Bytes moved per step: a trained item offloaded while unused goes out and back (2x its
bytes per off-period in the cycle of phases); a frozen model offloaded keeps its pinned
CPU copy, so only the copy in moves (1x); ``swap`` moves the reference in and the
policy's weights out and back (``R + 2P``).

With ``gpus`` > 1 (:func:`plan_per_rank`) the plan is rank 0's under FSDP2
(:mod:`rlhf_engine.memory.fsdp`): every role resident, the frozen roles replicated when that
fits, else sharded; :func:`fewest_gpus` finds the smallest world size that fits.

Budget: the GPU's total memory less the CUDA context (:data:`CUDA_CONTEXT_BYTES`) and a
margin (:data:`ALLOCATOR_RESERVE_FRACTION` of the peak, for the caching allocator's
rounding and fragmentation and the estimate's tolerance); the phases' predicted peaks are
compared with what remains. A measured ``max_memory_allocated`` is to be compared with ``peak_bytes``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field

from rlhf_engine.memory.estimate import PHASES, KINDS, RoleSpec, Workload, estimate, phase_roles
from rlhf_engine.memory.fsdp import Sharding, estimate_per_rank, per_rank_workload, world_sizes
from rlhf_engine.ops._lm_head_chunks import MIN_CHUNK_ROWS

GIB = 1 << 30
# Total memory as CUDA reports it for each built-in GPU (torch.cuda.get_device_properties).
GPU_MEMORY = {
    "a100-40gb": 42_505_273_344,
    "a100-80gb": 85_899_345_920,
    "h100-80gb": 85_520_809_984,
    "h200-141gb": 150_754_820_096,
}
# The CUDA context, cuBLAS/cuDNN workspaces and kernels loaded by torch + Triton on an H100:
# about 0.5-0.9 GiB; one GiB is kept for it.
CUDA_CONTEXT_BYTES = GIB
# The caching allocator rounds blocks up and fragments (reserved memory runs a few percent over
# the allocated peak), and the estimate is held to within 10% of traced peaks: a tenth of the
# peak is kept free for both.
ALLOCATOR_RESERVE_FRACTION = 0.10
RESIDENCIES = ("device", "offload", "swap", "adapter")
# LoRA rank the suggestions try when the run is full fine-tuning.
SUGGESTED_LORA_RANK = 64


def parse_memory(text: str) -> int:
    """``"80GiB"``, ``"80GB"``, ``"81920MiB"``, ``"8.5e10"`` -> bytes (GB = 10^9, GiB = 2^30).

    Raises ValueError naming the value for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGTkmgt]i?[Bb]|[Bb])?\s*", str(text))
    if not match:
        raise ValueError(f"--gpu-memory must be a size such as '80GiB', '40GB' or '81920MiB', got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B")
    unit = unit[0].upper() + unit[1:-1].lower() + "B" if len(unit) > 1 else "B"
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    return int(number * scale[unit])


def gpu_budget(name: str) -> int:
    """Total bytes of a built-in GPU name (see :data:`GPU_MEMORY`)."""
    key = name.lower()
    if key not in GPU_MEMORY:
        raise ValueError(f"--gpu must be one of {sorted(GPU_MEMORY)}, got {name!r} (or give --gpu-memory)")
    return GPU_MEMORY[key]


@dataclass
class PhasePlan:
    """One phase: its micro-batch, each role's residency and bytes by kind, the peak."""

    micro_batch: int
    peak_bytes: int
    roles: dict[str, dict] = field(default_factory=dict)
    lm_head_chunk_rows: int | None = None  # update_policy: set when the plan chose it (None: the op's rule)


@dataclass
class Suggestion:
    """A change that would make the run fit: ``what`` in words, the largest phase peak
    with it, and the change itself (config fields)."""

    what: str
    peak_bytes: int
    change: dict


@dataclass
class Plan:
    """The chosen residency, micro-batches and checkpointing, and the predicted peaks."""

    fits: bool
    budget_bytes: int
    usable_bytes: int
    phases: dict[str, PhasePlan]
    residency: dict[str, dict[str, str]]
    checkpointing: dict[str, bool]
    bytes_moved_per_step: int
    suggestions: list[Suggestion] = field(default_factory=list)
    gpus: int = 1  # FSDP2 ranks; above 1 the bytes are rank 0's (rlhf_engine.memory.fsdp)
    frozen: str | None = None  # with gpus > 1: "replicate" or "shard", where the frozen roles are
    fewest_gpus: int | None = None  # the smallest world size that fits, when asked (fewest_gpus())

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases.values())

    @property
    def micro_batches(self) -> dict[str, int]:
        return {phase: p.micro_batch for phase, p in self.phases.items()}

    def schedule(self) -> dict[str, dict[str, dict[str, str]]]:
        """The residency as :class:`rlhf_engine.memory.executor.PlacementExecutor` takes it:
        ``{phase: {"weights": {role: r}, "optimizer": {role: r}}}``."""
        out = {}
        for phase in self.phases:
            weights = {role: where[phase] for role, where in self.residency.items() if "." not in role}
            optimizer = {role.split(".")[0]: where[phase] for role, where in self.residency.items() if "." in role}
            out[phase] = {"weights": weights, "optimizer": optimizer}
        return out

    def to_dict(self) -> dict:
        """The plan for programs (what ``rlhf-engine plan --json`` prints)."""
        return {
            "fits": self.fits,
            "gpus": self.gpus,
            **({"frozen": self.frozen} if self.gpus > 1 else {}),
            **({"fewest_gpus": self.fewest_gpus} if self.fewest_gpus is not None else {}),
            "budget_bytes": self.budget_bytes,
            "usable_bytes": self.usable_bytes,
            "cuda_context_bytes": CUDA_CONTEXT_BYTES,
            "allocator_reserve_fraction": ALLOCATOR_RESERVE_FRACTION,
            "peak_bytes": self.peak_bytes,
            "bytes_moved_per_step": self.bytes_moved_per_step,
            "checkpointing": dict(self.checkpointing),
            "phases": {
                phase: {"peak_bytes": p.peak_bytes, "micro_batch": p.micro_batch, "roles": p.roles,
                        **({"lm_head_chunk_rows": p.lm_head_chunk_rows} if p.lm_head_chunk_rows else {})}
                for phase, p in self.phases.items()
            },
            "suggestions": [dataclasses.asdict(s) for s in self.suggestions],
        }


def usable_bytes(budget_bytes: int) -> int:
    """What the phases' peaks may use of ``budget_bytes``: less the CUDA context, and the
    allocator reserve (so ``peak · (1 + reserve) <= budget - context``)."""
    if budget_bytes <= CUDA_CONTEXT_BYTES:
        raise ValueError(
            f"GPU memory budget {budget_bytes / GIB:.2f} GiB is not larger than the CUDA context alone "
            f"({CUDA_CONTEXT_BYTES / GIB:.2f} GiB)"
        )
    return int((budget_bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_RESERVE_FRACTION))


# -- the choices -------------------------------------------------------------------------
def _unused_phases(role: str, specs: dict[str, RoleSpec], phases: list[str]) -> list[str]:
    return [p for p in phases if role not in phase_roles(p, specs)]


def _off_blocks(off: set[str], phases: list[str]) -> int:
    """How many maximal runs of consecutive phases (cyclically: a step follows a step) are in ``off``."""
    if not off or len(off) == len(phases):
        return 0 if not off else 1
    return sum(1 for i, p in enumerate(phases) if p in off and phases[i - 1] not in off)


def _weight_options(role: str, specs: dict[str, RoleSpec], phases: list[str]) -> list[dict[str, str]]:
    """Each way to place ``role``'s weights over the phases (residency per phase)."""
    spec = specs[role]
    if spec.is_adapter_view:
        return [{p: "adapter" for p in phases}]
    unused = _unused_phases(role, specs, phases)
    options = []
    for r in range(len(unused) + 1):
        for off in itertools.combinations(unused, r):
            options.append({p: ("offload" if p in off else "device") for p in phases})
    if role == "reference" and "policy" in specs and not specs["policy"].lora_rank:
        options.append({p: "swap" for p in phases})  # never on the device as a copy of its own
    return options


def _optimizer_options(role: str, specs: dict[str, RoleSpec], phases: list[str]) -> list[dict[str, str]]:
    """Optimizer state: resident, or offloaded in every phase but its role's update."""
    update = "update_policy" if role == "policy" else "update_critic"
    return [{p: "device" for p in phases}, {p: ("device" if p == update else "offload") for p in phases}]


def _bytes_moved(specs: dict[str, RoleSpec], residency: dict[str, dict[str, str]], phases: list[str]) -> int:
    from rlhf_engine.memory.estimate import optimizer_bytes, weights_bytes

    moved = 0
    for role, spec in specs.items():
        where = residency[role]
        if any(w == "swap" for w in where.values()):
            moved += weights_bytes(spec) + 2 * weights_bytes(specs["policy"])
            continue
        blocks = _off_blocks({p for p in phases if where[p] == "offload"}, phases)
        moved += blocks * weights_bytes(spec) * (2 if spec.trained else 1)
        if spec.trained:
            opt = residency[f"{role}.optimizer"]
            moved += 2 * optimizer_bytes(spec) * _off_blocks({p for p in phases if opt[p] == "offload"}, phases)
    return moved


def _phase_micro_batch_field(phase: str) -> str:
    return {"generate": "generate_micro_batch", "score": "score_micro_batch"}.get(phase, "update_micro_batch")


def _phase_rows(phase: str, work: Workload) -> int:
    return work.update_rows if phase.startswith("update") else work.rollout_batch


def _by_phase(residency: dict[str, dict[str, str]], phases: list[str]) -> dict[str, dict[str, str]]:
    """``{role: {phase: r}}`` -> ``{phase: {role: r}}``, what ``estimate`` reads (``swap``
    and ``adapter`` hold no weights of their own on the device). What is offloaded in a
    phase but on the device in the next is ``"prefetch"``: the executor copies it in
    during the phase, so its bytes count there too."""
    out = {}
    for i, p in enumerate(phases):
        following = phases[(i + 1) % len(phases)]
        out[p] = {
            role: "prefetch" if where[p] == "offload" and where[following] == "device" else where[p]
            for role, where in residency.items()
        }
    return out


def _peak(phase: str, specs, work: Workload, by_phase, micro: int, sharding: Sharding | None = None) -> tuple[int, dict]:
    work = dataclasses.replace(work, **{_phase_micro_batch_field(phase): micro})
    if sharding is None:
        result = estimate(specs, work, by_phase, phases=(phase,))[phase]
    else:
        result = estimate_per_rank(specs, work, sharding, phases=(phase,))[phase]
    return result.peak_bytes, result.roles


def _largest_fitting_micro_batch(phase, specs, work, by_phase, usable, fixed: int | None, sharding: Sharding | None = None):
    """``(micro, peak, roles, lm_head_chunk_rows)``: :func:`_micro_batch_search`, and for the
    policy's update, where the op's chunk rule would leave the minibatch split, the same with
    the smallest chunk the rule allows (``MIN_CHUNK_ROWS``: less lm_head workspace, the GEMM
    still efficient) when that fits a larger micro-batch (``lm_head_chunk_rows`` then set)."""
    micro, peak, roles = _micro_batch_search(phase, specs, work, by_phase, usable, fixed, sharding)
    if phase != "update_policy" or work.lm_head_chunk_rows or (peak <= usable and micro == _phase_rows(phase, work)):
        return micro, peak, roles, work.lm_head_chunk_rows
    rows = MIN_CHUNK_ROWS["cuda"]
    small = _micro_batch_search(phase, specs, dataclasses.replace(work, lm_head_chunk_rows=rows), by_phase, usable, fixed, sharding)
    # Only for a larger micro-batch (a smaller chunk is more GEMMs), or, when neither fits,
    # a lower peak (closer to fitting).
    def rank(candidate_micro, candidate_peak):
        fits = candidate_peak <= usable
        return fits, candidate_micro, 0 if fits else -candidate_peak

    if rank(small[0], small[1]) > rank(micro, peak):
        return (*small, rows)
    return micro, peak, roles, None


def _micro_batch_search(phase, specs, work, by_phase, usable, fixed: int | None, sharding: Sharding | None = None):
    """The largest micro-batch of ``phase`` whose peak fits ``usable`` (the peak grows with
    the micro-batch), or the smallest one's peak when none fits. ``fixed``: only that size."""
    rows = _phase_rows(phase, work)
    if fixed is not None:
        micro = min(fixed, rows)
        peak, roles = _peak(phase, specs, work, by_phase, micro, sharding)
        return micro, peak, roles
    peak, roles = _peak(phase, specs, work, by_phase, rows, sharding)
    if peak <= usable:
        return rows, peak, roles
    low, high = 1, rows  # invariant: high does not fit
    best = None
    while low < high:
        mid = (low + high) // 2
        mid_peak, mid_roles = _peak(phase, specs, work, by_phase, mid, sharding)
        if mid_peak <= usable:
            best, low = (mid, mid_peak, mid_roles), mid + 1
        else:
            high = mid
    if best is None:
        peak, roles = _peak(phase, specs, work, by_phase, 1, sharding)
        return 1, peak, roles
    return best


@dataclass(frozen=True)
class PlanOptions:
    """What ``plan`` may change. ``offload``: move models / optimizer state to pinned CPU
    memory (False: everything resident, ``--no-offload``). ``checkpointing``: turn on
    gradient checkpointing of trained roles (a role's own ``checkpointing=True`` always
    holds). ``micro_batches``: per phase a fixed micro-batch (others are chosen)."""

    offload: bool = True
    checkpointing: bool = True
    micro_batches: dict = field(default_factory=dict)


def plan(specs: dict[str, RoleSpec], work: Workload, budget_bytes: int, options: PlanOptions = PlanOptions(),
         gpus: int = 1) -> Plan:
    """Choose residency, micro-batches and checkpointing for ``specs`` on a GPU of
    ``budget_bytes`` (see the module docstring); with ``gpus`` > 1, rank 0's plan under FSDP2
    (:func:`plan_per_rank`: ``work`` is the global step). Never raises for a run that does
    not fit: the plan says ``fits=False`` and carries :attr:`Plan.suggestions`.

    Raises:
        ValueError when ``gpus`` cannot split ``work`` (:func:`~rlhf_engine.memory.fsdp.per_rank_workload`)."""
    chosen = _fit(specs, work, budget_bytes, options, gpus)
    if not chosen.fits:
        chosen.suggestions = suggest(specs, work, budget_bytes, options, gpus)
    return chosen


def _fit(specs, work, budget_bytes, options, gpus: int) -> Plan:
    return _search(specs, work, budget_bytes, options) if gpus == 1 else plan_per_rank(specs, work, budget_bytes, options, gpus)


def plan_per_rank(specs: dict[str, RoleSpec], work: Workload, budget_bytes: int, options: PlanOptions, gpus: int) -> Plan:
    """Rank 0's plan on ``gpus`` ranks under FSDP2 (:mod:`rlhf_engine.memory.fsdp`), ``work``
    being the global step: every role resident (the offload executor is for one GPU), each
    rank sampling its share in one batch, the other micro-batches and checkpointing chosen
    as on one GPU. The frozen roles are replicated when that fits (it moves nothing: sharded,
    their weights are all-gathered for every forward), else sharded; when neither fits, the
    one closer to fitting."""
    local = per_rank_workload(work, gpus)
    resident = dataclasses.replace(options, offload=False, micro_batches={**options.micro_batches, "generate": local.rollout_batch})
    placements = ("replicate", "shard") if any(not s.trained and not s.is_adapter_view for s in specs.values()) else ("replicate",)
    best = None
    for frozen in placements:
        found = _search(specs, local, budget_bytes, resident, Sharding(gpus, frozen))
        _label_per_rank(found, specs, gpus, frozen)
        if found.fits:
            return found
        if best is None or found.peak_bytes < best.peak_bytes:
            best = found
    return best


def _label_per_rank(found: Plan, specs: dict[str, RoleSpec], gpus: int, frozen: str) -> None:
    """Name where each role is in a per-rank plan: ``sharded``, ``replicated`` or ``adapter``."""
    def where(role: str) -> str:
        spec = specs[role.split(".")[0]]
        if spec.is_adapter_view:
            return "adapter"
        return "sharded" if spec.trained or frozen == "shard" else "replicated"

    found.gpus, found.frozen = gpus, frozen
    found.residency = {role: {p: where(role) for p in phases} for role, phases in found.residency.items()}
    for phase_plan in found.phases.values():
        for role, entry in phase_plan.roles.items():
            entry["residency"] = where(role)


def fewest_gpus(specs: dict[str, RoleSpec], work: Workload, budget_bytes: int, options: PlanOptions = PlanOptions(),
                limit: int = 1024, start: int = 1) -> Plan | None:
    """The plan at the smallest world size from ``start`` up to ``limit`` that fits (one GPU
    with offloading as :func:`plan` allows, or FSDP2 per rank), trying every world size the
    trainer can split ``work`` over (:func:`~rlhf_engine.memory.fsdp.world_sizes`: the
    divisors of ``prompts_per_step``, and of ``minibatch_size`` when it splits the rollout),
    not only powers of two; None when none fits."""
    for gpus in world_sizes(work, limit):
        if gpus >= start:
            found = _fit(specs, work, budget_bytes, options, gpus)
            if found.fits:
                return found
    return None


def _search(specs, work, budget_bytes, options, sharding: Sharding | None = None) -> Plan:
    usable = usable_bytes(budget_bytes)
    phases = [p for p in PHASES if p != "update_critic" or "critic" in specs]
    trained = [r for r, s in specs.items() if s.trained]
    per_role = []
    for role in specs:
        weights = _weight_options(role, specs, phases) if options.offload else [
            {p: ("adapter" if specs[role].is_adapter_view else "device") for p in phases}
        ]  # fmt: skip
        per_role.append([(role, w) for w in weights])
    per_opt = [
        [(f"{role}.optimizer", o) for o in (_optimizer_options(role, specs, phases) if options.offload else [{p: "device" for p in phases}])]
        for role in trained
    ]  # fmt: skip
    ckpt_choices = [
        [(role, on) for on in ((False, True) if options.checkpointing and not specs[role].checkpointing else (specs[role].checkpointing,))]
        for role in trained
    ]  # fmt: skip
    best_key, best, cache = None, None, {}
    for combo in itertools.product(*per_role, *per_opt):
        residency = dict(combo)
        moved = _bytes_moved(specs, residency, phases)
        by_phase = _by_phase(residency, phases)
        for ckpt in itertools.product(*ckpt_choices):
            ckpt = dict(ckpt)
            run_specs = {r: dataclasses.replace(s, checkpointing=ckpt.get(r, s.checkpointing)) for r, s in specs.items()}
            phase_plans, fits, micro_score = {}, True, 0.0
            for phase in phases:
                # Checkpointing changes only the update of the role it belongs to.
                updated = {"update_policy": "policy", "update_critic": "critic"}.get(phase)
                key = (phase, tuple(sorted(by_phase[phase].items())), ckpt.get(updated))
                if key not in cache:  # many combinations place a given phase alike
                    cache[key] = _largest_fitting_micro_batch(
                        phase, run_specs, work, by_phase, usable, options.micro_batches.get(phase), sharding
                    )
                micro, peak, roles, chunk_rows = cache[key]
                fits &= peak <= usable
                micro_score += micro / _phase_rows(phase, work)
                phase_plans[phase] = PhasePlan(micro, peak, {
                    role: {"residency": by_phase[phase][role], "bytes": kinds} for role, kinds in roles.items()
                }, chunk_rows)  # fmt: skip
            peak_max = max(p.peak_bytes for p in phase_plans.values())
            # Fitting plans: fewest bytes moved, fewest checkpointed roles, largest micro-batches.
            # Otherwise the closest to fitting.
            key = (0, moved, sum(ckpt.values()), -micro_score) if fits else (1, peak_max, moved, sum(ckpt.values()))
            if best_key is None or key < best_key:
                best_key = key
                best = Plan(fits, budget_bytes, usable, phase_plans, residency, ckpt, moved)
    return best


def suggest(specs: dict[str, RoleSpec], work: Workload, budget_bytes: int, options: PlanOptions, gpus: int = 1) -> list[Suggestion]:
    """What would make a run that does not fit on ``gpus`` GPUs fit, each with its largest
    phase peak (per rank with several GPUs)."""
    out = []

    def attempt(what: str, new_specs, new_work, change: dict, new_options=options) -> bool:
        found = _fit(new_specs, new_work, budget_bytes, new_options, gpus)
        if found.fits:
            out.append(Suggestion(what, found.peak_bytes, change))
        return found.fits

    trained = [r for r, s in specs.items() if s.trained]
    if any(not specs[r].lora_rank for r in trained):
        lora = {r: dataclasses.replace(s, lora_rank=s.lora_rank or SUGGESTED_LORA_RANK) if s.trained else s for r, s in specs.items()}
        if "reference" in lora and "policy" in trained:
            lora["reference"] = dataclasses.replace(lora["reference"], is_adapter_view=True)
        attempt(f"LoRA rank {SUGGESTED_LORA_RANK} on {' and '.join(trained)} (the reference becomes the adapter-disabled policy)",
                lora, work, {"lora_rank": SUGGESTED_LORA_RANK})  # fmt: skip
    if any(s.dtype == "fp32" for s in specs.values()):
        bf16 = {r: dataclasses.replace(s, dtype="bf16") for r, s in specs.items()}
        attempt("bf16 weights for every role (fp32 master weights and optimizer state for the trained ones)", bf16, work, {"dtype": "bf16"})
    if not options.offload and gpus == 1:
        attempt("allow offloading to pinned CPU memory (--plan auto)", specs, work, {"offload": True}, dataclasses.replace(options, offload=True))
    if work.response_length > 1:
        low, high, best = 1, work.response_length - 1, None
        while low <= high:
            mid = (low + high) // 2
            if _fit(specs, dataclasses.replace(work, response_length=mid), budget_bytes, options, gpus).fits:
                best, low = mid, mid + 1
            else:
                high = mid - 1
        if best is not None:
            attempt(f"responses of at most {best} tokens (max_new_tokens, now {work.response_length})",
                    specs, dataclasses.replace(work, response_length=best), {"max_new_tokens": best})  # fmt: skip
    more = fewest_gpus(specs, work, budget_bytes, options, start=gpus + 1)
    if more is not None:
        frozen = {"replicate": "frozen roles replicated", "shard": "frozen roles sharded too"}[more.frozen]
        out.append(Suggestion(f"{more.gpus} GPUs with FSDP2 (weights, gradients and optimizer state sharded, {frozen})",
                              more.peak_bytes, {"gpus": more.gpus}))  # fmt: skip
    return out


__all__ = ["GPU_MEMORY", "KINDS", "Plan", "PlanOptions", "Suggestion", "fewest_gpus", "gpu_budget", "parse_memory", "plan",
           "plan_per_rank", "usable_bytes"]
