"""Optional report sinks beside the JSONL run log (``train --report-to tensorboard wandb``).

``metrics.jsonl`` is always written (``RunLog``); a sink receives each record it writes,
``{"phase", "step", "time", **metrics}``, and logs every metric as ``"<phase>/<name>"``
against the record's step:

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files in ``OUT/tensorboard``
  (``tensorboard --logdir OUT/tensorboard``). A resumed run purges the events of the steps
  after its checkpoint (they are run again), as ``metrics.jsonl`` drops their lines.
* ``wandb``: a Weights & Biases run in ``OUT/wandb``, offline unless the environment sets
  ``WANDB_MODE`` (``wandb sync OUT/wandb/offline-run-*`` uploads it later); the project is
  ``WANDB_PROJECT`` or ``rlhf-engine``, the run's config what the checkpoints record
  (algorithm, model, config fields). Each phase's metrics are plotted against
  ``"<phase>/step"``. A resumed run is a new W&B run.

Null metrics (NaN / inf in the run) are skipped. :func:`check_report_to` runs before any
model is loaded, so a sink whose package is missing fails at once with the pip command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPORT_TO = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the module it needs (pip name alike)
_RESERVED = ("phase", "step", "time")


def check_report_to(names) -> tuple[str, ...]:
    """``names`` (from ``--report-to``) checked and without repeats, in order. ValueError for an
    unknown sink or one whose package is not installed (naming ``pip install ...``)."""
    if names is None:
        return ()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"--report-to must be a list of sink names from {REPORT_TO}, got {names!r}")
    chosen = tuple(dict.fromkeys(names))
    for name in chosen:
        if name not in REPORT_TO:
            raise ValueError(f"--report-to must be among {REPORT_TO}, got {name!r} (metrics.jsonl is always written)")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ValueError(f"--report-to {name}: the {_PACKAGES[name]} package is not installed "
                             f"(pip install {_PACKAGES[name]})")  # fmt: skip
    return chosen


def open_sinks(names, out: str | Path, *, run_config: dict | None = None, resumed_from: int | None = None,
               quiet: bool = False) -> list:  # fmt: skip
    """The sinks ``names`` writing under ``out``. ``run_config``: JSON values describing the run
    (W&B's config). ``resumed_from``: the step a resumed run continues from (TensorBoard purges
    the events at and after it). ``quiet``: W&B prints nothing."""
    out = Path(out)
    makers = {
        "tensorboard": lambda: TensorBoardSink(out / "tensorboard", purge_step=resumed_from),
        "wandb": lambda: WandbSink(out, run_config=run_config or {}, quiet=quiet),
    }
    return [makers[name]() for name in check_report_to(names)]


def _scalars(record: dict):
    """``(tag, value)`` of every non-null metric of a RunLog record."""
    phase = record["phase"]
    return [(f"{phase}/{k}", v) for k, v in record.items() if k not in _RESERVED and v is not None]


class TensorBoardSink:
    """Scalars into TensorBoard event files in ``directory``; ``purge_step``: events of earlier
    runs in that folder at or after this step are discarded (a resume)."""

    def __init__(self, directory: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def log(self, record: dict) -> None:
        for tag, value in _scalars(record):
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in ``out/wandb`` (offline unless ``WANDB_MODE`` is set), one ``log`` per record."""

    def __init__(self, out: Path, *, run_config: dict, quiet: bool):
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        mode = None if os.environ.get("WANDB_MODE") else "offline"  # None: wandb reads WANDB_MODE itself
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rlhf-engine"), dir=str(out), config=run_config, mode=mode,
            # console "off": wandb would otherwise wrap this process's stdout and stderr
            settings=wandb.Settings(console="off", silent=quiet),
        )  # fmt: skip
        self._phases: set[str] = set()

    def log(self, record: dict) -> None:
        phase = record["phase"]
        if phase not in self._phases:  # W&B steps must rise; each phase counts its own
            self.run.define_metric(f"{phase}/step")
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            self._phases.add(phase)
        self.run.log({**dict(_scalars(record)), f"{phase}/step": record["step"]})

    def close(self) -> None:
        self.run.finish()
