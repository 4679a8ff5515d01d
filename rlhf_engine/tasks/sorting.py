"""The embedded default task: sort the digits of the prompt.

Vocabulary (``vocab_size = 14``)::

    0 <pad>   1 <bos>   2 <eos>   3 <sep>   4..13 the digits 0..9

A prompt is ``[<bos>, d_1, ..., d_n, <sep>]`` with ``n`` uniform in
``[min_digits, max_digits]`` and each digit uniform in 0..9 (repeats allowed). The
perfect response is the prompt's digits in ascending order followed by ``<eos>``.

Hidden gold preference (``gold_score``), in [0, 1]. With ``t`` the perfect response
and ``r`` the response cut after its first ``<eos>`` (later tokens are ignored)::

    gold(r) = #{i : i < min(|r|, |t|) and r_i == t_i} / max(|r|, |t|)

Position-wise partial credit: one wrong digit in a 5-digit answer scores 5/6, one
adjacent swap 4/6; a missing or extra token shifts the rest and costs more. The score
is 1 exactly when ``r == t`` (equal lengths and every position matching).

Data, every draw from a caller's ``torch.Generator`` (same seed, same data):

- ``demonstrations``: the perfect response with probability ``1 - demo_noise``,
  otherwise one imitable mistake (an adjacent swap of two unequal digits, or one digit
  replaced by another). A model that imitates them samples mostly-right answers whose
  mode is right, so SFT alone leaves a gap that RL can close by sharpening.
- ``preference_pairs``: two responses to one prompt with ``k_a != k_b`` edits
  (``k`` in ``0..pair_max_edits``; an edit is an adjacent swap, a substitution, a
  deletion or an insertion of a digit) and different gold; ties are redrawn. The first
  is labelled preferred with probability ``sigmoid((gold_a - gold_b) / label_temperature)``
  (a Bradley-Terry annotator: noisy, like people).
- ``gold_scores`` is the verifiable reward for GRPO (``reward_fn(prompts, responses)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

PAD, BOS, EOS, SEP = 0, 1, 2, 3
DIGIT0 = 4  # token id of the digit 0; digit d is DIGIT0 + d
_SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", SEP: "<sep>"}
_SPECIAL_IDS = {name: i for i, name in _SPECIAL_NAMES.items()}


class _Uniforms:
    """Uniform [0, 1) floats drawn from ``generator`` in blocks (one torch call per block)."""

    def __init__(self, generator: torch.Generator, block: int = 4096):
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self._generator = generator
        self._block = block
        self._values: list[float] = []
        self._next = 0

    def uniform(self) -> float:
        if self._next == len(self._values):
            self._values = torch.rand(self._block, generator=self._generator, dtype=torch.float64).tolist()
            self._next = 0
        self._next += 1
        return self._values[self._next - 1]

    def integer(self, high: int) -> int:
        """Uniform in ``0 .. high - 1``."""
        return min(int(self.uniform() * high), high - 1)


def _check_count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def _token_list(name: str, seq) -> list[int]:
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {tuple(seq.shape)}")
        return seq.tolist()
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a list of token ids, got {type(seq).__name__}")
    return list(seq)


@dataclass
class SortingTask:
    """Sort the prompt's digits; see the module docstring for the gold score and the data.

    Fields:
        min_digits, max_digits: prompt length range in digits (inclusive), 1 <= min <= max.
        demo_noise: probability that a demonstration carries one mistake, in [0, 1].
        label_temperature: Bradley-Terry temperature of the preference labels (> 0);
            the default makes about 91% of labels agree with the gold ordering
            (the best pairwise accuracy any reward model can reach on held-out labels).
        pair_max_edits: the two responses of a pair have distinct edit counts in
            ``0 .. pair_max_edits`` (>= 1).
    """

    min_digits: int = 3
    max_digits: int = 5
    demo_noise: float = 0.5
    label_temperature: float = 0.15
    pair_max_edits: int = 3

    vocab_size: int = 14
    pad_token_id: int = PAD
    bos_token_id: int = BOS
    eos_token_id: int = EOS
    sep_token_id: int = SEP

    def __post_init__(self):
        for name in ("min_digits", "max_digits", "pair_max_edits"):
            _check_count(name, getattr(self, name))
        if self.min_digits < 1:
            raise ValueError(f"min_digits must be >= 1, got {self.min_digits}")
        if self.max_digits < self.min_digits:
            raise ValueError(f"max_digits must be >= min_digits ({self.min_digits}), got {self.max_digits}")
        if self.pair_max_edits < 1:
            raise ValueError(f"pair_max_edits must be >= 1, got {self.pair_max_edits}")
        for name in ("demo_noise", "label_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not 0.0 <= self.demo_noise <= 1.0:
            raise ValueError(f"demo_noise must be in [0, 1], got {self.demo_noise}")
        if not self.label_temperature > 0:
            raise ValueError(f"label_temperature must be > 0, got {self.label_temperature}")
        fixed = (self.vocab_size, self.pad_token_id, self.bos_token_id, self.eos_token_id, self.sep_token_id)
        if fixed != (14, PAD, BOS, EOS, SEP):
            raise ValueError("vocab_size and the special token ids are fixed by the task; leave them at their defaults")

    @property
    def max_prompt_len(self) -> int:
        """``<bos>`` + ``max_digits`` digits + ``<sep>``."""
        return self.max_digits + 2

    @property
    def max_response_len(self) -> int:
        """``max_digits`` digits + ``<eos>``."""
        return self.max_digits + 1

    # ---- text <-> ids -------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: digits and the tags ``<pad> <bos> <eos> <sep>``; whitespace is skipped.

        ``encode("<bos>312<sep>") == [1, 7, 5, 6, 3]``; any other character raises ValueError.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids, i = [], 0
        while i < len(text):
            ch = text[i]
            tag = text[i : text.find(">", i) + 1] if ch == "<" else ""
            if ch.isspace():
                i += 1
            elif ch in "0123456789":
                ids.append(DIGIT0 + int(ch))
                i += 1
            elif tag in _SPECIAL_IDS:
                ids.append(_SPECIAL_IDS[tag])
                i += len(tag)
            else:
                raise ValueError(f"text: cannot encode {text[i:i + 6]!r} at position {i} (digits and <pad> <bos> <eos> <sep> only)")
        return ids

    def decode(self, ids) -> str:
        """Inverse of ``encode`` (no spaces): ``decode([1, 7, 5, 6, 3]) == "<bos>312<sep>"``."""
        out = []
        for tok in _token_list("ids", ids):
            if tok in _SPECIAL_NAMES:
                out.append(_SPECIAL_NAMES[tok])
            elif DIGIT0 <= tok < DIGIT0 + 10:
                out.append(str(tok - DIGIT0))
            else:
                raise ValueError(f"ids: token id {tok} is outside the vocabulary 0..{self.vocab_size - 1}")
        return "".join(out)

    # ---- gold ----------------------------------------------------------------------

    def target(self, prompt) -> list[int]:
        """The perfect response to ``prompt``: its digit tokens sorted, then ``<eos>``."""
        digits = [t for t in _token_list("prompt", prompt) if DIGIT0 <= t < DIGIT0 + 10]
        return sorted(digits) + [EOS]

    def gold_score(self, prompt, response) -> float:
        """Hidden gold preference in [0, 1] (formula in the module docstring); 1 iff perfect."""
        target = self.target(prompt)
        resp = _token_list("response", response)
        if EOS in resp:
            resp = resp[: resp.index(EOS) + 1]
        matches = sum(a == b for a, b in zip(resp, target))
        return matches / max(len(resp), len(target))

    def gold_scores(self, prompts, responses) -> torch.Tensor:
        """fp32 ``[B]`` gold scores of ``B`` (prompt, response) token lists; usable as ``reward_fn``."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
        return torch.tensor([self.gold_score(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)

    # ---- data ----------------------------------------------------------------------

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[list[int]]:
        """``n`` prompts ``[<bos>, digits..., <sep>]`` (token ids)."""
        return self._prompts(_check_count("n", n), _Uniforms(generator))

    def demonstrations(self, n: int, generator: torch.Generator) -> list[tuple[list[int], list[int]]]:
        """``n`` imperfect SFT examples ``(prompt, response)``; a fraction ``demo_noise`` carry one mistake."""
        draws = _Uniforms(generator)
        out = []
        for prompt in self._prompts(_check_count("n", n), draws):
            response = self.target(prompt)
            if draws.uniform() < self.demo_noise:
                kind = "swap" if draws.uniform() < 0.5 and len(set(response[:-1])) > 1 else "substitute"
                response = _edit(response, kind, draws)
            out.append((prompt, response))
        return out

    def preference_pairs(self, n: int, generator: torch.Generator) -> list[dict]:
        """``n`` labelled pairs ``{"prompt", "chosen", "rejected"}`` (token-id lists).

        Per pair: two distinct edit counts ``k_a != k_b`` in ``0..pair_max_edits``, a response
        with each (redrawn while their gold ties), and ``a`` is chosen with probability
        ``sigmoid((gold_a - gold_b) / label_temperature)``.
        """
        draws = _Uniforms(generator)
        out = []
        for prompt in self._prompts(_check_count("n", n), draws):
            target = self.target(prompt)
            while True:
                k_a = draws.integer(self.pair_max_edits + 1)
                k_b = (k_a + 1 + draws.integer(self.pair_max_edits)) % (self.pair_max_edits + 1)
                a, b = _corrupt(target, k_a, draws), _corrupt(target, k_b, draws)
                gold_a, gold_b = self.gold_score(prompt, a), self.gold_score(prompt, b)
                if gold_a != gold_b:
                    break
            p_a = 0.5 * (1.0 + math.tanh(0.5 * (gold_a - gold_b) / self.label_temperature))  # sigmoid, no overflow
            chosen, rejected = (a, b) if draws.uniform() < p_a else (b, a)
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return out

    def _prompts(self, n: int, draws: _Uniforms) -> list[list[int]]:
        span = self.max_digits - self.min_digits + 1
        prompts = []
        for _ in range(n):
            length = self.min_digits + draws.integer(span)
            prompts.append([BOS] + [DIGIT0 + draws.integer(10) for _ in range(length)] + [SEP])
        return prompts


_EDIT_KINDS = ("swap", "substitute", "delete", "insert")


def _corrupt(target: list[int], edits: int, draws: _Uniforms) -> list[int]:
    """``target`` (digits + <eos>) with ``edits`` random edits of any kind."""
    response = list(target)
    for _ in range(edits):
        kinds = [k for k in _EDIT_KINDS if _edit_possible(response, k)]
        response = _edit(response, kinds[draws.integer(len(kinds))], draws)
    return response


def _edit_possible(response: list[int], kind: str) -> bool:
    digits = response[:-1]
    if kind == "swap":
        return any(x != y for x, y in zip(digits, digits[1:]))
    if kind == "delete":
        return len(digits) > 1
    return True


def _edit(response: list[int], kind: str, draws: _Uniforms) -> list[int]:
    """One edit of the digits (everything before the final <eos>) of ``response``."""
    digits, tail = list(response[:-1]), response[-1:]
    if kind == "swap":
        spots = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
        i = spots[draws.integer(len(spots))]
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
    elif kind == "substitute":
        i = draws.integer(len(digits))
        digits[i] = DIGIT0 + (digits[i] - DIGIT0 + 1 + draws.integer(9)) % 10
    elif kind == "delete":
        del digits[draws.integer(len(digits))]
    else:  # insert
        digits.insert(draws.integer(len(digits) + 1), DIGIT0 + draws.integer(10))
    return digits + tail
