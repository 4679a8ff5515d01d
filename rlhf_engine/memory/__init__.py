"""Memory planning: predict per-phase GPU bytes, choose residency and micro-batches, move models.

``ModelShape`` reads a Hugging Face config; ``estimate`` gives the bytes per phase, role and
kind on one GPU, ``estimate_per_rank`` on each of N under FSDP2; ``plan`` chooses what fits
a GPU (or each of ``gpus``), ``fewest_gpus`` how many it takes (``rlhf-engine plan`` prints
them). The executor (``rlhf_engine.memory.executor``) and the tracers
(``rlhf_engine.memory.trace``, ``rlhf_engine.memory.trace_fsdp``) are imported where they
are used. See docs/memory.md.
"""

from rlhf_engine.memory.estimate import PHASES, RoleSpec, Workload, estimate
from rlhf_engine.memory.fsdp import Sharding, estimate_per_rank, per_rank_workload
from rlhf_engine.memory.plan import GPU_MEMORY, Plan, PlanOptions, fewest_gpus, gpu_budget, parse_memory, plan
from rlhf_engine.memory.shapes import ModelShape

__all__ = ["GPU_MEMORY", "PHASES", "ModelShape", "Plan", "PlanOptions", "RoleSpec", "Sharding", "Workload", "estimate",
           "estimate_per_rank", "fewest_gpus", "gpu_budget", "parse_memory", "per_rank_workload", "plan"]
