"""The outer loop shared by every trainer: steps, logging, checkpoints, resume.

A trainer is any object with ``models`` and ``optimizers`` (dicts by role),
``step(k) -> metrics`` and optionally ``state_dict()`` / ``load_state_dict(d)`` for
small JSON state (e.g. the adaptive KL coefficient). Because each step draws its
randomness from ``step_generator(seed, k, ...)``, restoring weights, optimizer state and
that small state is all a resume needs to reproduce the uninterrupted run.

A data-parallel trainer (its ``parallel`` distributed) writes sharded checkpoints
(``rlhf_engine.distributed.checkpoint``); either format resumes a run of any number of
ranks, the single process included, except that a sharded run needs a sharded checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from rlhf_engine.distributed.checkpoint import is_sharded_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from rlhf_engine.distributed.group import SINGLE
from rlhf_engine.models.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from rlhf_engine.runlog import RunLog


def run_steps(
    trainer,
    *,
    steps: int,
    phase: str,
    log: RunLog | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    run: dict | None = None,
    keep_last: int | None = None,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> list[dict[str, float]]:
    """Run ``trainer.step(k)`` for ``k`` in ``[start, steps)`` and return the metrics.

    ``start`` is 0, or with ``resume`` one past the step of the latest checkpoint in
    ``checkpoint_dir``. A checkpoint is written every ``checkpoint_every`` steps (0: only
    at the end) when ``checkpoint_dir`` is given. ``stop_after`` ends the run after that
    many steps of this call (used to test resume). ``on_step(k, metrics)`` may add to the
    metrics before they are logged. ``run``: what identifies the run (e.g. the model and the
    config, JSON values), saved in every checkpoint; a resume refuses a checkpoint of another
    phase or whose ``run`` differs (the config's ``steps`` aside: a run may be extended), and
    ``resume`` without any checkpoint is an error, not a fresh start. ``keep_last``: after
    each checkpoint only the newest ``keep_last`` step folders stay (None: all).

    ``evaluate(k)``: the metrics of the models after step ``k`` on held-out data (``k = -1``:
    before any step), logged as phase ``f"{phase}_eval"`` at step ``k`` for each ``k`` of
    :func:`eval_points` (``eval_every``) that this call reaches, each before that step's
    checkpoint is written: a resume, which drops the log lines after its checkpoint, redoes
    exactly the evaluations whose lines it dropped. Their metrics are not in the returned list.
    """
    parallel = getattr(trainer, "parallel", SINGLE)
    start = 0
    if resume:
        if checkpoint_dir is None:
            raise ValueError(f"{phase}: resume needs a checkpoint directory")
        path = latest_checkpoint(checkpoint_dir)
        if path is None:
            raise ValueError(f"{phase}: --resume, but {checkpoint_dir} holds no checkpoint (start without --resume)")
        _check_same_run(path, phase, run)
        state = _load(path, trainer)
        if hasattr(trainer, "load_state_dict"):
            trainer.load_state_dict(state.get("trainer", {}))
        start = int(state["step"]) + 1
    points = set(eval_points(steps, eval_every)) if evaluate is not None else set()

    def evaluation(k: int) -> None:
        if k in points:
            result = evaluate(k)
            if log is not None:
                log.log(f"{phase}_eval", k, result)

    if start == 0:
        evaluation(-1)
    history = []
    for k in range(start, steps):
        metrics = trainer.step(k)
        if on_step is not None:
            on_step(k, metrics)
        history.append(metrics)
        if log is not None:
            log.log(phase, k, metrics)
        evaluation(k)
        last = k == steps - 1 or (stop_after is not None and len(history) == stop_after)
        if checkpoint_dir is not None and (last or (checkpoint_every and (k + 1) % checkpoint_every == 0)):
            state = {"step": k, "phase": phase, **({"run": run} if run is not None else {})}
            if hasattr(trainer, "state_dict"):
                state["trainer"] = trainer.state_dict()
            if parallel.distributed:
                save_sharded_checkpoint(checkpoint_dir, k, models=trainer.models, optimizers=trainer.optimizers, state=state,
                                        group=parallel)  # fmt: skip
            else:
                save_checkpoint(checkpoint_dir, k, models=trainer.models, optimizers=trainer.optimizers, state=state)
            if keep_last is not None and parallel.is_main:  # every rank's shards are in place by now
                prune_checkpoints(checkpoint_dir, keep_last)
        if stop_after is not None and len(history) == stop_after:
            break
    return history


def eval_points(steps: int, eval_every: int) -> list[int]:
    """The steps after which a run of ``steps`` steps evaluates: ``-1`` (before the first
    step), every ``eval_every``-th step (``k`` with ``(k + 1) % eval_every == 0``; 0: none in
    between) and the last one."""
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"--eval-every must be a number of steps >= 0 (0: only before and after training), got {eval_every!r}")
    return [-1] + [k for k in range(steps) if k == steps - 1 or (eval_every and (k + 1) % eval_every == 0)]


def _check_same_run(path: Path, phase: str, run: dict | None) -> None:
    """ValueError when the checkpoint at ``path`` belongs to another phase (algorithm) or run."""
    state = json.loads((path / "state.json").read_text())
    if state.get("phase") != phase:
        raise ValueError(f"resume: {path} is a checkpoint of {state.get('phase')!r}, not of {phase!r} (use another --out)")
    saved = state.get("run")
    if run is None or saved is None:
        return
    differ = [key for key in sorted(set(run) | set(saved)) if key not in _SECTIONS and run.get(key) != saved.get(key)]
    for section in _SECTIONS:
        now, then = run.get(section) or {}, saved.get(section) or {}
        differ += [f"{section}.{key}" for key in sorted(set(now) | set(then))
                   if (section, key) != ("config", "steps") and now.get(key, _DEFAULT) != then.get(key, _DEFAULT)]  # fmt: skip
    if differ:
        shown = ", ".join(f"{key} ({_field(saved, key)} saved, {_field(run, key)} now)" for key in differ)
        raise ValueError(f"resume: {path} is a checkpoint of another run: {shown} (use another --out, or the same settings)")


# The parts of `run` compared field by field (and named `section.field`); a field a section
# leaves out (the data config records only what differs from its defaults) is the default.
_SECTIONS = ("config", "data")
_DEFAULT = "(default)"


def _field(run: dict, key: str) -> str:
    section, _, name = key.partition(".")
    if not name:
        return repr(run.get(key))
    fields = run.get(section) or {}
    return repr(fields[name]) if name in fields else _DEFAULT


def _load(path: Path, trainer) -> dict:
    """Load the step folder ``path`` (either format) into the trainer; returns its saved state."""
    if is_sharded_checkpoint(path):
        return load_sharded_checkpoint(path, models=trainer.models, optimizers=trainer.optimizers)
    if getattr(trainer, "parallel", SINGLE).distributed:
        raise ValueError(f"resume: {path} is a single-process checkpoint; a torchrun run resumes from sharded ones only")
    return load_checkpoint(path, models=trainer.models, optimizers=trainer.optimizers)
