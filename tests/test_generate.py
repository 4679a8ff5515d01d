"""``rlhf-engine generate``: completions of JSONL prompts from a saved model folder, exactly what
the trainer's sampler draws with the same seed; the refusals and flag errors; ``--quiet``."""

import json

import pytest
import torch

from rlhf_engine.algos.common import sample_responses
from rlhf_engine.cli import main
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.models.tokenizers import ByteTokenizer
from rlhf_engine.quiet import quiet_transformers
from rlhf_engine.rollout import SamplingConfig
from tests.test_train import write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [{"prompt": "ab"}, {"prompt": "cba", "answer": "abc"}, {"prompt": "ca"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model = root / "model"
    PolicyModel.from_config(llama_config("tiny", ByteTokenizer.vocab_size), seed=3).save(model)
    ByteTokenizer().save(model)
    return {"model": str(model), "prompts": write_jsonl(root / "prompts.jsonl", PROMPTS), "root": root}


def generate(folder, *extra, model=None) -> list[str]:
    return ["generate", "--model", model or folder["model"], "--prompts", folder["prompts"], "--quiet", *extra]


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def expected(folder, n: int, seed: int, max_new_tokens: int, **sampling) -> list[list[str]]:
    """What the trainer's sampler draws for the prompts, decoded: the reference output."""
    tok = ByteTokenizer()
    prompts = [[tok.bos_token_id] + tok.encode(r["prompt"]) for r in PROMPTS]
    config = SamplingConfig(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            **sampling)  # fmt: skip
    rollout = sample_responses(PolicyModel.load(folder["model"]), prompts, n, config, torch.Generator().manual_seed(seed))
    responses = [tok.decode(r) for r in rollout.token_lists()[1]]
    return [responses[i * n:(i + 1) * n] for i in range(len(prompts))]


def test_generate_writes_one_line_per_prompt_as_the_sampler_draws(folder, capsys):
    assert main(generate(folder, "--max-new-tokens", "6", "--seed", "5", "--device", "cpu")) == 0
    out = lines(capsys.readouterr().out)
    assert [r["prompt"] for r in out] == ["ab", "cba", "ca"]
    assert [[r["completion"]] for r in out] == expected(folder, 1, 5, 6)
    assert all(set(r) == {"prompt", "completion"} for r in out)


def test_num_samples_top_p_and_the_out_file(folder, tmp_path, capsys):
    target = tmp_path / "out.jsonl"
    args = ["--num-samples", "3", "--max-new-tokens", "4", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"]
    assert main(generate(folder, *args, "--out", str(target))) == 0
    assert capsys.readouterr().out == ""
    out = lines(target.read_text())
    assert [r["completions"] for r in out] == expected(folder, 3, 1, 4, temperature=0.7, top_p=0.9)
    assert all(set(r) == {"prompt", "completions"} for r in out)
    # Another seed, other samples; the same seed, the same ones.
    assert main(generate(folder, *args[:-1], "2")) == 0
    assert [r["completions"] for r in lines(capsys.readouterr().out)] != [r["completions"] for r in out]
    assert main(generate(folder, *args)) == 0
    assert lines(capsys.readouterr().out) == out


def test_batches_draw_in_turn_from_one_generator(folder, capsys):
    """--batch-size 1 samples prompt after prompt from the same stream: the same seed still gives
    a fixed output, and each prompt's completion is the one the sampler draws in that order."""
    assert main(generate(folder, "--batch-size", "1", "--max-new-tokens", "3")) == 0
    out = lines(capsys.readouterr().out)
    tok, generator = ByteTokenizer(), torch.Generator().manual_seed(0)
    policy = PolicyModel.load(folder["model"])
    sampling = SamplingConfig(max_new_tokens=3, eos_token_id=2, pad_token_id=0)
    for record, prompt in zip(out, PROMPTS):
        rollout = sample_responses(policy, [[1] + tok.encode(prompt["prompt"])], 1, sampling, generator)
        assert record["completion"] == tok.decode(rollout.token_lists()[1][0])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "0"], "--temperature must be finite and > 0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--device", "gpu0"], "--device must be a torch device"),
    ],
)
def test_bad_flags_name_the_flag(folder, extra, message, capsys):
    assert main(generate(folder, *extra)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_refusals(folder, tmp_path, capsys):
    assert main(generate(folder, model="tiny")) == 2
    assert "--model tiny is a built-in size with random weights" in capsys.readouterr().err
    reward_model = tmp_path / "rm"
    ScalarHeadModel.from_policy(PolicyModel.load(folder["model"])).save(reward_model)
    ByteTokenizer().save(reward_model)
    assert main(generate(folder, model=str(reward_model))) == 2
    assert "is a reward model (a sequence classifier" in capsys.readouterr().err
    assert main(["generate", "--model", folder["model"], "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert f"--prompts {tmp_path / 'none.jsonl'}: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab"}\n{"text": "x"}\n')
    assert main(["generate", "--model", folder["model"], "--prompts", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err  # the loader's message: file and line


def test_quiet_silences_the_loading_bars(folder, capsys):
    assert main(generate(folder, "--max-new-tokens", "2")) == 0
    assert capsys.readouterr().err == ""
    assert main([a for a in generate(folder, "--max-new-tokens", "2") if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" in err and "generate" in err  # transformers' bar, and ours


def test_quiet_transformers_restores_the_switches():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError):
        with quiet_transformers():
            assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.ERROR
            raise RuntimeError
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.WARNING
    with quiet_transformers(False):
        assert hf_logging.is_progress_bar_enabled()
