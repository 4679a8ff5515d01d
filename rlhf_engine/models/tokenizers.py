"""Tokenizers for ``rlhf-engine train``: bytes for the built-in configs, the model's own
(Hugging Face, from its local folder) otherwise.

Both expose ``encode(text) -> list[int]`` (no special tokens), ``decode(ids) -> str``,
``pad_token_id`` / ``bos_token_id`` / ``eos_token_id`` / ``vocab_size`` and ``save(directory)``.
A prompt is ``[bos] + encode(prompt)``; a response is ``encode(response) + [eos]``.
``chat_template`` is the Hugging Face tokenizer's chat template (None for the byte tokenizer,
which has none); :meth:`HFTokenizer.render_chat` renders chat turns with it to text.

``rlhf-engine train`` saves the tokenizer next to the model it writes, so that folder can be
the ``--model`` of a later run: the Hugging Face files, or for a byte-level model the small
marker file ``BYTE_TOKENIZER_FILE`` (a byte model has no Hugging Face tokenizer to save).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rlhf_engine.models.checkpoint import atomic_write_bytes

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes shifted past three special tokens: pad 0, bos 1, eos 2; vocab 259."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259
    chat_template = None  # bytes have no turn markers: chat data needs a model folder with a template

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Write the marker ``directory/byte_tokenizer.json`` that :func:`load_tokenizer` reads."""
        ids = {"pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        atomic_write_bytes(Path(directory) / BYTE_TOKENIZER_FILE, json.dumps({"vocab_size": self.vocab_size, **ids}).encode())


class HFTokenizer:
    """A local Hugging Face tokenizer; pad falls back to eos when the model has none."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"model {path}: its tokenizer has no eos token")
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id
        self.bos_token_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_token_id
        self.vocab_size = len(self.tokenizer)
        self.chat_template = self.tokenizer.chat_template

    def render_chat(self, turns: list[dict], *, add_generation_prompt: bool = False, continue_final_message: bool = False) -> str:
        """``turns`` (``[{"role", "content"}, ...]``) rendered as text by the chat template (which
        writes its own bos, if any); ``add_generation_prompt`` appends the assistant header,
        ``continue_final_message`` leaves the last turn open."""
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message)  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


# "owner/name" as the hub spells a model id
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# The files a Hugging Face tokenizer is loaded from (any one of them is enough to try).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model: str) -> ByteTokenizer | HFTokenizer:
    """``ByteTokenizer`` for a built-in size name (``tiny``, ``small``) or a folder holding
    ``byte_tokenizer.json``, else the Hugging Face tokenizer in the local folder ``model``
    (ValueError when there is none)."""
    from rlhf_engine.models.configs import MODEL_SIZES

    if model in MODEL_SIZES:
        return ByteTokenizer()
    path = Path(model)
    if not path.is_dir():
        hint = ""
        if _HUB_ID.fullmatch(model) and not path.exists():
            hint = (f"; {model!r} looks like a Hugging Face hub id, and only local folders are read (nothing is "
                    f"downloaded): fetch it first, e.g. `huggingface-cli download {model} --local-dir DIR`, then pass DIR")
        raise ValueError(f"--model must be one of {sorted(MODEL_SIZES)} or a local model folder, got {model!r}{hint}")
    if (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers' own message here advises installing sentencepiece, which would not help
        raise ValueError(
            f"model {model}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
            f"tokenizer into it, e.g. AutoTokenizer.from_pretrained(SOURCE).save_pretrained({str(path)!r})"
        )
    try:
        return HFTokenizer(path)
    except (OSError, ValueError) as error:  # transformers raises either for a folder without tokenizer files
        raise ValueError(f"model {model}: no tokenizer found in the folder ({error})") from None
