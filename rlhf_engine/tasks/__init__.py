"""Built-in synthetic tasks and the data helpers that batch them (depend on torch only)."""

from rlhf_engine.tasks.data import left_pad, read_jsonl, right_pad
from rlhf_engine.tasks.sorting import SortingTask

__all__ = ["SortingTask", "left_pad", "right_pad", "read_jsonl"]
