"""The plan as a person reads it: a table per phase and role, then the verdict."""

from __future__ import annotations

from rlhf_engine.memory.estimate import KINDS
from rlhf_engine.memory.fsdp import PER_RANK_KINDS
from rlhf_engine.memory.plan import CUDA_CONTEXT_BYTES, GIB, Plan


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan, asked_fewest: bool = False) -> str:
    """Per phase: its peak against the usable budget and its micro-batch (and the lm_head
    chunk when the plan chose one); per role its
    residency and GiB by kind (with several GPUs, rank 0's, with FSDP2's buffers). Then
    whether it fits, the checkpointing chosen, the bytes moved per step, the suggestions
    when it does not fit, and with ``asked_fewest`` the fewest GPUs that fit."""
    kinds_shown = PER_RANK_KINDS if plan.gpus > 1 else KINDS
    columns = ["role", "residency", *kinds_shown, "total"]
    widths = [13, 10, *[max(len(k), 8) for k in kinds_shown], 8]
    lines = [
        f"GPU budget {gib(plan.budget_bytes)} GiB: {gib(plan.usable_bytes)} GiB usable after the CUDA context "
        f"({gib(CUDA_CONTEXT_BYTES)} GiB) and the allocator reserve (GiB below)"
    ]
    if plan.gpus > 1:
        frozen = {"replicate": "replicated on every rank", "shard": "sharded too (all-gathered for each pass)"}[plan.frozen]
        lines.append(f"{plan.gpus} GPUs with FSDP2, bytes per rank (rank 0): trained roles sharded per decoder layer, "
                     f"frozen roles {frozen}; each rank takes 1/{plan.gpus} of the step's sequences")
    for phase, p in plan.phases.items():
        status = "fits" if p.peak_bytes <= plan.usable_bytes else "DOES NOT FIT"
        lines.append("")
        chunk = f", lm_head chunk {p.lm_head_chunk_rows} tokens" if p.lm_head_chunk_rows else ""
        lines.append(f"{phase}: peak {gib(p.peak_bytes)} of {gib(plan.usable_bytes)} GiB ({status}), micro-batch {p.micro_batch}{chunk}")
        lines.append("  " + " ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths))))
        for role, entry in p.roles.items():
            kinds = entry["bytes"]
            cells = [role, entry["residency"], *[gib(kinds.get(k, 0)) for k in kinds_shown], gib(sum(kinds.values()))]
            lines.append("  " + " ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    lines.append("")
    ckpt = ", ".join(f"{role} {'on' if on else 'off'}" for role, on in plan.checkpointing.items()) or "none"
    lines.append(f"gradient checkpointing: {ckpt}; moved per step: {gib(plan.bytes_moved_per_step)} GiB")
    if plan.fits:
        lines.append(f"fits: largest phase peak {gib(plan.peak_bytes)} GiB of {gib(plan.usable_bytes)} GiB usable")
    else:
        lines.append(f"does NOT fit: largest phase peak {gib(plan.peak_bytes)} GiB of {gib(plan.usable_bytes)} GiB usable")
        if plan.suggestions:
            lines.append("would fit with any one of:")
            lines.extend(f"  - {s.what}: peak {gib(s.peak_bytes)} GiB" for s in plan.suggestions)
        else:
            lines.append("no single change tried (LoRA, bf16, offloading, shorter responses, up to 1024 GPUs) makes it fit")
    if asked_fewest:
        if plan.fewest_gpus is None:
            lines.append("fewest GPUs: none up to 1024 fits (world sizes tried: those that divide the step's batch)")
        else:
            lines.append(f"fewest GPUs: {plan.fewest_gpus} (the smallest world size that divides the step's batch and fits)")
    return "\n".join(lines)
