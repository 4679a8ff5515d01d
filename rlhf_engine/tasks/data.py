"""Batching token lists into padded tensors, and reading JSONL datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch


def _check_seqs(seqs, pad_id) -> list[list[int]]:
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise TypeError(f"pad_id must be an int, got {type(pad_id).__name__}")
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise TypeError(f"seqs must be a list of token-id lists, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError("seqs must not be empty")
    out = []
    for i, seq in enumerate(seqs):
        if isinstance(seq, torch.Tensor):
            seq = seq.tolist()
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(f"seqs[{i}] must be a list of ints, got {type(seq).__name__}")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in seq):
            raise TypeError(f"seqs[{i}] must contain only ints")
        out.append(list(seq))
    return out


def _pad(seqs, pad_id, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = _check_seqs(seqs, pad_id)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        if not seq:
            continue
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = True
    return ids, mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``B`` token lists, padding on the left (prompts).

    Returns ``ids`` long ``[B, L]`` and ``mask`` bool ``[B, L]`` with ``L`` the longest
    length; ``ids[b, L - len(seqs[b]):] == seqs[b]`` where ``mask`` is True, ``pad_id`` elsewhere.
    """
    return _pad(seqs, pad_id, left=True)


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``B`` token lists, padding on the right (responses): ``ids[b, :len(seqs[b])] == seqs[b]``.

    Returns ``ids`` long ``[B, L]`` and ``mask`` bool ``[B, L]`` (True on real tokens).
    """
    return _pad(seqs, pad_id, left=False)


def _type_ok(value, expected: type) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return False  # JSON true/false is not a number
    if expected is float:
        return isinstance(value, (int, float))
    if expected is list and isinstance(value, list):
        return True
    return isinstance(value, expected)


def jsonl_objects(path, *, torn_tail_ok: bool = False) -> list[tuple[int, dict]]:
    """The JSON objects of a JSON-lines file with their 1-based line numbers, blank lines
    skipped: ``[(line, record), ...]`` in file order.

    Raises ``ValueError("<path>:<line>: ...")`` for malformed JSON or a line that is not an
    object, and ``FileNotFoundError`` for a missing file. ``torn_tail_ok``: a last line that
    is not complete JSON (a writer killed mid-line) is dropped instead.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    objects = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail_ok and lineno == len(lines):
                break
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        objects.append((lineno, record))
    return objects


def record_problem(record: dict, required: dict[str, type]) -> str | None:
    """What is wrong with ``record`` against ``required`` (field name -> ``str``, ``int``,
    ``float`` (ints accepted), ``bool``, ``list`` or ``dict``): a missing or mistyped field,
    as a message; None when every field is there with its type."""
    for field, expected in required.items():
        if field not in record:
            return f"missing field {field!r}"
        if not _type_ok(record[field], expected):
            return f"field {field!r} must be {expected.__name__}, got {type(record[field]).__name__}"
    return None


def read_jsonl(
    path, required: dict[str, type], check: Callable[[dict], str | None] | None = None, *, torn_tail_ok: bool = False
) -> list[dict]:
    """Read a JSON-lines file: one JSON object per non-blank line (see :func:`jsonl_objects`).

    ``required`` maps field name -> Python type (see :func:`record_problem`); every record
    must have each field with that type. ``check(record)``, when given, runs on each record
    after that and returns an error message, or None when the record is fine. Raises
    ``ValueError("<path>:<line>: ...")`` for malformed JSON, a non-object line, a missing
    or mistyped field, or a message from ``check``, and ``FileNotFoundError`` for a
    missing file. Returns the records in file order. ``torn_tail_ok``: a last line that
    is not complete JSON (a writer killed mid-line) is dropped instead.
    """
    if not isinstance(required, dict) or not all(isinstance(k, str) and isinstance(t, type) for k, t in required.items()):
        raise TypeError("required must be a dict mapping field names (str) to types")
    records = []
    for lineno, record in jsonl_objects(path, torn_tail_ok=torn_tail_ok):
        problem = record_problem(record, required) or (check(record) if check is not None else None)
        if problem:
            raise ValueError(f"{path}:{lineno}: {problem}")
        records.append(record)
    return records
