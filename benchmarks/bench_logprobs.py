"""Benchmark ``token_logprobs`` (logprobs + entropy from logits) against how trainers write it.

Compared on the same inputs, in one run:

* ours: each backend that runs on the device (``common.our_backends``: triton and cuda on
  CUDA, cpp on the CPU, torch everywhere), and the in-place backward on CUDA;
* "trl-eager": the TRL habit: per-sequence ``log_softmax`` + gather loop for half
  precision, ``gathered logit - logsumexp`` for fp32; entropy as ``-sum(p * log p)`` from
  ``log_softmax``;
* "verl-eager": the verl habit: ``log_softmax`` + gather on fp32 logits, entropy as
  ``logsumexp - sum(softmax * logits)``;
* both of those under ``torch.compile``;
* logp only (no entropy), for training steps that need no entropy: ours, and TRL's
  ``selective_log_softmax`` habit (per-sequence ``log_softmax`` + gather for half
  precision, ``gathered logit - logsumexp`` for fp32);
* Liger-Kernel's cross entropy with ``reduction="none"`` (``-logp`` only, no entropy) when
  installed.

Two measurements: forward with entropy (no autograd: scoring with a frozen model) and
forward + backward of ``sum(logp * g1) + sum(entropy * g2)``. Floors: the forward must
read the logits once and write the outputs; forward + backward must read the logits twice
(forward, then backward) and write the gradient once.

Run: ``python -m rlhf_engine.benchmarks.bench_logprobs [--quick] [--out results.json]``.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_engine.benchmarks.common import Result, compiled, liger_installed, measure, our_backends, script_main
from rlhf_engine.ops import token_logprobs
from rlhf_engine._backend import triton_runs_on

TEMPERATURE = 1.0


def trl_eager(logits: torch.Tensor, labels: torch.Tensor):
    """logp and entropy the way TRL computes them; logits ``[B, T, V]``."""
    logits = logits / TEMPERATURE
    if logits.dtype in (torch.float32, torch.float64):
        label_logits = logits.gather(-1, labels[..., None]).squeeze(-1)
        # One sequence at a time, to bound the temporaries.
        lse = torch.stack([torch.logsumexp(seq, dim=-1) for seq in logits])
        logp = label_logits - lse
    else:
        # logsumexp in half precision loses too much, so log_softmax per sequence.
        logp = torch.stack(
            [torch.log_softmax(seq, dim=-1).gather(-1, lab[:, None]).squeeze(-1) for seq, lab in zip(logits, labels)]
        )
    entropy = torch.cat(
        [-(torch.exp(lsm) * lsm).sum(-1) for lsm in (torch.log_softmax(seq, dim=-1) for seq in logits)]
    ).view(labels.shape)
    return logp.float(), entropy.float()


def trl_selective_logp(logits: torch.Tensor, labels: torch.Tensor):
    """logp alone the way TRL's ``selective_log_softmax`` computes it; logits ``[B, T, V]``."""
    logits = logits / TEMPERATURE
    if logits.dtype in (torch.float32, torch.float64):
        label_logits = logits.gather(-1, labels[..., None]).squeeze(-1)
        return (label_logits - torch.stack([torch.logsumexp(seq, dim=-1) for seq in logits]),)
    rows = [torch.log_softmax(seq, dim=-1).gather(-1, lab[:, None]).squeeze(-1) for seq, lab in zip(logits, labels)]
    return (torch.stack(rows).float(),)


def verl_eager(logits: torch.Tensor, labels: torch.Tensor):
    """logp and entropy the way verl computes them; logits ``[B, T, V]``."""
    logits = logits.float() / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    return logp, entropy


def ours(backend: str, inplace: bool = False) -> Callable:
    def fn(logits, labels):
        return token_logprobs(
            logits, labels, temperature=TEMPERATURE, return_entropy=True, inplace_backward=inplace, backend=backend
        )

    return fn


def ours_logp(backend: str) -> Callable:
    def fn(logits, labels):
        return (token_logprobs(logits, labels, temperature=TEMPERATURE, backend=backend),)

    return fn


def liger_logp(logits: torch.Tensor, labels: torch.Tensor):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss(reduction="none")(logits.view(-1, logits.shape[-1]), labels.view(-1))
    return (-loss.view(labels.shape),)


def _implementations(device: torch.device) -> dict[str, Callable]:
    impls = {f"ours-{b}": ours(b) for b in our_backends(device, "token_logprobs")}
    impls["trl-eager"] = trl_eager
    impls["trl-compiled"] = compiled(trl_eager)
    impls["verl-eager"] = verl_eager
    impls["verl-compiled"] = compiled(verl_eager)
    impls.update({f"ours-{b} (logp only)": ours_logp(b) for b in ("triton", "torch") if f"ours-{b}" in impls})
    impls["trl-selective (logp only)"] = trl_selective_logp
    if liger_installed() and device.type == "cuda":
        impls["liger-ce (logp only)"] = liger_logp
    return impls


def _forward(fn, logits, labels) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn(logits, labels)

    return call


def _forward_backward(fn, logits, labels, upstream, inplace=False) -> Callable[[], object]:
    def call():
        # In place needs logits that are not a leaf: a view of the leaf is one.
        x = logits.view_as(logits) if inplace else logits
        outs = fn(x, labels)
        loss = sum((o * g).sum() for o, g in zip(outs, upstream))
        return torch.autograd.grad(loss, logits)

    return call


def run(device: torch.device, quick: bool) -> list[Result]:
    if device.type == "cuda" and not quick:
        batch, seq, vocab = 8, 1024, 151936
    else:
        batch, seq, vocab = 2, 64, 4096
    dtype = torch.bfloat16
    shape = f"[{batch * seq}, {vocab}] {str(dtype).replace('torch.', '')}"
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 4).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    upstream = [torch.randn(batch, seq, generator=gen).to(device) for _ in range(2)]

    n, elt = batch * seq, logits.element_size()
    small = n * 8 + 2 * n * 4  # labels in, logp + entropy out
    impls = _implementations(device)

    results = measure(
        "token_logprobs fwd", shape, {k: _forward(f, logits, labels) for k, f in impls.items()},
        device=device, bytes_moved=n * vocab * elt + small, quick=quick, dtype=dtype,
    )  # fmt: skip

    leaf = logits.detach().requires_grad_(True)
    train = {k: _forward_backward(f, leaf, labels, upstream) for k, f in impls.items()}
    if device.type == "cuda" and triton_runs_on(device):
        train["ours-triton-inplace"] = _forward_backward(ours("triton", True), leaf.clone().detach().requires_grad_(True),
                                                         labels, upstream, inplace=True)  # fmt: skip
    results += measure(
        "token_logprobs fwd+bwd", shape, train,
        device=device, bytes_moved=3 * n * vocab * elt + small + 2 * n * 4, quick=quick, dtype=dtype,
    )  # fmt: skip
    return results


if __name__ == "__main__":
    script_main(run, __doc__)
