"""A whole GRPO step, ours against TRL's ``GRPOTrainer``: generate, score, update.

Both sides train the same model (a Qwen2 causal LM saved to a temporary folder and loaded
from it by each side), on the same prompts (``PROMPTS`` strings of random words of a local
word-level tokenizer, the same token ids on both sides), with the same settings:

* ``prompts x group`` completions per step (16 x 4 on the CPU), at most ``new_tokens``
  new tokens, temperature 1, no top-k / top-p, fp32;
* one optimizer step per rollout on the whole rollout: TRL's ``num_iterations=1``,
  ``per_device_train_batch_size = generation_batch_size = prompts x group``, no gradient
  accumulation; ours ``epochs=1, minibatch_size = prompts x group``. Neither side runs the
  policy's old-logprob pass (TRL: ``gradient_accumulation_steps % (steps_per_generation *
  num_iterations) == 0``; ours: ``RLConfig.old_logprob_pass`` is False);
* the loss: TRL 1.16's default ``loss_type="dapo"`` (token sum over the whole generation
  batch's token count), ``epsilon=0.2`` (``epsilon_high`` = ``epsilon``),
  ``scale_rewards="group"``, ``beta`` with TRL's k3 KL in the loss; ours ``advantage="grpo",
  scale="group", preset="trl"``, ``loss="ppo", clip_low=0.2, clip_high=None``,
  ``aggregation="token-mean"`` over the one minibatch, ``kl_coef=beta, kl_estimator="k3",
  kl_in_reward=False``, no entropy bonus;
* AdamW (lr 1e-6, TRL's default; weight decay 0), gradients clipped at norm 1.0;
* one reward function on the decoded text (TRL decodes the completions before its reward
  functions; ours decodes them inside ``reward_fn`` with the same tokenizer).

``beta`` is 0.04 in the timed runs, not TRL's default 0: with ``beta=0`` TRL loads no
reference model and runs no reference pass, while our trainer always scores the reference
(``RLTrainer.score``), so ``beta > 0`` gives both sides the same work.

What each phase covers (seconds per step, medians over the timed steps):

* ``generate``. TRL: ``GRPOTrainer._generate`` (prompt tokenization, HF ``generate`` with
  KV cache, ``batch_decode``, length metrics). Ours: ``RLTrainer.generate`` (the prompt
  function, left padding, our KV-cached sampler).
* ``score``. TRL: the rest of ``_generate_and_score_completions`` (padding into tensors,
  the reference model's logprobs, the reward function, group advantages, metrics). Ours:
  ``RLTrainer.score`` (reference logprobs, the reward function) + ``RLTrainer.advantages``.
* ``update``: the whole step minus the two above. TRL: the Trainer loop's step from
  ``on_step_begin`` to ``on_step_end`` (shuffle and split of the generated batch, policy
  forward with per-token logprobs and entropy, loss, backward, gradient clipping, AdamW
  step, LR scheduler step, ``zero_grad``). Ours: ``RLTrainer.step`` minus the two above
  (``update_policy``: policy forward with the fused lm_head loss, backward, clipping, AdamW
  step, ``zero_grad``; then the step's metrics).
* ``step``: the whole step.

Timing: each side runs in its own Python process (so the peak memory is its own), the sides
alternating ``ours, TRL, ours, TRL, ...`` for ``runs`` pairs; each process builds its trainer,
runs ``warmup`` steps, then ``steps`` timed steps. ``ms`` is the median over every timed step of
that side; ``tokens_per_s`` is the prompt + completion tokens of a step over its time (median);
``ours/TRL`` is the median over the pairs of (ours' median step phase time over TRL's in the
adjacent run), and ``min``/``max`` are the extremes of that ratio over the pairs: the spread.
< 1 means ours is faster.

Peak memory: on the CPU the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` before the timed steps, so it is the timed steps' peak, weights,
optimizer state and library footprint included), with the resident set before those steps in
the JSON (``rss_before_bytes``); on CUDA ``torch.cuda.max_memory_allocated``.

Without TRL installed (``pip install 'rlhf-engine[trl]'``), the TRL rows carry the reason
in ``error`` and ours are still timed.

``python -m rlhf_engine.benchmarks.bench_grpo_step [--quick] [--runs PAIRS] [--steps N] [--out FILE.json]``
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from rlhf_engine.benchmarks.common import Result, floor_ms, format_table, measure_machine, write_json

PAD, BOS, EOS, UNK = 0, 1, 2, 3
RESULT_MARK = "GRPO_STEP_RESULT "  # prefixes the child process's one JSON line among TRL's logs
PHASES = ("generate", "score", "update", "step")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Model shape, rollout shape and timing repetitions of one comparison."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompts: int
    group: int
    new_tokens: int
    prompt_words: tuple[int, int]  # shortest and longest prompt, in tokens
    beta: float
    warmup: int
    steps: int
    runs: int

    @property
    def rows(self) -> int:
        return self.prompts * self.group


# Quick and CPU: ~5M parameters (4.1M of them the tied embedding), 64 completions of up to 64
# tokens; 3 pairs of runs of 2 timed steps each after one warm-up step: about 4 minutes on
# one thread of the 2-core box (a TRL step takes ~15 s there, ours ~6 s, and each process
# spends ~10 s importing and building). The committed table used more (--runs, --steps).
QUICK = Workload(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352, vocab=32000, prompts=16, group=4,
                 new_tokens=64, prompt_words=(8, 24), beta=0.04, warmup=1, steps=2, runs=3)  # fmt: skip
# A GPU: Qwen2's vocabulary and a wider, deeper model, 128 completions of up to 256 tokens.
FULL = dataclasses.replace(QUICK, hidden=1024, layers=8, heads=16, kv_heads=8, intermediate=2816, vocab=151936,
                           prompts=16, group=8, new_tokens=256, prompt_words=(32, 128), steps=5, runs=3)  # fmt: skip
# The test's: seconds, not minutes; the timings mean nothing, the rows' shape is what it checks.
TINY = dataclasses.replace(QUICK, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=512, prompts=2,
                           group=2, new_tokens=4, prompt_words=(2, 4), warmup=0, steps=1, runs=1)  # fmt: skip


@dataclasses.dataclass
class GRPOStepResult(Result):
    """One side's one phase: median ms per step, tokens/s, and the ratio to TRL with its spread."""

    phase: str = ""
    tokens_per_s: float | None = None
    vs_trl: float | None = None  # ours / TRL time (median over the pairs of runs); < 1: ours faster
    vs_trl_min: float | None = None
    vs_trl_max: float | None = None
    rss_before_bytes: int | None = None

    def as_dict(self) -> dict:
        extra = ("phase", "tokens_per_s", "vs_trl", "vs_trl_min", "vs_trl_max", "rss_before_bytes")
        return {**super().as_dict(), **{k: getattr(self, k) for k in extra}}


def trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


# -- the shared model, tokenizer and prompts -----------------------------------------------
def word(i: int) -> str:
    return f"w{i}"


def build_model_dir(directory: str, w: Workload) -> None:
    """A freshly initialized Qwen2 causal LM and a word-level tokenizer over its whole
    vocabulary (ids 0-3 special, id ``i`` the word ``w<i>``), saved in the Hugging Face layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK, **{word(i): i for i in range(4, w.vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(directory)
    config = Qwen2Config(
        vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate, num_hidden_layers=w.layers,
        num_attention_heads=w.heads, num_key_value_heads=w.kv_heads, max_position_embeddings=w.prompt_words[1] + w.new_tokens,
        tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)


def prompt_texts(w: Workload) -> list[str]:
    """``w.prompts`` prompts of random words, lengths spread over ``w.prompt_words``."""
    gen = torch.Generator().manual_seed(1)
    low, high = w.prompt_words
    lengths = torch.randint(low, high + 1, (w.prompts,), generator=gen).tolist()
    return [" ".join(word(int(i)) for i in torch.randint(4, w.vocab, (n,), generator=gen)) for n in lengths]


def text_reward(text: str) -> float:
    """The fraction of words that end in 7: cheap, and different across a group."""
    words = text.split()
    return sum(x.endswith("7") for x in words) / max(len(words), 1)


# -- memory --------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(device: torch.device) -> int:
    """Start a new peak-memory window; returns the memory in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    return _status_bytes("VmRSS")


def peak_since_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


# -- one side's run (in its own process unless isolate=False) ------------------------------
class PhaseTimer:
    """Accumulates wall seconds of named phases within the current step."""

    def __init__(self, device: torch.device):
        self.device, self.current, self.tokens = device, {}, 0

    def wrap(self, name: str, fn, count_tokens=None):
        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start
            if count_tokens is not None:
                self.tokens += count_tokens(out)
            return out

        return timed

    def end_step(self, step_seconds: float) -> dict:
        """The finished step's phases: ``update`` is what the step spent outside the others."""
        current, tokens = self.current, self.tokens
        self.current, self.tokens = {}, 0
        generate = current.get("generate", 0.0)
        # TRL's scoring is what its generate-and-score method spent outside generation.
        score = current["score"] if "score" in current else current["generate_and_score"] - generate
        return {"generate": generate, "score": score, "update": step_seconds - generate - score, "step": step_seconds,
                "tokens": tokens}  # fmt: skip


def run_ours(w: Workload, model_dir: str, device: torch.device) -> dict:
    from transformers import PreTrainedTokenizerFast

    from rlhf_engine.algos.rl import RLConfig, RLTrainer
    from rlhf_engine.models import PolicyModel

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in prompt_texts(w)]

    def reward_fn(prompts, responses):
        return torch.tensor([text_reward(t) for t in tokenizer.batch_decode(responses, skip_special_tokens=True)])

    config = RLConfig(
        steps=w.warmup + w.steps, prompts_per_step=w.prompts, group_size=w.group, max_new_tokens=w.new_tokens,
        temperature=1.0, lr=1e-6, weight_decay=0.0, grad_clip=1.0, epochs=1, minibatch_size=w.rows, advantage="grpo",
        scale="group", preset="trl", loss="ppo", clip_low=0.2, aggregation="token-mean", kl_coef=w.beta,
        kl_estimator="k3", kl_in_reward=False,
    )  # fmt: skip
    trainer = RLTrainer(
        config, policy=PolicyModel.from_pretrained(model_dir).to(device),
        reference=PolicyModel.from_pretrained(model_dir).to(device), prompts=lambda n, generator: prompt_ids[:n],
        pad_token_id=PAD, eos_token_id=EOS, reward_fn=reward_fn,
    )  # fmt: skip
    timer = PhaseTimer(device)
    trainer.generate = timer.wrap("generate", trainer.generate, lambda rollout: int(rollout.attention_mask.sum()))
    trainer.score = timer.wrap("score", trainer.score)
    trainer.advantages = timer.wrap("score", trainer.advantages)
    steps, rss_before, peak = [], None, None
    for step in range(w.warmup + w.steps):
        if step == w.warmup:
            rss_before = reset_peak(device)
        start = time.perf_counter()
        trainer.step(step)
        steps.append(timer.end_step(time.perf_counter() - start))
    peak = peak_since_reset(device)
    return {"steps": steps[w.warmup :], "peak_bytes": peak, "rss_before_bytes": rss_before}


def run_trl(w: Workload, model_dir: str, device: torch.device) -> dict:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)

    def reward_fn(prompts, completions, **kwargs):
        return [text_reward(t) for t in completions]

    timer = PhaseTimer(device)
    steps, memory = [], {}

    class StepClock(TrainerCallback):
        """Times each optimizer step of the Trainer loop and opens the peak window after the warm-up."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == w.warmup:
                memory["rss_before_bytes"] = reset_peak(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(timer.end_step(time.perf_counter() - self.start))

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=device.type == "cpu", bf16=False, fp16=False, report_to=[], logging_strategy="no",
            save_strategy="no", disable_tqdm=True, seed=0, max_steps=w.warmup + w.steps, learning_rate=1e-6,
            weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=w.rows, gradient_accumulation_steps=1,
            generation_batch_size=w.rows, num_generations=w.group, max_completion_length=w.new_tokens,
            temperature=1.0, top_k=0, top_p=1.0, num_iterations=1, beta=w.beta, epsilon=0.2, loss_type="dapo",
            scale_rewards="group", dataloader_num_workers=0,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model_dir, reward_funcs=reward_fn, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": prompt_texts(w)}), callbacks=[StepClock()],
        )  # fmt: skip

        def tokens(generated) -> int:
            prompt_ids, completion_ids = generated[0], generated[1]
            return sum(map(len, prompt_ids)) + sum(map(len, completion_ids))

        trainer._generate = timer.wrap("generate", trainer._generate, tokens)
        trainer._generate_and_score_completions = timer.wrap("generate_and_score", trainer._generate_and_score_completions)
        trainer.train()
    return {"steps": steps[w.warmup :], "peak_bytes": peak_since_reset(device), **memory}


SIDES = {"ours": run_ours, "TRL": run_trl}


def run_side(side: str, w: Workload, model_dir: str, device: torch.device, isolate: bool) -> dict:
    """One run of ``side``: in a fresh Python process (``isolate``) or in this one."""
    if not isolate:
        return SIDES[side](w, model_dir, device)
    command = [sys.executable, "-m", "rlhf_engine.benchmarks.bench_grpo_step", "--child", side, "--model-dir", model_dir,
               "--workload", json.dumps(dataclasses.asdict(w)), "--device", str(device),
               "--threads", str(torch.get_num_threads())]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} run failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


# -- the comparison ------------------------------------------------------------------------
def run_workload(device: torch.device, w: Workload, isolate: bool = True, quick: bool = True) -> list[Result]:
    sides = ["ours"] + (["TRL"] if trl_installed() else [])
    with tempfile.TemporaryDirectory() as model_dir:
        build_model_dir(model_dir, w)
        from transformers import AutoConfig

        params = _parameter_count(model_dir)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        errors: dict[str, str] = {}
        for _ in range(w.runs):
            for side in sides:
                if side in errors:
                    continue
                try:
                    runs[side].append(run_side(side, w, model_dir, device, isolate))
                except Exception as exc:  # reported in the row, never swallowed silently
                    errors[side] = f"{type(exc).__name__}: {exc}"[:300]
        hidden = AutoConfig.from_pretrained(model_dir).hidden_size
    if "TRL" not in sides:
        errors["TRL"] = "skipped: TRL is not installed (pip install 'rlhf-engine[trl]', i.e. trl==1.16.0)"

    tokens = w.rows * (sum(w.prompt_words) / 2 + w.new_tokens)  # for the floor only
    flops = {"generate": 2 * params * tokens, "score": 2 * params * tokens, "update": 6 * params * tokens}
    flops["step"] = sum(flops.values())
    weight_bytes = 4 * params
    moved = {"generate": weight_bytes * w.new_tokens, "score": weight_bytes, "update": weight_bytes * 7}
    moved["step"] = sum(moved.values())
    machine = measure_machine(device, torch.float32, quick)
    shape = (f"{w.prompts}x{w.group} P={w.prompt_words[0]}-{w.prompt_words[1]} N={w.new_tokens} H={hidden} "
             f"L={w.layers} V={w.vocab} fp32 beta={w.beta}")  # fmt: skip

    def per_run_median(run: dict, phase: str) -> float:
        return statistics.median(s[phase] for s in run["steps"])

    results = []
    for side in ("ours", "TRL"):
        for phase in PHASES:
            floor = floor_ms(machine, int(moved[phase]), int(flops[phase]))
            base = dict(op="grpo step", impl=f"{side}: {phase}", shape=shape, floor_ms=floor,
                        bytes_moved=int(moved[phase]), flops=int(flops[phase]), phase=phase)  # fmt: skip
            if side in errors or not runs[side]:
                results.append(GRPOStepResult(ms=None, peak_mem_bytes=None, error=errors.get(side, "no run"), **base))
                continue
            steps = [s for run in runs[side] for s in run["steps"]]
            row = GRPOStepResult(
                ms=1e3 * statistics.median(s[phase] for s in steps),
                peak_mem_bytes=max(run["peak_bytes"] for run in runs[side]),
                tokens_per_s=statistics.median(s["tokens"] / s["step"] for s in steps),
                rss_before_bytes=max(run["rss_before_bytes"] for run in runs[side]), **base,
            )  # fmt: skip
            if side == "ours" and runs.get("TRL") and "TRL" not in errors:
                ratios = [per_run_median(a, phase) / per_run_median(b, phase) for a, b in zip(runs["ours"], runs["TRL"])]
                row.vs_trl, row.vs_trl_min, row.vs_trl_max = statistics.median(ratios), min(ratios), max(ratios)
            results.append(row)
    return results


def _parameter_count(model_dir: str) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).parameters())


def run(device: torch.device, quick: bool) -> list[Result]:
    return run_workload(device, QUICK if quick or device.type != "cuda" else FULL, quick=quick)


def format_step_table(results: list[GRPOStepResult]) -> str:
    header = f"{'impl':<16} {'s/step':>8} {'tokens/s':>9} {'peak MiB':>9} {'ours/TRL':>9} {'min':>6} {'max':>6}"
    lines = [results[0].shape if results else "", header, "-" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"{r.impl:<16} error: {r.error}")
            continue
        ratio = f"{r.vs_trl:9.2f} {r.vs_trl_min:6.2f} {r.vs_trl_max:6.2f}" if r.vs_trl is not None else f"{'-':>9} {'-':>6} {'-':>6}"
        lines.append(f"{r.impl:<16} {r.ms / 1e3:8.3f} {r.tokens_per_s:9.0f} {r.peak_mem_bytes / 2**20:9.0f} {ratio}")
    return "\n".join(lines)


def _child(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=sorted(SIDES), required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = json.loads(args.workload)
    w = Workload(**{**fields, "prompt_words": tuple(fields["prompt_words"])})
    out = SIDES[args.child](w, args.model_dir, torch.device(args.device))
    print(RESULT_MARK + json.dumps(out), flush=True)


if __name__ == "__main__":
    if "--child" in sys.argv:
        _child(sys.argv[1:])
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
        parser.add_argument("--quick", action="store_true", help="the CPU workload (what a CPU runs anyway)")
        parser.add_argument("--out", help="write the results as JSON to this file")
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        parser.add_argument("--runs", type=int, help="pairs of runs (default: the workload's)")
        parser.add_argument("--steps", type=int, help="timed steps per run (default: the workload's)")
        args = parser.parse_args()
        device = torch.device(args.device)
        workload = QUICK if args.quick or device.type != "cuda" else FULL
        repeats = {k: v for k, v in (("runs", args.runs), ("steps", args.steps)) if v}
        workload = dataclasses.replace(workload, **repeats)
        results = run_workload(device, workload, quick=args.quick)
        print(format_table(results))
        print(format_step_table(results))
        if args.out:
            write_json(results, args.out, device, args.quick)
