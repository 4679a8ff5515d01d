"""``rlhf-engine train``: every algorithm end to end on the built-in tiny model and JSONL data
written here, a saved run's folder as ``--model``, errors that name the data file and line
or the config field, and resume equivalence (a run stopped at step k and resumed ends
bitwise where the uninterrupted run ends)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_engine.algos.sft import SFTConfig
from rlhf_engine.cli import main
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.models.tokenizers import ByteTokenizer, load_tokenizer
from rlhf_engine.train import load_config, run_train

SFT = [{"prompt": "ab", "response": "ba"}, {"prompt": "cba", "response": "abc"}, {"prompt": "ca", "response": "ac"}]
PAIRS = [
    {"prompt": "ab", "chosen": "ab", "rejected": "ba"},
    {"prompt": "cba", "chosen": "abc", "rejected": "cab", "margin": 1.5},
    {"prompt": "ca", "chosen": "ac", "rejected": "c"},
]
RANKINGS = [{"prompt": "ab", "responses": ["ab", "ba", "b"]}, {"prompt": "cba", "responses": ["abc", "cab"]}]
# With one new token, a response decodes to "" (stripped) when it is EOS or a whitespace byte:
# about 13 of the 259 ids, so some groups have mixed rewards and the policy really moves.
ANSWERS = [{"prompt": "ab", "answer": ""}, {"prompt": "cba", "answer": " "}, {"prompt": "ca", "answer": ""}]
PROMPTS = [{"prompt": "ab"}, {"prompt": "cba"}, {"prompt": "ca"}]

OFFLINE = "steps: 3\nbatch_size: 4\n"
GROUPED = "steps: 3\nprompts_per_step: 4\ngroup_size: 8\nmax_new_tokens: 1\nminibatch_size: 16\n"
SINGLE = "steps: 3\nprompts_per_step: 16\ngroup_size: 1\nmax_new_tokens: 1\nminibatch_size: 8\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train-data")
    data = {name: write_jsonl(root / f"{name}.jsonl", records) for name, records in
            [("sft", SFT), ("pairs", PAIRS), ("rankings", RANKINGS), ("answers", ANSWERS), ("prompts", PROMPTS)]}  # fmt: skip
    for name, text in [("offline", OFFLINE), ("grouped", GROUPED), ("single", SINGLE)]:
        (root / f"{name}.yaml").write_text(text)
        data[name] = str(root / f"{name}.yaml")
    return data


def train(algo: str, data: str, config: str, out: Path, *extra: str, model: str = "tiny") -> int:
    args = ["train", "--algo", algo, "--model", model, "--data", data, "--config", config, "--out", str(out), "--quiet"]
    return main(args + list(extra))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_model_dir(files, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("rm")
    assert train("rm", files["pairs"], files["offline"], out) == 0
    return str(out / "model")


@pytest.fixture(scope="module")
def sft_dir(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    assert train("sft", files["sft"], files["offline"], out) == 0
    return out


def tiny_init() -> PolicyModel:
    tok = ByteTokenizer()
    config = llama_config("tiny", tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)  # fmt: skip
    return PolicyModel.from_config(config, seed=0)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# -- every algorithm through the CLI ------------------------------------------------------

CASES = [
    ("sft", "sft", "offline", False),
    ("rm", "pairs", "offline", False),
    ("rm", "rankings", "offline", False),
    ("dpo", "pairs", "offline", False),
    ("ppo", "prompts", "single", True),
    ("grpo", "answers", "grouped", False),
    ("grpo", "prompts", "grouped", True),
    ("rloo", "answers", "grouped", False),
    ("rloo", "prompts", "grouped", True),
    ("reinforce_pp", "answers", "single", False),
    ("reinforce_pp", "prompts", "single", True),
]


@pytest.mark.parametrize("algo,data,config,with_rm", CASES, ids=[f"{a}-{d}" for a, d, _, _ in CASES])
def test_each_algorithm_trains_through_the_cli(algo, data, config, with_rm, files, reward_model_dir, tmp_path, capsys):
    extra = ["--reward-model", reward_model_dir] if with_rm else []
    assert train(algo, files[data], files[config], tmp_path, *extra) == 0
    assert f"{algo}: 3 steps run" in capsys.readouterr().out
    lines = metrics(tmp_path)
    assert [(r["phase"], r["step"]) for r in lines] == [(algo, k) for k in range(3)]
    assert all(v is None or isinstance(v, (int, float)) for r in lines for v in r.values() if not isinstance(v, str))
    if algo == "rm":
        model = ScalarHeadModel.load(tmp_path / "model")
        assert model.head.weight.abs().sum() > 0  # the zero-initialised head was trained
    else:
        model = PolicyModel.load(tmp_path / "model")
        assert not torch.equal(model.lm_head_weight, tiny_init().lm_head_weight)
    assert load_tokenizer(str(tmp_path / "model")).vocab_size == ByteTokenizer.vocab_size
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002"


def test_a_saved_run_is_a_model_path(files, sft_dir, tmp_path):
    """A folder written by ``train`` is a ``--model`` (its byte tokenizer marker is read back)."""
    first = metrics(sft_dir)
    assert train("sft", files["sft"], files["offline"], tmp_path / "again", model=str(sft_dir / "model")) == 0
    again = metrics(tmp_path / "again")
    # Starting from the trained weights, not a fresh init: the first loss is the trained one.
    assert again[0]["loss"] < first[0]["loss"] - 0.1
    start = PolicyModel.load(sft_dir / "model")
    assert not torch.equal(PolicyModel.load(tmp_path / "again" / "model").lm_head_weight, start.lm_head_weight)
    assert train("grpo", files["answers"], files["grouped"], tmp_path / "rl", model=str(sft_dir / "model")) == 0
    assert len(metrics(tmp_path / "rl")) == 3


def test_a_hugging_face_model_folder_and_its_saved_run(files, tmp_path):
    """A local folder with a Hugging Face tokenizer trains, and its output folder carries that
    tokenizer (so it is a ``--model`` in turn)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): 3 + i for i, c in enumerate(range(ord("a"), ord("z") + 1))}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    folder = tmp_path / "hf"
    tokenizer.save_pretrained(folder)
    PolicyModel.from_config(llama_config("tiny", len(vocab)), seed=1).save(folder)
    assert train("sft", files["sft"], files["offline"], tmp_path / "one", model=str(folder)) == 0
    assert train("sft", files["sft"], files["offline"], tmp_path / "two", model=str(tmp_path / "one" / "model")) == 0
    saved = load_tokenizer(str(tmp_path / "two" / "model"))
    assert saved.vocab_size == len(vocab) and saved.encode("cab") == [5, 3, 4] and saved.eos_token_id == 2
    assert PolicyModel.load(tmp_path / "two" / "model").vocab_size == len(vocab)
    assert metrics(tmp_path / "two")[0]["loss"] < metrics(tmp_path / "one")[0]["loss"]


def test_a_tokenizer_with_ids_outside_the_embedding_is_a_clear_error(files, tmp_path, capsys):
    """A pad token the tokenizer adds as a new id (transformers does so for a Qwen2 tokenizer
    without one) has no embedding row: refused when loading, before a batch reaches
    ``torch.embedding`` (where it was an IndexError)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{chr(c): 2 + i for i, c in enumerate(range(ord("a"), ord("z") + 1))}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    word_level.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})  # a new id, len(vocab)
    folder = tmp_path / "hf"
    tokenizer.save_pretrained(folder)
    PolicyModel.from_config(llama_config("tiny", len(vocab)), seed=1).save(folder)
    assert train("sft", files["sft"], files["offline"], tmp_path / "out", model=str(folder)) == 2
    err = capsys.readouterr().err
    assert f"pad token id {len(vocab)} is outside the model's embedding ({len(vocab)} rows" in err
    assert "resize_token_embeddings" in err and "IndexError" not in err


def test_model_folder_without_tokenizer_is_a_clear_error(files, sft_dir, tmp_path, capsys):
    folder = tmp_path / "bare"
    PolicyModel.load(sft_dir / "model").save(folder)  # weights and config only
    assert train("sft", files["sft"], files["offline"], tmp_path / "out", model=str(folder)) == 2
    err = capsys.readouterr().err
    assert f"model {folder}: the folder has no tokenizer" in err and "save_pretrained" in err
    assert "sentencepiece" not in err  # transformers' advice, which would not help


def test_a_hub_id_is_told_only_local_folders_are_read(files, tmp_path, capsys):
    assert train("sft", files["sft"], files["offline"], tmp_path / "out", model="Qwen/Qwen2.5-0.5B") == 2
    err = capsys.readouterr().err
    assert "looks like a Hugging Face hub id" in err and "huggingface-cli download Qwen/Qwen2.5-0.5B" in err


def test_a_missing_data_file_names_the_flag(files, tmp_path, capsys):
    assert train("sft", str(tmp_path / "nope.jsonl"), files["offline"], tmp_path / "out") == 2
    assert f"--data {tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err


def test_ppo_and_missing_reward_need_a_reward_model(files, tmp_path, capsys):
    assert train("ppo", files["answers"], files["single"], tmp_path / "ppo") == 2
    assert "--algo ppo needs --reward-model DIR" in capsys.readouterr().err
    assert train("grpo", files["prompts"], files["grouped"], tmp_path / "grpo") == 2
    assert "or an 'answer' in every record" in capsys.readouterr().err


# -- malformed data -----------------------------------------------------------------------

GOOD_SFT = json.dumps(SFT[0])
BAD_DATA = [
    # (algo, file text, the line named, words in the message)
    ("sft", f"{GOOD_SFT}\n{GOOD_SFT}\n{{\"prompt\": \"a\",\n", 3, "malformed JSON"),
    ("sft", f"{GOOD_SFT}\n\n{json.dumps({'prompt': 'a'})}\n", 3, "missing field 'response'"),  # blank line 2 still counts
    ("sft", f"{GOOD_SFT}\n{json.dumps({'prompt': 'a', 'response': 7})}\n", 2, "field 'response' must be str"),
    ("sft", f"{GOOD_SFT}\n[1, 2]\n", 2, "expected a JSON object"),
    ("dpo", f"{json.dumps(PAIRS[0])}\n{json.dumps({**PAIRS[0], 'rejected': None})}\n", 2, "field 'rejected' must be str"),
    ("rm", f"{json.dumps(PAIRS[0])}\n\n{json.dumps({**PAIRS[0], 'margin': 'big'})}\n", 3, "'margin' must be a number"),
    ("rm", f"{json.dumps(RANKINGS[0])}\n\n{json.dumps({'prompt': 'a', 'responses': ['x']})}\n", 3, "at least two strings"),
    ("rm", f"{json.dumps(RANKINGS[0])}\n{json.dumps(PAIRS[0])}\n", 2, "missing field 'responses'"),
    ("grpo", f"{json.dumps(ANSWERS[0])}\n\n{json.dumps({'prompt': 'a', 'answer': 3})}\n", 3, "field 'answer' must be str"),
    ("rloo", f"{json.dumps(ANSWERS[0])}\n{json.dumps({'answer': 'a'})}\n", 2, "missing field 'prompt'"),
]


@pytest.mark.parametrize("algo,text,line,words", BAD_DATA, ids=[f"{a}-line{n}-{w}" for a, _, n, w in BAD_DATA])
def test_malformed_data_names_the_file_and_line(algo, text, line, words, files, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    config = files["offline"] if algo in ("sft", "rm", "dpo") else files["grouped"]
    assert train(algo, str(data), config, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{data}:{line}: " in err and words in err
    with pytest.raises(ValueError, match=f"{data}:{line}: .*{words}"):
        run_train(algo, "tiny", data, tmp_path / "out", config_path=config, quiet=True)
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("algo", ["sft", "rm", "dpo", "grpo"])
@pytest.mark.parametrize("text", ["", "\n  \n"], ids=["empty", "blank"])
def test_empty_data_file_is_an_error(algo, text, files, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    assert train(algo, str(data), files["offline" if algo != "grpo" else "grouped"], tmp_path / "out") == 2
    assert f"{data}: no records" in capsys.readouterr().err


def test_missing_data_or_config_file_is_an_error(files, tmp_path, capsys):
    assert train("sft", str(tmp_path / "nope.jsonl"), files["offline"], tmp_path / "out") == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert train("sft", files["sft"], str(tmp_path / "nope.yaml"), tmp_path / "out") == 2
    assert "nope.yaml" in capsys.readouterr().err


# -- invalid config -----------------------------------------------------------------------

BAD_CONFIG = [
    # (algo, YAML text, words the message must hold)
    ("sft", "steps: 2\nlearning_rate: 0.1\n", ["unknown SFTConfig field(s) ['learning_rate']"]),
    ("sft", "steps: two\n", ["SFTConfig.steps must be int", "'two'"]),
    ("sft", "batch_size: true\n", ["SFTConfig.batch_size must be int"]),
    ("rm", "lr: -0.1\n", ["RewardModelConfig.lr must be > 0"]),
    ("rm", "ranking_loss: listnet\n", ["RewardModelConfig.ranking_loss must be one of"]),
    ("dpo", "label_smoothing: 0.5\n", ["DPOConfig.label_smoothing must be in [0, 0.5)"]),
    ("ppo", "top_p: 1.5\n", ["RLConfig.top_p must be in (0, 1]"]),
    ("ppo", "variant: dapo\n", ["unknown RLConfig field(s) ['variant']"]),
    ("grpo", "variant: grpo2\n", ["variant must be one of", "'grpo2'"]),
    ("grpo", "variant: [dapo]\n", ["variant must be one of"]),
    ("grpo", "group_size: 1\n", ["RLConfig.group_size must be >= 2"]),
    ("rloo", "kl_target: 0\n", ["RLConfig.kl_target must be > 0 or null"]),
    ("sft", "- steps\n- 3\n", ["expected a mapping", "list"]),
    ("sft", "steps: [1\n", ["not valid YAML"]),
]


@pytest.mark.parametrize("algo,text,words", BAD_CONFIG, ids=[f"{a}-{w[0][:40]}" for a, _, w in BAD_CONFIG])
def test_invalid_config_names_the_file_and_field(algo, text, words, files, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    data = files["sft" if algo == "sft" else "pairs" if algo in ("rm", "dpo") else "answers"]
    assert train(algo, data, str(config), tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{config}: " in err
    for w in words:
        assert w in err
    assert not (tmp_path / "out").exists()


def test_empty_config_keeps_the_defaults(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("# nothing set\n")
    assert load_config("grpo", config) == load_config("grpo", None)
    assert load_config("grpo", None).advantage == "grpo" and load_config("grpo", None).group_size == 8
    assert load_config("sft", config) == SFTConfig()


# -- resume -------------------------------------------------------------------------------

STEADY = ("time", "tokens_per_s")  # wall-clock metrics differ between any two runs


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in STEADY} for r in rows]


RESUME_CASES = [
    ("sft", "sft", "steps: 5\nbatch_size: 4\n", False),
    ("grpo", "answers", "steps: 5\nprompts_per_step: 4\ngroup_size: 8\nmax_new_tokens: 1\nminibatch_size: 8\n", False),
    ("ppo", "prompts", "steps: 5\nprompts_per_step: 4\ngroup_size: 1\nmax_new_tokens: 3\nminibatch_size: 2\nkl_target: 0.01\n", True),
]


@pytest.mark.parametrize("algo,data,text,with_rm", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_reaches_the_uninterrupted_result(algo, data, text, with_rm, files, reward_model_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    kwargs = dict(config_path=config, reward_model_path=reward_model_dir if with_rm else None, quiet=True)
    whole = run_train(algo, "tiny", files[data], tmp_path / "whole", **kwargs)
    assert len(whole) == 5
    if algo == "grpo":  # the answer reward really varied within groups, so the policy moved
        assert any(r["reward_std"] > 0 for r in whole) and any(r["grad_norm"] > 0 for r in whole)
    if algo == "ppo":  # the adaptive KL coefficient moved: its state must be carried over
        assert whole[-1]["kl_coef"] != whole[0]["kl_coef"]
    k = 2
    part = tmp_path / "part"
    first = run_train(algo, "tiny", files[data], part, checkpoint_every=1, stop_after=k, **kwargs)
    assert comparable(first) == comparable(whole[:k])
    torch.manual_seed(12345)  # whatever the global RNG holds now, the resumed run must not depend on it
    rest = run_train(algo, "tiny", files[data], part, checkpoint_every=1, resume=True, **kwargs)
    assert comparable(rest) == comparable(whole[k:])
    assert [r["step"] for r in metrics(part)] == list(range(5))
    assert comparable(metrics(part)) == comparable(metrics(tmp_path / "whole"))
    assert_same_weights(PolicyModel.load(part / "model"), PolicyModel.load(tmp_path / "whole" / "model"))


def test_resume_without_checkpoint_is_an_error_and_after_completion_runs_nothing(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert train("sft", files["sft"], files["offline"], out, "--resume") == 2
    err = capsys.readouterr().err
    assert "--resume, but" in err and "holds no checkpoint" in err
    assert not (out / "model").exists()
    assert train("sft", files["sft"], files["offline"], out) == 0
    assert [r["step"] for r in metrics(out)] == [0, 1, 2]
    done = PolicyModel.load(out / "model")
    capsys.readouterr()
    assert train("sft", files["sft"], files["offline"], out, "--resume") == 0
    assert "sft: 0 steps run" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == [0, 1, 2]
    assert_same_weights(PolicyModel.load(out / "model"), done)


def test_resume_refuses_another_algo_model_or_config(files, sft_dir, tmp_path, capsys):
    """A checkpoint records its algorithm, model and config: resuming it as another run is refused,
    naming what differs, and nothing is overwritten; a longer run (more steps) resumes."""
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text("steps: 2\nbatch_size: 4\n")
    assert train("sft", files["sft"], str(config), out) == 0
    before = PolicyModel.load(out / "model")
    capsys.readouterr()
    assert train("dpo", files["pairs"], str(config), out, "--resume") == 2
    assert "is a checkpoint of 'sft', not of 'dpo'" in capsys.readouterr().err
    assert train("sft", files["sft"], str(config), out, "--resume", model=str(sft_dir / "model")) == 2
    assert "model ('tiny' saved" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text("steps: 2\nbatch_size: 4\nlr: 1e-4\n")
    assert train("sft", files["sft"], str(other), out, "--resume") == 2
    assert "config.lr (0.003 saved, 0.0001 now)" in capsys.readouterr().err
    assert_same_weights(PolicyModel.load(out / "model"), before)  # nothing was overwritten
    longer = tmp_path / "longer.yaml"
    longer.write_text("steps: 3\nbatch_size: 4\n")
    assert train("sft", files["sft"], str(longer), out, "--resume") == 0
    assert [r["step"] for r in metrics(out)] == [0, 1, 2]


def test_keep_last_prunes_old_checkpoints_and_the_run_still_resumes(files, tmp_path, capsys):
    out, config = tmp_path / "out", tmp_path / "config.yaml"
    config.write_text("steps: 4\nbatch_size: 4\n")
    assert train("sft", files["sft"], str(config), out, "--checkpoint-every", "1", "--keep-last", "2") == 0
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-00000002", "step-00000003"]
    assert (out / "checkpoints" / "latest").read_text() == "step-00000003"
    config.write_text("steps: 5\nbatch_size: 4\n")
    assert train("sft", files["sft"], str(config), out, "--resume", "--keep-last", "1") == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004"]
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3, 4]
    capsys.readouterr()
    assert train("sft", files["sft"], str(config), tmp_path / "bad", "--keep-last", "0") == 2
    assert "--keep-last must be a number of checkpoints >= 1, got 0" in capsys.readouterr().err


def test_pruning_never_removes_the_checkpoint_latest_names(tmp_path):
    from rlhf_engine.models.checkpoint import prune_checkpoints

    for step in (1, 2, 3):
        (tmp_path / f"step-{step:08d}").mkdir()
    (tmp_path / "latest").write_text("step-00000001")  # e.g. a resumed run that re-saves an older step
    removed = prune_checkpoints(tmp_path, 1)
    assert [p.name for p in removed] == ["step-00000002"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001", "step-00000003"]


def test_resume_after_a_crash_between_checkpoints(files, tmp_path):
    """Steps logged after the last checkpoint are run again on resume and logged once."""
    config = tmp_path / "config.yaml"
    config.write_text("steps: 5\nbatch_size: 4\n")
    whole = run_train("sft", "tiny", files["sft"], tmp_path / "whole", config_path=config, quiet=True)
    out = tmp_path / "out"
    run_train("sft", "tiny", files["sft"], out, config_path=config, checkpoint_every=2, stop_after=4, quiet=True)
    # A crash during step 4 with checkpoints every 2 steps: the checkpoint of step 3 (the
    # stop_after one, which a crash would not have written) is gone; step 1's is the latest.
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    (out / "checkpoints" / "latest").write_text("step-00000001")
    rest = run_train("sft", "tiny", files["sft"], out, config_path=config, checkpoint_every=2, resume=True, quiet=True)
    assert comparable(rest) == comparable(whole[2:])
    assert [r["step"] for r in metrics(out)] == list(range(5))
    assert_same_weights(PolicyModel.load(out / "model"), PolicyModel.load(tmp_path / "whole" / "model"))
