"""What ``rlhf-engine train`` writes beside the model, on rank 0: the logs and the curves.

* ``metrics.jsonl`` (``RunLog``), also sent to the ``--report-to`` sinks (``rlhf_engine.sinks``);
* ``samples.jsonl`` (``rlhf_engine.samplelog``): ``--log-samples K`` samples of each RL step;
* ``curves.png`` (``rlhf_engine.curves``), drawn from the whole ``metrics.jsonl`` once the
  run's steps are done;
* ``data_stats.json`` (and ``eval_data_stats.json``): what loading kept, truncated and dropped.

A resumed run first drops the log lines of the steps after its checkpoint (``prepare_out``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from rlhf_engine.curves import write_curves
from rlhf_engine.models.checkpoint import atomic_write_bytes, latest_checkpoint
from rlhf_engine.runlog import RunLog
from rlhf_engine.samplelog import SampleLog
from rlhf_engine.sinks import open_sinks
from rlhf_engine.train_data import DataStats

METRICS_FILE, SAMPLES_FILE, CURVES_FILE = "metrics.jsonl", "samples.jsonl", "curves.png"


@contextlib.contextmanager
def train_outputs(out: Path, algo: str, steps: int, trainer, tokenizer, *, quiet: bool, report_to=(), run: dict | None = None,
                  resumed_from: int | None = None) -> Iterator[tuple[RunLog, Callable[[int, dict], None] | None]]:  # fmt: skip
    """Open the logs under ``out`` and yield ``(log, on_step)`` for ``run_steps``; ``on_step``
    writes ``trainer.samples`` (None when ``trainer.log_samples`` is 0 or absent: SFT, RM, DPO).
    ``run``: the run's identity (the W&B config, with ``algo``); ``resumed_from``: the first step
    of a resumed run. ``curves.png`` is written when the block ends without an error."""
    sinks = open_sinks(report_to, out, run_config={"algo": algo, **(run or {})}, resumed_from=resumed_from, quiet=quiet)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(RunLog(out / METRICS_FILE, total=steps, desc=algo, quiet=quiet, sinks=sinks))
        on_step = None
        if getattr(trainer, "log_samples", 0):
            samples = stack.enter_context(SampleLog(out / SAMPLES_FILE, tokenizer))

            def on_step(step: int, metrics: dict) -> None:
                samples.write(step, trainer.samples)

        yield log, on_step
    write_curves(out / METRICS_FILE, out / CURVES_FILE)


def report_data(stats: DataStats, path: Path, quiet: bool) -> None:
    """The data's one-line summary on stdout (unless ``quiet``) and its stats as JSON in ``path``."""
    if not quiet:
        print(stats.summary(), flush=True)
    atomic_write_bytes(path, (json.dumps(dataclasses.asdict(stats), indent=1) + "\n").encode())


def prepare_out(out: Path, resume: bool) -> int | None:
    """Create ``out``; for a resume, drop the log lines (metrics and samples) of steps after the
    latest checkpoint and return the step the run continues from (None without ``resume``)."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        return None
    for name in (METRICS_FILE, SAMPLES_FILE):
        drop_lines_after_checkpoint(out / name, out / "checkpoints")
    return checkpoint_step(out / "checkpoints") + 1


def checkpoint_step(checkpoint_dir: Path) -> int:
    """The step of the latest checkpoint in ``checkpoint_dir``, -1 without one."""
    latest = latest_checkpoint(checkpoint_dir)
    return json.loads((latest / "state.json").read_text())["step"] if latest is not None else -1


def drop_lines_after_checkpoint(log: Path, checkpoint_dir: Path) -> None:
    """Keep only the log lines of steps up to the latest checkpoint (all of them without one).

    A run killed between checkpoints logged steps that the resumed run does again; without
    this they would appear twice in ``metrics.jsonl``. A torn last line is dropped too.
    """
    if not log.is_file():
        return
    last = checkpoint_step(checkpoint_dir)
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_bytes(log, "".join(kept).encode())
