"""User reward functions in TRL's convention, turned into the trainers' token-level ScoreFn.

A reward function is called once per scoring pass as ::

    fn(prompts=..., completions=..., completion_ids=..., **fields) -> list[float | None]

(TRL's ``GRPOTrainer._calculate_rewards``): one entry per completion, each list aligned with
the completions, a prompt's values repeated for each of its group's completions.

* ``prompts``: the prompt as given in the data (a ``str``, or a list of chat turns
  ``[{"role", "content"}, ...]``).
* ``completions``: the decoded response (special tokens skipped, as TRL's
  ``batch_decode(..., skip_special_tokens=True)``); for a chat prompt
  ``[{"role": "assistant", "content": text}]``.
* ``completion_ids``: the response's token ids (``list[int]``, its EOS kept, as TRL's).
* ``**fields``: every other field of the data record (``answer``, ``solution``, ...) as a
  list; a record without a field another record has gets None there. TRL's trainer-only
  keywords (``trainer_state``, ``log_extra``, ``log_metric``) are not passed.

It returns one float per completion (int, bool, numpy or 0-d torch scalars are read as
floats), or None for "no score". Several functions combine as TRL does: the weighted sum
over the functions that scored a completion (None is NaN, summed with ``nansum``); a
completion no function scored is *unscorable* (NaN score, a warning naming its prompt and
completion), and the RL trainer leaves it out of its group's baseline and gives it
advantage 0 (``RLTrainer.advantages``). A NaN or infinite value returned by a function is an
error (return None instead); an exception inside one is re-raised as
:class:`RewardFunctionError` naming it, its own traceback chained.

The functions come from the command line as ``path/to/file.py:function`` (a file, relative to
the current directory) or ``package.module:function`` (imported), see
:func:`load_reward_fn`. :class:`RecordSampler` draws the prompts and remembers which records
it drew, so duplicated prompts with different fields are never mixed up.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhf_engine.distributed.group import SINGLE, DataParallel

RewardFn = Callable[..., Sequence[Any]]


class RewardFunctionError(RuntimeError):
    """A reward function raised: the message names it, the original exception is chained."""

# keywords the trainer itself passes: a data field of one of these names cannot reach a function
RESERVED = ("prompts", "completions", "completion_ids")
# fields TRL leaves out of the keywords (its dataset's own prompt and completion columns)
DROPPED = ("prompt", "completion", "completion_ids")


def load_reward_fn(spec: str, flag: str = "--reward-fn") -> RewardFn:
    """The function named by ``spec``: ``"path/to/file.py:name"`` (a ``.py`` file, relative to
    the current directory) or ``"package.module:name"`` (imported with importlib).

    ValueError naming ``flag`` and ``spec`` when the spec has no ``:name``, the file does not
    exist, importing the module raised (the error is quoted), the module has no such
    attribute, or it is not callable."""
    if not isinstance(spec, str):
        raise TypeError(f"{flag} must be 'FILE.py:FUNCTION' or 'MODULE:FUNCTION', got {type(spec).__name__}")
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ValueError(f"{flag} {spec!r}: expected FILE.py:FUNCTION or MODULE:FUNCTION (e.g. rewards.py:length_reward)")
    module = _import_file(where, flag, spec) if where.endswith(".py") or "/" in where else _import_module(where, flag, spec)
    if not hasattr(module, name):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{flag} {spec!r}: {where} has no attribute {name!r} (its functions: {public})")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"{flag} {spec!r}: {where}:{name} is a {type(fn).__name__}, not a function")
    return fn


def _import_file(path: str, flag: str, spec: str):
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{flag} {spec!r}: no such file {path} (paths are relative to {Path.cwd()})")
    # a name of its own per file, so two reward files called rewards.py do not replace each other
    module_name = f"_rlhf_engine_reward_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ValueError(f"{flag} {spec!r}: importing {path} raised {type(error).__name__}: {error}") from error
    return module


def _import_module(name: str, flag: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and name.startswith(error.name):
            raise ValueError(f"{flag} {spec!r}: no module named {error.name!r} (a file needs its .py suffix)") from None
        raise ValueError(f"{flag} {spec!r}: importing {name} raised {type(error).__name__}: {error}") from error
    except Exception as error:
        raise ValueError(f"{flag} {spec!r}: importing {name} raised {type(error).__name__}: {error}") from error


def resolve_reward_fns(fns: Sequence[RewardFn | str], weights: Sequence[float] | None = None) -> tuple[list, list[str], list[float]]:
    """``(functions, names, weights)`` from callables or ``"file.py:fn"`` / ``"module:fn"``
    strings; ``weights`` one per function (None: all 1). A name is the function's
    ``__name__`` (TRL's), made unique with ``_2``, ``_3``... when two share it."""
    if isinstance(fns, (str, bytes)) or not isinstance(fns, Sequence) or not fns:
        raise ValueError(f"reward functions must be a non-empty list of callables or 'FILE.py:FUNCTION' strings, got {fns!r}")
    loaded = [load_reward_fn(f) if isinstance(f, str) else f for f in fns]
    for f in loaded:
        if not callable(f):
            raise TypeError(f"a reward function must be callable or a 'FILE.py:FUNCTION' string, got {type(f).__name__}")
    names, seen = [], {}
    for f in loaded:
        base = getattr(f, "__name__", type(f).__name__)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    if weights is None:
        return loaded, names, [1.0] * len(loaded)
    weights = list(weights)
    if len(weights) != len(loaded):
        raise ValueError(f"--reward-weights: {len(weights)} weights for {len(loaded)} reward functions (give one per --reward-fn)")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"--reward-weights: each weight must be a finite number, got {w!r}")
    return loaded, names, [float(w) for w in weights]


def describe(fn: RewardFn | str) -> str:
    """What a checkpoint records of a reward function: its spec string, or ``module:qualname``."""
    if isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


class RecordSampler:
    """The trainers' PromptFn over RL records that remembers the records it drew.

    ``records``: dicts with ``"prompt"`` (token ids), ``"prompt_text"`` (the prompt as in the
    data) and ``"fields"`` (the record's other fields). ``sampler(n, generator)`` draws ``n``
    record indices uniformly with replacement and returns their prompts. The scored rows of a
    step are ``per_prompt`` consecutive samples of each prompt of ``share``, the slice of the
    step's prompts this process samples (all of them in one process; under torchrun
    ``parallel.rows(prompts_per_step)``): :meth:`scored_records` gives each row its record.
    """

    def __init__(self, records: list[dict], per_prompt: int, share: slice = slice(None)):
        self.records, self.per_prompt, self.share = records, per_prompt, share
        self.drawn: list[int] | None = None
        self._rows: list[dict] | None = None

    def __call__(self, n: int, generator: torch.Generator) -> list[list[int]]:
        self.drawn = torch.randint(len(self.records), (n,), generator=generator).tolist()
        self.expect([self.records[i] for i in self.drawn[self.share]], self.per_prompt)
        return [self.records[i]["prompt"] for i in self.drawn]

    def expect(self, records: list[dict], per_prompt: int) -> None:
        """The next rows scored are ``per_prompt`` samples of each of ``records``, in order: what
        each draw sets, and what an evaluation of other records (``--eval-data``) sets instead."""
        self._rows = [r for r in records for _ in range(per_prompt)]

    def scored_records(self, prompts: list[list[int]]) -> list[dict]:
        """The record of each scored row, whose prompt token ids are ``prompts`` (``[N]`` lists):
        by default the last draw's share, each record repeated ``per_prompt`` times (see
        :meth:`expect`). ValueError when the rows do not match (scored before any draw, or not
        the rollout of the last one)."""
        if self._rows is None:
            raise ValueError("RecordSampler: scoring before any prompt was drawn")
        rows = self._rows
        if len(rows) != len(prompts) or any(list(p) != r["prompt"] for p, r in zip(prompts, rows)):
            raise ValueError(
                f"RecordSampler: the {len(prompts)} scored rows are not the {len(rows)} expected (the last draw's, "
                f"{self.per_prompt} per prompt): score each rollout right after its prompts are drawn"
            )  # fmt: skip
        return rows


class TextReward:
    """ScoreFn ``(prompts, responses) -> fp32 [N]`` from reward functions in TRL's convention
    (see the module docstring): the weighted ``nansum`` of their scores, NaN where none scored.

    ``tokenizer`` decodes the responses; ``sampler`` gives each row its record. After each
    call :meth:`metrics` holds ``rewards/<name>/mean`` per function (over the completions it
    scored; summed over the ranks of ``parallel`` when it is read)."""

    def __init__(self, tokenizer, reward_fns: Sequence[RewardFn | str], weights: Sequence[float] | None = None, *,
                 sampler: RecordSampler, parallel: DataParallel = SINGLE):  # fmt: skip
        self.fns, self.names, self.weights = resolve_reward_fns(reward_fns, weights)
        self.tokenizer, self.sampler, self.parallel = tokenizer, sampler, parallel
        self._sums: dict[str, float] = {}

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        records = self.sampler.scored_records(prompts)
        kwargs = reward_kwargs(records, [self.tokenizer.decode(r) for r in responses], responses)
        per_fn = torch.tensor([self._call(name, fn, kwargs, len(responses)) for name, fn in zip(self.names, self.fns)],
                              dtype=torch.float32).reshape(len(self.fns), len(responses)).T  # fmt: skip
        scored = ~per_fn.isnan()
        self._sums = {}
        for i, name in enumerate(self.names):
            self._sums[f"rewards/{name}/sum"] = float(per_fn[:, i].nansum())
            self._sums[f"rewards/{name}/count"] = float(scored[:, i].sum())
        scores = (per_fn * torch.tensor(self.weights)).nansum(dim=1)
        unscorable = ~scored.any(dim=1)
        if unscorable.any():
            row = int(unscorable.nonzero()[0])
            warnings.warn(
                f"every reward function ({', '.join(self.names)}) returned None for {int(unscorable.sum())} of "
                f"{len(responses)} completions, e.g. prompt {kwargs['prompts'][row]!r}, completion "
                f"{kwargs['completions'][row]!r}: they get no score (advantage 0, left out of their group's baseline)",
                RuntimeWarning, stacklevel=2,
            )  # fmt: skip
            scores[unscorable] = torch.nan
        return scores

    def _call(self, name: str, fn: RewardFn, kwargs: dict[str, list], n: int) -> list[float]:
        try:
            inspect.signature(fn).bind(**kwargs)
        except TypeError as error:
            raise ValueError(f"reward function {name}: cannot take the keywords {sorted(kwargs)} ({error}); write it as "
                             f"def {name}(prompts, completions, **kwargs)") from None  # fmt: skip
        except ValueError:  # no signature to read (some builtins): just call it
            pass
        try:
            values = fn(**kwargs)
        except Exception as error:  # the user's own bug: its traceback follows, chained
            raise RewardFunctionError(f"reward function {name} raised {type(error).__name__}: {error}") from error
        return check_scores(name, values, n)

    def metrics(self) -> dict[str, float]:
        """``rewards/<name>/mean`` of the last call per function, over the completions it scored
        on every rank (NaN when it scored none)."""
        sums = self.parallel.sum_floats(self._sums)
        return {f"rewards/{name}/mean": sums[f"rewards/{name}/sum"] / sums[f"rewards/{name}/count"]
                if sums[f"rewards/{name}/count"] else math.nan for name in self.names}  # fmt: skip


def reward_kwargs(records: list[dict], texts: list[str], completion_ids: list[list[int]]) -> dict[str, list]:
    """The keywords of a reward function call for rows ``records`` with decoded ``texts``:
    ``prompts``, ``completions`` (chat prompts get ``[{"role": "assistant", "content": text}]``),
    ``completion_ids`` and every field of the records (None where a record lacks it)."""
    conversational = bool(records) and isinstance(records[0]["prompt_text"], list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)
    keys = sorted({k for r in records for k in r["fields"]} - set(DROPPED))
    clash = [k for k in keys if k in RESERVED]
    if clash:
        raise ValueError(f"data field {clash[0]!r}: the reward functions get {RESERVED} from the trainer; rename the field")
    kwargs = {"prompts": [r["prompt_text"] for r in records], "completions": completions, "completion_ids": completion_ids}
    kwargs.update({k: [r["fields"].get(k) for r in records] for k in keys})
    return kwargs


def check_scores(name: str, values, n: int) -> list[float]:
    """``values`` returned by reward function ``name`` as ``n`` floats (None -> NaN).

    ValueError unless a list / tuple (or 1-D numpy array / torch tensor) of ``n`` numbers or
    None, none of them NaN or infinite (a bad return value, which the CLI reports as it
    reports bad data)."""
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        values = values.tolist() if getattr(values, "ndim", 1) == 1 else values
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"reward function {name} returned a {type(values).__name__}; expected a list of {n} floats (None: no score)")
    if len(values) != n:
        raise ValueError(f"reward function {name} returned {len(values)} rewards for {n} completions (one per completion)")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            out.append(math.nan)
            continue
        if not isinstance(v, numbers.Real):
            raise ValueError(f"reward function {name} returned {v!r} ({type(v).__name__}) at completion {i}; expected a float or None")
        if not math.isfinite(float(v)):
            raise ValueError(f"reward function {name} returned {float(v)} at completion {i}; return None for 'no score'")
        out.append(float(v))
    return out


def exact_match(field: str = "answer") -> RewardFn:
    """The built-in reward of records with an answer in ``field`` (the data config's
    ``answer_field``): 1.0 when the completion's text equals the answer (both stripped), else
    0.0; None where a record has no answer. Named ``exact_match`` in the metrics."""
    def exact_match(completions: list, **fields) -> list[float | None]:
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        answers = fields.get(field, [None] * len(texts))
        return [None if a is None else float(t.strip() == a.strip()) for t, a in zip(texts, answers)]

    return exact_match
