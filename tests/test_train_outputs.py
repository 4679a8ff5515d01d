"""What ``train`` writes beside the model: ``samples.jsonl`` (--log-samples), ``curves.png``,
and ``--quiet`` silencing transformers' loading bars; the samples an RLTrainer keeps."""

import json
import shutil

import pytest
import torch

from rlhf_engine.algos.grpo import grpo_config
from rlhf_engine.algos.rl import RLTrainer
from rlhf_engine.curves import write_curves
from rlhf_engine.models import PolicyModel, llama_config
from rlhf_engine.models.tokenizers import ByteTokenizer
from rlhf_engine.train import run_train
from tests.test_runlog_plot import decode_png
from tests.test_train import ANSWERS, GROUPED, SFT, metrics, train, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("outputs-data")
    (root / "grouped.yaml").write_text(GROUPED)
    (root / "offline.yaml").write_text("steps: 2\nbatch_size: 4\n")
    return {"answers": write_jsonl(root / "answers.jsonl", ANSWERS), "sft": write_jsonl(root / "sft.jsonl", SFT),
            "grouped": str(root / "grouped.yaml"), "offline": str(root / "offline.yaml")}  # fmt: skip


def samples(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_rl_trainer_keeps_k_samples_of_the_step_spread_over_the_rollout():
    tok = ByteTokenizer()
    config = llama_config("tiny", tok.vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    policy = PolicyModel.from_config(config, seed=0)
    prompts = [[1, 10], [1, 20, 21], [1, 30], [1, 40, 41, 42]]

    def reward(p, r):  # depends on both, so a mismatched pair would show
        return torch.tensor([float(len(x) + 3 * (y[0] % 2)) for x, y in zip(p, r)])

    trainer = RLTrainer(grpo_config(steps=1, prompts_per_step=4, group_size=4, max_new_tokens=3, minibatch_size=16),
                        policy=policy, reference=PolicyModel.from_config(config, seed=0), pad_token_id=0, eos_token_id=2,
                        prompts=lambda n, g: prompts[:n], reward_fn=reward, log_samples=4)  # fmt: skip
    trainer.step(0)
    picked = trainer.samples
    assert [s["row"] for s in picked] == [0, 4, 8, 12]  # one per group of 4
    assert [s["prompt_ids"] for s in picked] == prompts
    for s in picked:
        assert s["reward"] == float(reward([s["prompt_ids"]], [s["response_ids"]]))
        assert 1 <= len(s["response_ids"]) <= 3 and isinstance(s["advantage"], float)
    trainer.log_samples = 16  # every row: each group's GRPO advantages sum to zero
    trainer.step(1)
    advantages = [s["advantage"] for s in trainer.samples]
    assert len(advantages) == 16
    for g in range(4):
        assert abs(sum(advantages[4 * g:4 * g + 4])) < 1e-5
    with pytest.raises(ValueError, match="log_samples must be an int >= 0"):
        RLTrainer(trainer.config, policy=policy, reference=PolicyModel.from_config(config, seed=0), pad_token_id=0,
                  eos_token_id=2, prompts=None, reward_fn=reward, log_samples=-1)  # fmt: skip


def test_pick_samples_of_token_advantages_is_the_mean_over_the_response():
    from rlhf_engine.algos.samples import pick_samples
    from rlhf_engine.rollout import Rollout

    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    rollout = Rollout(prompt_ids=torch.tensor([[0, 1, 5], [1, 6, 7], [0, 1, 8]]),
                      prompt_mask=torch.tensor([[False, True, True], [True, True, True], [False, True, True]]),
                      response_ids=torch.tensor([[9, 2, 0], [2, 0, 0], [10, 11, 2]]), response_mask=mask,
                      logprobs=torch.zeros(3, 3), scores=torch.tensor([0.5, -1.0, 2.0]))  # fmt: skip
    advantages = torch.tensor([[1.0, 3.0, 100.0], [-2.0, 100.0, 100.0], [0.0, 0.3, 0.6]])  # 100: masked, never counted
    picked = pick_samples(rollout, advantages, 2)
    assert [s["row"] for s in picked] == [0, 1]
    assert picked[0] == {"row": 0, "prompt_ids": [1, 5], "response_ids": [9, 2], "reward": 0.5, "advantage": 2.0}
    assert picked[1]["prompt_ids"] == [1, 6, 7] and picked[1]["advantage"] == -2.0
    everything = pick_samples(rollout, advantages, 10)  # more than the rollout holds: all of it
    assert [s["row"] for s in everything] == [0, 1, 2] and everything[2]["advantage"] == pytest.approx(0.3)


def test_train_logs_samples_with_their_rewards_and_writes_the_curves(files, tmp_path):
    assert train("grpo", files["answers"], files["grouped"], tmp_path, "--log-samples", "3") == 0
    lines = samples(tmp_path)
    assert [s["step"] for s in lines] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    answers = {r["prompt"]: r["answer"] for r in ANSWERS}
    for s in lines:
        assert set(s) == {"step", "prompt", "completion", "reward", "advantage"}
        assert s["prompt"] in answers  # decoded: the bos is dropped
        # the answer reward of this very completion: prompt, completion and reward belong together
        assert s["reward"] == float(s["completion"].strip() == answers[s["prompt"]].strip())
    # curves.png is the plot of metrics.jsonl
    assert metrics(tmp_path)[-1]["step"] == 2
    write_curves(tmp_path / "metrics.jsonl", tmp_path / "again.png")
    assert (tmp_path / "curves.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    assert decode_png((tmp_path / "curves.png").read_bytes()).shape[1] == 1400  # two columns


def test_log_samples_off_and_bad_values(files, tmp_path, capsys):
    assert train("grpo", files["answers"], files["grouped"], tmp_path / "off", "--log-samples", "0") == 0
    assert not (tmp_path / "off" / "samples.jsonl").exists()
    assert train("sft", files["sft"], files["offline"], tmp_path / "sft") == 0  # the default: nothing to sample
    assert not (tmp_path / "sft" / "samples.jsonl").exists() and (tmp_path / "sft" / "curves.png").is_file()
    capsys.readouterr()
    assert train("sft", files["sft"], files["offline"], tmp_path / "bad", "--log-samples", "2") == 2
    assert "--log-samples: --algo sft samples no completions" in capsys.readouterr().err
    assert train("grpo", files["answers"], files["grouped"], tmp_path / "bad", "--log-samples", "-1") == 2
    assert "--log-samples must be a number of samples >= 0" in capsys.readouterr().err


def test_resume_keeps_each_steps_samples_once(files, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("steps: 5\nprompts_per_step: 4\ngroup_size: 8\nmax_new_tokens: 1\nminibatch_size: 8\n")
    kwargs = dict(config_path=config, quiet=True, log_samples=2)
    run_train("grpo", "tiny", files["answers"], tmp_path / "whole", **kwargs)
    out = tmp_path / "out"
    run_train("grpo", "tiny", files["answers"], out, checkpoint_every=2, stop_after=4, **kwargs)
    # A crash during step 4 before its checkpoint: step 3's is gone, step 1's is the latest, and
    # samples.jsonl holds steps 2 and 3, which the resumed run does again.
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    (out / "checkpoints" / "latest").write_text("step-00000001")
    assert [s["step"] for s in samples(out)] == [0, 0, 1, 1, 2, 2, 3, 3]
    run_train("grpo", "tiny", files["answers"], out, checkpoint_every=2, resume=True, **kwargs)
    assert samples(out) == samples(tmp_path / "whole")


def test_quiet_silences_transformers_loading_bars(files, tmp_path, capsys):
    folder = tmp_path / "model"
    PolicyModel.from_config(llama_config("tiny", ByteTokenizer.vocab_size), seed=0).save(folder)
    ByteTokenizer().save(folder)
    capsys.readouterr()
    assert train("sft", files["sft"], files["offline"], tmp_path / "quiet", model=str(folder)) == 0  # --quiet
    assert capsys.readouterr().err == ""
    args = ["train", "--algo", "sft", "--model", str(folder), "--data", files["sft"], "--config", files["offline"],
            "--out", str(tmp_path / "loud")]  # fmt: skip
    from rlhf_engine.cli import main

    assert main(args) == 0
    assert "Loading weights" in capsys.readouterr().err  # what --quiet silenced
