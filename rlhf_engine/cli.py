"""Command line: ``rlhf-engine bench [--quick] [--only NAME ...] [--out DIR] [--device DEV]``.

``bench`` runs every benchmark module in ``rlhf_engine.benchmarks`` (the top-level
``benchmarks/`` folder, one ``bench_*.py`` per op family) on the device at hand, prints
one table and writes one JSON file per family under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time

import torch


def benchmark_families() -> list[str]:
    """Names of the benchmark modules, e.g. ``["advantages", "logprobs", ...]``."""
    import rlhf_engine.benchmarks as package

    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("bench_"))


def _bench(args: argparse.Namespace) -> int:
    from rlhf_engine.benchmarks import common

    families = benchmark_families()
    chosen = args.only or families
    unknown = sorted(set(chosen) - set(families))
    if unknown:
        print(f"rlhf-engine bench: unknown --only {unknown}; choose from {families}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("rlhf-engine bench: --device cuda given but CUDA is not available", file=sys.stderr)
        return 2
    machine = common.measure_machine(device, torch.bfloat16, args.quick)
    print(
        f"device: {machine.device}; measured copy {machine.copy_bytes_per_s / 1e9:.1f} GB/s, "
        f"matmul {machine.matmul_flops_per_s / 1e12:.2f} TFLOP/s; quick={args.quick}"
    )
    all_results = []
    for family in chosen:
        start = time.perf_counter()
        module = importlib.import_module(f"rlhf_engine.benchmarks.bench_{family}")
        results = module.run(device, args.quick)
        all_results += results
        print(f"[{family}: {len(results)} rows in {time.perf_counter() - start:.1f} s]", flush=True)
        if args.out:
            common.write_json(results, os.path.join(args.out, f"bench_{family}.json"), device, args.quick)
    print(common.format_table(all_results))
    if args.out:
        print(f"JSON written under {args.out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-engine", description="rlhf_engine: fused RLHF ops and benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmark every op family against eager PyTorch, torch.compile and Liger")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke run)")
    bench.add_argument("--only", nargs="+", metavar="FAMILY", help="run only these families (default: all)")
    bench.add_argument("--out", metavar="DIR", help="write one JSON file per family here")
    bench.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
