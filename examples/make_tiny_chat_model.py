"""Write a tiny chat model folder to try chat-format data with ``rlhf-engine train``, offline.

    python examples/make_tiny_chat_model.py runs/tiny-chat

The folder holds a Hugging Face tokenizer with a ChatML chat template (``<|im_start|>role\\n
content<|im_end|>\\n`` per turn; ``<|im_end|>`` is the eos, so a model trained on it ends
its turns with eos) and a randomly initialised ``tiny`` Llama (hidden 64, 2 layers) sized to
it: the same files as a downloaded chat model, small enough to train on a CPU in seconds.
The tokenizer is byte-level BPE without merges (one token per UTF-8 byte, like GPT-2 /
Qwen2 tokenizers before their merges), so any text encodes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = {"pad": "<|pad|>", "eos": "<|im_end|>", "start": "<|im_start|>"}


def build(folder: str | Path, seed: int = 0, max_length: int = 512) -> Path:
    """Write the tokenizer and the model into ``folder`` (created); returns it. ``max_length``:
    the model's longest sequence (prompt + response) in tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_engine.models import PolicyModel, llama_config

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=SPECIAL["pad"], eos_token=SPECIAL["eos"],
                                        additional_special_tokens=[SPECIAL["start"]])  # fmt: skip
    tokenizer.chat_template = CHATML
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = llama_config("tiny", len(tokenizer), max_position_embeddings=max_length, **ids)
    PolicyModel.from_config(config, seed=seed).save(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the model folder (the --model of rlhf-engine train)")
    parser.add_argument("--seed", type=int, default=0, help="the weights' initialisation seed")
    args = parser.parse_args()
    print(f"tiny chat model written to {build(args.folder, args.seed)}")


if __name__ == "__main__":
    main()
