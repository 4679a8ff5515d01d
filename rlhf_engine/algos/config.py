"""Configuration dataclasses built from YAML / dicts, with errors that name the field.

Every trainer's configuration is a dataclass whose defaults work on the embedded task.
``config_from_dict`` builds one from a plain mapping (a parsed YAML file), rejecting
unknown keys and values of the wrong type with a ``ValueError`` that names the field;
each dataclass's ``__post_init__`` checks value ranges the same way (``check_field``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def check_field(config: object, name: str, ok: bool, expected: str) -> None:
    """Raise ``ValueError("<Config>.<name> must be <expected>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name} must be {expected}, got {getattr(config, name)!r}")


# A decimal number as text (what YAML leaves a string: "1e-4", "5E-3"); not nan / inf.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _coerce(cls_name: str, name: str, annotation: Any, value: Any) -> Any:
    """``value`` checked against a field annotation (bool, int, float, str, Optional of those)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        # YAML 1.1 reads "1e-4" (no dot in the mantissa) as a string
        return float(value)
    if annotation in (bool, int, float, str) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ValueError(f"{cls_name}.{name} must be {annotation.__name__}, got {value!r}")
    return value


def config_from_dict(cls: type[T], values: dict[str, Any], *, source: str = "config") -> T:
    """Build the dataclass ``cls`` from ``values`` (missing keys keep their defaults).

    Raises ``ValueError`` naming ``source`` and the field for an unknown key, a value of
    the wrong type, or a value out of range.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(fields)}")
    try:
        coerced = {k: _coerce(cls.__name__, k, hints[k], v) for k, v in values.items()}
        return cls(**coerced)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is ``{}``); ValueError naming the file otherwise."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    return values


def load_yaml_config(cls: type[T], path: str | Path | None) -> T:
    """``cls`` from a YAML file of ``field: value`` lines (``None``: the defaults)."""
    if path is None:
        return cls()
    return config_from_dict(cls, read_yaml_mapping(path), source=str(path))


@dataclass
class OptimConfig:
    """The fields of every single-model trainer's config (subclasses change the defaults)."""

    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_field(self, "steps", self.steps >= 0, ">= 0")
        check_field(self, "batch_size", self.batch_size >= 1, ">= 1")
        check_field(self, "lr", self.lr > 0, "> 0")
        check_field(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        check_field(self, "grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)")
