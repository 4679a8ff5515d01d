"""``rlhf-engine generate``: sample completions of JSONL prompts from a trained model folder.

``--model DIR`` is a local causal LM with its tokenizer: the ``model/`` folder of a ``train``
run, or a Hugging Face model folder. A built-in size (``tiny``, ``small``) is refused: it has
no trained weights, only a random initialisation. A reward model's folder (a sequence
classifier) is refused too: it has no language-model head to sample from.

``--prompts FILE`` is read as the RL algorithms read their data (``train.load_records("grpo",
...)``: one ``{"prompt": ...}`` object per line, other fields ignored), each prompt tokenized
as ``[bos] + prompt``. Sampling is the trainer's own (KV-cached, ``algos.common.
sample_responses``) with ``--temperature``, ``--top-p``, ``--top-k``, at most
``--max-new-tokens`` tokens, ``--batch-size`` prompts at a time, all from one generator seeded
by ``--seed`` (the same seed and batch size give the same completions).

Output, one JSON object per prompt in the file's order (stdout, or ``--out FILE``):
``{"prompt": str, "completion": str}``, or with ``--num-samples N`` > 1
``{"prompt": str, "completions": [str] * N}``. Texts are decoded with the model's tokenizer,
special tokens dropped (``prompt`` is the prompt as the model saw it, decoded back).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf_engine.algos.common import check_device, sample_responses
from rlhf_engine.models.configs import MODEL_SIZES
from rlhf_engine.models.tokenizers import load_tokenizer
from rlhf_engine.rollout import SamplingConfig
from rlhf_engine.train import load_policy, load_records


def check_generate_options(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int, num_samples: int,
                           batch_size: int, seed: int) -> None:  # fmt: skip
    """ValueError naming the flag for an option out of range (or TypeError for a wrong type)."""
    ints = {"--max-new-tokens": (max_new_tokens, 1), "--top-k": (top_k, 0), "--num-samples": (num_samples, 1),
            "--batch-size": (batch_size, 1), "--seed": (seed, 0)}  # fmt: skip
    for flag, (value, least) in ints.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{flag} must be an int, got {value!r}")
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    for flag, value in (("--temperature", temperature), ("--top-p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{flag} must be a number, got {value!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature must be finite and > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1: off), got {top_p}")


def _check_model(model: str) -> None:
    if model in MODEL_SIZES:
        raise ValueError(f"--model {model} is a built-in size with random weights, nothing trained to sample from: "
                         "pass a trained model folder (e.g. the model/ folder a train run wrote)")  # fmt: skip
    from transformers import AutoConfig

    from rlhf_engine.models.heads import is_sequence_classifier

    if Path(model, "config.json").is_file() and is_sequence_classifier(AutoConfig.from_pretrained(model, local_files_only=True)):
        raise ValueError(f"--model {model} is a reward model (a sequence classifier, no language-model head): "
                         "generate samples from a policy folder")  # fmt: skip


def generate_completions(
    model: str, prompts: str | Path, *, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
    top_k: int = 0, num_samples: int = 1, seed: int = 0, device: str = "cpu", batch_size: int = 16, quiet: bool = False,
) -> Iterator[dict]:  # fmt: skip
    """Check the options, load the tokenizer, prompts and model (errors raised here, before
    anything is sampled), and return an iterator over the output records (see the module
    docstring), sampled ``batch_size`` prompts at a time as it is consumed. ``quiet``: no
    progress bar."""
    from rlhf_engine.train import load_policy, load_records

    check_generate_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           num_samples=num_samples, batch_size=batch_size, seed=seed)  # fmt: skip
    device = check_device(device)
    _check_model(model)
    tokenizer = load_tokenizer(model)
    if not Path(prompts).is_file():
        raise ValueError(f"--prompts {prompts}: no such file")
    token_prompts = [r["prompt"] for r in load_records("grpo", prompts, tokenizer)]
    policy = load_policy(model, tokenizer.vocab_size, tokenizer, seed, device)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return _sample(policy, tokenizer, token_prompts, sampling, num_samples, seed, batch_size, quiet)


def _sample(policy, tokenizer, prompts: list[list[int]], sampling: SamplingConfig, num_samples: int, seed: int,
            batch_size: int, quiet: bool) -> Iterator[dict]:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=quiet, dynamic_ncols=True) as bar:
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            _, responses = sample_responses(policy, batch, num_samples, sampling, generator).token_lists()
            for i, prompt in enumerate(batch):
                texts = [tokenizer.decode(r) for r in responses[i * num_samples:(i + 1) * num_samples]]
                record = {"prompt": tokenizer.decode(prompt)}
                record.update({"completion": texts[0]} if num_samples == 1 else {"completions": texts})
                yield record
            bar.update(len(batch))
