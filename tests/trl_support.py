"""Shared pieces for the tests that run TRL's trainers beside our drop-ins.

Everything is built locally (no Hub access): a byte-level BPE tokenizer trained on a few
hundred synthetic sentences, a two-layer Qwen2 causal LM sized to that tokenizer, tiny
``datasets.Dataset``s, a LoRA config, and :func:`trainer_args`, the TRL config every test
trainer shares (CPU, no saving, no reporting, a fixed seed, a few steps).

Parity runs compare two trainers built from the same initial weights
(:func:`tiny_causal_lm` with the same ``seed``) on the same data with the same config, so
any difference comes from how the trainer computes its loss.
"""

from __future__ import annotations

import functools
import random
import tempfile

import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
_WORDS = (
    "the a one every some cat dog bird fish robot river tree stone cloud engine "
    "runs jumps sees eats likes finds moves sings counts builds "
    "red green blue small large quick slow bright quiet old new "
    "today later here there again slowly quickly gladly"
).split()


def _sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))) + "." for _ in range(count)]


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
    """A directory holding a saved :class:`transformers.PreTrainedTokenizerFast`: byte-level
    BPE (vocabulary about 300) trained on synthetic sentences, with ``<|pad|>``, ``<|eos|>``
    and ``<|bos|>`` inside the vocabulary. Built once per session (trainers that load the
    tokenizer by path get the same files); the folder lives until the process exits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[PAD, EOS, BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_sentences(400, seed=0), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=EOS, bos_token=BOS)
    folder = tempfile.mkdtemp(prefix="rlhf-engine-test-tokenizer-")
    tokenizer.save_pretrained(folder)
    return folder


def tokenizer():
    """A fresh tokenizer object loaded from :func:`tokenizer_dir` (trainers may set
    attributes on it, so each caller gets its own)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir())


def tiny_causal_lm(seed: int = 0, *, tie_word_embeddings: bool = False):
    """A randomly initialised fp32 ``Qwen2ForCausalLM`` (hidden 32, 2 layers, 4 heads, 2 KV
    heads, vocabulary = the tokenizer's) built under ``torch.manual_seed(seed)``: equal
    seeds give equal weights. Untied lm_head by default, so the lm_head weight is a
    parameter of its own whose update the parity tests see."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(torch.float32)


@functools.lru_cache(maxsize=None)
def tiny_causal_lm_dir(seed: int = 0) -> str:
    """A directory holding :func:`tiny_causal_lm` ``(seed)`` saved with ``save_pretrained``:
    trainers that build a reference model from the policy's path (TRL's GRPO / RLOO with
    ``beta != 0`` and no PEFT) load it from here. Built once per session."""
    folder = tempfile.mkdtemp(prefix="rlhf-engine-test-model-")
    tiny_causal_lm(seed).save_pretrained(folder)
    return folder


def reward_length(completions, **kwargs) -> list[float]:
    """A local reward function for on-policy trainers: a tenth of each completion's length
    in characters (differs between completions, so group advantages are not all 0)."""
    return [len(text) / 10 for text in completions]


def _quiet_datasets() -> None:
    # TRL maps every dataset it is given (tokenize, add EOS, ...): one progress bar each.
    import datasets

    datasets.disable_progress_bars()


def preference_dataset(rows: int = 8, seed: int = 1):
    """``datasets.Dataset`` with ``prompt`` / ``chosen`` / ``rejected`` strings of uneven
    lengths (so padding, and the prompt / completion masks, differ between rows)."""
    from datasets import Dataset

    _quiet_datasets()
    text = _sentences(3 * rows, seed)
    return Dataset.from_dict(
        {"prompt": text[0::3], "chosen": [" " + t for t in text[1::3]], "rejected": [" " + t for t in text[2::3]]}
    )


def prompt_dataset(rows: int = 8, seed: int = 2):
    """``datasets.Dataset`` with a ``prompt`` column only (for on-policy trainers)."""
    from datasets import Dataset

    _quiet_datasets()
    return Dataset.from_dict({"prompt": _sentences(rows, seed)})


def lora_config():
    """A small LoRA (rank 4) on the attention projections; never on ``lm_head``, which
    TRL refuses (it reads ``lm_head.weight`` directly)."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def trainer_args(config_cls, output_dir, **overrides):
    """``config_cls`` (a TRL config class, e.g. ``trl.DPOConfig``) for a short, reproducible
    CPU run in fp32: no saving, no reporting, no dropout, batch 2, 2 steps, plain SGD (Adam turns a
    gradient difference at rounding level into a full ``lr``-sized step where a gradient is
    near 0, so parity runs use SGD, whose update is proportional to the gradient), logging
    every step, fixed seed, no shuffling difference (same seed, same sampler). ``overrides``
    win."""
    defaults = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's configs default to bf16 autocast; parity runs are fp32 unless they ask
        save_strategy="no",
        seed=0,
        data_seed=0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        logging_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return config_cls(**defaults)


def logged_history(trainer) -> list[dict]:
    """The per-step log entries of a finished run (``trainer.state.log_history``), without
    the wall-clock fields (``train_runtime``, ``*_per_second``) that differ between runs."""
    timing = ("runtime", "per_second")
    return [
        {key: value for key, value in entry.items() if not any(t in key for t in timing)}
        for entry in trainer.state.log_history
    ]


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    """Name -> detached copy of every parameter that requires a gradient."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def forbid_vocabulary_logits(monkeypatch, module, name: str) -> list[tuple[int, ...]]:
    """Make any ``[.., V]`` logits fail loudly: TRL's chunked logprob kernel and an lm_head-sized
    ``nn.Linear`` forward raise; ``module.name`` (our fused op, as the drop-in imports it) still
    runs and records the shape of each hidden-state batch it gets, in the list returned."""
    import torch
    import trl

    vocabulary = len(tokenizer())
    linear = torch.nn.Linear.forward

    def guarded(self, x):
        if self.out_features == vocabulary:
            raise AssertionError("the lm_head module ran: the [B, T, V] logits were built")
        return linear(self, x)

    shapes = []
    exact = getattr(module, name)

    def watched(hidden, *args, **kwargs):
        shapes.append(tuple(hidden.shape))
        return exact(hidden, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("TRL's logits path ran")

    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", refuse)
    monkeypatch.setattr(torch.nn.Linear, "forward", guarded)
    monkeypatch.setattr(module, name, watched)
    return shapes
