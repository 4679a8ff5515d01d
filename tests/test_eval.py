"""Evaluation: ``train --eval-data`` (its schedule, that it leaves the training untouched, how its
lines survive a resume) and ``rlhf-engine eval`` (the same numbers from the saved folder), the
per-algorithm metrics of ``rlhf_engine.algos.eval_runs`` against direct computations, and the
errors that name the flag."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.algos.common import sample_responses, step_generator
from rlhf_engine.algos.dpo import DPOConfig, pair_loss
from rlhf_engine.algos.eval_metrics import pairwise_accuracy
from rlhf_engine.algos.eval_runs import evaluate_dpo, evaluate_rewards, evaluate_rl, evaluate_sft, ranking_pairs
from rlhf_engine.algos.reward_model import sequence_rewards
from rlhf_engine.cli import main
from rlhf_engine.models import PolicyModel, ScalarHeadModel
from rlhf_engine.models.tokenizers import ByteTokenizer
from rlhf_engine.train import build_trainer, load_config, load_records, run_train
from tests.test_train import (  # noqa: F401  (files, reward_model_dir: fixtures)
    ANSWERS, PAIRS, RANKINGS, SFT, assert_same_weights, comparable, files, metrics, reward_model_dir, tiny_init, train,
    write_jsonl,
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOK = ByteTokenizer()
EVAL_ANSWERS = [{"prompt": "ba", "answer": ""}, {"prompt": "cc", "answer": " "}, {"prompt": "abc", "answer": ""}]
EVAL_PAIRS = [{"prompt": "ba", "chosen": "ab", "rejected": "b"}, {"prompt": "cab", "chosen": "abc", "rejected": "cba"}]


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval-data")
    return {name: write_jsonl(root / f"{name}.jsonl", records) for name, records in
            [("sft", SFT[1:]), ("pairs", EVAL_PAIRS), ("rankings", RANKINGS), ("answers", EVAL_ANSWERS)]}  # fmt: skip


def evals(out, algo: str) -> list[dict]:
    return [r for r in metrics(out) if r["phase"] == f"{algo}_eval"]


def trained(policy: PolicyModel, scale: float = 0.05, seed: int = 1) -> PolicyModel:
    """``policy`` with every weight moved by noise: a model that differs from its reference."""
    moved = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return moved


# -- train --eval-data --------------------------------------------------------------------


def test_eval_lines_follow_the_schedule_and_are_printed(files, eval_files, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 3\nbatch_size: 4\n")
    assert train("sft", files["sft"], str(config), tmp_path / "out", "--eval-data", eval_files["sft"], "--eval-every", "2") == 0
    lines = [(r["phase"], r["step"]) for r in metrics(tmp_path / "out")]
    assert lines == [("sft_eval", -1), ("sft", 0), ("sft", 1), ("sft_eval", 1), ("sft", 2), ("sft_eval", 2)]
    last = evals(tmp_path / "out", "sft")[-1]
    assert last["perplexity"] == pytest.approx(torch.tensor(last["loss"]).exp().item(), rel=1e-6)
    assert last["tokens"] == sum(len(r["response"]) + 1 for r in SFT[1:])  # + EOS
    assert evals(tmp_path / "out", "sft")[0]["loss"] > last["loss"]  # SFT on overlapping data lowers it
    out = capsys.readouterr().out
    assert "sft eval after step 2: loss=" in out and "perplexity=" in out
    assert train("sft", files["sft"], str(config), tmp_path / "ends", "--eval-data", eval_files["sft"]) == 0
    assert [r["step"] for r in evals(tmp_path / "ends", "sft")] == [-1, 2]  # default: before and after


RUNS = [
    ("sft", "sft", "sft", "offline", False),
    ("rm", "pairs", "rankings", "offline", False),
    ("dpo", "pairs", "pairs", "offline", False),
    ("grpo", "answers", "answers", "grouped", False),
    ("ppo", "prompts", "answers", "single", True),
]


@pytest.mark.parametrize("algo,data,eval_data,config,with_rm", RUNS, ids=[r[0] for r in RUNS])
def test_eval_changes_nothing_of_the_training(algo, data, eval_data, config, with_rm, files, eval_files, reward_model_dir,
                                              tmp_path):  # fmt: skip
    """The same training lines and bitwise the same weights with and without --eval-data (every
    step), whatever the global RNG holds when each starts."""
    kwargs = dict(config_path=files[config], reward_model_path=reward_model_dir if with_rm else None, quiet=True)
    torch.manual_seed(1)
    plain = run_train(algo, "tiny", files[data], tmp_path / "plain", **kwargs)
    torch.manual_seed(2)
    evaluated = run_train(algo, "tiny", files[data], tmp_path / "eval", eval_data=eval_files[eval_data], eval_every=1, **kwargs)
    assert comparable(evaluated) == comparable(plain)
    assert [r["step"] for r in evals(tmp_path / "eval", algo)] == [-1, 0, 1, 2]
    assert comparable([r for r in metrics(tmp_path / "eval") if r["phase"] == algo]) == comparable(metrics(tmp_path / "plain"))
    load = ScalarHeadModel.load if algo == "rm" else PolicyModel.load
    assert_same_weights(load(tmp_path / "eval" / "model"), load(tmp_path / "plain" / "model"))


@pytest.mark.parametrize("algo,data,eval_data,text", [
    ("sft", "sft", "sft", "steps: 5\nbatch_size: 4\n"),
    ("grpo", "answers", "answers", "steps: 5\nprompts_per_step: 4\ngroup_size: 8\nmax_new_tokens: 1\nminibatch_size: 8\n"),
], ids=["sft", "grpo"])  # fmt: skip
def test_eval_lines_after_a_crash_are_dropped_and_redone_once(algo, data, eval_data, text, files, eval_files, tmp_path):
    """Evaluations after the latest checkpoint are logged again by the resumed run, once; the log
    ends as the uninterrupted run's (evaluations every 2 steps, checkpoints every 2)."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    kwargs = dict(config_path=config, eval_data=eval_files[eval_data], eval_every=2, checkpoint_every=2, quiet=True)
    run_train(algo, "tiny", files[data], tmp_path / "whole", **kwargs)
    out = tmp_path / "out"
    run_train(algo, "tiny", files[data], out, stop_after=4, **kwargs)
    assert [r["step"] for r in evals(out, algo)] == [-1, 1, 3]
    shutil.rmtree(out / "checkpoints" / "step-00000003")  # a crash during step 4: step 1's is the latest
    (out / "checkpoints" / "latest").write_text("step-00000001")
    run_train(algo, "tiny", files[data], out, resume=True, **kwargs)
    assert [(r["phase"], r["step"]) for r in metrics(out)] == [(r["phase"], r["step"]) for r in metrics(tmp_path / "whole")]
    assert [r["step"] for r in evals(out, algo)] == [-1, 1, 3, 4]
    assert comparable(metrics(out)) == comparable(metrics(tmp_path / "whole"))


def test_a_crash_inside_an_evaluation_leaves_no_checkpoint_that_skips_it(files, eval_files, tmp_path, monkeypatch):
    """An evaluation runs before its step's checkpoint: a run killed during the evaluation after
    step 3 has no checkpoint of step 3, so the resumed run evaluates step 3 again."""
    import rlhf_engine.train as train_module

    config = tmp_path / "config.yaml"
    config.write_text("steps: 5\nbatch_size: 4\n")
    kwargs = dict(config_path=config, eval_data=eval_files["sft"], eval_every=2, checkpoint_every=2, quiet=True)
    run_train("sft", "tiny", files["sft"], tmp_path / "whole", **kwargs)
    evaluate_run, calls = train_module.evaluate_run, []

    def killed_after_step_3(algo, trainer, records):
        calls.append(algo)
        if len(calls) == 3:  # the evaluations before training, after step 1, after step 3
            raise KeyboardInterrupt
        return evaluate_run(algo, trainer, records)

    monkeypatch.setattr(train_module, "evaluate_run", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_train("sft", "tiny", files["sft"], tmp_path / "out", **kwargs)
    monkeypatch.setattr(train_module, "evaluate_run", evaluate_run)
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "step-00000001"
    run_train("sft", "tiny", files["sft"], tmp_path / "out", resume=True, **kwargs)
    assert comparable(metrics(tmp_path / "out")) == comparable(metrics(tmp_path / "whole"))


# -- rlhf-engine eval: the numbers the run logged, from its saved folder ---------------------

EVAL_COMMANDS = [
    ("sft", "sft", "sft", "offline", [], False),
    ("rm", "pairs", "rankings", "offline", [], False),
    ("dpo", "pairs", "pairs", "offline", ["--ref-model", "tiny"], False),
    ("grpo", "answers", "answers", "grouped", ["--ref-model", "tiny"], False),
    ("ppo", "prompts", "answers", "single", ["--ref-model", "tiny"], True),
]


@pytest.mark.parametrize("algo,data,eval_data,config,extra,with_rm", EVAL_COMMANDS, ids=[c[0] for c in EVAL_COMMANDS])
def test_the_eval_command_gives_the_runs_last_evaluation(algo, data, eval_data, config, extra, with_rm, files, eval_files,
                                                         reward_model_dir, tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    scorer = ["--reward-model", reward_model_dir] if with_rm else []
    extra = extra + scorer
    assert train(algo, files[data], files[config], out, "--eval-data", eval_files[eval_data], *scorer) == 0
    logged = {k: v for k, v in evals(out, algo)[-1].items() if k not in ("phase", "step", "time")}
    assert f"{algo} eval after step 2: " in capsys.readouterr().out  # the train command prints it, --quiet or not
    args = ["eval", "--algo", algo, "--model", str(out / "model"), "--data", eval_files[eval_data], "--config", files[config]]
    assert main(args + extra + ["--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"] == pytest.approx(logged, rel=1e-5, abs=1e-6)
    assert main(args + extra) == 0
    assert capsys.readouterr().out.startswith(f"{algo} eval of {out / 'model'} on {eval_files[eval_data]}: ")


def test_the_eval_command_without_a_reference_reports_no_kl(files, eval_files, sft_policy_dir, capsys):
    assert main(["eval", "--algo", "grpo", "--model", sft_policy_dir, "--data", eval_files["answers"], "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["metrics"]) == ["response_length", "reward_mean"]


def test_the_eval_command_quiet_silences_the_loading_bars(eval_files, sft_policy_dir, capsys):
    args = ["eval", "--algo", "sft", "--model", sft_policy_dir, "--data", eval_files["sft"]]
    assert main(args) == 0
    assert "Loading weights" in capsys.readouterr().err  # transformers' bar, read from the folder
    assert main(args + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def sft_policy_dir(files, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("sft-run")
    assert train("sft", files["sft"], files["offline"], out) == 0
    return str(out / "model")


# -- the metrics against direct computations -----------------------------------------------


def test_sft_eval_is_the_token_mean_nll_over_every_record(tmp_path):
    policy = trained(tiny_init())
    examples = load_records("sft", write_jsonl(tmp_path / "sft.jsonl", SFT), TOK)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, response in examples:  # one sequence at a time, from the full logits
            ids = torch.tensor([prompt + response])
            logp = F.log_softmax(policy.lm(input_ids=ids).logits[0, :-1].double(), dim=-1)
            token_logp = logp.gather(1, ids[0, 1:, None])[-len(response):]
            nll, tokens = nll - float(token_logp.sum()), tokens + len(response)
    for batch_size in (1, 2, 8):  # micro-batches weighted by their tokens: the same mean
        result = evaluate_sft(policy, examples, pad_id=TOK.pad_token_id, batch_size=batch_size)
        assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
        assert result["tokens"] == tokens
    policy.train()
    evaluate_sft(policy, examples, pad_id=TOK.pad_token_id, batch_size=2)
    assert policy.training and all(m.training for m in policy.modules())  # back in train mode


def test_reward_model_eval_counts_every_pair_of_a_ranking(tmp_path):
    model = ScalarHeadModel.from_policy(trained(tiny_init()))
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    records = load_records("rm", write_jsonl(tmp_path / "rankings.jsonl", RANKINGS), TOK)
    pairs = ranking_pairs(records)
    assert len(pairs) == 3 + 1  # C(3, 2) + C(2, 2)
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == (records[0]["responses"][0], records[0]["responses"][1])
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == (records[0]["responses"][1], records[0]["responses"][2])
    with torch.no_grad():
        chosen = torch.cat([sequence_rewards(model, [p["prompt"]], [p["chosen"]], TOK.pad_token_id) for p in pairs])
        rejected = torch.cat([sequence_rewards(model, [p["prompt"]], [p["rejected"]], TOK.pad_token_id) for p in pairs])
    result = evaluate_rewards(model, records, pad_id=TOK.pad_token_id, batch_size=1)
    assert result["accuracy"] == pytest.approx(pairwise_accuracy(chosen, rejected))
    assert result["margin"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-5, abs=1e-7)
    assert result["margin"] != 0


def test_dpo_eval_is_the_training_loss_over_every_pair(tmp_path):
    reference = tiny_init()
    policy = trained(reference)
    pairs = load_records("dpo", write_jsonl(tmp_path / "pairs.jsonl", PAIRS + EVAL_PAIRS), TOK)
    config = DPOConfig(batch_size=2, nll_coef=0.5)
    with torch.no_grad():
        loss, expected = pair_loss(policy, reference, pairs, config, TOK.pad_token_id)  # every pair at once
    result = evaluate_dpo(policy, reference, pairs, config, pad_id=TOK.pad_token_id)
    assert result == pytest.approx({"loss": float(loss), **{k: float(v) for k, v in expected.items()}}, rel=1e-5, abs=1e-6)
    assert result["reward_margin"] == pytest.approx(result["chosen_reward"] - result["rejected_reward"], abs=1e-6)
    assert result["reward_margin"] != 0
    same = evaluate_dpo(reference, reference, pairs, config, pad_id=TOK.pad_token_id)  # the reference itself
    assert same["reward_margin"] == 0 and same["reward_accuracy"] == 0.5


def test_rl_eval_scores_one_sample_per_prompt_with_the_runs_scorer(tmp_path):
    """The answer-match reward of the run's trainer on the eval prompts (answers it never trained
    on), from the fixed eval stream: the same on every call, no global RNG drawn, modes restored."""
    config = dataclasses.replace(load_config("grpo", None), prompts_per_step=2, group_size=2, max_new_tokens=2)  # 4-row chunks
    records = load_records("grpo", write_jsonl(tmp_path / "answers.jsonl", ANSWERS), TOK)
    eval_records = load_records("grpo", write_jsonl(tmp_path / "eval.jsonl", EVAL_ANSWERS * 2), TOK)  # chunks of 4 and 2
    policy = trained(tiny_init(), scale=0.5)
    trainer = build_trainer("grpo", config, policy, records, TOK, None, eval_records=eval_records)
    prompts = [r["prompt"] for r in eval_records]
    generator = step_generator(config.seed, 0, "eval")
    chunks = [sample_responses(trainer.policy, prompts[i : i + 4], 1, trainer.sampling, generator) for i in (0, 4)]
    responses = [TOK.decode(r).strip() for rollout in chunks for r in rollout.token_lists()[1]]
    expected = sum(text == r["answer"] for text, r in zip(responses, eval_records)) / len(prompts)
    lengths = [n for rollout in chunks for n in rollout.response_lengths.tolist()]
    trainer.policy.train()
    rng = torch.get_rng_state()
    result = evaluate_rl(trainer, eval_records)
    assert torch.equal(torch.get_rng_state(), rng)
    assert trainer.policy.training and not trainer.reference.training
    assert result["reward_mean"] == pytest.approx(expected)
    assert result["response_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert abs(result["kl"]) < 1e-4  # the reference is the starting policy: sampling vs training numerics only
    assert evaluate_rl(trainer, eval_records) == result


# -- errors that name the flag -------------------------------------------------------------


def test_eval_flag_errors(files, eval_files, tmp_path, capsys):
    assert train("sft", files["sft"], files["offline"], tmp_path / "a", "--eval-every", "2") == 2
    assert "--eval-every needs --eval-data FILE" in capsys.readouterr().err
    assert train("sft", files["sft"], files["offline"], tmp_path / "b", "--eval-data", str(tmp_path / "none.jsonl")) == 2
    assert f"--eval-data {tmp_path / 'none.jsonl'}: no such file" in capsys.readouterr().err
    assert train("sft", files["sft"], files["offline"], tmp_path / "c", "--eval-data", eval_files["sft"], "--eval-every", "-1") == 2
    assert "--eval-every must be a number of steps >= 0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab", "response": "ba"}\n{"prompt": "ab"}\n')
    assert train("sft", files["sft"], files["offline"], tmp_path / "d", "--eval-data", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "response" in err
    no_answer = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ba"}])
    assert train("grpo", files["answers"], files["grouped"], tmp_path / "e", "--eval-data", no_answer) == 2
    assert "--eval-data: every record needs an 'answer'" in capsys.readouterr().err
    assert not any((tmp_path / name / "model").exists() for name in "abcde")


def test_eval_command_errors(files, eval_files, sft_policy_dir, capsys):
    assert main(["eval", "--algo", "dpo", "--model", sft_policy_dir, "--data", eval_files["pairs"]]) == 2
    assert "--algo dpo needs --ref-model" in capsys.readouterr().err
    assert main(["eval", "--algo", "rm", "--model", "tiny", "--data", eval_files["pairs"]]) == 2
    assert "evaluates a reward model folder" in capsys.readouterr().err
    assert main(["eval", "--algo", "sft", "--model", sft_policy_dir, "--data", eval_files["sft"], "--ref-model", "tiny"]) == 2
    assert "--ref-model is for --algo dpo and the RL algorithms" in capsys.readouterr().err
    assert main(["eval", "--algo", "grpo", "--model", sft_policy_dir, "--data", files["prompts"]]) == 2
    assert "--algo grpo needs --reward-model DIR, --reward-fn FILE.py:FUNCTION or an 'answer' in every record" in capsys.readouterr().err


def test_eval_data_is_refused_under_torchrun_before_anything_loads(files, eval_files, tmp_path, monkeypatch, capsys):
    import subprocess

    import rlhf_engine.train as train_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("reached past the --eval-data refusal")

    monkeypatch.setattr(subprocess, "run", must_not_run)  # --nproc: refused before launching
    args = ["--eval-data", eval_files["sft"]]
    assert train("sft", files["sft"], files["offline"], tmp_path / "out", *args, "--nproc", "2") == 2
    assert "--eval-data runs in one process only, not under torchrun" in capsys.readouterr().err
    for name in ("init_process_group", "load_policy", "load_tokenizer", "load_records"):
        monkeypatch.setattr(train_module, name, must_not_run)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert train("sft", files["sft"], files["offline"], tmp_path / "out", *args) == 2
    assert "rlhf-engine eval --model OUT/model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
