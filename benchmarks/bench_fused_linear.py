"""Benchmark the fused lm_head ops (``fused_linear_logprobs``, ``fused_linear_policy_loss``)
against the unfused way trainers write it.

Two problems, compared in one run on the same inputs:

* lm_head logprobs, ``N = 8192`` tokens, ``H = 4096``, ``V = 151936`` (Qwen2), bf16:
  forward (scoring, no autograd) and forward + backward of ``Σ logp`` (d hidden, d weight);
* Liger-Kernel's GRPO shape, ``B = 8``, ``T = 1024``, ``H = 4096``, ``V = 128256`` (Llama 3),
  bf16: the scoring pass (policy and reference lm_heads, forward only), then the GRPO
  policy loss forward + backward (PPO clip 0.2, k3 KL to the reference with beta 0.04,
  per-sequence advantages, sequence-mean of token-means).

Implementations:

* ``ours-<backend>``: each backend that runs on the device;
* ``eager``: ``hidden @ weight.T``, the logits divided by the temperature, a TRL-style
  selective log-softmax (``log_softmax`` + ``gather`` one sequence at a time for half
  precision) and, for GRPO, the clipped loss with the k3 KL in plain PyTorch;
* ``compiled``: ``torch.compile`` of that eager code;
* ``matmul (floor)``: the bare lm_head GEMM forward (+ the two backward GEMMs for d hidden
  and d weight), what any implementation must at least do;
* Liger-Kernel, when installed: fused-linear cross entropy (``-logp``; ``reduction="none"``
  forward, ``"sum"`` forward + backward) and ``LigerFusedLinearGRPOLoss``. An API that
  differs from what is called here is recorded as an error row.

FLOPs: ``2·N·H·V`` per lm_head forward, ``6·N·H·V`` forward + backward; bytes: each input
read once and each output (or gradient) written once. The FLOPs dominate the floor.
Eager and compiled rows whose logits would not fit in the device's memory are skipped
with the reason in the row (on an 80 GB GPU all of them fit at these shapes).

Run: ``python -m rlhf_engine.benchmarks.bench_fused_linear [--quick] [--out results.json]``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from rlhf_engine._backend import triton_runs_on
from rlhf_engine.benchmarks.common import Result, compiled, liger_installed, measure, script_main
from rlhf_engine.ops import fused_linear_logprobs, fused_linear_policy_loss

TEMPERATURE = 1.0
CLIP = 0.2
BETA = 0.04


# ---------------------------------------------------------------------------------------
# The unfused computation, the way TRL writes it


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[label]`` for logits ``[B, T, V]``, labels ``[B, T]``.

    fp32: the label logit minus a per-sequence logsumexp. Half precision: logsumexp in
    bf16 loses too much, so a full ``log_softmax`` per sequence, then the gather (one
    sequence at a time bounds the temporary to ``[T, V]``)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels[..., None]).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(seq, dim=-1) for seq in logits])
    return torch.stack(
        [torch.log_softmax(seq, dim=-1).gather(-1, lab[:, None]).squeeze(-1) for seq, lab in zip(logits, labels)]
    )


def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """hidden ``[B, T, H]`` -> logp ``[B, T]``: full logits, then the selective log-softmax."""
    logits = hidden @ weight.T
    logits = logits / TEMPERATURE  # trainers divide even at temperature 1: one more [N, V] pass
    return selective_log_softmax(logits, labels)


def eager_grpo_loss(hidden, weight, labels, old_logp, ref_logp, advantages, mask) -> torch.Tensor:
    """GRPO: clipped ratio loss plus ``beta`` times the k3 KL estimate to the reference,
    mean over each sequence's tokens, then over sequences."""
    logp = eager_logprobs(hidden, weight, labels)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
    log_ref_ratio = ref_logp - logp
    per_token = per_token + BETA * (torch.exp(log_ref_ratio) - log_ref_ratio - 1)
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


# ---------------------------------------------------------------------------------------
# Ours and Liger


def ours_logprobs(backend: str) -> Callable:
    def fn(hidden, weight, labels):
        return fused_linear_logprobs(hidden, weight, labels, temperature=TEMPERATURE, backend=backend)

    return fn


def ours_grpo_loss(backend: str) -> Callable:
    def fn(hidden, weight, labels, old_logp, ref_logp, advantages, mask):
        loss, _ = fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, temperature=TEMPERATURE, loss="ppo", clip_low=CLIP,
            ref_logp=ref_logp, kl_coef=BETA, kl_estimator="k3", aggregation="seq-mean-token-mean", backend=backend,
        )  # fmt: skip
        return loss

    return fn


@functools.lru_cache(maxsize=None)
def _liger_module(name: str, **kwargs):
    """A Liger loss module, built once (imported here: Liger is optional)."""
    if name == "flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(**kwargs)
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(**kwargs)


def liger_logprobs(hidden, weight, labels):
    """``-`` Liger's fused-linear cross entropy per token (forward only)."""
    loss = _liger_module("flce", reduction="none")(weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))
    return -loss.view(labels.shape)


def liger_logprob_sum(hidden, weight, labels):
    """``Σ logp`` through Liger's fused-linear cross entropy (it computes the gradients in
    its forward, for a scalar loss)."""
    return -_liger_module("flce", reduction="sum")(weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))


def liger_grpo_loss(hidden, weight, labels, old_logp, ref_logp, advantages, mask):
    loss_fn = _liger_module(
        "grpo", beta=BETA, epsilon_low=CLIP, epsilon_high=CLIP, temperature=TEMPERATURE, use_ref_model=True,
        loss_type="grpo",
    )  # fmt: skip
    out = loss_fn(hidden, weight, labels, mask, advantages, ref_per_token_logps=ref_logp, old_per_token_logps=old_logp)
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------------------
# Harness


def _skipped(reason: str) -> Callable[[], object]:
    def call():
        raise RuntimeError(f"skipped: {reason}")

    return call


def _fits(device: torch.device, bytes_needed: int) -> str | None:
    """None when ``bytes_needed`` fits in the device's free memory, else the reason."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if bytes_needed <= 0.9 * free:
        return None
    return f"needs ~{bytes_needed / 2**30:.0f} GiB of logits and temporaries, {free / 2**30:.0f} GiB free"


def _unfused_bytes(tokens: int, vocab: int, with_backward: bool) -> int:
    # bf16 logits, their copy divided by the temperature, one sequence's log_softmax at a
    # time (forward); with autograd every sequence's log_softmax is saved and the logits
    # gradient comes on top: about 4 bytes per logit forward, 8 forward + backward.
    return tokens * vocab * (8 if with_backward else 4)


def _backends(device: torch.device) -> list[str]:
    return [b for b in ("triton", "torch") if b == "torch" or triton_runs_on(device)]


def _forward(fn, *args) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn(*args)

    return call


def _forward_backward(fn, hidden, weight, *args) -> Callable[[], object]:
    """``fn(hidden, weight, *args)`` -> a scalar loss or per-token logp (summed), then the
    gradients of hidden and weight."""
    def call():
        out = fn(hidden, weight, *args)
        return torch.autograd.grad(out.sum() if out.dim() else out, (hidden, weight))

    return call


def _matmul_floor(hidden, weight, with_backward: bool, grad_logits=None) -> Callable[[], object]:
    """The lm_head GEMM alone; with the backward, its two GEMMs for the logits gradient."""
    if not with_backward:
        return _forward(lambda: hidden @ weight.T)

    def call():
        logits = hidden @ weight.T
        return torch.autograd.grad(logits, (hidden, weight), grad_logits)

    return call


def _resolve(impls: dict, reason: str | None) -> dict:
    return {k: (_skipped(reason) if v is None else v) for k, v in impls.items()}


def _chunked_triton_logprobs(hidden, weight, labels):
    from rlhf_engine.kernels.logprobs import token_logprobs_fwd
    from rlhf_engine.ops._lm_head_chunks import chunked_logprobs_fwd, default_chunk_rows

    h2, y1 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = default_chunk_rows(h2.shape[0], weight.shape[0], h2.dtype, h2.device)
    return chunked_logprobs_fwd(h2, weight, None, y1, 1.0, -100, False, rows, token_logprobs_fwd)[0]


def _lm_head_inputs(batch, seq, hdim, vocab, device, dtype, gen):
    """Hidden states, lm_head weight (logits with a spread of a few units) and labels."""
    hidden = torch.randn(batch, seq, hdim, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=gen, device=device) * 2 * hdim**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    return hidden, weight, labels


def _grad_logits(batch, seq, vocab, device, dtype, gen):
    """An upstream logits gradient for the floor's backward GEMMs."""
    return torch.randn(batch, seq, vocab, generator=gen, device=device, dtype=dtype)


def _logprobs_rows(device, quick, dtype, gen) -> list[Result]:
    if device.type == "cuda" and not quick:
        batch, seq, hdim, vocab = 8, 1024, 4096, 151936
    else:
        batch, seq, hdim, vocab = 2, 128, 64, 2048
    n = batch * seq
    hidden, weight, labels = _lm_head_inputs(batch, seq, hdim, vocab, device, dtype, gen)
    shape = f"N={n} H={hdim} V={vocab} {str(dtype).replace('torch.', '')}"
    elt = hidden.element_size()
    inputs = (n * hdim + vocab * hdim) * elt + n * 8
    results: list[Result] = []

    impls = {f"ours-{b}": _forward(ours_logprobs(b), hidden, weight, labels) for b in _backends(device)}
    if "triton" in _backends(device):
        # The other forward schedule, to choose between them by measurement: a dense GEMM
        # per token chunk, then the Triton token_logprobs epilogue (what the backward does).
        impls["ours-chunked-gemm+triton-epilogue"] = _forward(_chunked_triton_logprobs, hidden, weight, labels)
    reason = _fits(device, _unfused_bytes(n, vocab, False))
    impls["eager"] = _forward(eager_logprobs, hidden, weight, labels) if reason is None else None
    impls["compiled"] = _forward(compiled(eager_logprobs), hidden, weight, labels) if reason is None else None
    impls["matmul (floor)"] = _matmul_floor(hidden, weight, False)
    if liger_installed():
        impls["liger-flce (-logp)"] = _forward(liger_logprobs, hidden, weight, labels)
    results += measure(
        "lm_head logp fwd", shape, _resolve(impls, reason), device=device, bytes_moved=inputs + n * 4,
        flops=2 * n * hdim * vocab, quick=quick, dtype=dtype,
    )  # fmt: skip

    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    impls = {f"ours-{b}": _forward_backward(ours_logprobs(b), h, w, labels) for b in _backends(device)}
    reason = _fits(device, _unfused_bytes(n, vocab, True))
    impls["eager"] = _forward_backward(eager_logprobs, h, w, labels) if reason is None else None
    impls["compiled"] = _forward_backward(compiled(eager_logprobs), h, w, labels) if reason is None else None
    impls["matmul (floor)"] = _matmul_floor(h, w, True, _grad_logits(batch, seq, vocab, device, dtype, gen))
    if liger_installed():
        impls["liger-flce (-logp)"] = _forward_backward(liger_logprob_sum, h, w, labels)
    results += measure(
        "lm_head logp fwd+bwd", shape, _resolve(impls, reason), device=device,
        bytes_moved=2 * inputs + (n * hdim + vocab * hdim) * elt, flops=6 * n * hdim * vocab, quick=quick, dtype=dtype,
    )  # fmt: skip
    return results


def _check_same_loss(ours: Callable, hidden, weight, *args) -> None:
    """Ours and the eager code must compute the same GRPO loss before they are compared
    (in fp32, so that a disagreement means different semantics, not rounding)."""
    with torch.no_grad():
        a = float(ours(hidden.float(), weight.float(), *args))
        b = float(eager_grpo_loss(hidden.float(), weight.float(), *args))
    if abs(a - b) > 1e-3 * max(1.0, abs(b)):
        raise AssertionError(f"GRPO loss of ours ({a}) and eager ({b}) differ: the rows would not be comparable")


def _grpo_rows(device, quick, dtype, gen) -> list[Result]:
    if device.type == "cuda" and not quick:
        batch, seq, hdim, vocab = 8, 1024, 4096, 128256
    else:
        batch, seq, hdim, vocab = 2, 128, 64, 2048
    n = batch * seq
    hidden, weight, labels = _lm_head_inputs(batch, seq, hdim, vocab, device, dtype, gen)
    # A reference model a little away from the policy.
    ref_weight = weight + torch.randn(vocab, hdim, generator=gen, device=device, dtype=dtype) * 0.1 * hdim**-0.5
    shape = f"B={batch} T={seq} H={hdim} V={vocab} {str(dtype).replace('torch.', '')}"
    elt = hidden.element_size()
    hw_bytes = (n * hdim + vocab * hdim) * elt
    results: list[Result] = []

    # Scoring: old logprobs from the policy's lm_head, reference logprobs from the
    # reference model's (hidden states taken as the same, to isolate the lm_head).
    def scoring(logprobs_fn):
        return lambda: (logprobs_fn(hidden, weight, labels), logprobs_fn(hidden, ref_weight, labels))

    impls = {f"ours-{b}": _forward(scoring(ours_logprobs(b))) for b in _backends(device)}
    reason = _fits(device, _unfused_bytes(n, vocab, False))
    impls["eager"] = _forward(scoring(eager_logprobs)) if reason is None else None
    impls["compiled"] = _forward(scoring(compiled(eager_logprobs))) if reason is None else None
    impls["matmul (floor)"] = _forward(lambda: (hidden @ weight.T, hidden @ ref_weight.T))
    if liger_installed():
        impls["liger-flce (-logp)"] = _forward(scoring(liger_logprobs))
    results += measure(
        "grpo score policy+ref fwd", shape, _resolve(impls, reason), device=device,
        bytes_moved=2 * hw_bytes + n * 8 + 2 * n * 4, flops=2 * 2 * n * hdim * vocab, quick=quick, dtype=dtype,
    )  # fmt: skip

    with torch.no_grad():
        noise = torch.randn(batch, seq, generator=gen, device=device) * 0.05  # ratios off 1, some clipped
        old_logp = fused_linear_logprobs(hidden, weight, labels) + noise
        ref_logp = fused_linear_logprobs(hidden, ref_weight, labels)
    advantages = torch.randn(batch, generator=gen, device=device)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    mask[:, seq - seq // 8 :] = torch.rand(batch, seq // 8, generator=gen, device=device) > 0.5  # ragged ends
    loss_args = (labels, old_logp, ref_logp, advantages, mask)

    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    impls = {f"ours-{b}": ours_grpo_loss(b) for b in _backends(device)}
    _check_same_loss(ours_grpo_loss("torch"), hidden, weight, *loss_args)
    train = {k: _forward_backward(fn, h, w, *loss_args) for k, fn in impls.items()}
    reason = _fits(device, _unfused_bytes(n, vocab, True))
    train["eager"] = _forward_backward(eager_grpo_loss, h, w, *loss_args) if reason is None else None
    train["compiled"] = _forward_backward(compiled(eager_grpo_loss), h, w, *loss_args) if reason is None else None
    train["matmul (floor)"] = _matmul_floor(h, w, True, _grad_logits(batch, seq, vocab, device, dtype, gen))
    if liger_installed():
        train["liger-grpo"] = _forward_backward(liger_grpo_loss, h, w, *loss_args)
    results += measure(
        "grpo loss fwd+bwd", shape, _resolve(train, reason), device=device,
        bytes_moved=2 * hw_bytes + n * (8 + 4 + 4 + 1) + batch * 4, flops=6 * n * hdim * vocab,
        quick=quick, dtype=dtype,
    )  # fmt: skip
    return results


# The CPU target of the fused lm_head (a GRPO loss step of a 0.5B-wide head): N = 2048
# response tokens, H = 896, fp32, at two vocabularies.
CPU_SHAPE = dict(batch=2, seq=1024, hdim=896)
CPU_VOCABS = (151936, 32000)


def _cpu_rows(device, gen) -> list[Result]:
    """The GRPO loss forward + backward at :data:`CPU_SHAPE`: ours (one pass over token
    chunks), the eager TRL-style code and the bare GEMMs, each timed and its peak CPU memory
    above the inputs measured (gradients included; ``cpu_peak_bytes``). Three timed calls
    each (a call takes seconds)."""
    results: list[Result] = []
    batch, seq, hdim = CPU_SHAPE["batch"], CPU_SHAPE["seq"], CPU_SHAPE["hdim"]
    n, dtype = batch * seq, torch.float32
    for vocab in CPU_VOCABS:
        hidden, weight, labels = _lm_head_inputs(batch, seq, hdim, vocab, device, dtype, gen)
        with torch.no_grad():
            noise = torch.randn(batch, seq, generator=gen, device=device) * 0.05
            old_logp = fused_linear_logprobs(hidden, weight, labels) + noise
            ref_logp = old_logp - noise * 2
        advantages = torch.randn(batch, generator=gen, device=device)
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        loss_args = (labels, old_logp, ref_logp, advantages, mask)
        _check_same_loss(ours_grpo_loss("torch"), hidden, weight, *loss_args)
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        impls = {
            "ours-torch": _forward_backward(ours_grpo_loss("torch"), h, w, *loss_args),
            "eager": _forward_backward(eager_grpo_loss, h, w, *loss_args),
            "matmul (floor)": _matmul_floor(h, w, True, _grad_logits(batch, seq, vocab, device, dtype, gen)),
        }
        hw_bytes = (n * hdim + vocab * hdim) * 4
        results += measure(
            "grpo loss fwd+bwd", f"N={n} H={hdim} V={vocab} float32", impls, device=device,
            bytes_moved=2 * hw_bytes + n * 17 + batch * 4, flops=6 * n * hdim * vocab, quick=True, dtype=dtype,
        )  # fmt: skip
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    """On CUDA the bf16 GPU shapes (tiny ones with ``quick``); on the CPU the fp32
    :data:`CPU_SHAPE` rows (tiny bf16 shapes with ``quick``)."""
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cpu" and not quick:
        return _cpu_rows(device, gen)
    return _logprobs_rows(device, quick, dtype, gen) + _grpo_rows(device, quick, dtype, gen)


if __name__ == "__main__":
    script_main(run, __doc__)
