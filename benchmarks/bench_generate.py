"""Generation: our ``rollout.generate`` against Hugging Face ``model.generate(do_sample=True)``.

One Llama-style model and one batch of left-padded prompts, sampled at temperature 1
with no top-k / top-p (HF's default ``top_k=50`` switched off: the same distribution on
both sides), ``max_new_tokens`` steps at most, timed in one run:

* ``ours (dynamic cache)``: ``generate`` as the trainers call it (``DynamicCache``,
  finished rows dropped once half the batch stopped);
* ``ours (static cache)``: ``SamplingConfig(static_cache=True)``, eager;
* ``ours (static + compiled)``: ``compile_decode=True`` (CUDA graphs on a GPU); on the CPU
  only with ``--compile`` (inductor's C++ compile of the decode step takes minutes there);
* ``HF generate``: ``policy.lm.generate(input_ids, attention_mask, do_sample=True,
  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD)``.

Two workloads: ``full length`` (no row stops before ``max_new_tokens``: EOS gets a -inf
lm_head bias) and ``ragged`` (EOS gets a bias that stops a row after ``N / 4`` steps on
average, so rows finish at different steps). Each call draws from its own seed (the same
seeds for every implementation), so the ragged lengths differ call to call; tokens/s counts
the tokens each call generated (EOS included, padding not).

Timing: the implementations alternate, one call each per round (the starting one rotates),
for ``ROUNDS`` rounds after a warm-up call each, every implementation on the same seed in a
round. Each row reports the median ms per call and the median tokens/s over the rounds;
``vs HF``, full length: the median over the rounds of tokens/s over HF's in the same round
(paired: the machine's load that round cancels; every call generates ``B · N`` tokens);
ragged: median tokens/s over HF's median (HF's sampler draws other samples than ours from
the same seed, so its rows end elsewhere and pairing cancels nothing). ``spread``: the
interquartile range over the median of what ``vs HF`` takes the median of.

Floor: decode reads every weight once per step (bytes: weights x steps run, KV cache
ignored); FLOPs ``2 · params · B · (P + N)``. Generation is far from both on the CPU: the
interesting number is the ratio to HF.

Full size (a GPU): hidden 2048, 8 layers, 16 heads (8 KV), MLP 5632, V=151936, bf16,
B=32, P=128, N=256. Quick and CPU: hidden 256, 4 layers, 4 heads (2 KV), MLP 688,
V=32000, fp32, B=8, P=32, N=64.

``python -m rlhf_engine.benchmarks.bench_generate [--quick] [--out FILE.json] [--compile]``
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from rlhf_engine.benchmarks.common import Result, _sync, floor_ms, format_table, measure_machine, peak_memory_bytes
from rlhf_engine.models import PolicyModel, llama_config
from rlhf_engine.rollout import SamplingConfig, generate

EOS, PAD = 2, 0
ROUNDS = {True: 21, False: 15}
FULL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128,
)  # fmt: skip
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@dataclasses.dataclass
class GenerateResult(Result):
    """A row with tokens/s (median over the rounds), its spread and the ratio to HF."""

    tokens_per_s: float | None = None
    spread: float | None = None
    vs_hf: float | None = None

    def as_dict(self) -> dict:
        return {**super().as_dict(), "tokens_per_s": self.tokens_per_s, "spread": self.spread, "vs_hf": self.vs_hf}


def response_lengths(sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """long ``[B]``: tokens HF generated per row, up to and including the first EOS."""
    response = sequences[:, prompt_len:]
    is_eos = response == EOS
    first = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1, response.shape[1])
    return first


def build(device: torch.device, full: bool, eos_bias: float):
    """(policy, prompt_ids, prompt_mask, max_new_tokens, dtype) of one workload."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, prompt_len, new, vocab = (32, 128, 256, 151936) if full else (8, 32, 64, 32000)
    config = llama_config("tiny", vocab, max_position_embeddings=prompt_len + new)
    for key, value in (FULL if full else SMALL).items():
        setattr(config, key, value)
    config.tie_word_embeddings = False  # the EOS bias lives on an untied lm_head
    policy = PolicyModel.from_config(config, seed=0)
    bias = torch.zeros(vocab)
    bias[EOS] = eos_bias
    policy.lm.lm_head.bias = torch.nn.Parameter(bias)
    policy = policy.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen)
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=gen)
    mask = torch.arange(prompt_len)[None, :] >= prompt_len - lengths[:, None]  # left padding
    return policy, ids.masked_fill(~mask, PAD).to(device), mask.to(device), new, dtype


def implementations(policy, ids, mask, new, device, compile_cpu: bool) -> dict:
    """name -> ``call(seed) -> tokens generated``."""
    base = SamplingConfig(max_new_tokens=new, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD)
    options = {"ours (dynamic cache)": {}, "ours (static cache)": {"static_cache": True}}
    if device.type == "cuda" or compile_cpu:
        options["ours (static + compiled)"] = {"static_cache": True, "compile_decode": True}

    def ours(config):
        def call(seed):
            rollout = generate(policy, ids, mask, config, generator=torch.Generator().manual_seed(seed))
            return int(rollout.response_lengths.sum())

        return call

    def hf(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = policy.lm.generate(
                input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD,
            )  # fmt: skip
        return int(response_lengths(out, ids.shape[1]).sum())

    impls = {name: ours(dataclasses.replace(base, **opts)) for name, opts in options.items()}
    impls["HF generate"] = hf
    return impls


def time_rounds(impls: dict, device: torch.device, rounds: int) -> dict:
    """name -> (ms per call, tokens/s per call) lists, the implementations alternating."""
    names = list(impls)
    for name in names:  # warm-up (and compilation)
        impls[name](0)
    times = {name: ([], []) for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            _sync(device)
            start = time.perf_counter()
            tokens = impls[name](1000 + r)
            _sync(device)
            seconds = time.perf_counter() - start
            times[name][0].append(seconds * 1e3)
            times[name][1].append(tokens / seconds)
    return times


def run_workload(device: torch.device, quick: bool, workload: str, compile_cpu: bool) -> list[Result]:
    full = device.type == "cuda" and not quick
    policy, ids, mask, new, dtype = build(device, full, -math.inf if workload == "full length" else 0.0)
    if workload == "ragged":
        # p(EOS) per step 4 / N: rows stop after N / 4 steps on average.
        vocab, p = policy.vocab_size, 4 / new
        policy.lm.lm_head.bias.data[EOS] = math.log(p * (vocab - 1) / (1 - p))
    impls = implementations(policy, ids, mask, new, device, compile_cpu)
    times = time_rounds(impls, device, ROUNDS[quick])

    params = sum(p.numel() for p in policy.parameters())
    batch, prompt_len = ids.shape
    flops = 2 * params * batch * (prompt_len + new)
    bytes_moved = params * policy.lm_head_weight.element_size() * new
    machine = measure_machine(device, dtype, quick)
    floor = floor_ms(machine, bytes_moved, flops)
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    shape = f"{workload} B={batch} P={prompt_len} N={new} H={policy.config.hidden_size} L={policy.config.num_hidden_layers} V={policy.vocab_size} {dtype_name}"
    hf_rates = times["HF generate"][1]
    results = []
    for name, (ms, rates) in times.items():
        paired = workload == "full length" and name != "HF generate"
        ratios = [ours / hf for ours, hf in zip(rates, hf_rates)] if paired else rates
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        peak = peak_memory_bytes(lambda: impls[name](0), device)
        results.append(GenerateResult(
            "generate", name, shape, statistics.median(ms), floor, bytes_moved, flops, peak,
            tokens_per_s=statistics.median(rates), spread=(q3 - q1) / statistics.median(ratios),
            vs_hf=statistics.median(ratios) if paired else statistics.median(rates) / statistics.median(hf_rates),
        ))  # fmt: skip
    return results


def run(device: torch.device, quick: bool, compile_cpu: bool = False) -> list[Result]:
    return [r for workload in ("full length", "ragged") for r in run_workload(device, quick, workload, compile_cpu)]


def format_generation_table(results: list[GenerateResult]) -> str:
    header = f"{'workload':<60} {'impl':<26} {'ms/call':>9} {'tokens/s':>10} {'spread':>7} {'vs HF':>6}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.shape:<60} {r.impl:<26} {r.ms:9.1f} {r.tokens_per_s:10.0f} {r.spread:7.1%} {r.vs_hf:6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    from rlhf_engine.benchmarks.common import write_json

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small model (the CPU sizes), fewer rounds")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="time the compiled decode step on the CPU too")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = run(device, args.quick, compile_cpu=args.compile)
    print(format_table(results))
    print(format_generation_table(results))
    if args.out:
        write_json(results, args.out, device, args.quick)
