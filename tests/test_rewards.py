"""User reward functions (``rlhf_engine.rewards``, ``train --reward-fn``): loading by file or
module with errors that name the flag, TRL 1.16's calling convention and its combination of
several functions (checked against TRL's own ``GRPOTrainer._calculate_rewards``), the record
of each scored row with duplicated prompts, unscorable completions as TRL treats them, the
README's example run, and rejection sampling from the command line."""

import dataclasses
import json
import math
import shlex
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_engine.algos.common import step_generator
from rlhf_engine.algos.rejection_sampling import RejectionSamplingConfig, RejectionSamplingTrainer
from rlhf_engine.algos.rl import RLConfig, RLTrainer
from rlhf_engine.cli import main
from rlhf_engine.distributed.batches import check_world_size
from rlhf_engine.models import PolicyModel, ScalarHeadModel
from rlhf_engine.models.tokenizers import ByteTokenizer
from rlhf_engine.rewards import (
    RecordSampler, RewardFunctionError, TextReward, check_scores, exact_match, load_reward_fn, reward_kwargs,
)  # fmt: skip
from rlhf_engine.rollout import Rollout
from rlhf_engine.train import load_records, run_train
from tests.test_train import assert_same_weights, metrics, tiny_init, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
GROUPED = "steps: 2\nprompts_per_step: 4\ngroup_size: 2\nmax_new_tokens: 2\nminibatch_size: 8\n"
REJECTION = "steps: 3\nprompts_per_step: 2\nsamples_per_prompt: 3\nkeep_top: 1\nmax_new_tokens: 2\n"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def records_of(tmp_path: Path, rows: list[dict]) -> list[dict]:
    return load_records("grpo", write_jsonl(tmp_path / "data.jsonl", rows), TOK)


# -- loading -------------------------------------------------------------------------------

def test_a_function_loads_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    write(tmp_path / "my_rewards.py", "def short(completions, **kw):\n    return [float(len(c) < 3) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    by_file = load_reward_fn("my_rewards.py:short")
    assert by_file(completions=["a", "abcd"]) == [1.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_reward_fn("my_rewards:short")
    assert by_module(completions=["abcd"]) == [0.0]
    assert load_reward_fn("rlhf_engine.rewards:exact_match") is exact_match


@pytest.mark.parametrize("spec,source,words", [
    ("rewards.py", None, "expected FILE.py:FUNCTION or MODULE:FUNCTION"),
    ("missing.py:fn", None, "no such file missing.py"),
    ("bad.py:fn", "import not_a_module_anywhere\n", "importing bad.py raised ModuleNotFoundError"),
    ("bad.py:fn", "raise RuntimeError('boom')\n", "importing bad.py raised RuntimeError: boom"),
    ("ok.py:nope", "def fn(**kw):\n    return []\n", "has no attribute 'nope' (its functions: ['fn'])"),
    ("ok.py:VALUE", "VALUE = 3\n", "is a int, not a function"),
    ("no_such_pkg.mod:fn", None, "no module named 'no_such_pkg'"),
])  # fmt: skip
def test_a_bad_spec_is_a_clear_error_naming_the_flag(spec, source, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        write(tmp_path / spec.partition(":")[0], source)
    with pytest.raises(ValueError, match="--reward-fn") as error:
        load_reward_fn(spec)
    assert words in str(error.value)


def test_the_cli_reports_a_bad_spec_before_loading_a_model(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab"}])
    assert main(["train", "--algo", "grpo", "--model", "no-such-model", "--data", data, "--reward-fn", "nope.py:fn",
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "--reward-fn 'nope.py:fn': no such file nope.py" in capsys.readouterr().err


# -- the returned scores -------------------------------------------------------------------

def test_scores_accept_numbers_none_and_scalars():
    values = [1, True, None, np.float32(0.5), np.int64(2), torch.tensor(0.25), 3.0]
    out = check_scores("f", values, len(values))
    assert out[:2] == [1.0, 1.0] and math.isnan(out[2]) and out[3:] == [0.5, 2.0, 0.25, 3.0]
    assert check_scores("f", np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    assert check_scores("f", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]


@pytest.mark.parametrize("values,words", [
    (0.5, "returned a float; expected a list of 2 floats"),
    ([1.0], "returned 1 rewards for 2 completions"),
    ([1.0, "high"], "returned 'high' (str) at completion 1"),
    ([1.0, float("nan")], "returned nan at completion 1; return None"),
    ([float("inf"), 1.0], "returned inf at completion 0"),
])  # fmt: skip
def test_bad_scores_name_the_function(values, words):
    with pytest.raises(ValueError, match="reward function length") as raised:
        check_scores("length", values, 2)
    assert words in str(raised.value)


def test_a_function_that_raises_is_named_with_its_own_error_chained(tmp_path):
    sampler = RecordSampler(records_of(tmp_path, [{"prompt": "ab"}]), per_prompt=1)
    prompts = sampler(1, torch.Generator().manual_seed(0))

    def broken(completions, **kwargs):
        return [1 / 0 for _ in completions]

    with pytest.raises(RewardFunctionError, match="reward function broken raised ZeroDivisionError") as raised:
        TextReward(TOK, [broken], sampler=sampler)(prompts, [[5]])
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


# -- TRL's convention ----------------------------------------------------------------------

def trl_rewards_per_func(fns, inputs, prompts, completions, completion_ids) -> torch.Tensor:
    """TRL 1.16's own ``GRPOTrainer._calculate_rewards`` on a stand-in trainer (one process)."""
    from accelerate import PartialState
    from trl import GRPOTrainer

    PartialState()  # TRL's warning for an unscorable row goes through accelerate's logger
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True), reward_funcs=fns,
        reward_processing_classes=[None] * len(fns), reward_func_names=[f.__name__ for f in fns],
        state=SimpleNamespace(global_step=0), args=SimpleNamespace(report_to=[]), _log_completion_extra=None,
        _log_metric=None, environments=None,
    )  # fmt: skip
    return GRPOTrainer._calculate_rewards(trainer, inputs, prompts, completions, completion_ids)


def recording(name: str, calls: list, result):
    """A reward function named ``name`` that appends the keywords it got to ``calls`` (TRL's
    trainer-only ones left out) and returns ``result(completions, fields)``."""
    def fn(prompts, completions, completion_ids, **fields):
        calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                      **{k: v for k, v in fields.items() if k not in ("trainer_state", "log_extra", "log_metric")}})  # fmt: skip
        return result(completions, fields)

    fn.__name__ = name
    return fn


def test_functions_get_what_trl_passes_and_combine_as_trl_sums_them(tmp_path):
    rows = [{"prompt": "ab", "answer": "x", "level": 1}, {"prompt": "ca", "answer": "y", "level": 2}]
    sampler = RecordSampler(records_of(tmp_path, rows), per_prompt=2)
    prompts = sampler(3, torch.Generator().manual_seed(1))
    drawn = [sampler.records[i] for i in sampler.drawn for _ in range(2)]
    responses = [[TOK.encode(t)[0], TOK.eos_token_id] for t in "pqrstu"]
    ours, theirs = [], []
    # the second function scores only level-2 records: with a weight NaN-summed per row; a row
    # both functions leave unscored (level 1 and completion "p", "r" or "t") has no score at all
    make = lambda calls: [  # noqa: E731
        recording("pq", calls, lambda cs, f: [None if c in "prt" else 1.0 for c in cs]),
        recording("level", calls, lambda cs, f: [None if lv == 1 else float(lv) for lv in f["level"]]),
    ]  # fmt: skip
    weights = [1.0, 0.5]
    reward = TextReward(TOK, make(ours), weights, sampler=sampler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = reward([p for p in prompts for _ in range(2)], responses)
    inputs = [{"prompt": r["prompt_text"], **r["fields"]} for r in drawn]
    per_func = trl_rewards_per_func(make(theirs), inputs, [r["prompt_text"] for r in drawn],
                                    [TOK.decode(r) for r in responses], responses)  # fmt: skip
    assert ours == theirs  # the same keywords, values and order
    expected = (per_func * torch.tensor(weights)).nansum(dim=1)  # TRL's sum over the functions
    expected[per_func.isnan().all(dim=1)] = torch.nan  # and its unscorable rows
    torch.testing.assert_close(scores, expected, equal_nan=True)
    assert expected.isnan().any()  # the draw has an unscorable row, and it was warned about
    assert any("every reward function (pq, level) returned None" in str(w.message) for w in caught)
    assert reward.metrics() == pytest.approx(
        {f"rewards/{n}/mean": float(per_func[:, i].nanmean()) for i, n in enumerate(["pq", "level"])}, nan_ok=True
    )


def test_chat_prompts_get_assistant_messages_as_completions():
    chat = [{"role": "user", "content": "2+2?"}]
    records = [{"prompt": [1], "prompt_text": chat, "fields": {"answer": "4", "prompt": chat}}]
    kwargs = reward_kwargs(records, ["4"], [[7, 2]])
    assert kwargs == {"prompts": [chat], "completions": [[{"role": "assistant", "content": "4"}]],
                      "completion_ids": [[7, 2]], "answer": ["4"]}  # fmt: skip
    assert exact_match()(**kwargs) == [1.0]


def test_a_field_missing_from_some_records_is_none_and_a_reserved_name_is_refused():
    records = [{"prompt": [1], "prompt_text": "a", "fields": {"hint": "h"}}, {"prompt": [1], "prompt_text": "a", "fields": {}}]
    assert reward_kwargs(records, ["x", "y"], [[3], [4]])["hint"] == ["h", None]
    with pytest.raises(ValueError, match="data field 'completions'"):
        reward_kwargs([{"prompt": [1], "prompt_text": "a", "fields": {"completions": 1}}], ["x"], [[3]])


def test_a_function_that_cannot_take_the_fields_is_named(tmp_path):
    sampler = RecordSampler(records_of(tmp_path, [{"prompt": "ab"}]), per_prompt=1)
    prompts = sampler(1, torch.Generator().manual_seed(0))

    def needs_solution(completions, solution):
        return [1.0]

    with pytest.raises(ValueError, match="reward function needs_solution: cannot take the keywords"):
        TextReward(TOK, [needs_solution], sampler=sampler)(prompts, [[5]])


# -- which record each scored row belongs to -----------------------------------------------

def test_duplicated_prompts_keep_their_own_fields_through_a_run(tmp_path):
    """Four records, three with the same prompt: every scored row gets the record drawn for it,
    its group's rows consecutive, with the scoring pass in micro-batches (which score_rollout
    splits for the models, never for the reward function)."""
    rows = [{"prompt": "ab", "id": 0}, {"prompt": "ab", "id": 1}, {"prompt": "ca", "id": 2}, {"prompt": "ab", "id": 3}]
    calls = []
    ids = recording("by_id", calls, lambda cs, f: [float(i) for i in f["id"]])
    config = write(tmp_path / "c.yaml", GROUPED + "score_micro_batch_size: 3\n")
    run_train("grpo", "tiny", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out", config_path=config, quiet=True,
              reward_fns=[ids])  # fmt: skip
    assert len(calls) == 2
    for step, call in enumerate(calls):
        drawn = torch.randint(4, (4,), generator=step_generator(0, step, "prompts")).tolist()
        assert call["id"] == [i for i in drawn for _ in range(2)]
        assert call["prompts"] == [rows[i]["prompt"] for i in call["id"]]
    logged = metrics(tmp_path / "out")
    assert [r["rewards/by_id/mean"] for r in logged] == pytest.approx([sum(c["id"]) / 8 for c in calls])


def test_a_rank_scores_its_share_of_the_drawn_prompts(tmp_path):
    rows = [{"prompt": "ab", "id": i} for i in range(4)]
    sampler = RecordSampler(records_of(tmp_path, rows), per_prompt=2, share=slice(2, 4))  # rank 1 of 2
    prompts = sampler(4, torch.Generator().manual_seed(3))
    scored = sampler.scored_records([p for p in prompts[2:4] for _ in range(2)])
    assert [r["fields"]["id"] for r in scored] == [i for i in sampler.drawn[2:4] for _ in range(2)]
    with pytest.raises(ValueError, match="not the 4 expected"):
        sampler.scored_records([p for p in prompts for _ in range(2)])


# -- unscorable completions ----------------------------------------------------------------

def grouped_rollout(scores: list[float], group_size: int) -> Rollout:
    n = len(scores)
    return Rollout(
        prompt_ids=torch.ones(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
        response_ids=torch.full((n, 2), 5), response_mask=torch.ones(n, 2, dtype=torch.bool), logprobs=torch.zeros(n, 2),
        group_ids=torch.arange(n // group_size).repeat_interleave(group_size), scores=torch.tensor(scores),
    )  # fmt: skip


def rl_trainer(reward_model=None, **config) -> RLTrainer:
    config = RLConfig(**{"prompts_per_step": 2, "group_size": 3, "kl_coef": 0.0, **config})
    scorer = {"reward_model": reward_model} if reward_model is not None else {"reward_fn": lambda p, r: torch.zeros(len(p))}
    return RLTrainer(config, policy=tiny_init(), reference=tiny_init(), prompts=lambda n, g: [[1]] * n, pad_token_id=0,
                     eos_token_id=2, **scorer)  # fmt: skip


def test_unscorable_completions_are_left_out_of_grpo_groups_as_trl_does():
    from trl.trainer.utils import nanstd

    nan = math.nan
    scores = torch.tensor([1.0, nan, 3.0, nan, nan, 2.0])  # the second group has one scorable completion
    advantages, _ = rl_trainer(advantage="grpo").advantages(grouped_rollout(scores.tolist(), 3))
    grouped = scores.view(2, 3)  # TRL 1.16 GRPOTrainer, scale_rewards "group"
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(3)
    std = nanstd(grouped, dim=1).repeat_interleave(3)
    expected = torch.nan_to_num((scores - mean) / (std + 1e-4), nan=0.0)
    torch.testing.assert_close(advantages, expected)
    assert advantages[0] < 0 < advantages[2] and advantages[[1, 3, 4, 5]].eq(0).all()


def test_unscorable_completions_are_left_out_of_rloo_baselines_as_trl_does():
    nan = math.nan
    scores = torch.tensor([1.0, nan, 3.0, 4.0, 0.0, 2.0])
    advantages, _ = rl_trainer(advantage="rloo", kl_in_reward=True).advantages(grouped_rollout(scores.tolist(), 3))
    grouped = scores.view(2, 3)  # TRL 1.16 RLOOTrainer: the mean of the scorable siblings
    count = (~grouped.isnan()).sum(dim=1, keepdim=True)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (count - 1)
    expected = torch.nan_to_num((grouped - baseline).flatten(), nan=0.0)
    torch.testing.assert_close(advantages, expected)


def test_a_token_estimator_refuses_an_unscorable_completion():
    trainer = rl_trainer(advantage="reinforce_pp", group_size=1, prompts_per_step=3, kl_in_reward=True)
    with pytest.raises(ValueError, match="advantage 'reinforce_pp' needs a score for every completion"):
        trainer.advantages(grouped_rollout([1.0, math.nan, 0.0], 1))


def test_a_nan_from_a_reward_model_is_an_error_not_an_unscorable_completion():
    trainer = rl_trainer(reward_model=ScalarHeadModel.from_policy(tiny_init()))
    with pytest.raises(ValueError, match="the reward model scored NaN for 1 of 6 completions"):
        trainer.advantages(grouped_rollout([1.0, math.nan, 0.0, 1.0, 2.0, 3.0], 3))


def test_rejection_sampling_never_keeps_an_unscorable_sample():
    config = RejectionSamplingConfig(steps=1, prompts_per_step=2, samples_per_prompt=3, keep_top=2, max_new_tokens=2)
    # every sample but the first of each prompt unscorable: one kept per prompt, though keep_top is 2
    score = lambda p, r: torch.tensor([0.0 if i % 3 == 0 else math.nan for i in range(len(p))])  # noqa: E731
    trainer = RejectionSamplingTrainer(tiny_init(), config, prompts=lambda n, g: [[1, 5]] * n, score_fn=score,
                                       pad_token_id=0, eos_token_id=2)  # fmt: skip
    step = trainer.step(0)
    assert step["kept"] == 2 and step["reward_mean"] == 0.0 and "loss" in step


# -- the command line ----------------------------------------------------------------------

def readme_example() -> list[str]:
    """The README's reward-function example command, as argv after ``rlhf-engine``."""
    text = (ROOT / "README.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("rlhf-engine train") and "examples/rewards.py" in line)
    return shlex.split(line)[1:]


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    argv = readme_example()
    assert argv[argv.index("--model") + 1] == "tiny"
    monkeypatch.chdir(ROOT)  # the command's paths are relative to the repository root
    assert main(argv + ["--out", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    assert "grpo: 3 steps run" in capsys.readouterr().out
    logged = metrics(tmp_path)
    assert len(logged) == 3
    for r in logged:  # the weighted sum of the two functions' means (every completion scored by both)
        assert r["reward_mean"] == pytest.approx(r["rewards/length_reward/mean"] + 0.5 * r["rewards/format_reward/mean"])
        assert 0.0 <= r["rewards/length_reward/mean"] <= 1.0
    assert not torch.equal(PolicyModel.load(tmp_path / "model").lm_head_weight, tiny_init().lm_head_weight)


@pytest.mark.parametrize("algo,extra,words", [
    ("sft", ["--reward-fn", "examples/rewards.py:format_reward"], "--algo sft samples none"),
    ("grpo", ["--reward-weights", "1"], "--reward-weights needs --reward-fn"),
    ("grpo", ["--reward-fn", "examples/rewards.py:format_reward", "--reward-weights", "1", "2"], "2 weights for 1 reward"),
    ("grpo", ["--reward-fn", "examples/rewards.py:format_reward", "--reward-model", "RM"], "give --reward-fn or --reward-model"),
    ("grpo", ["--reward-fn", "examples/rewards.py:format_reward", "--reward-weights", "nan"], "must be a finite number, got nan"),
    ("ppo", ["--reward-fn", "examples/rewards.py:format_reward"], "--algo ppo needs --reward-model DIR"),
    ("grpo", [], "needs --reward-model DIR, --reward-fn FILE.py:FUNCTION or an 'answer'"),
])  # fmt: skip
def test_reward_flag_misuse_is_a_clear_error(algo, extra, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "response": "b"}])
    assert main(["train", "--algo", algo, "--model", "tiny", "--data", data, "--out", str(tmp_path / "o"), "--quiet", *extra]) == 2
    assert words in capsys.readouterr().err


def test_ppo_scores_with_the_functions_and_starts_its_critic_from_the_reward_model(tmp_path, monkeypatch):
    from tests.test_train import PAIRS

    monkeypatch.chdir(ROOT)
    offline = write(tmp_path / "rm.yaml", "steps: 1\nbatch_size: 4\n")
    assert main(["train", "--algo", "rm", "--model", "tiny", "--data", write_jsonl(tmp_path / "p.jsonl", PAIRS),
                 "--config", offline, "--out", str(tmp_path / "rm"), "--quiet"]) == 0  # fmt: skip
    single = write(tmp_path / "ppo.yaml", "steps: 2\nprompts_per_step: 4\ngroup_size: 1\nmax_new_tokens: 2\nminibatch_size: 4\n")
    assert main(["train", "--algo", "ppo", "--model", "tiny", "--data", "examples/prompts.jsonl", "--config", single,
                 "--reward-model", str(tmp_path / "rm" / "model"), "--reward-fn", "examples/rewards.py:length_reward",
                 "--out", str(tmp_path / "ppo"), "--quiet"]) == 0  # fmt: skip
    logged = metrics(tmp_path / "ppo")
    assert [r["reward_mean"] for r in logged] == pytest.approx([r["rewards/length_reward/mean"] for r in logged])
    assert all("value_loss" in r for r in logged)


def rejection_sampling(tmp_path: Path, data: str, out: Path, *extra: str) -> int:
    config = write(tmp_path / "rs.yaml", REJECTION)
    return main(["train", "--algo", "rejection_sampling", "--model", "tiny", "--data", data, "--config", config,
                 "--out", str(out), "--quiet", *extra])  # fmt: skip


def test_rejection_sampling_trains_from_the_cli_with_each_scorer(tmp_path, monkeypatch, capsys):
    from tests.test_train import ANSWERS, PAIRS

    monkeypatch.chdir(ROOT)
    answers = write_jsonl(tmp_path / "a.jsonl", ANSWERS)
    assert rejection_sampling(tmp_path, answers, tmp_path / "by-answer") == 0
    assert rejection_sampling(tmp_path, "examples/prompts.jsonl", tmp_path / "by-fn", "--reward-fn", "examples/rewards.py:length_reward") == 0
    offline = write(tmp_path / "rm.yaml", "steps: 1\nbatch_size: 4\n")
    assert main(["train", "--algo", "rm", "--model", "tiny", "--data", write_jsonl(tmp_path / "p.jsonl", PAIRS),
                 "--config", offline, "--out", str(tmp_path / "rm"), "--quiet"]) == 0  # fmt: skip
    assert rejection_sampling(tmp_path, answers, tmp_path / "by-rm", "--reward-model", str(tmp_path / "rm" / "model")) == 0
    assert "rejection_sampling: 3 steps run" in capsys.readouterr().out
    for name in ("by-answer", "by-fn", "by-rm"):
        logged = metrics(tmp_path / name)
        assert [(r["phase"], r["step"]) for r in logged] == [("rejection_sampling", k) for k in range(3)]
        assert all(r["kept"] == 2 for r in logged)  # keep_top 1 of each of the 2 prompts, no threshold
        assert not torch.equal(PolicyModel.load(tmp_path / name / "model").lm_head_weight, tiny_init().lm_head_weight)
    assert "rewards/length_reward/mean" in metrics(tmp_path / "by-fn")[0]


def test_rejection_sampling_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    kwargs = dict(config_path=write(tmp_path / "rs.yaml", REJECTION), quiet=True, checkpoint_every=1,
                  reward_fns=["examples/rewards.py:length_reward"])  # fmt: skip
    run_train("rejection_sampling", "tiny", "examples/prompts.jsonl", tmp_path / "whole", **kwargs)
    run_train("rejection_sampling", "tiny", "examples/prompts.jsonl", tmp_path / "split", stop_after=1, **kwargs)
    resumed = run_train("rejection_sampling", "tiny", "examples/prompts.jsonl", tmp_path / "split", resume=True, **kwargs)
    assert len(resumed) == 2
    assert_same_weights(PolicyModel.load(tmp_path / "whole" / "model"), PolicyModel.load(tmp_path / "split" / "model"))
    untimed = lambda out: [{k: v for k, v in r.items() if k != "time"} for r in metrics(out)]  # noqa: E731
    assert untimed(tmp_path / "split") == untimed(tmp_path / "whole")
    with pytest.raises(ValueError, match="reward_fns"):  # another reward function is another run
        run_train("rejection_sampling", "tiny", "examples/prompts.jsonl", tmp_path / "split", resume=True,
                  **{**kwargs, "reward_fns": ["examples/rewards.py:format_reward"]})  # fmt: skip


def test_rejection_sampling_is_refused_under_torchrun(tmp_path, capsys):
    with pytest.raises(ValueError, match="rejection_sampling runs in one process"):
        check_world_size("rejection_sampling", RejectionSamplingConfig(), 2)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "answer": ""}])
    assert main(["train", "--algo", "rejection_sampling", "--model", "tiny", "--data", data, "--nproc", "2"]) == 2
    assert "without torchrun or --nproc" in capsys.readouterr().err


def test_the_python_api_scores_an_rl_trainer_with_text_rewards(tmp_path):
    """``TextReward`` with a ``RecordSampler`` as the prompts of a hand-built ``RLTrainer``."""
    records = records_of(tmp_path, [{"prompt": "ab", "answer": "x"}, {"prompt": "ab", "answer": "y"}])
    config = RLConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2, minibatch_size=4)
    sampler = RecordSampler(records, config.group_size)
    seen = []
    fn = recording("answers", seen, lambda cs, f: [float(a == "x") for a in f["answer"]])
    trainer = RLTrainer(config, policy=tiny_init(), reference=tiny_init(), prompts=sampler, pad_token_id=0, eos_token_id=2,
                        reward_fn=TextReward(TOK, [fn], sampler=sampler))  # fmt: skip
    step = trainer.step(0)
    answers = [records[i]["fields"]["answer"] for i in sampler.drawn for _ in range(2)]
    assert seen[0]["answer"] == answers
    assert step["reward_mean"] == pytest.approx(answers.count("x") / 4)


def test_two_ranks_score_their_own_records_as_one_process_does(tmp_path):
    """Under torchrun each rank scores its share of the step's prompts: with duplicated prompts
    whose fields differ, a rank reading another share's records would log other rewards."""
    from tests.test_distributed import assert_same_metrics, launch_ok, train_args

    rows = [{"prompt": "ab", "id": 0}, {"prompt": "ab", "id": 1}, {"prompt": "ca", "id": 2}, {"prompt": "ab", "id": 3}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    fn = write(tmp_path / "by_id.py", "def by_id(completions, id, **kwargs):\n    return [float(i) for i in id]\n")
    config = write(tmp_path / "c.yaml", GROUPED)
    extra = ("--reward-fn", f"{fn}:by_id")
    assert main(["train", *train_args("grpo", data, config, tmp_path / "single", *extra)]) == 0
    launch_ok(2, *train_args("grpo", data, config, tmp_path / "two", *extra))
    assert_same_metrics(tmp_path / "two", tmp_path / "single", ("reward_mean", "reward_std", "rewards/by_id/mean"))
    assert len({r["reward_mean"] for r in metrics(tmp_path / "single")}) > 1  # the draws differ by step


def test_the_plan_of_ppo_scored_by_functions_has_no_reward_model_role(tmp_path):
    """Its reward model only starts the critic: an offloading plan must not schedule a role the
    trainer does not hold (the placement executor refuses an unknown role)."""
    from rlhf_engine.memory.run_specs import role_specs
    from rlhf_engine.train import load_config, plan_run
    from tests.test_trainer_levers import QWEN25_7B, RECORDS

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps(QWEN25_7B))
    config = load_config("ppo", None)
    assert set(role_specs("ppo", config, QWEN25_7B, QWEN25_7B)) == {"policy", "reference", "reward_model", "critic"}
    assert set(role_specs("ppo", config, QWEN25_7B, QWEN25_7B, reward_scores=False)) == {"policy", "reference", "critic"}
    config = dataclasses.replace(config, dtype="bf16", lora_rank=16, critic_lora_rank=16)  # a 7B PPO that fits 80 GB
    _, chosen = plan_run("ppo", config, str(rm), None, RECORDS, str(rm), torch.device("cuda"), "auto", gpu_memory="80GiB",
                         reward_scores=False)  # fmt: skip
    assert {role.partition(".")[0] for role in chosen.residency} == {"policy", "reference", "critic"}


def test_eval_records_are_scored_with_their_own_fields(tmp_path):
    """``--eval-data`` prompts that are training prompts too, with other fields: the evaluation
    scores each sample with its eval record (one sample per record), training with its own."""
    train_rows = [{"prompt": "ab", "id": 0}, {"prompt": "ca", "id": 1}]
    eval_rows = [{"prompt": "ab", "id": 10}, {"prompt": "ca", "id": 30}, {"prompt": "ab", "id": 20}]
    calls = []
    ids = recording("by_id", calls, lambda cs, f: [float(i) for i in f["id"]])
    run_train("grpo", "tiny", write_jsonl(tmp_path / "d.jsonl", train_rows), tmp_path / "out", quiet=True,
              config_path=write(tmp_path / "c.yaml", GROUPED), eval_data=write_jsonl(tmp_path / "e.jsonl", eval_rows),
              reward_fns=[ids])  # fmt: skip
    logged = metrics(tmp_path / "out")
    evals = [r for r in logged if r["phase"] == "grpo_eval"]
    assert [r["step"] for r in evals] == [-1, 1] and all(r["reward_mean"] == pytest.approx(20.0) for r in evals)
    assert all(r["reward_mean"] <= 1.0 for r in logged if r["phase"] == "grpo")
    assert [c["id"] for c in calls if c["id"][0] >= 10] == [[10, 30, 20]] * 2


def test_the_eval_command_scores_with_the_runs_reward_functions(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config, fns = write(tmp_path / "c.yaml", GROUPED), ["--reward-fn", "examples/rewards.py:length_reward"]
    out = tmp_path / "run"
    assert main(["train", "--algo", "grpo", "--model", "tiny", "--data", "examples/prompts.jsonl", "--config", config,
                 "--eval-data", "examples/prompts.jsonl", "--out", str(out), "--quiet", *fns]) == 0  # fmt: skip
    capsys.readouterr()
    logged = [r for r in metrics(out) if r["phase"] == "grpo_eval"][-1]
    assert main(["eval", "--algo", "grpo", "--model", str(out / "model"), "--data", "examples/prompts.jsonl", "--config",
                 config, "--ref-model", "tiny", "--device", "cpu", "--json", *fns]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)["metrics"]
    assert result == pytest.approx({k: logged[k] for k in result}, rel=1e-5, abs=1e-6)
    assert 0.0 < result["reward_mean"] <= 1.0


def test_eval_data_is_refused_for_rejection_sampling(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "answer": ""}])
    assert main(["train", "--algo", "rejection_sampling", "--model", "tiny", "--data", data, "--eval-data", data,
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "--eval-data: rejection_sampling has no evaluation" in capsys.readouterr().err


def test_the_built_in_answer_match_reads_the_data_configs_answer_field(tmp_path, capsys):
    """``--prompt-field question --answer-field solution``: the same run as with the default names."""
    from tests.test_train import ANSWERS

    renamed = [{"question": r["prompt"], "solution": r["answer"]} for r in ANSWERS]
    config = write(tmp_path / "c.yaml", GROUPED)
    base = ["train", "--algo", "grpo", "--model", "tiny", "--config", config, "--quiet"]
    assert main(base + ["--data", write_jsonl(tmp_path / "a.jsonl", ANSWERS), "--out", str(tmp_path / "default")]) == 0
    assert main(base + ["--data", write_jsonl(tmp_path / "r.jsonl", renamed), "--out", str(tmp_path / "renamed"),
                        "--prompt-field", "question", "--answer-field", "solution"]) == 0  # fmt: skip
    untimed = lambda out: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in metrics(out)]  # noqa: E731
    assert untimed(tmp_path / "renamed") == untimed(tmp_path / "default")
    assert all(r["reward_mean"] == r["rewards/exact_match/mean"] for r in metrics(tmp_path / "default"))
    assert exact_match("solution")(completions=[" 4 ", "5"], solution=["4", "4"], answer=["5", "5"]) == [1.0, 0.0]


def test_chat_prompts_reach_the_functions_as_turns_through_a_run(tmp_path):
    """Chat prompts (rendered by the tokenizer's template for sampling): the functions get the
    turns as in the data and each completion as one assistant message holding its decoded text."""
    import runpy

    from rlhf_engine.models.tokenizers import load_tokenizer

    model = str(runpy.run_path(str(ROOT / "examples" / "make_tiny_chat_model.py"))["build"](tmp_path / "chat-model"))
    rows = [{"prompt": [{"role": "user", "content": q}], "id": i} for i, q in enumerate(("ab", "cba", "ca"))]
    calls = []
    fn = recording("chat", calls, lambda cs, f: [float(len(c[0]["content"])) for c in cs])
    run_train("grpo", model, write_jsonl(tmp_path / "q.jsonl", rows), tmp_path / "out", quiet=True,
              config_path=write(tmp_path / "c.yaml", GROUPED), reward_fns=[fn])  # fmt: skip
    tokenizer = load_tokenizer(model)
    assert len(calls) == 2
    for call in calls:
        assert call["prompts"] == [rows[i]["prompt"] for i in call["id"]]
        assert call["completions"] == [[{"role": "assistant", "content": tokenizer.decode(ids)}] for ids in call["completion_ids"]]


def test_a_run_with_unscorable_completions_warns_and_trains_on_the_rest(tmp_path):
    rows = [{"prompt": "ab", "id": 0}, {"prompt": "ca", "id": 1}]
    calls = []
    fn = recording("even_only", calls, lambda cs, f: [None if i % 2 else float(len(c)) for c, i in zip(cs, f["id"])])
    with pytest.warns(RuntimeWarning, match="every reward function \\(even_only\\) returned None"):
        history = run_train("grpo", "tiny", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out", quiet=True,
                            config_path=write(tmp_path / "c.yaml", GROUPED), reward_fns=[fn])  # fmt: skip
    for step, call in zip(history, calls):
        scored = [len(c) for c, i in zip(call["completions"], call["id"]) if i == 0]
        assert step["reward_mean"] == pytest.approx(sum(scored) / len(scored))
    assert not torch.equal(PolicyModel.load(tmp_path / "out" / "model").lm_head_weight, tiny_init().lm_head_weight)
