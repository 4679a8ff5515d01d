"""GPU build check without a GPU: every Triton kernel specialization the launchers produce at
realistic shapes, compiled ahead of time for ``sm_80`` and ``sm_90``, with each kernel's
registers, spills and shared memory.

How: each launcher in ``rlhf_engine.kernels`` is called on ``meta`` tensors (shapes, dtypes,
strides, no memory) with ``JITFunction.run`` intercepted, so the exact arguments of every
launch are recorded and nothing runs; Triton's own argument specialization (types, 16-divisibility of
pointers and ints, ints equal to 1 as constants) gives the signature a GPU launch would
compile, a ``meta`` tensor's address counting as aligned, as a fresh allocation is. Each
distinct specialization (kernel, signature, constexprs, divisibility, warps, stages) is then
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``;
Triton ships ``ptxas``, which reports the registers and spill bytes of the PTX (``ptxas -v``).

Shapes (the issue's): logits ``[8192, 151936]`` bf16 / fp32 and a ``[:, :-1]`` view of
``[8, 1025, 151936]``, with and without entropy; the fused lm_head forward at N 8192, H 4096,
V 151936 in bf16 / fp16 / fp32, with and without bias and entropy; the policy loss for every
loss, KL estimator and option flag; group advantages for every method and scale; GAE and
discounted returns padded and packed; KL penalties; the value loss; whitening.

The CUDA kernels of ``csrc/cuda`` are compiled too (:mod:`build_check_cuda`: ``nvcc -cubin
-Xptxas -v`` for ``sm_80`` / ``sm_90a``) and judged by the same rules, unless ``--triton-only``.

``python -m rlhf_engine.benchmarks.build_check [--arch 80 90] [--out FILE.json]`` prints a
table and exits 1 on a compile error, on shared memory over what a block may use on the
arch (:data:`SHARED_MEMORY_LIMIT`: the launch would fail), or on a spill in a kernel of the
hot path (:data:`HOT_PATH`: every kernel here). It must run without ``TRITON_INTERPRET`` (under the
interpreter ``@triton.jit`` makes interpreted functions that cannot be compiled).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

META = torch.device("meta")
ARCHS = (80, 90)
# Kernels whose register spills fail the check: all of this project's.
HOT_PATH = "*"
# The most shared memory a block may use (opt-in dynamic shared memory, CUDA C Programming
# Guide, compute capabilities 8.0 and 9.0): a kernel above it compiles, and fails at launch.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

class Launch:
    """One recorded launch: the kernel, its argument types and constexprs, warps and stages."""

    def __init__(self, fn, args: tuple, kwargs: dict):
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        self.fn = fn
        values = dict(zip(fn.arg_names, args))
        self.num_warps = kwargs.pop("num_warps", 4)
        self.num_stages = kwargs.pop("num_stages", 3)
        values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
        self.signature, self.constexprs, self.attrs = {}, {}, {}
        for i, param in enumerate(fn.params):
            value = values.get(param.name, param.default if param.has_default else None)
            if param.is_constexpr:
                kind, spec = "constexpr", value
            else:
                # Triton's own specialization of a launch argument: its type, and "D" where
                # it is 16-divisible (a pointer's address, an int's value), or a constexpr
                # for an int equal to 1 or None.
                kind, spec = native_specialize_impl(
                    CUDABackend, value, param.is_const, not param.do_not_specialize,
                    not param.do_not_specialize_on_alignment,
                )  # fmt: skip
            self.signature[param.name] = kind
            if kind == "constexpr":
                self.constexprs[param.name] = spec
            elif spec == "D":
                self.attrs[(i,)] = [["tt.divisibility", 16]]

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self) -> tuple:
        return (self.fn.fn.__module__, self.name, tuple(self.signature.items()), tuple(sorted(self.constexprs.items(), key=str)),
                tuple(sorted(self.attrs)), self.num_warps, self.num_stages)  # fmt: skip

    def describe(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if v is not None)
        ptrs = ",".join(t[1:] for t in self.signature.values() if t.startswith("*"))
        return f"{self.name}[{ptrs}]({consts}) w{self.num_warps} s{self.num_stages}"


@contextlib.contextmanager
def recording(launches: list):
    """Intercept ``JITFunction.run``: record each launch, run nothing."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def record_all() -> list[Launch]:
    """Every launch of the launchers at the shapes of the module docstring."""
    from rlhf_engine.kernels import advantages, fused_linear, gae, kl, logprobs, policy_loss, value_loss
    from rlhf_engine.reference.advantages import METHODS
    from rlhf_engine.reference.kl import ESTIMATORS
    from rlhf_engine.reference.policy_loss import LOSSES

    launches: list[Launch] = []
    n, vocab = 8192, 151936
    with recording(launches):
        labels = _meta(n, dtype=torch.int64)
        for dtype in (torch.bfloat16, torch.float32):
            dense = _meta(1, n, vocab, dtype=dtype)
            shifted = _meta(8, 1025, vocab, dtype=dtype)[:, :-1]
            for logits in (dense, shifted):
                for entropy in (False, True):
                    lp, h, lse = logprobs.token_logprobs_fwd(logits, labels, 1.0, -100, entropy)
                    grad = _meta(n)
                    logprobs.token_logprobs_bwd(grad, grad if entropy else None, logits, labels, lse,
                                                h if entropy else None, logits, 1.0, -100)  # fmt: skip
        for dtype, bias, entropy in itertools.product((torch.bfloat16, torch.float16, torch.float32), (False, True), (False, True)):
            hidden, weight = _meta(n, 4096, dtype=dtype), _meta(vocab, 4096, dtype=dtype)
            fused_linear.fused_linear_logprobs_fwd(hidden, weight, _meta(vocab, dtype=dtype) if bias else None, labels,
                                                   1.0, -100, entropy)  # fmt: skip
        tokens, seqs = 1 << 20, 1024
        cu = torch.empty(seqs + 1, dtype=torch.int32, device=META)
        tok = _meta(tokens)
        mask = _meta(tokens, dtype=torch.bool)
        # Every loss with no option and with every option (the k3 KL), and every KL estimator
        # on the PPO loss with every option: each constexpr value at least once.
        cases = [(loss, "k3", flags) for loss in LOSSES for flags in (False, True)]
        cases += [("ppo", estimator, True) for estimator in ESTIMATORS if estimator != "k3"]
        for loss, estimator, on in cases:  # on: KL (times the ratio) + entropy, per-sequence adv + IS, dual clip + delta + clamps
            policy_loss.policy_loss_fwd(
                tok, tok, _meta(seqs) if on else tok, mask, cu, tok if on else None, tok if on else None,
                _meta(seqs) if on else None, loss=loss, clip_low=0.2, clip_high=5.0 if loss == "cispo-trl" else 0.28,
                dual_clip=3.0 if on else None, delta=4.0 if on else None, log_ratio_min=-20.0 if on else -math.inf,
                log_ratio_max=20.0 if on else math.inf, sapo_tau_pos=1.0, sapo_tau_neg=1.05, kl_coef=0.04,
                kl_estimator=estimator, kl_clamp=on, kl_ratio_weight=on, entropy_coef=0.01, seq_len=tokens // seqs,
            )  # fmt: skip
        policy_loss.seq_scale_bwd(_meta(()), _meta(seqs), tok, cu, 1.0, tokens // seqs, torch.float32)
        value_loss.value_loss_fwd(tok, tok, tok, mask, cu, clip=0.2, seq_len=tokens // seqs)
        value_loss.value_loss_fwd(tok, tok, tok, mask, cu, clip=None, seq_len=0)
        for estimator in ESTIMATORS:
            for clamp, need_grad in ((False, True), (True, False)):
                kl.kl_penalty_fwd(tok, tok, estimator, clamp, need_grad)
        scores = _meta(1 << 16)
        # Every method with every scale (TRL's preset), and every method under verl's.
        cases = [(m, scale, "trl") for m in METHODS for scale in ("group", "batch", "none")]
        cases += [(m, "group", "verl") for m in METHODS]
        lengths, group_ids = _meta(1 << 16, dtype=torch.int64), _meta(1 << 16, dtype=torch.int64)
        for method, scale, preset in cases:
            advantages.group_advantages_fwd(scores, None, lengths, 16, 1 << 12, method, scale, 1e-6, preset)
        for method, scale in [(m, "group") for m in METHODS] + [("grpo", "batch")]:  # groups given by id
            advantages.group_advantages_fwd(scores, group_ids, lengths, 0, 1 << 12, method, scale, 1e-6, "trl")
        advantages.masked_whiten_fwd(tok, mask, True, 1e-8)
        padded = _meta(seqs, tokens // seqs)
        padded_mask = _meta(seqs, tokens // seqs, dtype=torch.bool)
        for whiten in (False, True):
            gae.gae_fwd(padded, padded, padded_mask, 1.0, 0.95, whiten)
            gae.gae_fwd(tok, tok, mask, 1.0, 0.95, whiten, cu_seqlens=cu)
        gae.discounted_returns_fwd(padded, padded_mask, 1.0)
        gae.discounted_returns_fwd(tok, mask, 1.0, cu_seqlens=cu)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """``ptxas -v`` of one kernel's PTX: registers and spill bytes."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", f"-arch={target}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()[-500:]}")
    text = out.stderr + out.stdout
    return {k: int(m.group(1)) if (m := r.search(text)) else 0 for k, r in _PTXAS_RE.items()}


def compile_one(launch: Launch, arch: int) -> dict:
    """Compile ``launch`` for ``sm_<arch>`` -> a row: registers, spills, shared memory, seconds, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": launch.name, "module": launch.fn.fn.__module__, "specialization": launch.describe(), "arch": f"sm_{arch}"}
    start = time.perf_counter()
    try:
        source = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})  # fmt: skip
        row.update(ptxas_usage(compiled.asm["ptx"], arch), shared_bytes=int(compiled.metadata.shared), error=None)
    except Exception as exc:  # a compile error is a result of the check, reported per kernel
        row.update(registers=None, spill_stores=None, spill_loads=None, shared_bytes=None,
                   error=f"{type(exc).__name__}: {str(exc).strip()[-400:]}")  # fmt: skip
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def failures(rows: list[dict]) -> list[str]:
    """What fails the check: compile errors, shared memory over the arch's limit (the launch
    would fail), and spills in the hot path."""
    bad = []
    for r in rows:
        where = f"{r['arch']} {r['specialization']}"
        if r["error"]:
            bad.append(f"{where}: {r['error']}")
            continue
        limit = SHARED_MEMORY_LIMIT.get(int(r["arch"].removeprefix("sm_").rstrip("a")))
        if limit is not None and r["shared_bytes"] > limit:
            bad.append(f"{where}: {r['shared_bytes']} B of shared memory, over the {limit} B a block may use")
        if (HOT_PATH == "*" or r["kernel"] in HOT_PATH) and (r["spill_stores"] or r["spill_loads"]):
            bad.append(f"{where}: spills {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
    return bad


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'arch':<6} {'regs':>5} {'spill':>6} {'smem KiB':>9}  specialization"]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['arch']:<6} {'error':>5}  {r['specialization']}: {r['error'][:120]}")
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        lines.append(f"{r['arch']:<6} {r['registers']:>5} {spill:>6} {r['shared_bytes'] / 1024:>9.1f}  {r['specialization']}")
    return "\n".join(lines)


def check(archs=ARCHS) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("build_check: run without TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    launches = record_all()
    return [compile_one(launch, arch) for arch in archs for launch in launches]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="compile every Triton kernel specialization and every csrc/cuda kernel for GPUs, without one"
    )
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--triton-only", action="store_true", help="skip the csrc/cuda kernels (nvcc)")
    args = parser.parse_args()
    rows = check(tuple(args.arch))
    if not args.triton_only:
        from rlhf_engine.benchmarks.build_check_cuda import check_cuda

        rows += check_cuda(tuple(args.arch))
    print(format_rows(rows))
    if args.out:
        from rlhf_engine.benchmarks.common import git_commit

        import triton

        with open(args.out, "w") as f:
            json.dump({"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "triton": triton.__version__,
                       "rows": rows}, f, indent=1)  # fmt: skip
    bad = failures(rows)
    if bad:
        print("\nFAILED:\n" + "\n".join(bad), file=sys.stderr)
        raise SystemExit(1)
    print(f"\n{len(rows)} compiles: no error, no spill, shared memory within each arch's limit")


if __name__ == "__main__":
    main()

__all__ = ["check", "compile_one", "failures", "record_all"]
