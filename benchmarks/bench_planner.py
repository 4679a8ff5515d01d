"""Benchmark: the memory planner's predictions against traced peaks, and its speed.

For each cell (model shape x dtype x checkpointing x full / LoRA) and each phase of a PPO
step (policy, reference, critic and reward model of one shape), the planner's predicted
peak (``rlhf_engine.memory.estimate``, everything resident, the cell's micro-batches) is
compared with the peak of the real phase traced under ``FakeTensorMode`` by MemTracker
(``rlhf_engine.memory.trace``), on the CPU, without allocating the memory. The shapes are
the published configs of Qwen2.5-0.5B, -1.5B, -7B and Llama-3-8B, written here (no
downloads). Each row's ``ms`` is how long planning the cell took (``plan`` on an 80 GB
budget); the error is in the JSON (``validation``) and in the table's ``shape`` column.

``python -m rlhf_engine.benchmarks.bench_planner [--quick] [--layers N] [--out FILE.json]``
traces at full depth unless ``--layers N`` (every shape at ``N`` layers, the real widths
and vocabulary, as the tests do); ``--quick`` traces the 0.5B cells only.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time

import torch

from rlhf_engine.benchmarks.common import Result

MODELS = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
                   "rope_theta": 500000.0},
}  # fmt: skip
DTYPES = ("fp32", "bf16")
LORA_RANK = 64
# One PPO step per cell: 8 prompts x 4 samples of 256 + 512 tokens, minibatches of 16,
# micro-batches of 8 (generate, score) and 4 (updates).
WORKLOAD = dict(prompts_per_step=8, group_size=4, prompt_length=256, response_length=512, minibatch_size=16,
                generate_micro_batch=8, score_micro_batch=8, update_micro_batch=4)  # fmt: skip
TOLERANCE = 0.10


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    dtype: str
    checkpointing: bool
    lora: bool

    @property
    def name(self) -> str:
        return f"{self.model} {self.dtype} {'ckpt' if self.checkpointing else 'no-ckpt'} {'lora' if self.lora else 'full'}"


def cells(models=tuple(MODELS)) -> list[Cell]:
    return [Cell(m, d, c, lora) for m, d, c, lora in itertools.product(models, DTYPES, (False, True), (False, True))]


def hf_config(model: str, layers: int | None = None):
    """The transformers config of a shape (``layers``: fewer blocks, same widths)."""
    from transformers import AutoConfig

    values = dict(MODELS[model])
    if layers is not None:
        values["num_hidden_layers"] = layers
    kind = values.pop("model_type")
    return AutoConfig.for_model(kind, **values)


def cell_specs(cell: Cell, layers: int | None = None):
    """PPO's four roles of one shape for ``cell``."""
    from rlhf_engine.memory.estimate import RoleSpec
    from rlhf_engine.memory.shapes import ModelShape

    config = hf_config(cell.model, layers)
    shape = ModelShape.from_config(config)
    rank = LORA_RANK if cell.lora else 0
    return {
        "policy": RoleSpec(config, shape, "lm", cell.dtype, True, lora_rank=rank, checkpointing=cell.checkpointing),
        "reference": RoleSpec(config, shape, "lm", cell.dtype, False, is_adapter_view=cell.lora),
        "critic": RoleSpec(config, shape, "scalar", cell.dtype, True, lora_rank=rank, checkpointing=cell.checkpointing),
        "reward_model": RoleSpec(config, shape, "scalar", cell.dtype, False),
    }


def validate(cell: Cell, layers: int | None = None) -> list[dict]:
    """Prediction against traced peak for every phase of ``cell``."""
    from rlhf_engine.memory.estimate import Workload, estimate
    from rlhf_engine.memory.trace import trace_phase

    specs, work = cell_specs(cell, layers), Workload(**WORKLOAD)
    predicted = estimate(specs, work)
    rows = []
    for phase, prediction in predicted.items():
        start = time.perf_counter()
        traced = trace_phase(phase, specs, work)
        rows.append({
            "cell": cell.name, "phase": phase, "layers": layers or MODELS[cell.model]["num_hidden_layers"],
            "predicted_bytes": prediction.peak_bytes, "traced_bytes": traced.peak, "traced_by_kind": traced.by_kind,
            "lm_head_workspace_bytes": traced.workspace, "error": prediction.peak_bytes / traced.peak - 1,
            "trace_s": time.perf_counter() - start,
        })  # fmt: skip
    return rows


def run(device: torch.device, quick: bool, layers: int | None = 2, out_rows: list | None = None) -> list[Result]:
    """One Result per cell and phase: ``ms`` = planning time of the cell (80 GB budget).
    Under ``rlhf-engine bench`` the cells are traced at two layers (the full-depth table takes
    minutes a cell: run this module with no ``--layers`` for it). The planner runs on the
    CPU whatever ``device`` is."""
    from rlhf_engine.memory.estimate import Workload
    from rlhf_engine.memory.plan import GPU_MEMORY, plan

    results = []
    for cell in cells(("qwen2.5-0.5b",) if quick else tuple(MODELS)):
        start = time.perf_counter()
        plan(cell_specs(cell), Workload(**WORKLOAD), GPU_MEMORY["h100-80gb"])
        plan_ms = (time.perf_counter() - start) * 1e3
        for row in validate(cell, layers):
            row["plan_ms"] = plan_ms
            if out_rows is not None:
                out_rows.append(row)
            shape = f"{cell.name} {row['phase']} err {row['error']:+.1%}"
            results.append(Result("plan", "estimate vs trace", shape, plan_ms, 0.0, 0, 0, row["traced_bytes"]))
    return results


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="the planner's predictions against traced peaks")
    parser.add_argument("--quick", action="store_true", help="the 0.5B cells only")
    parser.add_argument("--layers", type=int, help="trace every shape at this many layers")
    parser.add_argument("--out", help="write the validation table as JSON here")
    parser.add_argument("--markdown", metavar="FILE.json", help="print a JSON written by --out as a markdown table, and exit")
    args = parser.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            print(format_markdown(json.load(f)["rows"]))
        return
    rows: list[dict] = []
    run(torch.device("cpu"), args.quick, args.layers, rows)
    print(format_validation(rows))
    if args.out:
        from rlhf_engine.benchmarks.common import git_commit

        with open(args.out, "w") as f:
            json.dump({"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "tolerance": TOLERANCE,
                       "workload": WORKLOAD, "rows": rows}, f, indent=1)  # fmt: skip


def format_markdown(rows: list[dict]) -> str:
    """One line per cell: predicted / traced GiB and the error of each phase."""
    phases = ["generate", "score", "update_policy", "update_critic"]
    by_cell: dict[str, dict] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], {})[r["phase"]] = r
    lines = ["| cell | layers | " + " | ".join(phases) + " |", "|---|---|" + "---|" * len(phases)]
    for cell, per_phase in by_cell.items():
        cells = [
            f"{r['predicted_bytes'] / 2**30:.2f} / {r['traced_bytes'] / 2**30:.2f} ({r['error']:+.1%})" if (r := per_phase.get(p)) else "-"
            for p in phases
        ]
        layers = next(iter(per_phase.values()))["layers"]
        lines.append(f"| {cell} | {layers} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_validation(rows: list[dict]) -> str:
    lines = [f"{'cell':<36} {'phase':<14} {'predicted GiB':>13} {'traced GiB':>11} {'error':>7}"]
    for r in rows:
        lines.append(f"{r['cell']:<36} {r['phase']:<14} {r['predicted_bytes'] / 2**30:13.2f} {r['traced_bytes'] / 2**30:11.2f} {r['error']:+7.1%}")
    worst = max((abs(r["error"]) for r in rows), default=0.0)
    lines.append(f"worst |error| {worst:.1%} over {len(rows)} cells x phases (tolerance {TOLERANCE:.0%})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

__all__ = ["MODELS", "cells", "cell_specs", "run", "validate"]
