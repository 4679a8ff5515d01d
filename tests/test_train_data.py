"""``rlhf_engine.train_data`` / ``data_files``: the records ``rlhf-engine train`` feeds its trainers.

Chat data is tokenized as TRL's own trainers do it (their prepared datasets are the
reference); every file type gives the same records; field names and limits come from the
config's ``data:`` or the flags; truncation is counted; bad data names the file and row.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from rlhf_engine.cli import main
from rlhf_engine.models.tokenizers import ByteTokenizer, load_tokenizer
from rlhf_engine.train import load_config, run_identity
from rlhf_engine.train_data import DataConfig, implicit_prompt, is_chat, load_data, load_data_config, load_records
from tests import trl_support

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
# A template that writes the bos itself, as Llama's do: the loader must not add another one.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")  # fmt: skip
# One whose generation prompt the answer turn does not start with (an empty thought block, as
# Gemma's and DeepSeek-R1's): the responses start where prompt and conversation diverge.
THINKING = TEMPLATE.replace("{{ '<assistant>' }}", "{{ '<assistant><think>' }}")


def turns(*pairs):
    return [{"role": role, "content": text} for role, text in pairs]


USER, SYSTEM = turns(("user", "the cat runs")), turns(("system", "be quick"), ("user", "a bird sings"))
CHAT_PAIRS = [
    {"prompt": USER, "chosen": turns(("assistant", "a dog sees")), "rejected": turns(("assistant", "red"))},
    {"prompt": SYSTEM, "chosen": turns(("assistant", "slowly")), "rejected": turns(("assistant", "the old tree moves"))},
]
CHAT_SFT = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in CHAT_PAIRS]
MESSAGES = [{"messages": p["prompt"] + p["chosen"]} for p in CHAT_PAIRS]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module", params=[TEMPLATE, THINKING], ids=["template", "thinking-template"])
def hf_tokenizer(request):
    """TRL's test tokenizer (byte-level BPE) with :data:`TEMPLATE` or :data:`THINKING`."""
    tokenizer = trl_support.tokenizer()
    tokenizer.chat_template = request.param
    return tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer(hf_tokenizer, tmp_path_factory):
    """The same tokenizer as ``rlhf-engine train`` loads it from a model folder."""
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    hf_tokenizer.save_pretrained(folder)
    return load_tokenizer(str(folder))


def trl_prepared(trainer_name: str, rows: list, hf_tokenizer, tmp_path):
    """TRL's trainer ``trainer_name`` built on ``rows``: its tokenized training dataset."""
    import datasets
    import trl

    datasets.disable_progress_bars()
    kind = getattr(trl, trainer_name)
    config = getattr(trl, trainer_name.replace("Trainer", "Config"))
    extra = {"ref_model": trl_support.tiny_causal_lm(0)} if trainer_name == "DPOTrainer" else {}
    trainer = kind(model=trl_support.tiny_causal_lm(0), args=trl_support.trainer_args(config, tmp_path, max_length=None),
                   train_dataset=datasets.Dataset.from_list(rows), processing_class=hf_tokenizer, **extra)  # fmt: skip
    return trainer.train_dataset


# -- chat data: the same tokens as TRL's trainers ---------------------------------------------


def test_chat_prompt_completion_sft_matches_trl(hf_tokenizer, chat_tokenizer, tmp_path):
    """TRL's SFTTrainer on prompt-completion chat rows: input_ids = our prompt + response, and
    the loss (labels != -100) exactly on our response. The text we tokenize is what
    ``trl.data_utils.apply_chat_template`` renders, one bos (the template's)."""
    from trl.data_utils import apply_chat_template

    records = load_records("sft", write_jsonl(tmp_path / "sft.jsonl", CHAT_SFT), chat_tokenizer)
    prepared = trl_prepared("SFTTrainer", CHAT_SFT, hf_tokenizer, tmp_path / "trl")
    for (prompt, response), row, theirs in zip(records, CHAT_SFT, prepared, strict=True):
        assert prompt + response == theirs["input_ids"]
        assert [label != -100 for label in theirs["labels"]] == [False] * len(prompt) + [True] * len(response)
        assert prompt[0] == hf_tokenizer.bos_token_id != prompt[1]
        if hf_tokenizer.chat_template == TEMPLATE:  # (THINKING's prompts diverge inside a token)
            text = apply_chat_template(row, hf_tokenizer)
            assert hf_tokenizer.decode(prompt) == text["prompt"] and hf_tokenizer.decode(response) == text["completion"]
        else:
            assert len(prompt) < len(hf_tokenizer(text=apply_chat_template({"prompt": row["prompt"]}, hf_tokenizer)["prompt"])["input_ids"])


def test_chat_messages_sft_matches_trl(hf_tokenizer, chat_tokenizer, tmp_path):
    """``{"messages"}``: the loss on every token (TRL's default, assistant_only_loss=False),
    which for us is the whole conversation after its first token."""
    records = load_records("sft", write_jsonl(tmp_path / "sft.jsonl", MESSAGES), chat_tokenizer)
    prepared = trl_prepared("SFTTrainer", MESSAGES, hf_tokenizer, tmp_path / "trl")
    for (prompt, response), theirs in zip(records, prepared, strict=True):
        assert prompt + response == theirs["input_ids"] == theirs["labels"]
        assert len(prompt) == 1


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit-prompt", "implicit-prompt"])
def test_chat_preference_pairs_match_trl_dpo(implicit, hf_tokenizer, chat_tokenizer, tmp_path):
    """DPO (and RM pairs, the same records) on chat pairs: TRL's DPOTrainer's prompt_ids,
    chosen_ids, rejected_ids; with the prompt implicit in chosen / rejected too."""
    rows = [{k: r["prompt"] + r[k] for k in ("chosen", "rejected")} for r in CHAT_PAIRS] if implicit else CHAT_PAIRS
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prepared = trl_prepared("DPOTrainer", rows, hf_tokenizer, tmp_path / "trl")
    for algo in ("dpo", "rm"):
        records, stats = load_data(algo, path, chat_tokenizer)
        assert stats.chat == len(rows)
        for ours, theirs in zip(records, prepared, strict=True):
            assert (ours["prompt"], ours["chosen"], ours["rejected"]) == (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])


def test_rl_chat_prompts_are_rendered_with_the_generation_prompt(hf_tokenizer, chat_tokenizer, tmp_path):
    """An RL prompt as chat turns: the text of ``trl.data_utils.maybe_apply_chat_template``
    (generation prompt after a user turn; an assistant turn continued), and the record keeps
    the turns as ``prompt_text`` and the other fields under their names."""
    from trl.data_utils import maybe_apply_chat_template

    open_turn = USER + turns(("assistant", "a dog"))
    rows = [{"prompt": USER, "answer": "x", "level": 3}, {"prompt": open_turn}, {"prompt": "plain text", "id": "q1"}]
    records = load_records("grpo", write_jsonl(tmp_path / "rl.jsonl", rows), chat_tokenizer)
    for record, row in zip(records, rows, strict=True):
        text = maybe_apply_chat_template({"prompt": row["prompt"]}, hf_tokenizer)["prompt"]
        if is_chat(row["prompt"]):
            assert record["prompt"] == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        else:  # plain text: [bos] + the text, as before
            assert record["prompt"] == [chat_tokenizer.bos_token_id] + chat_tokenizer.encode(text)
        assert record["prompt_text"] == row["prompt"]
        assert record["fields"] == {k: v for k, v in row.items() if k != "prompt"}
    assert records[0]["answer"] == "x" and records[1]["answer"] is None
    assert hf_tokenizer.decode(records[1]["prompt"]).endswith("<assistant>a dog")  # continued, not closed


@pytest.mark.parametrize("chosen,rejected", [
    ("The sky is blue.", "The sky is green."),
    ("Hi there", "Hi you"),
    (USER + turns(("assistant", "a")), USER + turns(("assistant", "b"))),
    (SYSTEM + turns(("assistant", "a"), ("user", "more"), ("assistant", "b")), SYSTEM + turns(("assistant", "c"))),
])  # fmt: skip
def test_implicit_prompt_is_trls_extract_prompt(chosen, rejected):
    from trl.data_utils import extract_prompt

    theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
    assert implicit_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


@pytest.mark.parametrize("value", ["text", USER, [], [{"content": "no role"}], [["user", "x"]], 3])
def test_is_chat_agrees_with_trl_is_conversational(value):
    from trl.data_utils import is_conversational

    expected = bool(value) and isinstance(value, list) and is_conversational({"prompt": value})
    assert is_chat(value) == expected


# -- plain text and the formats named by TRL ---------------------------------------------------


def test_plain_text_records_keep_bos_and_eos(tmp_path):
    tok = ByteTokenizer()
    rows = [{"prompt": "ab", "response": "c"}]
    assert load_records("sft", write_jsonl(tmp_path / "a.jsonl", rows), tok) == [([1, 100, 101], [102, 2])]
    # TRL's prompt-completion field name gives the same records
    same = load_records("sft", write_jsonl(tmp_path / "b.jsonl", [{"prompt": "ab", "completion": "c"}]), tok)
    assert same == [([1, 100, 101], [102, 2])]
    pairs = load_records("dpo", write_jsonl(tmp_path / "p.jsonl", [{"chosen": "Hi there", "rejected": "Hi you"}]), tok)
    assert pairs == [{"prompt": [1] + tok.encode("Hi"), "chosen": tok.encode(" there") + [2], "rejected": tok.encode(" you") + [2]}]


# -- file types --------------------------------------------------------------------------------

ROWS = [{"prompt": "ab", "response": "ba", "margin": 1.0}, {"prompt": "cba", "response": "abc", "margin": 2.0}]


def saved(kind: str, folder: Path) -> Path:
    """``ROWS`` written as ``kind``: a file type, or a folder of datasets' save_to_disk."""
    import datasets

    dataset = datasets.Dataset.from_list(ROWS)
    path = folder / kind
    if kind == "saved":
        dataset.save_to_disk(str(path))
    elif kind == "saved-dict":
        datasets.DatasetDict(train=dataset, test=dataset.select([0])).save_to_disk(str(path))
    elif kind == "parquet-folder":  # split files as the hub lays them out, already downloaded
        (path / "data").mkdir(parents=True)
        dataset.to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
    else:
        path = folder / f"rows.{kind}"
        {"json": dataset.to_json, "parquet": dataset.to_parquet, "csv": dataset.to_csv}[kind](str(path))
    return path


@pytest.mark.parametrize("kind", ["json", "parquet", "csv", "saved", "saved-dict", "parquet-folder"])
def test_every_file_type_gives_the_same_records(kind, tmp_path):
    tok = ByteTokenizer()
    expected = load_records("sft", write_jsonl(tmp_path / "rows.jsonl", ROWS), tok)
    path = saved(kind, tmp_path)
    assert load_records("sft", path, tok) == expected
    records = load_records("grpo", path, tok)
    assert [r["fields"] for r in records] == [{k: v for k, v in row.items() if k != "prompt"} for row in ROWS]


def test_a_bad_row_in_a_parquet_file_names_the_file_and_row(tmp_path):
    import datasets

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"prompt": "ab", "response": "ba"}, {"prompt": "ab", "response": None}]).to_parquet(str(path))
    with pytest.raises(ValueError, match=f"{path}: row 1: field 'response' must be str"):
        load_records("sft", path, ByteTokenizer())


def test_data_paths_that_cannot_be_read_are_clear_errors(tmp_path):
    import datasets

    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="--data Qwen/some-dataset: no such file or folder .only local data"):
        load_records("sft", "Qwen/some-dataset", tok)  # a hub id is never downloaded
    (tmp_path / "rows.txt").write_text("prompt")
    with pytest.raises(ValueError, match=r"unknown data file type '.txt'; expected .jsonl, .json, .parquet, .csv"):
        load_records("sft", tmp_path / "rows.txt", tok)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"--data {tmp_path / 'bad.json'}: datasets could not read it"):
        load_records("sft", tmp_path / "bad.json", tok)
    splits = tmp_path / "splits"
    one = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict(a=one, b=one).save_to_disk(str(splits))
    with pytest.raises(ValueError, match=r"splits \['a', 'b'\] and no 'train' split"):
        load_records("sft", splits, tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a folder must be saved by save_to_disk or hold"):
        load_records("sft", tmp_path / "empty", tok)


# -- chat data errors ------------------------------------------------------------------------


def test_chat_data_with_a_tokenizer_without_template_names_the_file_and_the_way_out(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", MESSAGES)
    assert main(["train", "--algo", "sft", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1: field 'messages' holds chat turns, but the model's tokenizer has no chat template" in err
    assert "examples/make_tiny_chat_model.py" in err
    assert not (tmp_path / "out").exists()


def test_chat_data_without_jinja2_says_to_install_it(chat_tokenizer, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jinja2", None)  # what an absent package looks like to import
    path = write_jsonl(tmp_path / "chat.jsonl", MESSAGES)
    with pytest.raises(ValueError, match=f"{path}:1: field 'messages' holds chat turns, and chat templates need jinja2"):
        load_records("sft", path, chat_tokenizer)


BAD_CHAT = [
    ("dpo", {"prompt": "text", "chosen": USER, "rejected": USER}, "field 'chosen' and field 'prompt' must both be strings or both chat"),
    ("sft", {"prompt": SYSTEM[:1], "completion": USER}, "field 'prompt' ends with a 'system' turn"),
    ("sft", {"messages": "hello"}, "field 'messages' must be a list of chat turns"),
    ("grpo", {"prompt": []}, "field 'prompt' must be str or a list of chat turns"),
    ("dpo", {"chosen": USER, "rejected": SYSTEM}, "share no first turn to be the prompt"),
]  # fmt: skip


@pytest.mark.parametrize("algo,row,words", BAD_CHAT, ids=[w[:30] for _, _, w in BAD_CHAT])
def test_bad_chat_records_name_the_line(algo, row, words, chat_tokenizer, tmp_path):
    good = {"sft": CHAT_SFT[0], "dpo": CHAT_PAIRS[0], "grpo": {"prompt": USER}}[algo]
    if "prompt" not in row and algo == "dpo":
        good = {k: good["prompt"] + good[k] for k in ("chosen", "rejected")}  # the first record sets the format
    if "messages" in row:
        good = MESSAGES[0]
    path = write_jsonl(tmp_path / "data.jsonl", [good, row])
    with pytest.raises(ValueError, match=f"{path}:2: .*{re.escape(words)}"):
        load_records(algo, path, chat_tokenizer)


# -- the data config ---------------------------------------------------------------------------


def test_field_names_from_the_config_or_the_flags(tmp_path, capsys):
    tok = ByteTokenizer()
    renamed = [{"question": r["prompt"], "best": r["chosen"], "worst": r["rejected"]} for r in
               [{"prompt": "ab", "chosen": "ab", "rejected": "ba"}, {"prompt": "c", "chosen": "c", "rejected": "a"}]]  # fmt: skip
    usual = [{"prompt": r["question"], "chosen": r["best"], "rejected": r["worst"]} for r in renamed]
    config = tmp_path / "c.yaml"
    config.write_text("steps: 1\nbatch_size: 2\ndata:\n  prompt_field: question\n  chosen_field: best\n  rejected_field: worst\n")
    data = load_data_config(config)
    assert (data.prompt_field, data.chosen_field, data.rejected_field) == ("question", "best", "worst")
    assert load_records("dpo", write_jsonl(tmp_path / "r.jsonl", renamed), tok, data) == load_records(
        "dpo", write_jsonl(tmp_path / "u.jsonl", usual), tok)  # fmt: skip
    assert load_config("dpo", config).steps == 1  # the algorithm's config ignores data:
    (tmp_path / "empty.yaml").write_text("steps: 1\ndata:\n")
    assert load_data_config(tmp_path / "empty.yaml") == DataConfig()  # `data:` with nothing under it
    flags = load_data_config(config, {"prompt_field": "q2", "max_length": 9, "chosen_field": None})
    assert (flags.prompt_field, flags.chosen_field, flags.max_length) == ("q2", "best", 9)
    # the CLI: the config's data: and a flag over it
    rows = [{"q2": r["question"], "best": r["best"], "worst": r["worst"]} for r in renamed]
    args = ["train", "--algo", "dpo", "--model", "tiny", "--data", str(write_jsonl(tmp_path / "q2.jsonl", rows)),
            "--config", str(config), "--out", str(tmp_path / "out"), "--prompt-field", "q2"]  # fmt: skip
    assert main(args) == 0
    assert "data: " in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "data_stats.json").read_text())["records"] == 2


BAD_DATA_CONFIG = [
    ("data:\n  prompt_feild: q\n", "unknown DataConfig field(s) ['prompt_feild']"),
    ("data:\n  max_length: 0\n", "DataConfig.max_length must be >= 1 or null, got 0"),
    ("data:\n  max_length: ten\n", "DataConfig.max_length must be int"),
    ("data:\n  prompt_truncation: middle\n", "DataConfig.prompt_truncation must be 'left'"),
    ("data:\n  max_prompt_length: 8\n  max_length: 8\n", "DataConfig.max_prompt_length must be < max_length (8)"),
    ("data:\n  prompt_field: ''\n", "DataConfig.prompt_field must be a field name"),
    ("data: [prompt]\n", "expected a mapping of DataConfig fields"),
    ("steps: 2\nmax_length: 8\n", "unknown SFTConfig field(s) ['max_length']"),  # data fields live under data:
]


@pytest.mark.parametrize("text,words", BAD_DATA_CONFIG, ids=[w[:40] for _, w in BAD_DATA_CONFIG])
def test_a_bad_data_config_names_the_file_and_field(text, words, tmp_path, capsys):
    config, data = tmp_path / "c.yaml", write_jsonl(tmp_path / "d.jsonl", ROWS)
    config.write_text(text)
    args = ["train", "--algo", "sft", "--model", "tiny", "--data", str(data), "--config", str(config), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{config}" in err and words in err
    assert not (tmp_path / "o").exists()


def test_a_bad_flag_value_names_the_flag(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = ["train", "--algo", "sft", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "o"), "--max-length", "0"]
    assert main(args) == 2
    assert "--max-length: DataConfig.max_length must be >= 1" in capsys.readouterr().err


def test_nproc_checks_the_data_config_before_launching(tmp_path, capsys, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("launched torchrun"))
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = ["train", "--algo", "sft", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "o"), "--nproc", "2",
            "--max-prompt-length", "9", "--max-length", "9"]  # fmt: skip
    assert main(args) == 2
    assert "--max-prompt-length, --max-length: DataConfig.max_prompt_length must be < max_length (9)" in capsys.readouterr().err


def test_the_data_config_is_part_of_the_run_identity(tmp_path, capsys):
    """Resuming with other field names or limits is another run; the default data config adds
    nothing (checkpoints written before it existed still resume)."""
    assert "data" not in run_identity("tiny", load_config("sft", None), None, DataConfig())
    assert run_identity("tiny", load_config("sft", None), None, DataConfig(max_length=64))["data"] == {"max_length": 64}
    config, data, out = tmp_path / "c.yaml", write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "out"
    config.write_text("steps: 2\nbatch_size: 2\n")
    args = ["train", "--algo", "sft", "--model", "tiny", "--data", str(data), "--config", str(config), "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert main(args + ["--resume", "--max-prompt-length", "2"]) == 2
    assert "data.max_prompt_length ((default) saved, 2 now)" in capsys.readouterr().err


# -- truncation --------------------------------------------------------------------------------


def test_truncation_is_applied_and_counted(tmp_path):
    tok = ByteTokenizer()
    rows = [{"prompt": "abcdef", "chosen": "xyz", "rejected": "q"},  # prompt 7 ids with bos
            {"prompt": "ab", "chosen": "x", "rejected": "qrstuvw"},
            {"prompt": "abcdefghij", "chosen": "x", "rejected": "y"}]  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    records, stats = load_data("dpo", path, tok, DataConfig(max_prompt_length=4, max_length=6))
    enc = lambda text: tok.encode(text)  # noqa: E731
    assert records[0] == {"prompt": enc("cdef"), "chosen": enc("xy"), "rejected": enc("q") + [2]}
    assert records[1] == {"prompt": [1] + enc("ab"), "chosen": enc("x") + [2], "rejected": enc("qrs")}
    assert (stats.rows, stats.records, stats.prompts_truncated, stats.responses_truncated, stats.dropped) == (3, 3, 2, 2, 0)
    right = load_records("dpo", path, tok, DataConfig(max_prompt_length=4, prompt_truncation="right"))
    assert right[0]["prompt"] == [1] + enc("abc") and right[0]["chosen"] == enc("xyz") + [2]
    # a prompt alone at max_length: the record is dropped (TRL's DPO filter), and counted
    records, stats = load_data("dpo", path, tok, DataConfig(max_length=8))
    assert [r["prompt"] for r in records] == [[1] + enc("abcdef"), [1] + enc("ab")] and stats.dropped == 1
    assert "2 of 3 records; max_length 8: 3 responses truncated, 1 records dropped" in stats.summary()
    with pytest.raises(ValueError, match=f"{path}: all 3 records dropped: each prompt alone has >= max_length .2."):
        load_records("dpo", path, tok, DataConfig(max_length=2))


def test_rl_data_takes_max_prompt_length_only(tmp_path):
    tok = ByteTokenizer()
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abcdef", "answer": "x"}])
    records, stats = load_data("grpo", path, tok, DataConfig(max_prompt_length=3))
    assert records[0]["prompt"] == tok.encode("def") and records[0]["prompt_text"] == "abcdef" and stats.prompts_truncated == 1
    with pytest.raises(ValueError, match="data.max_length .8. bounds prompt . response for .'sft', 'rm', 'dpo'.; --algo grpo"):
        load_records("grpo", path, tok, DataConfig(max_length=8))


def test_the_summary_is_printed_and_written_by_train(tmp_path, capsys):
    config, data, out = tmp_path / "c.yaml", write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "out"
    config.write_text("steps: 1\nbatch_size: 2\ndata:\n  max_length: 5\n")
    args = ["train", "--algo", "sft", "--model", "tiny", "--data", str(data), "--config", str(config), "--out", str(out)]
    assert main(args) == 0
    line = f"data: {data}: 2 of 2 records; max_length 5: 2 responses truncated, 0 records dropped"
    assert line in capsys.readouterr().out
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["responses_truncated"] == 2 and stats["max_length"] == 5 and stats["path"] == str(data)
    assert main(args + ["--quiet", "--out", str(tmp_path / "quiet")]) == 0
    assert "data: " not in capsys.readouterr().out


# -- the README's chat example -----------------------------------------------------------------


def readme_chat_commands() -> list[str]:
    """The commands of the README's "Chat data" block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = text.split("### Chat data and other formats", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_chat_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """Each command of the README's chat block, in a fresh folder beside the repository's
    examples/: the tiny chat model is built, SFT and DPO train on the chat files."""
    import runpy
    import shlex
    import sys

    commands = readme_chat_commands()
    assert commands[0].startswith("python examples/make_tiny_chat_model.py ")
    assert sum(c.startswith("rlhf-engine train ") for c in commands) == len(commands) - 1 >= 2
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        words = shlex.split(command.split("#", 1)[0])
        if words[0] == "python":
            monkeypatch.setattr(sys, "argv", words[1:])
            runpy.run_path(words[1], run_name="__main__")
        else:
            assert main(words[1:] + ["--quiet"]) == 0, command
    out = capsys.readouterr().out
    assert out.count("3 steps run") == len(commands) - 1
    for command in commands[1:]:
        run = Path(shlex.split(command)[shlex.split(command).index("--out") + 1])
        assert json.loads((run / "data_stats.json").read_text())["chat"] > 0
        assert (run / "model" / "chat_template.jinja").is_file() or "chat_template" in (run / "model" / "tokenizer_config.json").read_text()


def test_the_readme_data_config_block_is_a_valid_data_config(tmp_path):
    text = (REPO / "README.md").read_text().split("### Chat data and other formats", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "c.yaml").write_text(block)
    data = load_data_config(tmp_path / "c.yaml")
    assert (data.prompt_field, data.max_prompt_length, data.max_length) == ("question", 512, 1024)


def test_chat_rankings_are_the_pairs_responses(chat_tokenizer, tmp_path):
    """A reward-model ranking of chat responses: each response is what a pair of them gives."""
    pair = CHAT_PAIRS[1]
    ranking = {"prompt": pair["prompt"], "responses": [pair["chosen"], pair["rejected"]]}
    (ours,) = load_records("rm", write_jsonl(tmp_path / "r.jsonl", [ranking]), chat_tokenizer)
    (expected,) = load_records("rm", write_jsonl(tmp_path / "p.jsonl", [pair]), chat_tokenizer)
    assert ours == {"prompt": expected["prompt"], "responses": [expected["chosen"], expected["rejected"]]}


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> str:
    """The README's tiny chat model folder, built by the example script."""
    import runpy

    build = runpy.run_path(str(REPO / "examples" / "make_tiny_chat_model.py"))["build"]
    return str(build(tmp_path_factory.mktemp("tiny-chat") / "model"))


def test_grpo_trains_on_chat_prompts(tiny_chat_model, tmp_path, capsys):
    """RL prompts as chat turns: rendered with the generation prompt, answer rewards, 3 steps."""
    rows = [{"prompt": turns(("user", q)), "answer": ""} for q in ("ab", "cba", "ca")]
    config = tmp_path / "c.yaml"
    config.write_text("steps: 3\nprompts_per_step: 4\ngroup_size: 8\nmax_new_tokens: 1\nminibatch_size: 16\n")
    args = ["train", "--algo", "grpo", "--model", tiny_chat_model, "--data", str(write_jsonl(tmp_path / "q.jsonl", rows)),
            "--config", str(config), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"data: {tmp_path / 'q.jsonl'}: 3 of 3 records (3 chat)" in out and "grpo: 3 steps run" in out


def test_eval_data_is_read_with_the_data_config(tmp_path, capsys):
    """``--eval-data`` and ``rlhf-engine eval`` read their records with the run's ``data:``."""
    rows = [{"question": r["prompt"], "response": r["response"]} for r in ROWS]
    config, data, out = tmp_path / "c.yaml", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out"
    config.write_text("steps: 1\nbatch_size: 2\ndata:\n  prompt_field: question\n")
    args = ["train", "--algo", "sft", "--model", "tiny", "--data", str(data), "--config", str(config), "--out", str(out)]
    assert main(args + ["--eval-data", str(data)]) == 0
    assert json.loads((out / "eval_data_stats.json").read_text())["records"] == len(rows)
    capsys.readouterr()
    assert main(["eval", "--algo", "sft", "--model", str(out / "model"), "--data", str(data), "--config", str(config)]) == 0
    assert "sft eval of" in capsys.readouterr().out
