"""Memory planning: predict per-phase GPU bytes, choose residency and micro-batches, move models.

``ModelShape`` reads a Hugging Face config; ``estimate`` gives the bytes per phase, role and
kind; ``plan`` chooses what fits a GPU (``rlhf-engine plan`` prints it). The executor
(``rlhf_engine.memory.executor``) and the tracer (``rlhf_engine.memory.trace``) are imported
where they are used. See docs/memory.md.
"""

from rlhf_engine.memory.estimate import PHASES, RoleSpec, Workload, estimate
from rlhf_engine.memory.plan import GPU_MEMORY, Plan, PlanOptions, gpu_budget, parse_memory, plan
from rlhf_engine.memory.shapes import ModelShape

__all__ = ["GPU_MEMORY", "PHASES", "ModelShape", "Plan", "PlanOptions", "RoleSpec", "Workload", "estimate", "gpu_budget",
           "parse_memory", "plan"]
