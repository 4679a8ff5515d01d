"""peft LoRA layers inside a module: finding them, switching them off, merged weights.

These helpers know peft's layer classes but not the wrappers (:mod:`rlhf_engine.models.lora`
applies LoRA to a ``PolicyModel`` / ``ScalarHeadModel``). They never import peft themselves:
a module can hold LoRA layers only once peft has been imported, so a model without adapters
never pays for the import, and peft stays an optional dependency (the ``lora`` extra).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from rlhf_engine.models.checkpoint import unique_state_dict


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{qualified name: layer}`` of the peft LoRA layers (``peft.tuners.lora.LoraLayer``) in ``module``."""
    if sys.modules.get("peft") is None:  # never imported (or blocked): no LoRA layer can exist
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def adapters_off(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block every LoRA layer of ``module`` computes its base layer only.

    peft's ``enable_adapters`` also flips the adapters' ``requires_grad``; the flags (and each
    layer's on/off state) are restored exactly on exit, so a frozen adapter stays frozen.
    """
    layers = lora_layers(module).values()
    was_off = [layer.disable_adapters for layer in layers]
    grads = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, off in zip(layers, was_off):
            layer.enable_adapters(not off)
        for p, flag in grads:
            p.requires_grad_(flag)


@torch.no_grad()
def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``module`` with each adapter folded into its base layer, under the names the
    module has without adapters (what plain ``transformers`` loads); tied tensors once.

    For a LoRA layer ``name``: ``name.weight = W + (alpha / r) · B @ A`` (peft's
    ``get_delta_weight`` of each active adapter, in the weight's dtype; nothing added while the
    adapters are off), ``name.bias`` = the base bias; the adapter tensors are dropped. The live
    module is not modified: new tensors are computed, the rest are the module's own (detached).
    Without LoRA layers this is :func:`~rlhf_engine.models.checkpoint.unique_state_dict`.

    Raises:
        ValueError for a LoRA layer merged in place (peft's ``merge``): its base weight already
        holds the adapter, and this module never merges in place.
    """
    layers = lora_layers(module)
    merged = {}
    for key, tensor in unique_state_dict(module).items():
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        if owner is None:
            merged[key] = tensor
            continue
        inner = key[len(owner) + 1 :]
        if not inner.startswith("base_layer."):
            continue  # an adapter tensor (lora_A, lora_B, ...)
        layer, param = layers[owner], inner[len("base_layer.") :]
        if layer.merged:
            raise ValueError(f"merged_state_dict: LoRA layer {owner!r} is merged in place; unmerge it first")
        if param == "weight" and not layer.disable_adapters:
            for adapter in (a for a in layer.active_adapters if a in layer.lora_A):
                tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        merged[f"{owner}.{param}"] = tensor
    return merged
