"""Example reward functions for ``rlhf-engine train --reward-fn examples/rewards.py:NAME``.

Each follows TRL's convention: keyword arguments ``prompts`` and ``completions`` (text, one
per sampled completion), ``completion_ids`` and every other field of the data records as
lists aligned with them; it returns one float per completion, or None for "no score".
"""

import re


def length_reward(completions, target_length, **kwargs):
    """1 for a completion of exactly ``target_length`` characters, falling off by 0.1 per
    character away from it (the record's ``target_length`` field; None where it has none)."""
    return [None if n is None else max(0.0, 1.0 - 0.1 * abs(len(c) - n)) for c, n in zip(completions, target_length)]


def format_reward(completions, **kwargs):
    """1 when the completion is an answer in brackets, e.g. ``[4]``, else 0."""
    return [1.0 if re.fullmatch(r"\s*\[[^\[\]]+\]\s*", c) else 0.0 for c in completions]
