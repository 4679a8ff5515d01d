"""``rlhf-engine plan``: the memory planner from the user's side, in process through ``cli.main``.

Model configs are written here (Qwen2.5-7B's published shape), so nothing is downloaded or built.
The printed table is read back and compared with the ``--json`` plan of the same run; with
``--no-offload`` the JSON is compared with ``memory.estimate.estimate`` of the same specs and
workload, built independently through ``run_specs``; bad input must exit 2 naming the problem.
"""

import dataclasses
import json
import re

import pytest

from rlhf_engine.cli import main
from rlhf_engine.memory.estimate import KINDS, estimate
from rlhf_engine.memory.plan import GPU_MEMORY
from rlhf_engine.memory.run_specs import role_specs, workload
from rlhf_engine.train import load_config

GIB = 1 << 30
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)  # fmt: skip
PPO_ROLES = ["policy", "reference", "reward_model", "critic"]
PPO_PHASES = ["generate", "score", "update_policy", "update_critic"]
# 7B PPO that fits an H100: bf16, LoRA on the policy and the critic.
FITS = "dtype: bf16\nlora_rank: 16\ncritic_lora_rank: 16\n"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``rlhf-engine plan ...`` (argparse's exits included)."""
    try:
        code = main(["plan", *argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def qwen(tmp_path) -> str:
    return write(tmp_path / "config.json", json.dumps(QWEN25_7B))


def ppo(model: str, config: str | None, *extra: str) -> list[str]:
    args = ["--algo", "ppo", "--model", model, "--reward-model", model, *extra]
    return args + (["--config", config] if config else [])


def check_json_structure(data: dict, roles: list[str], phases: list[str]) -> None:
    assert isinstance(data["fits"], bool) and isinstance(data["budget_bytes"], int)
    assert list(data["phases"]) == phases
    for entry in data["phases"].values():
        assert isinstance(entry["peak_bytes"], int) and isinstance(entry["micro_batch"], int) and entry["micro_batch"] >= 1
        assert sorted(entry["roles"]) == sorted(roles)
        for role in entry["roles"].values():
            assert isinstance(role["residency"], str)
            assert set(role["bytes"]) == set(KINDS) and all(isinstance(v, int) for v in role["bytes"].values())


def table_sections(text: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """``{phase: (header cells, {role: row cells})}`` read from the printed table."""
    sections, lines, i = {}, text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^(\w+): peak ", lines[i])
        if match:
            header, rows, i = lines[i + 1].split(), {}, i + 2
            while i < len(lines) and lines[i].startswith("  "):
                cells = lines[i].split()
                rows[cells[0]] = cells
                i += 1
            sections[match.group(1)] = (header, rows)
        else:
            i += 1
    return sections


# -- a run that fits -----------------------------------------------------------------------------
def test_a_fitting_ppo_run_prints_a_section_per_phase_matching_its_json(qwen, tmp_path, capsys):
    config = write(tmp_path / "fits.yaml", FITS)
    code, text, _ = run(ppo(qwen, config, "--gpu", "h100-80gb"), capsys)
    assert code == 0
    json_code, out, _ = run(ppo(qwen, config, "--gpu", "h100-80gb", "--json"), capsys)
    data = json.loads(out)
    assert json_code == 0 and data["fits"] is True and data["suggestions"] == []
    check_json_structure(data, PPO_ROLES, PPO_PHASES)
    sections = table_sections(text)
    assert list(sections) == PPO_PHASES
    for phase, (header, rows) in sections.items():
        assert header == ["role", "residency", *KINDS, "total"]
        assert sorted(rows) == sorted(PPO_ROLES)
        entry = data["phases"][phase]
        assert f"{phase}: peak {entry['peak_bytes'] / GIB:.2f} " in text and f"micro-batch {entry['micro_batch']}" in text
        for role, cells in rows.items():
            kinds = entry["roles"][role]["bytes"]
            assert cells[1] == entry["roles"][role]["residency"]
            assert cells[2:] == [f"{kinds[k] / GIB:.2f}" for k in KINDS] + [f"{sum(kinds.values()) / GIB:.2f}"]
    assert "fits: largest phase peak" in text


@pytest.mark.parametrize("gpu", sorted(GPU_MEMORY))
def test_budget_bytes_is_the_named_gpu(gpu, qwen, tmp_path, capsys):
    code, out, _ = run(ppo(qwen, write(tmp_path / "fits.yaml", FITS), "--gpu", gpu, "--json"), capsys)
    data = json.loads(out)
    assert data["budget_bytes"] == GPU_MEMORY[gpu]
    assert code == (0 if data["fits"] else 1)
    check_json_structure(data, PPO_ROLES, PPO_PHASES)


@pytest.mark.parametrize("size, expected", [("24GiB", 24 * 2**30), ("100GB", 100 * 10**9), ("81920MiB", 80 * 2**30)])
def test_budget_bytes_is_the_gpu_memory_given(size, expected, qwen, tmp_path, capsys):
    code, out, _ = run(ppo(qwen, write(tmp_path / "fits.yaml", FITS), "--gpu-memory", size, "--json"), capsys)
    data = json.loads(out)
    assert data["budget_bytes"] == expected and code == (0 if data["fits"] else 1)


# -- a run that cannot fit -----------------------------------------------------------------------
def test_a_run_that_cannot_fit_exits_1_with_its_suggestions(qwen, tmp_path, capsys):
    # 7B full fine-tuning in fp32 with a critic: ~200 GiB in update_policy against 40 GB.
    # Short responses keep the suggestions' search (it bisects max_new_tokens) quick.
    config = write(tmp_path / "fp32.yaml", "max_new_tokens: 4\n")
    code, out, _ = run(ppo(qwen, config, "--gpu", "a100-40gb", "--json"), capsys)
    data = json.loads(out)
    assert code == 1 and data["fits"] is False and data["suggestions"]
    assert data["peak_bytes"] > data["usable_bytes"]
    assert all(s["peak_bytes"] <= data["usable_bytes"] and s["change"] for s in data["suggestions"])
    code, text, _ = run(ppo(qwen, config, "--gpu", "a100-40gb"), capsys)
    assert code == 1 and "does NOT fit" in text and "would fit with any one of:" in text
    for suggestion in data["suggestions"]:
        assert f"  - {suggestion['what']}: peak {suggestion['peak_bytes'] / GIB:.2f} GiB" in text


# -- --no-offload: exactly the configuration given ----------------------------------------------
NO_OFFLOAD_CONFIGS = {
    "micro-batches-bf16-checkpointing": "dtype: bf16\nprompts_per_step: 8\nminibatch_size: 8\nmicro_batch_size: 2\n"
    "score_micro_batch_size: 4\ngenerate_micro_batch_size: 8\npolicy_gradient_checkpointing: true\n"
    "critic_gradient_checkpointing: true\n",
    # No micro-batches: every pass takes the whole batch; a LoRA reference is the adapter view.
    "lora-whole-batches": "dtype: bf16\nfrozen_dtype: fp32\nlora_rank: 8\nprompts_per_step: 4\nminibatch_size: 2\n",
}


@pytest.mark.parametrize("name", list(NO_OFFLOAD_CONFIGS))
def test_no_offload_predicts_exactly_the_configured_run(name, qwen, tmp_path, capsys):
    path = write(tmp_path / "run.yaml", NO_OFFLOAD_CONFIGS[name])
    code, out, _ = run(ppo(qwen, path, "--gpu", "h200-141gb", "--no-offload", "--prompt-length", "256", "--json"), capsys)
    data = json.loads(out)
    assert code == (0 if data["fits"] else 1)
    config = load_config("ppo", path)
    specs = role_specs("ppo", config, QWEN25_7B, QWEN25_7B)
    work = workload(config, 256)
    expected = estimate(specs, work)
    rollout, update = config.prompts_per_step * config.group_size, config.micro_batch_size or config.minibatch_size
    configured = {
        "generate": config.generate_micro_batch_size or rollout, "score": config.score_micro_batch_size or rollout,
        "update_policy": update, "update_critic": update,
    }  # fmt: skip
    assert list(data["phases"]) == list(expected) == PPO_PHASES
    assert data["bytes_moved_per_step"] == 0
    checkpointing = {"policy": config.policy_gradient_checkpointing, "critic": config.critic_gradient_checkpointing}
    assert data["checkpointing"] == checkpointing
    for phase, entry in data["phases"].items():
        assert entry["micro_batch"] == configured[phase]
        assert entry["peak_bytes"] == expected[phase].peak_bytes
        for role, placed in entry["roles"].items():
            assert placed["residency"] == ("adapter" if role == "reference" and config.lora_rank else "device")
            assert placed["bytes"] == expected[phase].roles[role]


# -- --model forms -------------------------------------------------------------------------------
def test_model_is_a_folder_or_a_bare_config_json(tmp_path, capsys):
    folder = tmp_path / "qwen"
    folder.mkdir()
    write(folder / "config.json", json.dumps(QWEN25_7B))
    bare = write(tmp_path / "bare.json", json.dumps(QWEN25_7B))
    config = write(tmp_path / "fits.yaml", FITS)
    outputs = []
    for model in (str(folder), bare):
        code, out, err = run(ppo(model, config, "--json"), capsys)
        assert code == 0, err
        outputs.append(json.loads(out))
    assert outputs[0] == outputs[1]
    assert outputs[0]["phases"]["generate"]["roles"]["policy"]["bytes"]["weights"] > 0


# -- bad input -----------------------------------------------------------------------------------
def missing(field: str) -> str:
    return json.dumps({k: v for k, v in QWEN25_7B.items() if k != field})


@pytest.mark.parametrize("case, match", [
    ("no-hidden-size", "'hidden_size'"),
    ("unknown-model-type", "model_type 'gpt2' is not supported"),
    ("budget-below-context", "not larger than the CUDA context"),
    ("unknown-config-field", r"unknown RLConfig field\(s\) \['lora_ranks'\]"),
    ("ppo-without-reward-model", "--algo ppo needs --reward-model"),
    ("algo-sft", "invalid choice: 'sft'"),
    ("unknown-gpu", "--gpu must be one of"),
    ("bad-gpu-memory", "--gpu-memory must be a size"),
    ("no-config-json", "no config.json there"),
])  # fmt: skip
def test_bad_input_exits_2_naming_the_problem(case, match, qwen, tmp_path, capsys):
    config = write(tmp_path / "fits.yaml", FITS)
    args = {
        "no-hidden-size": ppo(write(tmp_path / "no_hidden.json", missing("hidden_size")), config),
        "unknown-model-type": ppo(write(tmp_path / "gpt2.json", json.dumps({**QWEN25_7B, "model_type": "gpt2"})), config),
        "budget-below-context": ppo(qwen, config, "--gpu-memory", "512MiB"),
        "unknown-config-field": ppo(qwen, write(tmp_path / "bad.yaml", "lora_ranks: 4\n")),
        "ppo-without-reward-model": ["--algo", "ppo", "--model", qwen, "--config", config],
        "algo-sft": ["--algo", "sft", "--model", qwen],
        "unknown-gpu": ppo(qwen, config, "--gpu", "v100"),
        "bad-gpu-memory": ppo(qwen, config, "--gpu-memory", "lots"),
        "no-config-json": ppo(str(tmp_path / "nowhere"), config),
    }[case]
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    assert re.search(match, err), err


# -- --gpus: per rank under FSDP2, and the fewest GPUs -------------------------------------------
# README's worked example: GRPO on a Qwen2.5-7B-shaped policy, full bf16 fine-tuning, 32 prompts x 8
# samples of 512 + 1024 tokens: too large for one H100 even with offloading.
GRPO_7B = "prompts_per_step: 32\ngroup_size: 8\nmax_new_tokens: 1024\nminibatch_size: 64\ndtype: bf16\n"


def grpo(model: str, config: str, *extra: str) -> list[str]:
    return ["--algo", "grpo", "--model", model, "--config", config, "--gpu", "h100-80gb", *extra]


def test_gpus_n_prints_rank_zeros_plan_with_fsdp_buffers_and_the_fewest_gpus(qwen, tmp_path, capsys):
    from rlhf_engine.memory.fsdp import PER_RANK_KINDS, Sharding, estimate_per_rank, per_rank_workload
    from rlhf_engine.memory.plan import fewest_gpus
    from rlhf_engine.memory.run_specs import plan_options

    path = write(tmp_path / "grpo.yaml", GRPO_7B)
    code, out, _ = run(grpo(qwen, path, "--gpus", "8", "--json"), capsys)
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["gpus"] == 8 and data["frozen"] == "replicate"
    # The JSON is the per-rank estimate of independently built specs at the chosen micro-batches,
    # and its fewest GPUs the planner's own answer for them (more than one: it does not fit one).
    config = load_config("grpo", path)
    specs, work = role_specs("grpo", config, QWEN25_7B), per_rank_workload(workload(config, 512), 8)
    fewest = fewest_gpus(specs, workload(config, 512), data["budget_bytes"], plan_options(config, offload=True))
    assert data["fewest_gpus"] == fewest.gpus and fewest.gpus > 1
    for phase, entry in data["phases"].items():
        field = {"generate": "generate_micro_batch", "score": "score_micro_batch"}.get(phase, "update_micro_batch")
        local = dataclasses.replace(work, **{field: entry["micro_batch"]}, lm_head_chunk_rows=entry.get("lm_head_chunk_rows"))
        expected = estimate_per_rank(specs, local, Sharding(8, "replicate"), phases=(phase,))[phase]
        assert entry["peak_bytes"] == expected.peak_bytes
        assert {r: e["bytes"] for r, e in entry["roles"].items()} == expected.roles
        assert {r: e["residency"] for r, e in entry["roles"].items()} == {"policy": "sharded", "reference": "replicated"}
    code, text, _ = run(grpo(qwen, path, "--gpus", "8"), capsys)
    assert code == 0 and "8 GPUs with FSDP2, bytes per rank (rank 0)" in text
    for header, rows in table_sections(text).values():
        assert header == ["role", "residency", *PER_RANK_KINDS, "total"] and sorted(rows) == ["policy", "reference"]
    assert f"fewest GPUs: {data['fewest_gpus']} " in text


def test_the_fewest_gpus_fit_and_one_fewer_world_size_does_not(qwen, tmp_path, capsys):
    path = write(tmp_path / "grpo.yaml", GRPO_7B)
    code, out, _ = run(grpo(qwen, path, "--gpus", "auto", "--json"), capsys)
    data = json.loads(out)
    fewest = data["fewest_gpus"]
    assert code == 0 and data["fits"] and data["gpus"] == fewest > 1
    smaller = max(d for d in range(1, fewest) if 32 % d == 0)  # the next world size down that divides the step
    code, out, _ = run(grpo(qwen, path, "--gpus", str(smaller), "--json"), capsys)
    below = json.loads(out)
    assert code == 1 and not below["fits"] and below["fewest_gpus"] == fewest
    assert {"gpus": fewest} in [s["change"] for s in below["suggestions"]]
    code, text, _ = run(grpo(qwen, path), capsys)  # the default: one GPU, today's output
    assert code == 1 and "fewest GPUs" not in text and f"  - {fewest} GPUs with FSDP2" in text


def test_gpus_auto_exits_1_when_no_world_size_fits(qwen, tmp_path, capsys):
    path = write(tmp_path / "grpo.yaml", GRPO_7B)
    code, out, _ = run(["--algo", "grpo", "--model", qwen, "--config", path, "--gpu-memory", "4GiB", "--gpus", "auto", "--json"], capsys)
    data = json.loads(out)
    assert code == 1 and not data["fits"] and "fewest_gpus" not in data and data["gpus"] == 32


@pytest.mark.parametrize("value, config, match", [
    ("0", GRPO_7B, r"--gpus must be a number of GPUs >= 1 or 'auto', got '0'"),
    ("two", GRPO_7B, r"--gpus must be a number of GPUs >= 1 or 'auto', got 'two'"),
    ("3", GRPO_7B, r"--gpus 3 does not divide prompts_per_step = 32: each rank takes whole prompt groups"),
    ("16", GRPO_7B.replace("minibatch_size: 64", "minibatch_size: 24"), r"--gpus 16 does not divide minibatch_size = 24"),
    ("2", GRPO_7B + "generate_micro_batch_size: 8\n", r"RLConfig.generate_micro_batch_size = 8.*set it to null"),
])  # fmt: skip
def test_bad_gpus_exit_2_naming_the_flag_and_field(value, config, match, qwen, tmp_path, capsys):
    code, out, err = run(grpo(qwen, write(tmp_path / "grpo.yaml", config), "--gpus", value), capsys)
    assert code == 2 and out == ""
    assert re.search(match, err), err
