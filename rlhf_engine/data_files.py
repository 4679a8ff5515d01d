"""The rows of a local training data file or folder, each with where it came from.

:func:`read_rows` reads

* ``FILE.jsonl``: one JSON object per line (our own reader: errors name ``FILE:LINE``);
* ``FILE.json``, ``FILE.parquet``, ``FILE.csv``: through ``datasets.load_dataset("json" |
  "parquet" | "csv", data_files=FILE, split="train")``;
* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``: through
  ``datasets.load_from_disk``; any other folder (e.g. Parquet shards named by split) through
  ``datasets.load_dataset(FOLDER)``. A ``DatasetDict`` gives its ``train`` split, or its
  only split; otherwise an error lists the splits.

Only local paths are read: a path that does not exist is an error, never a hub id to
download (``datasets`` is told ``local_files_only``). Rows are ``(where, record)`` pairs:
``where`` is ``"FILE:LINE"`` for JSONL and ``"FILE: row I"`` (``I`` as in ``dataset[I]``)
otherwise, the prefix of every error about that record.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_engine.tasks.data import jsonl_objects

# File suffix -> the `datasets` packaged builder that reads it.
DATASETS_FORMATS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
# What a folder written by `save_to_disk` holds (a Dataset's state, or a DatasetDict's split list).
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """The records of ``path`` in order, as ``(where, record)`` (see the module docstring).

    Raises ValueError naming ``--data`` and the path for a path that does not exist, an
    unknown suffix, a file ``datasets`` cannot read, or a dataset dict without a ``train``
    split; ``FILE:LINE`` errors for malformed JSONL.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or folder (only local data is read)")
    if path.is_file() and path.suffix == ".jsonl":
        return [(f"{path}:{line}", record) for line, record in jsonl_objects(path)]
    if path.is_file() and path.suffix not in DATASETS_FORMATS:
        raise ValueError(
            f"--data {path}: unknown data file type {path.suffix!r}; expected .jsonl, "
            f"{', '.join(DATASETS_FORMATS)}, or a folder saved by datasets' save_to_disk"
        )
    dataset = _train_split(path, _load(path))
    return [(f"{path}: row {i}", dict(row)) for i, row in enumerate(dataset)]


def _load(path: Path):
    """``path`` through ``datasets`` (a Dataset or a DatasetDict), errors as ValueError."""
    import datasets
    from datasets import DownloadConfig, load_dataset, load_from_disk

    local = DownloadConfig(local_files_only=True)
    hint = "" if path.is_file() else "; a folder must be saved by save_to_disk or hold .parquet / .json / .csv files"
    try:
        if path.is_file():
            return load_dataset(DATASETS_FORMATS[path.suffix], data_files=str(path), split="train", download_config=local)
        if any((path / marker).is_file() for marker in _SAVED_MARKERS):
            return load_from_disk(str(path))
        return load_dataset(str(path), download_config=local)
    except (datasets.exceptions.DatasetGenerationError, datasets.exceptions.DataFilesNotFoundError) as error:
        cause = error.__cause__ or error
        raise ValueError(f"--data {path}: datasets could not read it ({type(cause).__name__}: {cause}){hint}") from None
    except (ValueError, OSError, TypeError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"--data {path}: datasets could not read it ({type(error).__name__}: {error}){hint}") from None


def _train_split(path: Path, loaded):
    """A Dataset as is; a DatasetDict's ``train`` split, or its only one."""
    from datasets import DatasetDict

    if not isinstance(loaded, DatasetDict):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"--data {path}: a dataset with splits {sorted(loaded)} and no 'train' split: save the split to "
                     "train on alone (dataset_dict[NAME].save_to_disk(DIR)) and pass that folder")  # fmt: skip
