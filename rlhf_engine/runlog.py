"""Run logs: one JSON line per logged step, plus a progress bar.

Each ``RunLog.log`` call appends ``{"phase", "step", "time", **metrics}`` as one line and
flushes it, so a killed run keeps every line it wrote; ``read_runlog`` reads them back.
Optional sinks (``rlhf_engine.sinks``: TensorBoard, W&B) receive every record too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf_engine.tasks.data import read_jsonl

_RESERVED = ("phase", "step", "time")
_POSTFIX_METRICS = 4


def _metric_value(name: str, value):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics[{name!r}] must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metrics[{name!r}] must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN / inf are not JSON; written as null
    return value


class RunLog:
    """Append-only JSONL log with a tqdm progress bar.

    Args:
        path: the JSONL file (parent folders are created; an existing file is appended
            to, so a resumed run continues it), or None to log to the bar only.
        total: the number of ``log`` calls the run will make; the bar advances one per call.
        desc: the bar's label.
        quiet: no progress bar (tests, non-interactive use); the file is still written.
        sinks: objects with ``log(record)`` and ``close()`` (``rlhf_engine.sinks.open_sinks``),
            given each record written and closed with the log.

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, path: str | Path | None, *, total: int, desc: str, quiet: bool = False, sinks=()):
        if path is not None and not isinstance(path, (str, Path)):
            raise TypeError(f"path must be a str, Path or None, got {type(path).__name__}")
        if isinstance(total, bool) or not isinstance(total, int):
            raise TypeError(f"total must be an int, got {type(total).__name__}")
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        if not isinstance(desc, str):
            raise TypeError(f"desc must be a str, got {type(desc).__name__}")
        self.path = None if path is None else Path(path)
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._bar = tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True)
        self._sinks = list(sinks)
        self._start = time.monotonic()

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> dict:
        """Append one record and advance the bar; returns the record written.

        ``time`` is seconds since the RunLog was opened. Metric values are numbers or
        one-element tensors; NaN and inf are written as null. The first few metrics (in
        the dict's order) are shown on the bar.
        """
        if not isinstance(phase, str) or not phase:
            raise TypeError(f"phase must be a non-empty str, got {phase!r}")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        for name in metrics:
            if not isinstance(name, str):
                raise TypeError(f"metrics keys must be str, got {name!r}")
            if name in _RESERVED:
                raise ValueError(f"metrics must not use the reserved key {name!r}")
        record = {"phase": phase, "step": step, "time": round(time.monotonic() - self._start, 4)}
        record.update({name: _metric_value(name, v) for name, v in metrics.items()})
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        for sink in self._sinks:
            sink.log(record)
        shown = list(metrics)[:_POSTFIX_METRICS]
        postfix = {"phase": phase, "step": step}
        postfix.update({k: "nan" if record[k] is None else f"{record[k]:.4g}" for k in shown})
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)
        return record

    def close(self) -> None:
        self._bar.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_runlog(path: str | Path) -> list[dict]:
    """The records of a RunLog file, in order.

    A torn last line (the run was killed mid-write) is dropped; a malformed line
    anywhere else raises ``ValueError("<path>:<line>: ...")``.
    """
    return read_jsonl(path, {}, check=_runlog_problem, torn_tail_ok=True)


def _runlog_problem(record: dict) -> str | None:
    if "phase" not in record or "step" not in record:
        return "not a RunLog record (needs 'phase' and 'step')"
    return None
