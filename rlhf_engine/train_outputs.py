"""What ``rlhf-engine train`` writes beside the model, on rank 0: the logs and the curves.

* ``metrics.jsonl`` (``RunLog``), also sent to the ``--report-to`` sinks (``rlhf_engine.sinks``);
* ``samples.jsonl`` (``rlhf_engine.samplelog``): ``--log-samples K`` samples of each RL step;
* ``curves.png`` (``rlhf_engine.curves``), drawn from the whole ``metrics.jsonl`` once the
  run's steps are done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from rlhf_engine.curves import write_curves
from rlhf_engine.runlog import RunLog
from rlhf_engine.samplelog import SampleLog
from rlhf_engine.sinks import open_sinks

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
