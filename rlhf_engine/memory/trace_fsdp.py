"""Traced peaks per rank under FSDP2: the trainer's phases on ``fully_shard`` models of a
fake process group, measured by FSDP2's own tracker.

One process plays rank 0 of ``world_size``: ``torch.distributed`` is initialised with the
``"fake"`` backend (``torch.testing._internal.distributed.fake_pg.FakeStore``; its
collectives return at once and allocate only their outputs), the models are built under
``FakeTensorMode`` on the CPU and wrapped the trainer's way (``fully_shard`` per decoder
layer, then the root, ``rlhf_engine/distributed/sharding.py``), and each phase runs under
``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker``, which counts every
allocation (sharded and unsharded parameters and gradients, the all-gather outputs and
the reduce-scatter inputs, activations, optimizer state). FSDPMemTracker needs no CUDA:
fake CPU tensors and a CPU device mesh are what torch's fake process group supports on a
machine without GPUs, and nothing the tracker counts depends on the device type.

The trainer's convention under torchrun (``RLTrainer`` on a data-parallel group):

* a trained role is built in fp32 (the sharded parameters are the fp32 masters AdamW
  steps) and, for ``dtype: bf16``, computes in bf16 through
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``;
* a frozen role is either replicated (a full copy per rank, in its dtype) or, with
  ``frozen="shard"``, sharded the same way without mixed precision. Its root stays
  unsharded after the forward, as every root does (the fused lm_head op reads the full
  weight after the forward returns), and is resharded after the role's pass (it has no
  backward to reshard it).

A trained root stays unsharded after a no-grad pass until its next backward, so a phase
starts with the roots the step's earlier phases left gathered
(:func:`rlhf_engine.memory.fsdp.carried_roots`): a one-token pass gathers them inside the
tracker, and the phase's peak is measured from there.

The phases are :mod:`rlhf_engine.memory.trace`'s, run on each rank's share of the batch
(``work`` is per rank); the fused lm_head's invisible workspace is held as a placeholder
tensor while the op runs (so it counts only if the peak is there: under FSDP the peak
can be the root's all-gather instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch

from rlhf_engine.memory.estimate import PHASES, RoleSpec, Workload, lm_head_workspace
from rlhf_engine.memory.fsdp import carried_roots
from rlhf_engine.memory.trace import TracedPeak, _build, _generate, _optimizer, _score, _tokens, _triton_fakes, _update

FROZEN_PLACEMENTS = ("replicate", "shard")
# The wrapper methods that run a forward of the root (the trainer registers the same ones).
FORWARD_METHODS = ("hidden_states", "next_token_logits", "values")


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """``torch.distributed`` on the fake backend as rank 0 of ``world_size``, and its 1-D CPU
    device mesh; the group is destroyed on exit (a real one must not be active already)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"fake_process_group: world_size must be an int >= 1, got {world_size!r}")
    if dist.is_initialized():
        raise RuntimeError("fake_process_group: a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def _shard(model: torch.nn.Module, mesh, mp_policy) -> None:
    """``fully_shard`` each decoder layer of ``model`` (its ``_no_split_modules`` classes),
    then the model, register the wrapper's forward methods, and reduce gradients by a plain
    sum, as the trainer does (its losses carry the global normalizer)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    for layer in [m for m in model.modules() if type(m).__name__ in names]:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _build_sharded(spec: RoleSpec, mesh, frozen: str):
    """``(model, sharded)``: the role's model on ``mesh``, a trained role in fp32 with mixed
    precision to its dtype, a frozen one in its dtype, replicated or (``frozen="shard"``)
    sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if spec.trained:
        model = _build(dataclasses.replace(spec, dtype="fp32"))
        mp = MixedPrecisionPolicy(param_dtype=spec.torch_dtype, reduce_dtype=torch.float32) if spec.dtype != "fp32" else MixedPrecisionPolicy()
        _shard(model, mesh, mp)
        return model, True
    model = _build(spec)
    if frozen == "shard":
        _shard(model, mesh, MixedPrecisionPolicy())
        return model, True
    return model, False


def _tracker_class():
    from torch.distributed._tools.fsdp2_mem_tracker import _TOTAL_KEY, FSDPMemTracker, _FSDPModMemStats, _FSDPRefType

    class RolesFSDPMemTracker(FSDPMemTracker):
        """FSDPMemTracker over several roles: every FSDP module of ``roots`` is instrumented
        (FSDPMemTracker takes one root), and the replicated models' parameters (as unsharded
        parameters) and the other optimizers' state are tracked too (FSDPMemTracker's
        ``track_external`` is a no-op, and MemTracker's uses kinds it does not keep)."""

        def __init__(self, roots: list, optimizer, replicated: list, optimizers: list) -> None:
            super().__init__(roots[0], optimizer)
            self._root_mod = torch.nn.ModuleList(roots)
            for model in replicated:
                for t in model.parameters():
                    self._update_and_maybe_create_winfos(t, _FSDPRefType.UNSHARDED_PARAM)
                for t in model.buffers():
                    self._update_and_maybe_create_winfos(t, _FSDPRefType.BUFFER)
            for other in optimizers:
                self._track_optimizer_states(_FSDPRefType.OPT, other)

        def _known(self, fsdp_mod, method):
            """``method`` after making sure ``fsdp_mod`` has its stats: a root whose forward is a
            registered method (``register_fsdp_forward_method``) runs FSDP's pre-forward
            directly, not through the hook FSDPMemTracker wraps, so its first sight of the
            root is the backward."""

            def inner(*args, **kwargs):
                if fsdp_mod not in self.memory_tracking:
                    self.memory_tracking[fsdp_mod] = _FSDPModMemStats(type(fsdp_mod).__name__)
                return method(*args, **kwargs)

            return inner

        def _fsdp_param_group_pre_backward(self, fsdp_mod, orig):
            return self._known(fsdp_mod, super()._fsdp_param_group_pre_backward(fsdp_mod, orig))

        def _fsdp_param_group_post_backward(self, fsdp_mod, orig):
            return self._known(fsdp_mod, super()._fsdp_param_group_post_backward(fsdp_mod, orig))

        def restart_peak(self) -> None:
            """The peak from now on: what is allocated now, not what was before."""
            self._peak_mem = {device: snap[_TOTAL_KEY] for device, snap in self._curr_mem_snap.items()}
            self._peak_mem_snap = {device: dict(snap) for device, snap in self._curr_mem_snap.items()}

        def _update_peak_stats(self, peak_state) -> None:
            # Only the device-wide peak is read (see trace.py: the per-module peaks are
            # quadratic in depth).
            for device, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[device] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snap)

    return RolesFSDPMemTracker


def trace_phase_fsdp(phase: str, specs: dict[str, RoleSpec], work: Workload, world_size: int,
                     frozen: str = "replicate") -> TracedPeak:
    """Rank 0's traced peak of ``phase`` at ``world_size`` ranks, every role resident, on
    ``work`` (one rank's share of the step). ``frozen``: ``"replicate"`` or ``"shard"``
    the frozen roles (reference, reward model)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if phase not in PHASES:
        raise ValueError(f"trace_phase_fsdp: phase must be one of {PHASES}, got {phase!r}")
    if frozen not in FROZEN_PLACEMENTS:
        raise ValueError(f"trace_phase_fsdp: frozen must be one of {FROZEN_PLACEMENTS}, got {frozen!r}")
    with fake_process_group(world_size) as mesh, FakeTensorMode(), _triton_fakes(), warnings.catch_warnings():
        # ModTracker's module stack loses its place around the roots' registered forward
        # methods (they bypass the module hooks); only the device-wide peak is read here.
        warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe be messed up")
        models, sharded = {}, []
        for role, spec in specs.items():
            if spec.is_adapter_view:
                continue
            models[role], is_sharded = _build_sharded(spec, mesh, frozen)
            if is_sharded:
                sharded.append(models[role])
        optimizers = {role: _optimizer(models[role], dataclasses.replace(spec, dtype="fp32"))
                      for role, spec in specs.items() if spec.trained}  # fmt: skip
        updated = {"update_policy": "policy", "update_critic": "critic"}.get(phase)
        main = optimizers.get(updated)
        others = [opt for role, opt in optimizers.items() if role != updated]
        replicated = [m for m in models.values() if all(m is not s for s in sharded)]
        tracker = _tracker_class()(sharded, main, replicated, others)
        fresh = tracker.reset_mod_stats
        with tracker:
            # The roots the step's earlier no-grad passes left unsharded (see fsdp.carried_roots):
            # gathered by a one-token pass, then the peak starts from there.
            for role in carried_roots(phase, specs, work):
                models[role].eval()
                forward = models[role].values if specs[role].head == "scalar" else models[role].hidden_states
                with torch.no_grad():
                    forward(*_tokens(1, 2))
            tracker.restart_peak()
            if phase == "generate":
                models["policy"].eval()
                with torch.no_grad():
                    _generate(models["policy"], specs["policy"], work, fresh)
            elif phase == "score":
                for model in models.values():
                    model.eval()
                frozen_sharded = {r for r, m in models.items() if not specs[r].trained and any(m is s for s in sharded)}
                _score(models, specs, work, fresh, after_pass=lambda r: models[r].reshard() if r in frozen_sharded else None)
            else:
                # The lm_head workspace held at its moment: under FSDP the peak may be elsewhere
                # (the root's all-gather), where adding it would overstate the peak.
                _update(updated, models[updated], optimizers[updated], specs[updated], work, fresh,
                        workspace=lm_head_workspace(phase, specs, work))
        snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_kind = {getattr(kind, "value", kind): count for kind, count in snapshot.items() if count}
    return TracedPeak(tracked=by_kind.pop("Total"), workspace=0, by_kind=by_kind)


__all__ = ["FROZEN_PLACEMENTS", "fake_process_group", "trace_phase_fsdp"]
