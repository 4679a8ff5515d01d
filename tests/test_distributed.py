"""Data-parallel training on FSDP2 under torchrun (CPU, gloo, 2 processes).

Each algorithm runs on the built-in tiny model: 2 ranks against 1 process on the same global
batch, resume from a sharded checkpoint at 2 ranks and at 1, the exported model loaded by
plain ``transformers``, and the world-size errors raised before any model is loaded.

Tolerance: the 2-rank run sums the same fp32 terms in another order (each rank's partial sums
of the loss and of the gradients, then an all-reduce / a reduce-scatter), so its parameters
differ from the single process's by rounding: about 1e-7 after a few AdamW steps here. The
tests allow ``ATOL`` = 1e-5 and check that training moved the parameters by far more than
that (a rank training on the wrong rows, or a normalizer off by the world size, moves them
by ~1e-3 differently).
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
TIMEOUT_S = 240

SFT = [{"prompt": "ab", "response": "ba"}, {"prompt": "cba", "response": "abc"}, {"prompt": "ca", "response": "ac"}]
PAIRS = [
    {"prompt": "ab", "chosen": "ab", "rejected": "ba"},
    {"prompt": "cba", "chosen": "abc", "rejected": "cab"},
    {"prompt": "ca", "chosen": "ac", "rejected": "c"},
]

RANKINGS = [{"prompt": "ab", "responses": ["ab", "ba", "b"]}, {"prompt": "cba", "responses": ["abc", "cab"]}]
PROMPTS = [{"prompt": "ab"}, {"prompt": "cba"}, {"prompt": "ca"}]
# 4 prompts of 2 ranks: 2 whole groups per rank. GRPO: an on-policy update (one minibatch of
# all 16 rows) in micro-batches of 4 with an entropy bonus; PPO: 2 epochs of 2 minibatches of 4
# (2 rows per rank each) for the policy and the critic, with an adaptive KL coefficient (state
# a resume must restore).
GRPO = "prompts_per_step: 4\ngroup_size: 4\nmax_new_tokens: 3\nminibatch_size: 16\nmicro_batch_size: 4\nentropy_coef: 0.01\n"
PPO = "prompts_per_step: 4\ngroup_size: 2\nmax_new_tokens: 3\nminibatch_size: 4\nepochs: 2\nkl_target: 0.1\n"
LORA = "lora_rank: 4\npolicy_gradient_checkpointing: true\nlr: 0.01\n"
RL_METRICS = ("reward_mean", "kl", "reward_std", "entropy", "policy_loss", "grad_norm", "approx_kl", "kl_coef", "response_length")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def torchrun_of_one():
    """This process as rank 0 of a 1-process torchrun launch (``--nproc-per-node 1``): the FSDP2
    path, in process; ``run_train`` joins and leaves the process group itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}.items():  # fmt: skip
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    """A reward model trained for 3 steps (continuous scores: the advantages are not all 0)."""
    root = tmp_path_factory.mktemp("rm")
    data, config = jsonl(root / "pairs.jsonl", PAIRS), write(root / "rm.yaml", "steps: 3\nbatch_size: 4\n")
    assert main(["train", *train_args("rm", data, config, root / "out")]) == 0
    return str(root / "out" / "model")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def jsonl(path: Path, records: list) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def launch(nproc: int, *args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    """``rlhf-engine train ... --nproc N`` (or ``torchrun ... -m rlhf_engine.cli train``) in a
    subprocess importing this tree; the ranks' output is shown when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "rlhf_engine.cli", "train", *args]  # fmt: skip
    else:
        command = [sys.executable, "-m", "rlhf_engine.cli", "train", *args, "--nproc", str(nproc)]
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(command)} ran past {TIMEOUT_S} s:\n{error.stdout}\n{error.stderr}")
    return done


def launch_ok(nproc: int, *args: str, torchrun: bool = False) -> None:
    done = launch(nproc, *args, torchrun=torchrun)
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def train_args(algo: str, data: str, config: str, out: Path, *extra: str) -> list[str]:
    return ["--algo", algo, "--model", "tiny", "--data", data, "--config", config, "--out", str(out), "--quiet",
            "--device", "cpu", *extra]  # fmt: skip


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(got: Path, want: Path, start: dict[str, torch.Tensor]) -> None:
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    moved = max(float((b[k] - start[k]).abs().max()) for k in b)
    assert moved > 100 * ATOL, f"training moved the weights by {moved} only: the comparison would prove nothing"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0, msg=lambda m: f"{k}: {m}")


def assert_same_metrics(got: Path, want: Path, keys: tuple[str, ...]) -> None:
    """``got``'s log equals the first steps of ``want``'s (all of them when ``got`` ran them all)."""
    a, b = metrics(got), metrics(want)
    assert [r["step"] for r in a] == [r["step"] for r in b][: len(a)] and a
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (x["step"], k, x[k], y[k])


def initial_weights(tmp_path: Path, data: str) -> dict[str, torch.Tensor]:
    """The tiny model's starting weights (a 0-step SFT run exports them)."""
    out = tmp_path / "init"
    assert main(["train", *train_args("sft", data, write(tmp_path / "zero.yaml", "steps: 0\nbatch_size: 2\n"), out)]) == 0
    return weights(out)


def check_two_ranks_and_resume(tmp_path: Path, algo: str, data: str, head: str, steps: int, stop: int,
                               metric_keys: tuple[str, ...], init: dict[str, torch.Tensor], *extra: str,
                               resume_at_two: bool = True) -> tuple[str, str]:  # fmt: skip
    """1 process for ``steps`` steps; 2 ranks stopped after ``stop`` steps (sharded checkpoint),
    then resumed at 2 ranks (``resume_at_two``) and, from a copy, in 1 process: all end with the
    same weights, the 2-rank log equals the single process's (global metrics). Returns the
    configs (stopped, full)."""
    full = write(tmp_path / "full.yaml", f"{head}steps: {steps}\n")
    part = write(tmp_path / "part.yaml", f"{head}steps: {stop}\n")
    single, two = tmp_path / "single", tmp_path / "two"
    assert main(["train", *train_args(algo, data, full, single, *extra)]) == 0
    # the single process took the plain path: no process group, its own checkpoint format
    assert not torch.distributed.is_initialized()
    assert not (single / "checkpoints" / f"step-{steps - 1:08d}" / ".metadata").exists()
    launch_ok(2, *train_args(algo, data, part, two, *extra))
    assert (two / "checkpoints" / f"step-{stop - 1:08d}" / ".metadata").is_file()  # sharded (DCP)
    assert sorted(p.name for p in (two / "checkpoints" / f"step-{stop - 1:08d}").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(two, tmp_path / "two-stopped")
    one = tmp_path / "resumed-at-1"
    shutil.copytree(two, one)
    if resume_at_two:
        launch_ok(2, *train_args(algo, data, full, two, "--resume", *extra), torchrun=True)
        assert_same_weights(two, single, init)
    assert_same_metrics(two, single, metric_keys)
    assert main(["train", *train_args(algo, data, full, one, "--resume", *extra)]) == 0
    assert_same_weights(one, single, init)
    assert [r["step"] for r in metrics(one)] == list(range(steps))
    return part, full


def test_sft_two_ranks_match_one_process_and_resume_at_two_and_one(tmp_path):
    from transformers import AutoModelForCausalLM

    data = jsonl(tmp_path / "sft.jsonl", SFT)
    init = initial_weights(tmp_path, data)
    _, full = check_two_ranks_and_resume(tmp_path, "sft", data, "batch_size: 4\n", 5, 3, ("loss", "tokens", "grad_norm"), init)
    # and at one rank under torchrun (FSDP2, world size 1, in process) from the same 2-rank checkpoint
    fsdp_one = tmp_path / "resumed-at-1-under-torchrun"
    shutil.copytree(tmp_path / "two-stopped", fsdp_one)
    with torchrun_of_one():
        assert main(["train", *train_args("sft", data, full, fsdp_one, "--resume")]) == 0
    assert_same_weights(fsdp_one, tmp_path / "single", init)
    # The model the 2 ranks gathered is a plain Hugging Face folder, and the --model of a later run.
    out = tmp_path / "two"
    lm = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    saved = weights(out)
    assert "lm_head.weight" not in saved  # tied to the embeddings: stored once, as PolicyModel.save does
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    for name, tensor in lm.state_dict().items():
        torch.testing.assert_close(tensor, saved.get(name, saved["model.embed_tokens.weight"]), atol=0, rtol=0)
    later = train_args("sft", data, write(tmp_path / "later.yaml", "steps: 1\nbatch_size: 2\n"), tmp_path / "later")
    later[later.index("tiny")] = str(out / "model")
    assert main(["train", *later]) == 0


def test_dpo_two_ranks_under_torchrun_match_one_process(tmp_path):
    data = jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = write(tmp_path / "dpo.yaml", "steps: 3\nbatch_size: 4\nnll_coef: 0.5\n")
    single, two = tmp_path / "single", tmp_path / "two"
    assert main(["train", *train_args("dpo", data, config, single)]) == 0
    launch_ok(2, *train_args("dpo", data, config, two), torchrun=True)
    assert_same_weights(two, single, initial_weights(tmp_path, jsonl(tmp_path / "sft.jsonl", SFT)))
    assert_same_metrics(two, single, ("loss", "chosen_reward", "reward_margin", "nll_loss", "grad_norm"))


def test_reward_model_on_rankings_two_ranks_match_one_process(tmp_path):
    """InstructGPT's K-choose-2 loss on rankings of 3 and 2 responses (each rank scores its own
    records' responses: different row counts, one forward each); the gathered export is the
    sequence-classification folder ``ScalarHeadModel.save`` writes."""
    from transformers import AutoModelForSequenceClassification

    data = jsonl(tmp_path / "rankings.jsonl", RANKINGS)
    config = write(tmp_path / "rm.yaml", "steps: 3\nbatch_size: 4\n")
    single, two = tmp_path / "single", tmp_path / "two"
    assert main(["train", *train_args("rm", data, config, single)]) == 0
    launch_ok(2, *train_args("rm", data, config, two), torchrun=True)
    a, b = weights(two), weights(single)
    assert a.keys() == b.keys() and "score.weight" in a
    assert float(b["score.weight"].abs().max()) > 100 * ATOL  # the head starts at 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0, msg=lambda m: f"{k}: {m}")
    assert_same_metrics(two, single, ("loss", "accuracy", "margin", "grad_norm"))
    scorer = AutoModelForSequenceClassification.from_pretrained(two / "model", local_files_only=True)
    torch.testing.assert_close(scorer.score.weight.detach(), a["score.weight"], atol=0, rtol=0)


def test_grpo_with_lora_and_checkpointing_two_ranks_match_one_process(tmp_path, reward_model):
    """LoRA (peft layers inside the FSDP units; the reference is the adapter-disabled sharded
    policy; the export merges the gathered adapters) with gradient checkpointing (each
    checkpointed layer all-gathered again for its recompute). Full fine-tuning of RL roles:
    the PPO test."""
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    config = write(tmp_path / "grpo.yaml", f"{GRPO}steps: 3\n{LORA}")
    single, two = tmp_path / "single", tmp_path / "two"
    extra = ("--reward-model", reward_model)
    assert main(["train", *train_args("grpo", data, config, single, *extra)]) == 0
    launch_ok(2, *train_args("grpo", data, config, two, *extra), torchrun=True)
    assert_same_weights(two, single, initial_weights(tmp_path, jsonl(tmp_path / "sft.jsonl", SFT)))
    assert_same_metrics(two, single, RL_METRICS + ("logprob_gap_max",))
    # rank 0 alone writes the samples of the global rollout: those the single process wrote
    got, want = ([json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()] for out in (two, single))
    assert [(s["step"], s["prompt"], s["completion"]) for s in got] == [(s["step"], s["prompt"], s["completion"]) for s in want]
    assert [s["reward"] for s in got] == pytest.approx([s["reward"] for s in want], rel=1e-4, abs=1e-5)
    assert (two / "curves.png").is_file()


def test_ppo_with_a_critic_two_ranks_match_one_process_and_resume_at_one(tmp_path, reward_model):
    """2 ranks for 2 steps (their log equals the single process's), resumed in one process from
    the sharded checkpoint to step 4 (the weights equal the single process's). The critic is
    sharded and checkpointed too: GAE reads its values, so a critic that trained or resumed
    differently changes the policy's updates (and ``value_loss``). Resume at 2 ranks: the SFT test."""
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    check_two_ranks_and_resume(tmp_path, "ppo", data, PPO, 4, 2, RL_METRICS + ("value_loss", "explained_variance"),
                               initial_weights(tmp_path, jsonl(tmp_path / "sft.jsonl", SFT)), "--reward-model", reward_model,
                               resume_at_two=False)  # fmt: skip


def test_ppo_with_sharded_frozen_roles_two_ranks_match_one_process(tmp_path, reward_model):
    """frozen_sharding "shard": the reference and the reward model are FSDP2 units too (each
    score pass all-gathers them layer by layer, and their roots are resharded after it); the
    update equals the single process's (which has no sharding to choose)."""
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    config = write(tmp_path / "ppo.yaml", f"{PPO}steps: 2\nfrozen_sharding: shard\n")
    single, two = tmp_path / "single", tmp_path / "two"
    extra = ("--reward-model", reward_model)
    assert main(["train", *train_args("ppo", data, config, single, *extra)]) == 0
    launch_ok(2, *train_args("ppo", data, config, two, *extra))
    assert_same_weights(two, single, initial_weights(tmp_path, jsonl(tmp_path / "sft.jsonl", SFT)))
    assert_same_metrics(two, single, RL_METRICS + ("value_loss",))


def test_frozen_roles_shard_on_the_mesh_and_reshard_after_scoring(monkeypatch):
    """In one process under torchrun (a mesh of one rank): with frozen_sharding "shard" the
    frozen roles are FSDP2 modules whose parameters are DTensors, and after score their roots
    hold the sharded parameters again (not the gathered ones FSDP leaves after a forward)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from rlhf_engine.algos.rl import RLConfig, RLTrainer
    from rlhf_engine.distributed.group import destroy_process_group, init_process_group
    from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config

    with torchrun_of_one():
        parallel = init_process_group(torch.device("cpu"))
        try:
            model_config = llama_config("tiny", vocab_size=16)
            policy = PolicyModel.from_config(model_config, seed=0)
            reference = PolicyModel.from_config(model_config, seed=1)
            reward = ScalarHeadModel.from_config(model_config, seed=2)
            config = RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=2, frozen_sharding="shard")
            trainer = RLTrainer(config, policy=policy, reference=reference, prompts=lambda n, g: [[1, 2]] * n,
                                pad_token_id=0, eos_token_id=3, reward_model=reward, parallel=parallel)  # fmt: skip
            for model in (trainer.reference, trainer.reward_model):
                assert isinstance(model, FSDPModule) and all(isinstance(p, DTensor) for p in model.parameters())
                assert not any(p.requires_grad for p in model.parameters())
            rollout = trainer.generate(0)
            trainer.score(rollout)
            for model in (trainer.reference, trainer.reward_model):
                assert all(isinstance(p, DTensor) for p in model.parameters()), "a frozen root stayed gathered"
        finally:
            destroy_process_group()


def test_plan_auto_under_torchrun_is_rank_0s_plan_and_places_the_frozen_roles():
    """``plan_run`` at world size 2 (what every rank runs before loading, ``--plan auto`` on
    CUDA; only the budget is read, so a CUDA device object serves here): the per-rank plan's
    micro-batches, each rank sampling its share at once, and the frozen reference replicated
    while it fits, sharded at the smallest budget that fits only that way; too small a budget
    is refused naming the world size."""
    from rlhf_engine.models.tokenizers import load_tokenizer
    from rlhf_engine.train import load_config, plan_run

    tokenizer, records, cuda = load_tokenizer("small"), [{"prompt": [1] * 64}], torch.device("cuda")
    config = load_config("grpo", None)

    def planned(mib: int):
        return plan_run("grpo", config, "small", tokenizer, records, None, cuda, "auto", f"{mib}MiB", world_size=2)

    roomy, chosen = planned(80 * 1024)
    assert chosen.gpus == 2 and chosen.frozen == "replicate" and roomy.frozen_sharding == "replicate"
    assert roomy.generate_micro_batch_size is None and roomy.micro_batch_size == chosen.micro_batches["update_policy"]
    fitting = []
    for mib in range(1025, 4096):  # from just over the CUDA context up, a MiB at a time
        try:
            fitting.append((mib, *planned(mib)))
            break
        except ValueError as error:
            assert "does not fit 2 GPUs" in str(error) or "CUDA context" in str(error), error
    (mib, tight, chosen), = fitting
    assert tight.frozen_sharding == chosen.frozen == "shard", f"at {mib} MiB the plan keeps the reference {chosen.frozen}"


def test_a_crash_mid_save_leaves_the_last_checkpoint_and_resume_at_one_rank_reproduces_the_run(tmp_path, monkeypatch):
    """Under torchrun with one rank (FSDP2, world size 1, in process): the save of step 2 dies after
    writing part of its shards; ``latest`` still names step 1, no step-2 folder is visible, and
    ``--resume`` (again FSDP2 at one rank) ends where the uninterrupted single process ends."""
    import torch.distributed.checkpoint as dcp

    from rlhf_engine.distributed.group import current
    from rlhf_engine.train import run_train

    data = jsonl(tmp_path / "sft.jsonl", SFT)
    config = write(tmp_path / "c.yaml", "steps: 4\nbatch_size: 2\n")
    single, out = tmp_path / "single", tmp_path / "out"
    real_save, saves = dcp.save, []

    def dying_save(state, *, checkpoint_id):
        saves.append(checkpoint_id)
        if len(saves) == 3:
            Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
            raise RuntimeError("killed mid-save")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", dying_save)
    with torchrun_of_one(), pytest.raises(RuntimeError, match="killed mid-save"):
        run_train("sft", "tiny", data, out, config_path=config, checkpoint_every=1, quiet=True)
    assert current().distributed is False  # the process group was left
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000001"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000000", "step-00000001"]
    assert (checkpoints / "step-00000001" / ".metadata").is_file()  # written by the FSDP2 path (DCP)
    monkeypatch.setattr(dcp, "save", real_save)
    with torchrun_of_one():
        run_train("sft", "tiny", data, out, config_path=config, checkpoint_every=1, quiet=True, resume=True)
    assert not (checkpoints / ".tmp-step-00000002").exists()
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3]
    assert main(["train", *train_args("sft", data, config, single)]) == 0
    assert_same_weights(out, single, initial_weights(tmp_path, data))


def test_bf16_under_torchrun_is_fsdp_mixed_precision_with_fp32_masters(tmp_path, reward_model):
    """``dtype: bf16`` at one FSDP rank (in process), PPO with its critic: the passes compute in bf16
    (``MixedPrecisionPolicy``), the sharded parameters (the masters) and so the export stay fp32.
    Not compared with the single process's bf16 run: that one rounds its gradients in bf16 before
    moving them to its masters, FSDP reduces them in fp32, so the sampled responses soon differ."""
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    config = write(tmp_path / "bf16.yaml", f"{PPO}steps: 2\ndtype: bf16\n")
    out = tmp_path / "out"
    with torchrun_of_one():
        assert main(["train", *train_args("ppo", data, config, out, "--reward-model", reward_model)]) == 0
    saved, init = weights(out), initial_weights(tmp_path, jsonl(tmp_path / "sft.jsonl", SFT))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert max(float((saved[k] - init[k]).abs().max()) for k in init) > 1e-3
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) and torch.isfinite(torch.tensor(r["value_loss"])) for r in metrics(out))


def test_sampling_keeps_the_sharded_layers_gathered_for_the_whole_rollout():
    """Inside ``DataParallel.unsharded`` a decoder layer's parameters stay the gathered (plain)
    tensors after each forward, so a rollout all-gathers each layer once, not once per decode
    step; on exit they are sharded (DTensors) again. Outside it, every forward reshards."""
    from torch.distributed.tensor import DTensor

    from rlhf_engine.algos.common import sample_responses
    from rlhf_engine.distributed.group import destroy_process_group, init_process_group
    from rlhf_engine.models import PolicyModel, llama_config
    from rlhf_engine.models.tokenizers import ByteTokenizer
    from rlhf_engine.rollout import SamplingConfig

    tok = ByteTokenizer()
    config = llama_config("tiny", tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torchrun_of_one():
        parallel = init_process_group(torch.device("cpu"))
        try:
            policy = parallel.shard(PolicyModel.from_config(config, seed=0))
            layer = policy.lm.model.layers[0]
            sample = lambda: sample_responses(policy, [[1, 5, 6]], 2, sampling, torch.Generator().manual_seed(0),  # noqa: E731
                                              parallel=parallel, prompt_width=3)  # fmt: skip
            plain = sample()
            assert isinstance(layer.self_attn.q_proj.weight, DTensor)  # resharded after every forward
            with parallel.unsharded(policy):
                gathered = sample()
                assert not isinstance(layer.self_attn.q_proj.weight, DTensor)
            assert isinstance(layer.self_attn.q_proj.weight, DTensor)
            assert torch.equal(plain.response_ids, gathered.response_ids)
        finally:
            destroy_process_group()


def test_decode_steps_run_without_fsdp_hooks_once_the_units_are_gathered():
    """Inside ``DataParallel.unsharded`` the prefill goes through FSDP (it gathers every unit);
    the decode steps after it run the units as plain modules (no FSDP pre-forward: it has
    nothing left to gather, and costs host time per unit and step), give the logits of the
    unsharded model, and leave FSDP's hooks where they were."""
    from torch.profiler import profile

    from rlhf_engine.distributed.group import destroy_process_group, init_process_group
    from rlhf_engine.distributed.sharding import gathered
    from rlhf_engine.models import PolicyModel, llama_config

    def fsdp_forwards(run) -> tuple[int, object]:
        with profile() as prof:
            out = run()
        return sum(e.name.startswith("FSDP::pre_forward") for e in prof.events()), out

    config = llama_config("tiny", vocab_size=16)
    ids = torch.tensor([[0, 4, 5, 6], [3, 7, 8, 9]])
    mask = ids != 0
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step_ids, step_positions = torch.tensor([[10], [11]]), positions[:, -1:] + 1
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    plain = PolicyModel.from_config(config, seed=0)
    want, cache = plain.next_token_logits(ids, mask, positions, None)
    want_step, _ = plain.next_token_logits(step_ids, step_mask, step_positions, cache)
    with torchrun_of_one():
        parallel = init_process_group(torch.device("cpu"))
        try:
            policy = parallel.shard(PolicyModel.from_config(config, seed=0))
            hooks = [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in policy.modules()]
            with torch.no_grad():
                calls, _ = fsdp_forwards(lambda: policy.next_token_logits(ids, mask, positions, None))
                assert calls > 0 and not gathered(policy)  # outside: every forward reshards its layers
                with parallel.unsharded(policy):
                    calls, (logits, cache) = fsdp_forwards(lambda: policy.next_token_logits(ids, mask, positions, None))
                    assert calls > 0 and gathered(policy)  # the prefill gathered every unit
                    calls, (step, _) = fsdp_forwards(lambda: policy.next_token_logits(step_ids, step_mask, step_positions, cache))
                    assert calls == 0
                assert not gathered(policy)
                calls, _ = fsdp_forwards(lambda: policy.next_token_logits(ids, mask, positions, None))
                assert calls > 0  # FSDP's hooks and forward method are back
            assert [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in policy.modules()] == hooks
            torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
            torch.testing.assert_close(step, want_step, rtol=0, atol=1e-6)
        finally:
            destroy_process_group()


def test_a_torchrun_resume_from_a_single_process_checkpoint_is_a_clear_error(tmp_path, capsys):
    data = jsonl(tmp_path / "sft.jsonl", SFT)
    config = write(tmp_path / "c.yaml", "steps: 2\nbatch_size: 2\n")
    assert main(["train", *train_args("sft", data, config, tmp_path / "out")]) == 0
    with torchrun_of_one():
        assert main(["train", *train_args("sft", data, config, tmp_path / "out", "--resume")]) == 2
    assert "is a single-process checkpoint; a torchrun run resumes from sharded ones only" in capsys.readouterr().err


@pytest.mark.parametrize("algo, records, text, words", [
    ("sft", SFT, "batch_size: 3\n", ["SFTConfig.batch_size = 3", "2 ranks", "multiple of 2", "[1, 3]"]),
    ("dpo", PAIRS, "batch_size: 5\n", ["DPOConfig.batch_size = 5", "2 ranks"]),
    ("rm", PAIRS, "batch_size: 7\n", ["RewardModelConfig.batch_size = 7", "2 ranks"]),
    ("grpo", [{"prompt": "ab", "answer": ""}], "prompts_per_step: 3\ngroup_size: 4\n",
     ["RLConfig.prompts_per_step = 3", "2 ranks", "whole groups of group_size = 4"]),
    ("grpo", [{"prompt": "ab", "answer": ""}], "prompts_per_step: 4\ngroup_size: 4\nminibatch_size: 5\n",
     ["RLConfig.minibatch_size = 5", "2 ranks"]),
])  # fmt: skip
def test_a_world_size_that_does_not_split_the_batch_fails_before_any_model_loads(algo, records, text, words, tmp_path,
                                                                                 monkeypatch, capsys):  # fmt: skip
    """Under the torchrun environment of rank 0 of 2 (in this process): the error names the field,
    the world size and what would divide, before the process group is joined or a model read."""
    import rlhf_engine.train as train

    def must_not_run(*args, **kwargs):
        raise AssertionError("reached past the world-size check")

    for name in ("init_process_group", "load_policy", "load_tokenizer", "load_records"):
        monkeypatch.setattr(train, name, must_not_run)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    data = jsonl(tmp_path / "data.jsonl", records)
    assert main(["train", *train_args(algo, data, write(tmp_path / "c.yaml", text), tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "out").exists()


def test_nproc_checks_the_world_size_before_launching(tmp_path, capsys):
    data = jsonl(tmp_path / "sft.jsonl", SFT)
    assert main(["train", *train_args("sft", data, write(tmp_path / "c.yaml", "batch_size: 4\n"), tmp_path / "out"), "--nproc", "3"]) == 2
    assert "SFTConfig.batch_size = 4 does not split over 3 ranks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
