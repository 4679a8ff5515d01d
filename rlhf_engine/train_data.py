"""Training data for ``rlhf-engine train``: rows of a data file -> the token records each trainer takes.

Rows come from :func:`rlhf_engine.data_files.read_rows` (JSONL, JSON, Parquet, CSV, or a
folder saved by ``datasets``). Field names below are :class:`DataConfig`'s defaults; each
can be renamed (``data:`` in the ``--config`` YAML, or ``--prompt-field`` etc.).

Formats, by algorithm (TRL's dataset formats, plus ours):

* ``sft``: ``{"prompt", "response"}``, or TRL's prompt-completion ``{"prompt", "completion"}``
  (whichever name the first record has; the loss is on the response), or TRL's
  conversational language modeling ``{"messages": [turns]}`` (the loss on every token but
  the first, as TRL's default ``assistant_only_loss=False``).
* ``rm``: ``{"prompt", "chosen", "rejected"}`` (optional number ``"margin"``), or rankings
  ``{"prompt", "responses": [...]}`` best first.
* ``dpo``: ``{"prompt", "chosen", "rejected"}``. For ``rm`` and ``dpo``, when the first record
  has no prompt, the prompt is implicit (TRL's ``extract_prompt``): the longest common start
  of ``chosen`` and ``rejected`` (turns, or characters).
* ``ppo``, ``grpo``, ``rloo``, ``reinforce_pp``: ``{"prompt"}`` with an optional string
  ``"answer"``. Each record also keeps ``"prompt_text"`` (the prompt as given) and
  ``"fields"`` (every field but the prompt, under its own name) for reward functions.

A text field is a string, or a list of chat turns ``[{"role": ..., "content": ...}, ...]``
(a record's prompt and responses all strings, or all chat turns). Strings are tokenized as
``[bos] + prompt`` and ``response + [eos]``. Chat turns go through the tokenizer's chat
template as TRL's trainers do: the prompt rendered with the generation prompt (or, when its
last turn is the assistant's, continuing that turn), each response as the rest of the
rendered prompt + response turns after the tokens they share with the prompt (so prompt +
response is exactly the rendered conversation: the template's own bos / end-of-turn tokens,
nothing doubled, no eos added). A tokenizer without a chat template (the byte tokenizer of
``tiny`` / ``small``) is an error for chat data.

Truncation (counted in :class:`DataStats`): ``max_prompt_length`` cuts prompts to that many
tokens (``prompt_truncation="left"``, the default, keeps their end, next to the response);
``max_length`` bounds prompt + response for ``sft``, ``rm`` and ``dpo``: responses are cut
at the end, and a record whose prompt alone has ``max_length`` tokens or more is dropped (as
TRL's DPO does). RL responses are generated (``max_new_tokens`` bounds them), so RL data
takes ``max_prompt_length`` only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rlhf_engine.algos.config import check_field, config_from_dict, read_yaml_mapping
from rlhf_engine.data_files import read_rows

OFFLINE_ALGOS = ("sft", "rm", "dpo")


@dataclass
class DataConfig:
    """Field names of the data rows and token limits (``data:`` in the ``--config`` YAML).

    ``response_field`` None: ``"response"``, or ``"completion"`` when the first record has
    that and no ``"response"``. Lengths are in tokens; None: no limit.
    """

    prompt_field: str = "prompt"
    response_field: str | None = None
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    responses_field: str = "responses"
    margin_field: str = "margin"
    answer_field: str = "answer"
    max_prompt_length: int | None = None
    max_length: int | None = None
    prompt_truncation: str = "left"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name.endswith("_field") and getattr(self, f.name) is not None:
                check_field(self, f.name, getattr(self, f.name) != "", "a field name (not empty)")
        for name in ("max_prompt_length", "max_length"):
            check_field(self, name, getattr(self, name) is None or getattr(self, name) >= 1, ">= 1 or null")
        check_field(self, "prompt_truncation", self.prompt_truncation in ("left", "right"),
                    "'left' (keep the end of a prompt) or 'right' (keep its start)")  # fmt: skip
        if self.max_prompt_length is not None and self.max_length is not None:
            check_field(self, "max_prompt_length", self.max_prompt_length < self.max_length,
                        f"< max_length ({self.max_length}), leaving room for a response")  # fmt: skip


def load_data_config(path: str | Path | None, flags: dict | None = None) -> DataConfig:
    """The ``data:`` mapping of the YAML file ``path`` (absent: the defaults), with ``flags``
    (field -> value, e.g. from ``--max-length``; None values are not given) over it. Errors
    name the file and field, or the flags."""
    values = (read_yaml_mapping(path).get("data") or {}) if path is not None else {}  # `data:` alone is empty
    config = config_from_dict(DataConfig, values, source=f"{path}: data")
    given = {name: value for name, value in (flags or {}).items() if value is not None}
    if not given:
        return config
    source = ", ".join("--" + name.replace("_", "-") for name in given)
    return config_from_dict(DataConfig, {**dataclasses.asdict(config), **given}, source=source)


@dataclass
class DataStats:
    """What loading did: rows read, records kept, prompts and responses truncated (each
    response of a pair or ranking counts), records dropped, records through the chat template."""

    path: str
    rows: int = 0
    records: int = 0
    chat: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    dropped: int = 0
    max_prompt_length: int | None = None
    max_length: int | None = None

    def summary(self) -> str:
        """One line for the console, e.g. ``data: f.jsonl: 3 of 4 records (3 chat); max_prompt_length 64:
        1 prompts truncated; max_length 96: 0 responses truncated, 1 records dropped (prompt alone >=
        max_length)`` (the limits' parts only when they are set)."""
        line = f"data: {self.path}: {self.records} of {self.rows} records" + (f" ({self.chat} chat)" if self.chat else "")
        if self.max_prompt_length is not None:
            line += f"; max_prompt_length {self.max_prompt_length}: {self.prompts_truncated} prompts truncated"
        if self.max_length is not None:
            line += (f"; max_length {self.max_length}: {self.responses_truncated} responses truncated, "
                     f"{self.dropped} records dropped (prompt alone >= max_length)")  # fmt: skip
        return line


def load_data(algo: str, path: str | Path, tokenizer, data: DataConfig | None = None) -> tuple[list, DataStats]:
    """The records for ``algo`` from the data at ``path`` (see the module docstring) and the
    :class:`DataStats` of loading them.

    Records: ``sft`` ``(prompt_ids, response_ids)`` tuples; ``rm`` ``{"prompt", "chosen",
    "rejected"[, "margin"]}`` or ``{"prompt", "responses"}``; ``dpo`` ``{"prompt", "chosen",
    "rejected"}``; RL ``{"prompt", "answer", "prompt_text", "fields"}`` (ids are lists of
    ints). ValueError naming the file and line / row, the file when it holds no record, or
    the data config field."""
    data = data or DataConfig()
    if data.max_length is not None and algo not in OFFLINE_ALGOS:
        raise ValueError(f"data.max_length ({data.max_length}) bounds prompt + response for {OFFLINE_ALGOS}; --algo {algo} "
                         "generates its responses (RLConfig.max_new_tokens bounds them): set max_prompt_length only")  # fmt: skip
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no records (the file is empty)")
    stats = DataStats(str(path), rows=len(rows), max_prompt_length=data.max_prompt_length, max_length=data.max_length)
    builder = _RecordBuilder(algo, data, _Tokens(tokenizer), stats, first=rows[0][1])
    records = [record for where, row in rows if (record := builder.build(where, row)) is not None]
    if not records:
        raise ValueError(f"{path}: all {len(rows)} records dropped: each prompt alone has >= max_length "
                         f"({data.max_length}) tokens")  # fmt: skip
    stats.records = len(records)
    return records, stats


def load_records(algo: str, path: str | Path, tokenizer, data: DataConfig | None = None) -> list:
    """:func:`load_data`'s records alone."""
    return load_data(algo, path, tokenizer, data)[0]


def is_chat(value) -> bool:
    """Whether ``value`` is a list of chat turns (dicts with a string ``"role"``), as TRL's
    ``is_conversational`` tells a conversational field."""
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) and isinstance(t.get("role"), str) for t in value)


def shared_start(a, b) -> int:
    """How many leading items the sequences ``a`` and ``b`` have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def implicit_prompt(chosen, rejected) -> tuple:
    """``(prompt, chosen, rejected)``: the longest common start of ``chosen`` and ``rejected``
    (lists of turns, or strings) and the rest of each, TRL's ``extract_prompt``: for strings
    a space just before they differ stays with the responses."""
    n = shared_start(chosen, rejected)
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


class _Tokens:
    """Token ids of a record's text fields: strings as ``[bos] + prompt`` / ``response + [eos]``,
    chat turns through the tokenizer's chat template (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def prompt(self, where: str, field: str, prompt) -> list[int]:
        """A prompt alone (RL): its ids, ready for generation."""
        if not is_chat(prompt):
            return [self.tokenizer.bos_token_id] + self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self._render(where, field, prompt, **_prompt_ending(where, field, prompt)))

    def with_responses(self, where: str, prompt_field: str, prompt, responses: dict) -> tuple[list[int], list[list[int]]]:
        """``(prompt_ids, [response_ids, ...])`` of one prompt and its ``responses`` (field name
        -> value; all strings, or all chat turns, like the prompt)."""
        if not is_chat(prompt):
            eos = [self.tokenizer.eos_token_id]
            return self.prompt(where, prompt_field, prompt), [self.tokenizer.encode(r) + eos for r in responses.values()]
        alone = self.prompt(where, prompt_field, prompt)
        whole = {f: self.conversation(where, f, prompt + r) for f, r in responses.items()}
        # The responses start where the prompt rendered alone and every conversation part (TRL's
        # common_prefix_length): a template may render the generation prompt unlike the start
        # of the answer turn, or tokens may merge across the boundary.
        start = min(shared_start(alone, ids) for ids in whole.values())
        for f, ids in whole.items():
            if len(ids) == start:
                raise ValueError(f"{where}: field {f!r} renders to no tokens after the prompt in the chat template")
        return alone[:start], [ids[start:] for ids in whole.values()]

    def conversation(self, where: str, field: str, turns: list) -> list[int]:
        """A whole conversation's ids, the template's own special tokens included."""
        return self.tokenizer.encode(self._render(where, field, turns))

    def _render(self, where: str, field: str, turns: list, **ending) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"{where}: field {field!r} holds chat turns, but the model's tokenizer has no chat template: use a model "
                f"folder whose tokenizer has one (its chat_template; `python examples/make_tiny_chat_model.py DIR` "
                f"builds a tiny one), or give the text fields as plain strings"
            )
        try:  # transformers renders templates with jinja2, which it does not require
            from jinja2 import TemplateError
        except ImportError:
            raise ValueError(f"{where}: field {field!r} holds chat turns, and chat templates need jinja2: "
                             "pip install jinja2") from None  # fmt: skip
        try:
            return self.tokenizer.render_chat(turns, **ending)
        except TemplateError as error:
            raise ValueError(f"{where}: the chat template refused field {field!r}: {error}") from None


def _prompt_ending(where: str, field: str, prompt: list) -> dict:
    """How a chat prompt ends (TRL's rule): after a user / tool turn the generation prompt
    follows; an assistant turn is continued."""
    last = prompt[-1]["role"]
    if last in ("user", "tool"):
        return {"add_generation_prompt": True}
    if last == "assistant":
        return {"continue_final_message": True}
    raise ValueError(f"{where}: field {field!r} ends with a {last!r} turn; a prompt ends with a 'user' or 'tool' "
                     "turn (or an 'assistant' turn, to continue it)")  # fmt: skip


def _text_kind(where: str, field: str, value) -> str:
    """``"chat"`` or ``"text"``; ValueError naming the field for anything else."""
    if isinstance(value, str):
        return "text"
    if is_chat(value):
        return "chat"
    got = "an empty list" if value == [] else type(value).__name__
    raise ValueError(f"{where}: field {field!r} must be str or a list of chat turns ({{'role': ..., 'content': ...}}), got {got}")


class _RecordBuilder:
    """One trainer record from one row: checks the fields, tokenizes, truncates, counts.

    The format (rankings or pairs, prompt / response or messages, explicit or implicit
    prompt) is the first record's; every record must follow it."""

    def __init__(self, algo: str, data: DataConfig, tokens: _Tokens, stats: DataStats, first: dict):
        self.algo, self.data, self.tokens, self.stats = algo, data, tokens, stats
        if algo == "sft":
            self.response_field = data.response_field or ("completion" if "completion" in first and "response" not in first else "response")
            self.format = "messages" if data.messages_field in first else "completion"
        elif algo == "rm" and data.responses_field in first:
            self.format = "ranking"
        elif algo in OFFLINE_ALGOS:
            self.format = "implicit pair" if data.prompt_field not in first and data.chosen_field in first else "pair"
        else:
            self.format = "prompt"

    def build(self, where: str, row: dict):
        """The record of ``row`` (None when it is dropped: its prompt alone fills max_length)."""
        d = self.data
        if self.format == "prompt":
            return self._rl(where, row)
        if self.format == "messages":
            return self._messages(where, row)
        if self.format == "implicit pair":
            return self._implicit_pair(where, row)
        prompt = _field(where, row, d.prompt_field)
        if self.format == "completion":
            fitted = self._fit(where, d.prompt_field, prompt, {self.response_field: _field(where, row, self.response_field)})
            return None if fitted is None else (fitted[0], fitted[1][0])
        if self.format == "ranking":
            responses = _field(where, row, d.responses_field)
            if not isinstance(responses, list) or len(responses) < 2:
                raise ValueError(f"{where}: {d.responses_field!r} must be a list of at least two strings (or chat-turn lists)")
            fitted = self._fit(where, d.prompt_field, prompt, {f"{d.responses_field}[{i}]": r for i, r in enumerate(responses)})
            return None if fitted is None else {"prompt": fitted[0], "responses": fitted[1]}
        return self._pair(where, row, d.prompt_field, prompt, _field(where, row, d.chosen_field), _field(where, row, d.rejected_field))

    def _messages(self, where: str, row: dict):
        field = self.data.messages_field
        turns = _field(where, row, field)
        if not is_chat(turns):
            raise ValueError(f"{where}: field {field!r} must be a list of chat turns ({{'role': ..., 'content': ...}})")
        self.stats.chat += 1
        ids = self.tokens.conversation(where, field, turns)
        if len(ids) < 2:
            raise ValueError(f"{where}: field {field!r} renders to fewer than 2 tokens")
        # Every token but the first is predicted, as TRL's labels (= input_ids) make it.
        fitted = self._limit(ids[:1], [ids[1:]])
        return None if fitted is None else (fitted[0], fitted[1][0])

    def _implicit_pair(self, where: str, row: dict):
        d = self.data
        chosen, rejected = _field(where, row, d.chosen_field), _field(where, row, d.rejected_field)
        if _text_kind(where, d.chosen_field, chosen) != _text_kind(where, d.rejected_field, rejected):
            raise ValueError(f"{where}: fields {d.chosen_field!r} and {d.rejected_field!r} must both be strings or both chat turns")
        prompt, chosen, rejected = implicit_prompt(chosen, rejected)
        if isinstance(prompt, list) and not prompt:
            raise ValueError(f"{where}: no {d.prompt_field!r} field, and {d.chosen_field!r} and {d.rejected_field!r} share no "
                             "first turn to be the prompt: give the prompt as a field of its own")  # fmt: skip
        return self._pair(where, row, f"{d.chosen_field}/{d.rejected_field} (shared start)", prompt, chosen, rejected)

    def _pair(self, where: str, row: dict, prompt_field: str, prompt, chosen, rejected):
        d = self.data
        margin = row.get(d.margin_field)
        if margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool)):
            raise ValueError(f"{where}: {d.margin_field!r} must be a number, got {margin!r}")
        fitted = self._fit(where, prompt_field, prompt, {d.chosen_field: chosen, d.rejected_field: rejected})
        if fitted is None:
            return None
        record = {"prompt": fitted[0], "chosen": fitted[1][0], "rejected": fitted[1][1]}
        if margin is not None:
            record["margin"] = float(margin)
        return record

    def _fit(self, where: str, prompt_field: str, prompt, responses: dict):
        """The ids of a prompt and its responses (all of one kind), within the limits."""
        kind = _text_kind(where, prompt_field, prompt)
        for field, response in responses.items():
            if _text_kind(where, field, response) != kind:
                raise ValueError(f"{where}: field {field!r} and field {prompt_field!r} must both be strings or both chat turns")
        self.stats.chat += int(kind == "chat")
        return self._limit(*self.tokens.with_responses(where, prompt_field, prompt, responses))

    def _rl(self, where: str, row: dict) -> dict:
        d = self.data
        prompt = _field(where, row, d.prompt_field)
        answer = row.get(d.answer_field)
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"{where}: field {d.answer_field!r} must be str, got {type(answer).__name__}")
        self.stats.chat += int(_text_kind(where, d.prompt_field, prompt) == "chat")
        ids = self._truncate_prompt(self.tokens.prompt(where, d.prompt_field, prompt))
        fields = {name: value for name, value in row.items() if name != d.prompt_field}
        return {"prompt": ids, "answer": answer, "prompt_text": prompt, "fields": fields}

    def _limit(self, prompt: list[int], responses: list[list[int]]):
        """``(prompt, responses)`` within max_prompt_length and max_length (counted), or None
        when the prompt alone fills max_length."""
        prompt = self._truncate_prompt(prompt)
        limit = self.data.max_length
        if limit is None:
            return prompt, responses
        if len(prompt) >= limit:
            self.stats.dropped += 1
            return None
        room = limit - len(prompt)
        self.stats.responses_truncated += sum(len(r) > room for r in responses)
        return prompt, [r[:room] for r in responses]

    def _truncate_prompt(self, ids: list[int]) -> list[int]:
        limit = self.data.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids
        self.stats.prompts_truncated += 1
        return ids[-limit:] if self.data.prompt_truncation == "left" else ids[:limit]


def _field(where: str, row: dict, name: str):
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r}")
    return row[name]
