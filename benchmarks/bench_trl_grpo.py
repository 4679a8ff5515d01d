"""The loss step of TRL's ``GRPOTrainer`` against ``FusedGRPOTrainer``, the drop-in
(``rlhf_engine.integrations.trl``): peak memory and time of one ``_compute_loss`` forward +
``backward`` on one prepared batch, at Qwen2's vocabulary.

Both trainers are built the same way (``GRPOConfig``: TRL 1.16's default
``loss_type="dapo"``, ``epsilon=0.2``, ``beta=0.04`` with the k3 KL and
``use_bias_correction_kl``, no entropy bonus) on the same Qwen2 model (saved to a temporary
folder, loaded by each), and get the same batch: ``B`` left-padded prompts of ``P``
tokens and completions of up to ``T`` tokens with ragged ends, old and reference
logprobs a little off the policy (so some ratios clip), advantages of both signs. Each
call is what ``Trainer.training_step`` runs for that batch minus the optimizer: the
policy's forward, the head, the loss, the metrics and ``loss.backward()`` into every
parameter's ``.grad`` (dropped after each call, so the peak includes them). TRL's head
is its chunked logprob kernel over the completion positions (``[B, T, V]`` logits never
exist there either, but its backward and its entropy output run through full-vocabulary
chunks with autograd); ours is one ``fused_linear_policy_loss`` call on the scored rows
(on the one-pass path the head's logits are made once for value and gradients).

Before timing, the two losses must agree (relative 1e-4 in fp32, 2e-2 under bf16
autocast), else the run fails. Rows: ``TRL`` and ``ours``; ``ours`` carries
``time_vs_trl`` and ``peak_vs_trl`` (< 1: ours faster / smaller). Peak: the memory
allocated above what was allocated before the call (CUDA's allocator statistics; on the
CPU the profiler's allocation events). FLOPs (the floor): ``6 · (params − 2·V·H) ·
B·(P+T)`` for the body and ``6 · n · H · V`` for the head on the ``n`` completion tokens.

CPU (``--quick`` too): hidden 64, 2 layers, V = 151936 (untied head), B = 8, P = 16, T =
64, fp32. GPU: hidden 1024, 8 layers, B = 16, P = 128, T = 1024, bf16 autocast.

``python -m rlhf_engine.benchmarks.bench_trl_grpo [--quick] [--out FILE.json] [--device DEV]``
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile

import torch

from rlhf_engine.benchmarks.common import Result, measure, script_main


@dataclasses.dataclass(frozen=True)
class Workload:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    prompt: int
    completion: int
    bf16: bool


CPU = Workload(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=151936, batch=8, prompt=16,
               completion=64, bf16=False)  # fmt: skip
GPU = Workload(hidden=1024, layers=8, heads=16, kv_heads=8, intermediate=2816, vocab=151936, batch=16, prompt=128,
               completion=1024, bf16=True)  # fmt: skip
# The test's: seconds; the rows' shape is what it checks.
TINY = dataclasses.replace(CPU, hidden=32, layers=1, intermediate=64, vocab=512, batch=4, prompt=4, completion=8)
WORDS = 8  # the tokenizer's vocabulary: the loss step never decodes, so it need not cover the model's


@dataclasses.dataclass
class TRLLossStepResult(Result):
    """A row with ours' time and peak over TRL's (None on TRL's own row)."""

    time_vs_trl: float | None = None
    peak_vs_trl: float | None = None

    def as_dict(self) -> dict:
        return {**super().as_dict(), "time_vs_trl": self.time_vs_trl, "peak_vs_trl": self.peak_vs_trl}


def trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def build_model_dir(directory: str, w: Workload) -> None:
    """A freshly initialized Qwen2 causal LM (untied head) and a tiny word-level tokenizer, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)  # fmt: skip
    config = Qwen2Config(
        vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate, num_hidden_layers=w.layers,
        num_attention_heads=w.heads, num_key_value_heads=w.kv_heads, max_position_embeddings=w.prompt + w.completion,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)


def build_trainer(trainer_cls, model_dir: str, output_dir: str, w: Workload, device: torch.device):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir=output_dir, use_cpu=device.type == "cpu", bf16=w.bf16, report_to=[], save_strategy="no",
        disable_tqdm=True, seed=0, per_device_train_batch_size=w.batch, num_generations=w.batch,
        max_completion_length=w.completion, loss_type="dapo", beta=0.04, model_init_kwargs=dict(dtype=torch.float32),
    )  # fmt: skip
    trainer = trainer_cls(
        model=model_dir, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions), args=args,
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
        train_dataset=Dataset.from_dict({"prompt": ["w4 w5"] * w.batch}),
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    trainer.model.train()
    return trainer


def build_batch(trainer, w: Workload, device: torch.device) -> dict:
    """TRL's ``_compute_loss`` inputs (see the module docstring), from the policy's own logprobs."""
    from trl import GRPOTrainer

    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, w.vocab, (w.batch, w.prompt), generator=gen)
    prompt_mask = torch.ones(w.batch, w.prompt, dtype=torch.long)
    prompt_mask[1::2, : w.prompt // 4] = 0  # left padding on every other prompt
    completion_ids = torch.randint(4, w.vocab, (w.batch, w.completion), generator=gen)
    ends = torch.randint(w.completion // 2, w.completion + 1, (w.batch,), generator=gen)
    completion_mask = (torch.arange(w.completion) < ends[:, None]).long()
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask)  # fmt: skip
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), w.completion,
        )  # fmt: skip
    mask = batch["completion_mask"]
    noise = [torch.randn(logps.shape, generator=gen).to(device) for _ in range(2)]
    batch.update(
        old_per_token_logps=(logps + 0.05 * noise[0]) * mask, ref_per_token_logps=(logps + 0.1 * noise[1]) * mask,
        advantages=torch.randn(w.batch, generator=gen).to(device), num_items_in_batch=mask.sum(),
    )  # fmt: skip
    return batch


def loss_step(trainer, batch):
    """One ``_compute_loss`` forward + backward, gradients dropped; returns the loss."""
    def call():
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        return loss.detach()

    return call


def run_workload(device: torch.device, w: Workload, quick: bool) -> list[Result]:
    dtype_name = "bf16 autocast" if w.bf16 else "fp32"
    shape = f"B={w.batch} P={w.prompt} T={w.completion} H={w.hidden} L={w.layers} V={w.vocab} {dtype_name}"
    op = "TRL GRPO loss step"
    if not trl_installed():
        reason = "TRL is not installed: pip install 'rlhf-engine[trl]'"
        return [TRLLossStepResult(op, impl, shape, None, 0.0, 0, 0, None, error=reason) for impl in ("TRL", "ours")]
    from trl import GRPOTrainer

    from rlhf_engine.integrations.trl import FusedGRPOTrainer

    with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as out:
        build_model_dir(model_dir, w)
        trainers = {"TRL": build_trainer(GRPOTrainer, model_dir, out, w, device),
                    "ours": build_trainer(FusedGRPOTrainer, model_dir, out, w, device)}  # fmt: skip
        batch = build_batch(trainers["TRL"], w, device)
        steps = {impl: loss_step(trainer, batch) for impl, trainer in trainers.items()}
        theirs, ours = steps["TRL"]().float().item(), steps["ours"]().float().item()
        tolerance = 2e-2 if w.bf16 else 1e-4
        if abs(ours - theirs) > tolerance * max(abs(theirs), 1e-6):
            raise RuntimeError(f"bench_trl_grpo: losses differ (TRL {theirs}, ours {ours}): the rows would not compare")
        model = trainers["TRL"].model
        params = sum(p.numel() for p in model.parameters())
        tokens, scored = w.batch * (w.prompt + w.completion), int(batch["completion_mask"].sum())
        flops = 6 * (params - 2 * w.vocab * w.hidden) * tokens + 6 * scored * w.hidden * w.vocab
        bytes_moved = 3 * params * 4 + tokens * 8
        # On the CPU even --quick times at least 10 calls (as bench_train_step): 3 would leave the ratio noisy.
        dtype = torch.bfloat16 if w.bf16 else torch.float32
        rows = measure(op, shape, steps, device=device, bytes_moved=bytes_moved, flops=flops,
                       quick=quick and device.type != "cpu", dtype=dtype)  # fmt: skip
    results = [TRLLossStepResult(**dataclasses.asdict(r)) for r in rows]
    trl_row, our_row = results
    if trl_row.ms and our_row.ms:
        our_row.time_vs_trl = our_row.ms / trl_row.ms
    if trl_row.peak_mem_bytes and our_row.peak_mem_bytes is not None:
        our_row.peak_vs_trl = our_row.peak_mem_bytes / trl_row.peak_mem_bytes
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    return run_workload(device, GPU if device.type == "cuda" and not quick else CPU, quick)


if __name__ == "__main__":
    script_main(run, __doc__)
