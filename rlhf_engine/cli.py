"""Command line: ``rlhf-engine demo | train | eval | generate | plan | bench``.

* ``demo [--out DIR] [--seed S]``: the embedded pipeline (SFT, reward model, PPO, GRPO)
  on the built-in sorting task; see ``rlhf_engine.demo``.
* ``train --algo A --model PATH|tiny --data FILE|DIR [--config FILE.yaml] [--resume] [--nproc N]
  [--eval-data FILE] [--log-samples K] [--report-to tensorboard wandb]
  [--reward-fn FILE.py:FUNCTION ... [--reward-weights W ...]]``: one algorithm on a
  local model and data (JSONL, JSON, Parquet, CSV or a saved ``datasets``
  folder; ``--prompt-field`` ... ``--max-length`` set the data config, see
  ``rlhf_engine.train_data``); see ``rlhf_engine.train`` (reward functions:
  ``rlhf_engine.rewards``). Data-parallel on FSDP2:
  ``torchrun --nproc-per-node N -m rlhf_engine.cli train ...``, or ``--nproc N`` which launches that.
* ``eval --algo A --model DIR --data FILE.jsonl [--config FILE.yaml] [--reward-model DIR]
  [--ref-model DIR] [--json]``: a saved model's metrics on a data file, the ones ``train
  --eval-data FILE`` logs; see ``rlhf_engine.evaluate``.
* ``generate --model DIR --prompts FILE.jsonl [--out FILE] [--num-samples N] [--max-new-tokens N]
  [--temperature T] [--top-p P] [--top-k K] [--seed S] [--device DEV]``: sample completions from a
  trained model folder, one JSON line per prompt; see ``rlhf_engine.generate``.
* ``plan --algo A --model PATH|config.json [--reward-model ...] [--gpu NAME | --gpu-memory SIZE]
  [--config FILE.yaml] [--prompt-length N] [--no-offload] [--gpus N|auto] [--json]``: will the run
  fit one GPU (or each of N under FSDP2, and how many it needs)? The memory plan per phase and
  role; exit status 1 when it does not fit; see ``rlhf_engine.memory``.
* ``bench [--quick] [--only NAME ...] [--out DIR] [--device DEV]`` runs every benchmark module in ``rlhf_engine.benchmarks`` (the top-level
``benchmarks/`` folder, one ``bench_*.py`` per op family) on the device at hand, prints
one table and writes one JSON file per family under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path

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
    if not common.liger_installed():  # the families that compare with it say nothing without it
        print("Liger-Kernel: not installed (pip install liger-kernel): no Liger rows")
    if args.out:
        print(f"JSON written under {args.out}/")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rlhf_engine.demo import DemoConfig, format_summary, run_demo
    from rlhf_engine.quiet import quiet_transformers

    try:
        with quiet_transformers(args.quiet):
            summary = run_demo(args.out, DemoConfig(seed=args.seed, device=args.device), quiet=args.quiet)
    except ValueError as error:
        print(f"rlhf-engine demo: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"metrics, checkpoints, curves.png and summary.json written under {args.out}/")
    return 0


def _train(args: argparse.Namespace) -> int:
    from rlhf_engine.distributed.group import launched_by_torchrun
    from rlhf_engine.quiet import quiet_transformers
    from rlhf_engine.train import run_train

    if args.nproc is not None and not launched_by_torchrun():
        return _launch_train(args)
    rank = int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    try:
        with quiet_transformers(args.quiet):
            history = run_train(
                args.algo, args.model, args.data, args.out, config_path=args.config, resume=args.resume,
                reward_model_path=args.reward_model, checkpoint_every=args.checkpoint_every, quiet=args.quiet,
                device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), plan=args.plan,
                gpu_memory=args.gpu_memory, keep_last=args.keep_last, eval_data=args.eval_data, eval_every=args.eval_every,
                data_options=_data_options(args), report_to=args.report_to, log_samples=args.log_samples,
                reward_fns=args.reward_fn, reward_weights=args.reward_weights,
            )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        print(f"rlhf-engine train{f' (rank {rank})' if launched_by_torchrun() else ''}: {error}", file=sys.stderr)
        return 2
    if rank != 0:  # rank 0 reports for every rank (the metrics are global)
        return 0
    last = history[-1] if history else {}
    print(f"{args.algo}: {len(history)} steps run; last step: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
    if args.eval_data is not None:
        _print_last_eval(args.algo, Path(args.out) / "metrics.jsonl")
    print(f"model written to {args.out}/model, metrics to {args.out}/metrics.jsonl")
    return 0


def _data_options(args: argparse.Namespace) -> dict:
    """The DataConfig fields the ``train`` flags set (None: not given)."""
    return {name: getattr(args, name) for name, *_ in DATA_FLAGS}


def _print_last_eval(algo: str, log: Path) -> None:
    """The run's latest ``--eval-data`` line (of this call, or of the run it resumed)."""
    from rlhf_engine.runlog import read_runlog
    from rlhf_engine.train import format_eval

    evals = [r for r in read_runlog(log) if r["phase"] == f"{algo}_eval"]
    if evals:
        last = {k: v for k, v in evals[-1].items() if k not in ("phase", "step", "time")}
        print(format_eval(algo, evals[-1]["step"], last))


def _eval(args: argparse.Namespace) -> int:
    import json
    import math

    from rlhf_engine.evaluate import run_eval
    from rlhf_engine.quiet import quiet_transformers

    try:
        with quiet_transformers(args.quiet):
            metrics = run_eval(args.algo, args.model, args.data, config_path=args.config, reward_model_path=args.reward_model,
                               ref_model=args.ref_model, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                               reward_fns=args.reward_fn, reward_weights=args.reward_weights)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        print(f"rlhf-engine eval: {error}", file=sys.stderr)
        return 2
    if args.json:  # an infinite perplexity is null, as in metrics.jsonl
        finite = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
        print(json.dumps({"algo": args.algo, "model": args.model, "data": args.data, "metrics": finite}))
    else:
        print(f"{args.algo} eval of {args.model} on {args.data}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import json

    from rlhf_engine.generate import generate_completions
    from rlhf_engine.quiet import quiet_transformers

    try:
        with quiet_transformers(args.quiet):
            records = generate_completions(
                args.model, args.prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, quiet=args.quiet,
                device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            )  # fmt: skip
            with open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout) as sink:
                for record in records:
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"rlhf-engine generate: {error}", file=sys.stderr)
        return 2
    if args.out:
        print(f"completions written to {args.out}", file=sys.stderr)
    return 0


def _launch_train(args: argparse.Namespace) -> int:
    """``train --nproc N``: this command line again, without ``--nproc``, under
    ``torch.distributed.run`` with N processes on this node (``--standalone``: a free port). The
    world-size and data config checks run here first, so a bad size or data config fails before
    any process starts."""
    import subprocess

    from rlhf_engine.distributed.batches import check_world_size
    from rlhf_engine.train import EVAL_UNDER_TORCHRUN, load_config
    from rlhf_engine.train_data import load_data_config

    try:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.eval_data is not None:
            raise ValueError(EVAL_UNDER_TORCHRUN)
        check_world_size(args.algo, load_config(args.algo, args.config), args.nproc)
        load_data_config(args.config, _data_options(args))
    except (ValueError, FileNotFoundError) as error:
        print(f"rlhf-engine train: {error}", file=sys.stderr)
        return 2
    argv, rest = list(args.argv), []
    while argv:
        arg = argv.pop(0)
        if arg == "--nproc":
            argv.pop(0)
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "rlhf_engine.cli", *rest]  # fmt: skip
    return subprocess.run(command).returncode


def _plan(args: argparse.Namespace) -> int:
    import json

    from rlhf_engine.memory.plan import fewest_gpus, gpu_budget, parse_memory, plan
    from rlhf_engine.memory.report import format_plan
    from rlhf_engine.memory.run_specs import check_gpus, plan_options, role_specs, workload
    from rlhf_engine.train import load_config

    try:
        if args.prompt_length < 1:
            raise ValueError(f"--prompt-length must be >= 1, got {args.prompt_length}")
        gpus = _parse_gpus(args.gpus)
        budget = parse_memory(args.gpu_memory) if args.gpu_memory else gpu_budget(args.gpu)
        config = load_config(args.algo, args.config)
        check_gpus(config, gpus)
        specs = role_specs(args.algo, config, args.model, args.reward_model)
        work, options = workload(config, args.prompt_length), plan_options(config, offload=not args.no_offload)
        fewest = fewest_gpus(specs, work, budget, options) if args.gpus != "1" else None
        if gpus == "auto":
            chosen = fewest or plan(specs, work, budget, options, gpus=_largest_world_size(work))
        else:
            chosen = plan(specs, work, budget, options, gpus=gpus)
    except (ValueError, TypeError) as error:
        print(f"rlhf-engine plan: {error}", file=sys.stderr)
        return 2
    if args.gpus != "1":
        chosen.fewest_gpus = fewest.gpus if fewest else None
    print(json.dumps(chosen.to_dict(), indent=1) if args.json else format_plan(chosen, asked_fewest=args.gpus != "1"))
    return 0 if chosen.fits else 1


def _parse_gpus(text: str) -> int | str:
    """``--gpus``: a world size >= 1, or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise ValueError(f"--gpus must be a number of GPUs >= 1 or 'auto', got {text!r}")
    return value


def _largest_world_size(work) -> int:
    from rlhf_engine.memory.fsdp import world_sizes

    return world_sizes(work)[-1]


def _version() -> str:
    from rlhf_engine import __version__

    return __version__


# `train` flags that set DataConfig fields (over the --config file's `data:` mapping): name, type, metavar, help.
DATA_FLAGS = [
    ("prompt_field", str, "NAME", "the prompt's field in the data (default: prompt)"),
    ("response_field", str, "NAME", "SFT: the response's field (default: response, or completion when the data has that)"),
    ("messages_field", str, "NAME", "SFT: the conversation's field (default: messages)"),
    ("chosen_field", str, "NAME", "RM, DPO: the preferred response's field (default: chosen)"),
    ("rejected_field", str, "NAME", "RM, DPO: the other response's field (default: rejected)"),
    ("answer_field", str, "NAME", "RL: the answer's field for the exact-match reward (default: answer)"),
    ("max_prompt_length", int, "N", "cut prompts to N tokens (keeping their end; data.prompt_truncation: right keeps the start)"),
    ("max_length", int, "N", "SFT, RM, DPO: cut responses so prompt + response <= N tokens; drop records whose prompt alone has N"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-engine", description="rlhf_engine: fused RLHF ops and benchmarks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="SFT -> reward model -> PPO and GRPO on the built-in task (CPU, minutes)")
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: demo-out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars (transformers' loading bars included)")
    demo.add_argument("--device", default="cpu", help="where the models run (default: cpu, what the demo is sized for)")
    demo.set_defaults(handler=_demo)
    train = commands.add_parser("train", help="train one algorithm on a local model and local data (JSONL, JSON, Parquet, CSV, datasets folders)")
    train.add_argument("--algo", required=True,
                       choices=["sft", "rm", "ppo", "grpo", "rloo", "reinforce_pp", "dpo", "rejection_sampling"])
    train.add_argument("--model", required=True, help="a local model folder, or a built-in size: tiny, small")
    train.add_argument("--data", required=True, metavar="FILE|DIR",
                       help="local data: .jsonl, .json, .parquet, .csv, or a folder saved by datasets' save_to_disk")
    train.add_argument("--config", metavar="FILE.yaml", help="fields of the algorithm's config dataclass")
    train.add_argument("--reward-model", metavar="DIR", help="reward model folder (saved by --algo rm) for RL algorithms")
    train.add_argument("--reward-fn", action="append", metavar="FILE.py:FUNCTION",
                       help="a reward function in TRL's convention (or MODULE:FUNCTION); repeat for several, summed with "
                            "--reward-weights (RL algorithms and rejection_sampling)")
    train.add_argument("--reward-weights", type=float, nargs="+", metavar="W",
                       help="one weight per --reward-fn, in order (default: all 1)")
    train.add_argument("--out", default="train-out", metavar="DIR", help="output folder (default: train-out)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--checkpoint-every", type=int, default=10, metavar="N", help="steps between checkpoints")
    train.add_argument("--keep-last", type=int, metavar="N", help="keep only the newest N checkpoints (default: all)")
    train.add_argument("--quiet", action="store_true", help="no progress bars (transformers' loading bars included)")
    train.add_argument("--device", help="where the models run (default: cuda when available, else cpu)")
    train.add_argument("--plan", choices=["auto", "off"],
                       help="auto (default on CUDA for RL algorithms): plan GPU memory, offload and micro-batch to fit, or "
                            "refuse before loading anything; off (default elsewhere): everything resident, as configured")
    train.add_argument("--gpu-memory", metavar="SIZE", help="plan for this much GPU memory (default: the device's)")
    train.add_argument("--report-to", nargs="+", metavar="SINK", choices=["tensorboard", "wandb"],
                       help="also send the metrics to tensorboard (OUT/tensorboard) and/or wandb (OUT/wandb, offline "
                            "unless WANDB_MODE is set); metrics.jsonl is always written")
    train.add_argument("--log-samples", type=int, metavar="K",
                       help="RL algorithms: K prompts with their completion and reward per step in OUT/samples.jsonl "
                            "(default 4; 0: off)")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="data-parallel over N processes on this node: re-launches itself under torchrun "
                            "(FSDP2; the same as torchrun --nproc-per-node N -m rlhf_engine.cli train ...)")
    train.add_argument("--eval-data", metavar="FILE.jsonl",
                       help="held-out records (the --data format): evaluated before training, every --eval-every steps and "
                            "at the end, logged to metrics.jsonl as phase ALGO_eval")
    train.add_argument("--eval-every", type=int, metavar="N", help="steps between evaluations (default 0: before and after only)")
    for name, kind, metavar, text in DATA_FLAGS:
        train.add_argument("--" + name.replace("_", "-"), type=kind, metavar=metavar, help=text)
    train.set_defaults(handler=_train)
    evaluate = commands.add_parser("eval", help="a saved model's metrics on a data file (what train --eval-data logs)")
    evaluate.add_argument("--algo", required=True, choices=["sft", "rm", "ppo", "grpo", "rloo", "reinforce_pp", "dpo"])
    evaluate.add_argument("--model", required=True, metavar="DIR", help="a model folder as train writes it (OUT/model)")
    evaluate.add_argument("--data", required=True, metavar="FILE.jsonl", help="records in the algorithm's train format")
    evaluate.add_argument("--config", metavar="FILE.yaml", help="the run's config (seed, sampling, beta, batch sizes)")
    evaluate.add_argument("--reward-model", metavar="DIR", help="RL: the reward model that scores the samples")
    evaluate.add_argument("--reward-fn", action="append", metavar="FILE.py:FUNCTION",
                          help="RL: a reward function that scores the samples, as train takes it (repeatable)")
    evaluate.add_argument("--reward-weights", type=float, nargs="+", metavar="W", help="one weight per --reward-fn")
    evaluate.add_argument("--ref-model", metavar="DIR",
                          help="the run's reference (its starting --model; a folder or a built-in size): needed by dpo, "
                               "gives the RL algorithms' kl")
    evaluate.add_argument("--device", help="where the models run (default: cuda when available, else cpu)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars (transformers' loading bars included)")
    evaluate.set_defaults(handler=_eval)
    generate = commands.add_parser("generate", help="sample completions of JSONL prompts from a trained model folder")
    generate.add_argument("--model", required=True, metavar="DIR", help="a trained model folder (e.g. the model/ of a train run)")
    generate.add_argument("--prompts", required=True, metavar="FILE.jsonl", help='one {"prompt": ...} per line, as train reads RL data')
    generate.add_argument("--out", metavar="FILE", help="write the JSONL here (default: stdout)")
    generate.add_argument("--num-samples", type=int, default=1, metavar="N", help="completions per prompt (default 1)")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per completion at most (default 64)")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens up to this probability (default 1: off)")
    generate.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (default 0: off)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    generate.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts sampled at once (default 16)")
    generate.add_argument("--device", help="where the model runs (default: cuda when available, else cpu)")
    generate.add_argument("--quiet", action="store_true", help="no progress bars (transformers' loading bars included)")
    generate.set_defaults(handler=_generate)
    plan = commands.add_parser("plan", help="will an RL run fit one GPU, or N? memory per phase and role, before any model is loaded")
    plan.add_argument("--algo", required=True, choices=["ppo", "grpo", "rloo", "reinforce_pp"])
    plan.add_argument("--model", required=True, metavar="PATH", help="the policy: a model folder or a bare config.json")
    plan.add_argument("--reward-model", metavar="PATH", help="the reward model (PPO's critic has its shape): folder or config.json")
    gpu = plan.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", default="h100-80gb", help="a100-40gb, a100-80gb, h100-80gb (default) or h200-141gb")
    gpu.add_argument("--gpu-memory", metavar="SIZE", help="the GPU's memory instead, e.g. 80GiB, 24GB")
    plan.add_argument("--config", metavar="FILE.yaml", help="fields of the RL config (batch sizes, dtype, LoRA, micro-batches)")
    plan.add_argument("--prompt-length", type=int, default=512, metavar="N", help="longest prompt in tokens (default 512)")
    plan.add_argument("--no-offload", action="store_true",
                      help="predict exactly the configuration given: everything resident, the config's micro-batches and checkpointing")
    plan.add_argument("--gpus", default="1", metavar="N|auto",
                      help="plan rank 0 of N GPUs under FSDP2 (default 1: one GPU, offloading allowed), and name the fewest "
                           "GPUs that fit; auto: plan at that fewest number")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_plan)
    bench = commands.add_parser("bench", help="benchmark every op family against eager PyTorch, torch.compile and Liger")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke run)")
    bench.add_argument("--only", nargs="+", metavar="FAMILY", help="run only these families (default: all)")
    bench.add_argument("--out", metavar="DIR", help="write one JSON file per family here")
    bench.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `train --nproc` re-launches
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
