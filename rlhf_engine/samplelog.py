"""``samples.jsonl``: a few prompts and completions of every RL step, with their rewards.

One JSON object per sample, ``{"step", "prompt", "completion", "reward", "advantage"}``:
the texts decoded with the run's tokenizer (special tokens dropped), ``reward`` the
sequence score the step trained on, ``advantage`` its advantage (per sequence, or the mean
over the response's tokens for PPO / REINFORCE++); non-finite numbers are null. Lines are
flushed as they are written, so a killed run keeps them; ``train --resume`` drops the lines of
steps after the checkpoint, as it does in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class SampleLog:
    """Append-only ``path`` (created with its folders; an existing file is continued) written
    from ``RLTrainer.samples`` (``rlhf_engine.algos.samples.pick_samples``) by ``write``;
    ``tokenizer.decode(ids) -> str`` turns ids into text. A context manager."""

    def __init__(self, path: str | Path, tokenizer):
        self.path, self.tokenizer = Path(path), tokenizer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, samples: list[dict]) -> None:
        """One line per sample of step ``step``."""
        decode = self.tokenizer.decode
        for sample in samples:
            line = {"step": step, "prompt": decode(sample["prompt_ids"]), "completion": decode(sample["response_ids"]),
                    "reward": _number(sample["reward"]), "advantage": _number(sample["advantage"])}  # fmt: skip
            self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SampleLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None
