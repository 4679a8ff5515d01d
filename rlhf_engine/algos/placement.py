"""The RL trainer's side of the memory plan: how roles are prepared, and what happens at
each phase boundary.

``prepare_trained`` sets a trained role's precision, LoRA adapter and gradient
checkpointing. ``PhasePlacement`` is what ``RLTrainer.step`` calls at each boundary: it
hands the phase to the :class:`~rlhf_engine.memory.executor.PlacementExecutor` of a plan
(models and optimizer state moved between the GPU and pinned CPU memory), and on CUDA
records each phase's measured peak (``torch.cuda.max_memory_allocated``) next to the
plan's prediction. The algorithms never see either.
"""

from __future__ import annotations

import contextlib

import torch

from rlhf_engine.algos.precision import parse_dtype

GIB = float(1 << 30)


def prepare_trained(model: torch.nn.Module, dtype: str, lora_rank: int, lora_alpha: float, checkpointing: bool, seed: int):
    """``model`` cast to ``dtype``, with a LoRA adapter of ``lora_rank`` (0: none; its init
    drawn from ``seed``) and gradient checkpointing when asked. In place; returns ``model``."""
    model.to(parse_dtype(dtype))
    if lora_rank:
        from rlhf_engine.models.lora import LoraSettings, apply_lora

        apply_lora(model, LoraSettings(rank=lora_rank, alpha=lora_alpha), seed=seed)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


class PhasePlacement:
    """Phase boundaries of one trainer under a plan (``rlhf_engine.memory.plan.Plan``, or
    None: everything stays where it is and nothing is predicted)."""

    def __init__(self, trainer, plan=None):
        self.plan, self.executor = plan, None
        self._peaks: dict[str, int] = {}
        if plan is not None and plan.bytes_moved_per_step:
            from rlhf_engine.memory.executor import PlacementExecutor

            device = next(trainer.policy.parameters()).device
            self.executor = PlacementExecutor(trainer.roles, trainer.optimizers, plan.schedule(), device=device)

    @property
    def swaps_reference(self) -> bool:
        """Whether the reference pass runs on the policy's storage (residency ``swap``)."""
        return self.plan is not None and self.plan.residency.get("reference", {}).get("score") == "swap"

    def reference_weights(self):
        """Context in which the policy computes as the reference (see ``PlacementExecutor``)."""
        return self.executor.reference_weights()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Enter ``name`` (the executor's moves), run it, and on CUDA record its peak."""
        if self.executor is not None:
            self.executor.enter(name)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        yield
        if cuda:
            self._peaks[name] = torch.cuda.max_memory_allocated()

    def metrics(self) -> dict[str, float]:
        """Per phase on CUDA: ``peak_gib/<phase>`` measured and ``predicted_gib/<phase>``
        (with a plan); and ``moved_gib`` (bytes the executor moved this step)."""
        out = {}
        for name, peak in self._peaks.items():
            out[f"peak_gib/{name}"] = peak / GIB
            if self.plan is not None and name in self.plan.phases:
                out[f"predicted_gib/{name}"] = self.plan.phases[name].peak_bytes / GIB
        if self.executor is not None:
            out["moved_gib"] = sum(self.executor.moved_bytes.values()) / GIB
            self.executor.moved_bytes.clear()
        self._peaks.clear()
        return out
