"""The demo's time budget: three seeds of ``rlhf-engine demo`` at once, as ``make test`` runs them.

The issue's bar is learning (tests/test_demo.py checks it) *within 5 minutes on a 2-core CPU*;
the time half lives here, not in a test, because a loaded machine makes it fail with every
learning check passing. Each demo records its own wall time in ``summary.json``
(``seconds``); this prints them with the budget as one JSON object and exits 1 when the
slowest seed is over it.

``python -m rlhf_engine.benchmarks.demo_time [--seeds 0 1 2] [--budget 300] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_demos(root: Path, seeds: list[int]) -> dict[int, float]:
    """Run one ``rlhf-engine demo`` process per seed concurrently; each seed's ``seconds``."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the demo never needs the interpreter
    procs = {
        seed: subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", "demo", "--out", str(root / f"seed{seed}"),
                                "--seed", str(seed), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)  # fmt: skip
        for seed in seeds
    }
    outputs = {seed: proc.communicate()[0] for seed, proc in procs.items()}
    failed = [seed for seed, proc in procs.items() if proc.returncode]
    if failed:
        raise SystemExit(f"demo seed {failed[0]} failed:\n{outputs[failed[0]]}")
    return {seed: json.loads((root / f"seed{seed}" / "summary.json").read_text())["seconds"] for seed in seeds}


def verdict(seconds: dict[int, float], budget: float) -> dict:
    """The report: each seed's seconds, the slowest, the budget, and whether it was met."""
    slowest = max(seconds.values())
    return {"seconds": {str(s): round(t, 1) for s, t in seconds.items()}, "slowest_s": round(slowest, 1),
            "budget_s": budget, "within_budget": slowest <= budget, "cpus": os.cpu_count()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds allowed for the slowest seed")
    parser.add_argument("--out", metavar="DIR", help="keep the demos' folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.out:
        seconds = run_demos(Path(args.out), args.seeds)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = run_demos(Path(tmp), args.seeds)
    report = verdict(seconds, args.budget)
    print(json.dumps(report))
    return 0 if report["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
