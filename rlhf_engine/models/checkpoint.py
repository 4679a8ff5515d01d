"""Crash-safe checkpoints: safetensors weights, optimizer and RNG state, a ``latest`` pointer.

Every file lands by write-to-temp, fsync, rename, so a crash mid-save leaves the previous
file (or step directory) untouched. A step directory ``step-00000012/`` is filled under a
hidden temporary name inside the checkpoint directory and renamed into place only when
complete; ``latest`` (a text file naming the step directory) is replaced afterwards::

    directory/
      latest                      "step-00000012"
      step-00000012/
        <name>.safetensors        weights of models[name] (tied tensors stored once)
        <name>.config.json        the model's config, when it has one
        optimizers.pt             {name: optimizer.state_dict()}
        rng.pt                    torch / CUDA / numpy / python RNG states
        state.json                the caller's ``state``
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

STEP_PREFIX = "step-"
LATEST = "latest"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's contents (its entries, for a directory) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` on a temporary file next to ``path``, fsync, rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a part."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"atomic_write_bytes: data must be bytes, got {type(data).__name__}")
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save ``{name: tensor}`` as a safetensors file, atomically.

    The tensors must not share storage (safetensors refuses it); see :func:`unique_state_dict`.
    """
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"atomic_save_safetensors: tensors[{name!r}] must be a Tensor, got {type(t).__name__}")
    contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
    _atomic_write(path, lambda tmp: safetensors.torch.save_file(contiguous, tmp, metadata={"format": "pt"}))


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def unique_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with each tied tensor kept once, under its first name.

    Tied weights (an lm_head sharing the embedding) are one tensor under two names;
    :func:`load_state` re-ties them by loading into the module, which already shares them.
    """
    kept, seen = {}, set()
    for name, t in module.state_dict().items():
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            kept[name] = t
    return kept


def save_state(module: torch.nn.Module, path: str | Path) -> None:
    """Save ``module``'s weights to the safetensors file ``path`` atomically (tied tensors once)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"save_state: module must be a torch.nn.Module, got {type(module).__name__}")
    atomic_save_safetensors(path, unique_state_dict(module))


def load_state(module: torch.nn.Module, path: str | Path) -> None:
    """Load weights saved by :func:`save_state` into ``module`` (cast to its dtypes, on its devices).

    Raises:
        ValueError when the file has names the module lacks, or lacks a tensor that is not
        tied to one it has.
    """
    tensors = safetensors.torch.load_file(str(path))
    _, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"load_state: {path} has tensors the module lacks: {sorted(unexpected)[:5]}")
    groups: dict[tuple, set[str]] = {}
    for name, t in module.state_dict().items():
        groups.setdefault(_storage_key(t), set()).add(name)
    untied = [name for key, names in groups.items() if not names & tensors.keys() for name in names]
    if untied:
        raise ValueError(f"load_state: {path} lacks tensors of the module: {sorted(untied)[:5]}")


def _step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _rng_state() -> dict:
    bit_generator, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (bit_generator, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    bit_generator, key, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((bit_generator, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(rng["python"])


def _check_names(op: str, arg: str, named: Mapping, kind: type) -> None:
    if not isinstance(named, Mapping):
        raise TypeError(f"{op}: {arg} must be a dict of name -> {kind.__name__}, got {type(named).__name__}")
    for name, obj in named.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{op}: {arg} names must match [A-Za-z0-9_.-]+, got {name!r}")
        if not isinstance(obj, kind):
            raise TypeError(f"{op}: {arg}[{name!r}] must be a {kind.__name__}, got {type(obj).__name__}")


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    state: dict | None = None,
) -> Path:
    """Write ``directory/step-<step:08d>/`` atomically and point ``directory/latest`` at it.

    Args:
        directory: created if missing.
        step: int ``>= 0``; an existing directory of the same step is replaced.
        models: ``{name: module}``; names match ``[A-Za-z0-9_.-]+``.
        optimizers: ``{name: optimizer}``.
        state: JSON-serializable dict (trainer counters, controller state), returned by
            :func:`load_checkpoint`.

    Returns:
        The step directory.
    """
    op = "save_checkpoint"
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{op}: step must be an int >= 0, got {step!r}")
    optimizers, state = optimizers or {}, state or {}
    _check_names(op, "models", models, torch.nn.Module)
    _check_names(op, "optimizers", optimizers, torch.optim.Optimizer)
    state_json = json.dumps(state)  # before touching the disk: a bad state raises TypeError here
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / _step_name(step)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp-{final.name}."))
    try:
        for name, model in models.items():
            save_state(model, tmp / f"{name}.safetensors")
            config = getattr(model, "config", None)
            if hasattr(config, "to_json_string"):
                (tmp / f"{name}.config.json").write_text(config.to_json_string())
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / "optimizers.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(state_json)
        for file in tmp.iterdir():
            _fsync_path(file)
        _fsync_path(tmp)
        if final.exists():
            # Re-saving a step (a resumed run that crashed before moving `latest` on):
            # the old copy is moved aside, never deleted before the new one is in place.
            stale = Path(tempfile.mkdtemp(dir=directory, prefix=f".old-{final.name}."))
            os.rename(final, stale / final.name)
            os.rename(tmp, final)
            shutil.rmtree(stale)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(directory)
    atomic_write_bytes(directory / LATEST, final.name.encode())
    return final


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` (>= 1) step directories of ``directory``, never
    the one ``latest`` names; returns those removed. Either checkpoint format (a step folder
    is removed whole, so a crash mid-prune leaves a folder or none, and ``latest`` intact)."""
    directory = Path(directory)
    steps = sorted(p for p in directory.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name[len(STEP_PREFIX) :].isdigit())
    latest = latest_checkpoint(directory)
    removed = [p for p in steps[:-keep_last] if p != latest]
    for path in removed:
        shutil.rmtree(path)
    if removed:
        _fsync_path(directory)
    return removed


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The step directory named by ``directory/latest``, or None when there is none.

    When ``latest`` is missing or names a directory that is gone, the newest complete
    ``step-*`` directory is returned instead (step directories appear only complete).
    """
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if named.is_dir():
            return named
    steps = sorted(p for p in directory.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name[len(STEP_PREFIX) :].isdigit())
    return steps[-1] if steps else None


def load_checkpoint(
    path: str | Path,
    *,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load a step directory written by :func:`save_checkpoint` into ``models`` / ``optimizers``.

    Models and optimizers are loaded in place; names missing from the checkpoint raise
    ValueError. With ``restore_rng`` the torch, CUDA, numpy and python RNGs are restored.

    Returns:
        The ``state`` dict that was saved.
    """
    op = "load_checkpoint"
    optimizers = optimizers or {}
    _check_names(op, "models", models, torch.nn.Module)
    _check_names(op, "optimizers", optimizers, torch.optim.Optimizer)
    path = Path(path)
    if not (path / "state.json").is_file():
        raise ValueError(f"{op}: path {path} is not a checkpoint step directory (no state.json)")
    for name, model in models.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise ValueError(f"{op}: models[{name!r}] has no weights in {path}")
        load_state(model, file)
    saved = torch.load(path / "optimizers.pt", weights_only=True)
    for name, opt in optimizers.items():
        if name not in saved:
            raise ValueError(f"{op}: optimizers[{name!r}] has no state in {path} (it has {sorted(saved)})")
        opt.load_state_dict(saved[name])
    if restore_rng:
        _restore_rng(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
