"""FSDP2 at one rank against the plain single process: the same GRPO run, step times compared.

The issue's GPU check: ``torchrun --nproc-per-node 1`` (here ``train --nproc 1``) must match
the non-distributed run's step time within 10% on one GPU. Both runs train the same model
on the same prompts (``{"prompt", "answer"}`` records of the built-in byte tokenizer) with
the same config; the step time is the median of the differences of ``metrics.jsonl``'s
``time`` (seconds since the log opened) over the steps after ``--warmup``. Exit status 1
when the FSDP run is slower than ``--limit`` times the plain one.

``python -m rlhf_engine.benchmarks.fsdp_one_rank [--model small|DIR] [--device cuda] [--steps 12]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = "prompts_per_step: {prompts}\ngroup_size: 8\nmax_new_tokens: {tokens}\nminibatch_size: {rows}\nsteps: {steps}\n"


def step_times(out: Path, warmup: int) -> list[float]:
    times = [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(times, times[1:])][warmup:]


def run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "train", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"train {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="a built-in size or a local model folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="step times dropped at the start")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens")
    parser.add_argument("--limit", type=float, default=1.10, help="largest allowed FSDP / plain step-time ratio")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "qa.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "answer": p[::-1]}) + "\n" for p in ("abc", "cab", "bca", "acb")))
        config = root / "grpo.yaml"
        config.write_text(CONFIG.format(prompts=args.prompts, tokens=args.tokens, rows=8 * args.prompts, steps=args.steps))
        common = ["--algo", "grpo", "--model", args.model, "--data", str(data), "--config", str(config), "--quiet",
                  "--device", args.device, "--plan", "off"]  # fmt: skip
        run([*common, "--out", str(root / "plain")])
        run([*common, "--out", str(root / "fsdp"), "--nproc", "1"])
        plain, fsdp = (statistics.median(step_times(root / name, args.warmup)) for name in ("plain", "fsdp"))
    ratio = fsdp / plain
    print(json.dumps({"model": args.model, "device": args.device, "plain_step_s": plain, "fsdp_one_rank_step_s": fsdp,
                      "ratio": ratio, "limit": args.limit}))  # fmt: skip
    return 0 if ratio <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
