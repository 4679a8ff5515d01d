"""Sharded checkpoints (``torch.distributed.checkpoint``) and the final model as one HF folder.

A step folder holds DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per rank: each
rank writes its own shards of the models and the optimizers) and ``state.json``. Every rank
writes into ``directory/.tmp-step-<k>/``; after a barrier rank 0 adds ``state.json``, fsyncs
and renames the folder to ``step-<k>`` (one atomic rename), then replaces ``latest``
(:func:`rlhf_engine.models.checkpoint.latest_checkpoint` reads both formats), so a crash
mid-save leaves the previous checkpoint intact. The ranks must share the checkpoint folder's
file system (one node, or a shared file system across nodes).

Loading reshards: the state dicts come from ``get_state_dict`` by fully qualified names, so a
checkpoint written by N ranks loads on M ranks, and into a plain single-process run (DCP
without a process group reads every shard it needs).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from rlhf_engine.distributed.group import DataParallel
from rlhf_engine.models.checkpoint import LATEST, _fsync_path, _step_name, atomic_write_bytes

DCP_METADATA = ".metadata"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether the step folder ``path`` was written by :func:`save_sharded_checkpoint`."""
    return (Path(path) / DCP_METADATA).is_file()


def _state_dicts(models: Mapping[str, torch.nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    out = {}
    for role, model in models.items():
        if role in optimizers:
            model_sd, optim_sd = get_state_dict(model, optimizers[role])
            out[role] = {"model": model_sd, "optim": optim_sd}
        else:
            out[role] = {"model": get_model_state_dict(model)}
    return out


def save_sharded_checkpoint(
    directory: str | Path, step: int, *, models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer], state: dict, group: DataParallel,
) -> Path:  # fmt: skip
    """Every rank: write ``directory/step-<step:08d>/`` (see the module docstring); returns it."""
    import torch.distributed.checkpoint as dcp

    state_json = json.dumps(state)
    directory = Path(directory)
    final = directory / _step_name(step)
    tmp = directory / f".tmp-{final.name}"
    if group.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed before its rename
    group.barrier()
    dcp.save(_state_dicts(models, optimizers), checkpoint_id=str(tmp))
    group.barrier()  # every rank's shards are written
    if group.is_main:
        (tmp / "state.json").write_text(state_json)
        for file in tmp.iterdir():
            _fsync_path(file)
        _fsync_path(tmp)
        if final.exists():  # a resumed run saving the same step again: the old copy goes only after
            stale = directory / f".old-{final.name}"
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale)
        else:
            os.rename(tmp, final)
        _fsync_path(directory)
        atomic_write_bytes(directory / LATEST, final.name.encode())
    group.barrier()  # nobody goes on (or reads `latest`) before the step is visible
    return final


def load_sharded_checkpoint(
    path: str | Path, *, models: Mapping[str, torch.nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
) -> dict:  # fmt: skip
    """Load a step folder of :func:`save_sharded_checkpoint` into ``models`` / ``optimizers`` (sharded or
    not, any number of ranks; every rank calls it); returns its ``state.json``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    state = _state_dicts(models, optimizers)
    missing = sorted(set(state) - set(_saved_roles(path)))
    if missing:
        raise ValueError(f"load_sharded_checkpoint: {path} has no state for {missing}")
    with warnings.catch_warnings():  # a single process loading a sharded checkpoint is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=str(path))
    for role, model in models.items():
        if role in optimizers:
            set_state_dict(model, optimizers[role], model_state_dict=state[role]["model"], optim_state_dict=state[role]["optim"])
        else:
            set_model_state_dict(model, state[role]["model"])
    return json.loads((path / "state.json").read_text())


def _saved_roles(path: Path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank: the unsharded state dict of ``model``, on the CPU of rank 0 only (``{}`` elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_policy(policy: torch.nn.Module, directory: str | Path, group: DataParallel) -> None:
    """Every rank: gather the sharded ``PolicyModel`` and, on rank 0, write it as the plain
    Hugging Face folder :meth:`PolicyModel.save` writes (``config.json`` + ``model.safetensors``,
    tied weights once, LoRA adapters merged into their base weights)."""
    from rlhf_engine.models.policy import save_pretrained_layout

    gathered = full_state_dict(policy)
    if group.is_main:
        save_pretrained_layout(plain_weights(policy.lm, {k[len("lm.") :]: v for k, v in gathered.items()}), policy.config, directory)
    group.barrier()


def export_scalar_head(model: torch.nn.Module, directory: str | Path, group: DataParallel) -> None:
    """Every rank: gather the sharded ``ScalarHeadModel`` and, on rank 0, write the sequence-
    classification folder :meth:`ScalarHeadModel.save` writes."""
    gathered = full_state_dict(model)
    if group.is_main:
        backbone = {k[len("backbone.") :]: v for k, v in gathered.items() if k.startswith("backbone.")}
        model.save_weights(plain_weights(model.backbone, backbone), gathered["head.weight"], directory)
    group.barrier()


def plain_weights(lm: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state dict ``tensors`` of the transformer ``lm`` (names relative to it) as plain
    ``transformers`` loads it: the output embedding dropped when tied to the input embedding, and
    each peft LoRA layer folded, ``W + (alpha / r) · B @ A``
    (:func:`rlhf_engine.models.adapters.merged_state_dict` on gathered tensors)."""
    from rlhf_engine.models.adapters import lora_layers

    out = dict(tensors)
    output = lm.get_output_embeddings()
    if output is not None and output.weight is lm.get_input_embeddings().weight:
        name = next(n for n, m in lm.named_modules() if m is output)
        out.pop(f"{name}.weight", None)
    for owner, layer in lora_layers(lm).items():
        weight = out[f"{owner}.base_layer.weight"]
        if not layer.disable_adapters:
            for adapter in (a for a in layer.active_adapters if a in layer.lora_A):
                delta = out[f"{owner}.lora_B.{adapter}.weight"] @ out[f"{owner}.lora_A.{adapter}.weight"]
                weight = weight + (delta.T if layer.fan_in_fan_out else delta).to(weight.dtype) * layer.scaling[adapter]
        bias = out.get(f"{owner}.base_layer.bias")
        out = {k: v for k, v in out.items() if not k.startswith(owner + ".")}
        out[f"{owner}.weight"] = weight
        if bias is not None:
            out[f"{owner}.bias"] = bias
    return out
