"""FSDP2 (``fully_shard``) for the trained roles: each decoder layer its own unit, then the root.

The root unit is the wrapper (``PolicyModel`` / ``ScalarHeadModel``) and holds what no layer
holds: the embeddings, the final norm, the lm_head (tied to the embeddings in the built-in
models) and the scalar head. The trainers call the wrappers' methods, not ``forward``, and use
``lm_head_weight`` outside any module (the fused lm_head ops take the weight and the hidden
states), so those methods are registered as FSDP forward methods
(``register_fsdp_forward_method``): they all-gather the root's parameters, and FSDP keeps the
root unsharded after its forward (its backward all-gathers them right away anyway), so the
weight the op reads is the full one, and its gradient is reduce-scattered at the end of the
backward like every other.

Gradient reduction: the trainers divide their losses by the *global* token / sequence counts
(all-reduced), so the sum of the ranks' gradients is the gradient of the global batch; FSDP's
default averages over the ranks, so every unit's divide factor is set to 1 (a sum; the
alternative, scaling every loss by the world size, would change the logged losses).

Frozen roles (reference, reward model): by default each rank keeps a full replica, which
needs no collective (and so cannot fall out of lockstep) and costs one copy per rank; with
``RLConfig.frozen_sharding = "shard"`` they are sharded like the trained roles (no optimizer,
no backward), and since FSDP leaves a root gathered after its forward (for the backward
that a frozen role never runs) the trainer reshards them after each score pass.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

# Wrapper methods that run a forward of the root (what the trainers and the sampler call).
FORWARD_METHODS = ("hidden_states", "next_token_logits", "values")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model``: modules of the classes transformers never splits
    (``_no_split_modules``, e.g. ``LlamaDecoderLayer``)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"shard_model: found no decoder layers in {type(model).__name__} (no _no_split_modules)")
    return layers


def shard_model(model: torch.nn.Module, mesh, *, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``fully_shard`` every decoder layer of ``model``, then ``model`` (in place; returns it).

    ``param_dtype``: the dtype of the all-gathered parameters the forwards compute in (bf16:
    ``MixedPrecisionPolicy`` with fp32 gradient reduction; the sharded parameters, the
    optimizer's masters, stay fp32); None computes in the parameters' dtype.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    # ScalarHeadModel.values returns a view (its squeeze), which the trainers only slice out of place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPScalarHeadModel\) returned a view tensor")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # a plain SUM reduce-scatter (gloo has no PREMUL_SUM; nccl's zero-copy path wants SUM)
            module.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def unsharded_layers(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block the decoder layers of the sharded ``model`` stay unsharded after their first
    forward, and are resharded on exit: sampling then all-gathers each layer once per rollout
    instead of once per decode step (at the cost of the full weights on every rank meanwhile).
    The root unit is left alone (it never reshards after its forward, see the module docstring).

    Once the first ``next_token_logits`` (the prefill) has gathered every unit, the later calls
    (the decode steps) run without FSDP's forward hooks (:func:`hooks_paused`): with
    nothing left to gather they only cost host time, about as much per unit and step as a
    small layer's own kernel launches."""
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    fsdp_method = model.__dict__.get("next_token_logits")  # FSDP's wrapper (register_fsdp_forward_method)
    hooks = fsdp_hooks(model)
    all_gathered = False  # once every unit is gathered they stay so until the block ends

    def next_token_logits(*args, **kwargs):
        nonlocal all_gathered
        all_gathered = all_gathered or gathered(model)
        if torch.compiler.is_compiling() or not all_gathered:
            return fsdp_method(*args, **kwargs)
        with hooks_paused(hooks):
            return type(model).next_token_logits(model, *args, **kwargs)

    if fsdp_method is not None:
        model.next_token_logits = next_token_logits
    try:
        yield
    finally:
        if fsdp_method is not None:
            model.next_token_logits = fsdp_method
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
            layer.reshard()


def gathered(model: torch.nn.Module) -> bool:
    """Whether every FSDP unit of ``model`` is unsharded: FSDP2 registers the gathered parameters
    of an unsharded unit as plain tensors, and its shards as DTensors."""
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for p in model.parameters())


def fsdp_hooks(model: torch.nn.Module) -> list[tuple[dict, list]]:
    """FSDP's forward pre- and post-hooks on the units of ``model``: ``(hook dict, its keys
    that are FSDP's)`` per dict that has any (they are bound methods of the unit's FSDP state).
    A unit whose hooks are not found this way (another torch layout of them) is not listed."""
    from torch.distributed.fsdp import FSDPModule

    found = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                keys = [key for key, hook in hooks.items() if getattr(hook, "__self__", None) is state]
                if keys:
                    found.append((hooks, keys))
    return found


@contextlib.contextmanager
def hooks_paused(found: list[tuple[dict, list]]) -> Iterator[None]:
    """Inside the block the hooks of ``found`` (:func:`fsdp_hooks`) are out of their dicts, so
    the FSDP units run as plain modules; on exit each dict is as it was, order included. Only
    for forwards without gradients on units that are all unsharded (:func:`gathered`): FSDP's
    hooks would gather nothing there, and no backward needs the state they set up. A unit
    whose hooks were not found keeps them: slower, never wrong."""
    saved = [(hooks, list(hooks.items())) for hooks, _ in found]
    for hooks, keys in found:
        for key in keys:
            del hooks[key]
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.clear()
            hooks.update(items)


_MESHES: dict = {}


def forget_meshes() -> None:
    """Drop the meshes made by :func:`device_mesh` (their process group is being destroyed)."""
    _MESHES.clear()


def device_mesh(group) -> object:
    """The 1-D data-parallel mesh over every rank of ``group`` (a :class:`DataParallel`), made once."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (group.device.type, group.world_size)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(group.device.type, (group.world_size,), mesh_dim_names=("dp",))
    return _MESHES[key]
