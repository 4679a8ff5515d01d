"""SortingTask (gold score, data, labels) and the tasks.data helpers."""

import json
import math

import pytest
import torch

from rlhf_engine.tasks import SortingTask, left_pad, read_jsonl, right_pad

EOS = 2


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def task():
    return SortingTask()


# ---- vocabulary and text ---------------------------------------------------------


def test_vocabulary_and_lengths(task):
    assert (task.vocab_size, task.pad_token_id, task.bos_token_id, task.eos_token_id, task.sep_token_id) == (14, 0, 1, 2, 3)
    assert task.max_prompt_len == task.max_digits + 2
    assert task.max_response_len == task.max_digits + 1


def test_encode_decode_round_trip(task):
    assert task.encode("<bos>312<sep>") == [1, 7, 5, 6, 3]
    assert task.encode(" 1 2\t<eos>") == [5, 6, 2]
    ids = [1, 4, 13, 3, 4, 13, 2, 0]
    assert task.encode(task.decode(ids)) == ids
    assert task.decode(torch.tensor([5, 2])) == "1<eos>"


@pytest.mark.parametrize("bad", ["12a", "<bos", "<foo>1"])
def test_encode_rejects_unknown_text(task, bad):
    with pytest.raises(ValueError, match="text"):
        task.encode(bad)


def test_decode_rejects_out_of_vocab(task):
    with pytest.raises(ValueError, match="ids"):
        task.decode([1, 14])


# ---- gold score --------------------------------------------------------------------


def test_gold_score_hand_cases(task):
    prompt = task.encode("<bos>53142<sep>")  # target 12345<eos>, length 6
    g = lambda text: task.gold_score(prompt, task.encode(text))  # noqa: E731
    assert g("12345<eos>") == 1.0
    assert g("12395<eos>") == pytest.approx(5 / 6)  # one wrong digit
    assert g("12435<eos>") == pytest.approx(4 / 6)  # one adjacent swap
    assert g("12345") == pytest.approx(5 / 6)  # no <eos>
    assert g("1234<eos>") == pytest.approx(4 / 6)  # last digit missing
    assert g("2345<eos>") == 0.0  # first digit missing shifts everything
    assert g("123456<eos>") == pytest.approx(5 / 7)  # one extra digit
    assert g("12345<eos>999<pad><pad>") == 1.0  # after the first <eos> nothing counts
    assert g("") == 0.0


def test_gold_score_is_one_only_for_the_target(task):
    prompts = task.sample_prompts(64, gen(1))
    pairs = task.preference_pairs(300, gen(2))
    for p in pairs:
        target = task.target(p["prompt"])
        for r in (p["chosen"], p["rejected"]):
            s = task.gold_score(p["prompt"], r)
            assert 0.0 <= s <= 1.0
            assert (s == 1.0) == (r == target)
    for prompt in prompts:
        assert task.gold_score(prompt, task.target(prompt)) == 1.0


def test_gold_scores_batch(task):
    prompts = task.sample_prompts(5, gen())
    responses = [task.target(p) for p in prompts]
    responses[1] = responses[1][:-1]
    scores = task.gold_scores(prompts, responses)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores[1] < 1 and (scores[[0, 2, 3, 4]] == 1).all()
    with pytest.raises(ValueError, match="same length"):
        task.gold_scores(prompts, responses[:-1])


# ---- prompts and demonstrations ----------------------------------------------------


def test_prompts_format_and_determinism(task):
    prompts = task.sample_prompts(400, gen(3))
    lengths = set()
    for p in prompts:
        assert p[0] == task.bos_token_id and p[-1] == task.sep_token_id
        assert all(4 <= t <= 13 for t in p[1:-1])
        lengths.add(len(p) - 2)
    assert lengths == set(range(task.min_digits, task.max_digits + 1))
    assert task.sample_prompts(400, gen(3)) == prompts
    assert task.sample_prompts(400, gen(4)) != prompts


def test_demonstrations_noise_rate_and_kind(task):
    n = 2000
    demos = task.demonstrations(n, gen(5))
    assert demos == task.demonstrations(n, gen(5))
    perfect = 0
    for prompt, response in demos:
        target = task.target(prompt)
        assert len(response) == len(target) and response[-1] == EOS  # mistakes keep the length
        wrong = sum(a != b for a, b in zip(response, target))
        assert wrong in (0, 1, 2)  # one substitution or one adjacent swap
        perfect += wrong == 0
    # Binomial(n, 1 - demo_noise): 5 standard deviations.
    p = 1 - task.demo_noise
    assert abs(perfect / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert all(r == task.target(p) for p, r in SortingTask(demo_noise=0.0).demonstrations(100, gen()))
    assert all(r != task.target(p) for p, r in SortingTask(demo_noise=1.0).demonstrations(100, gen()))


# ---- preference pairs --------------------------------------------------------------


def test_preference_pairs_structure(task):
    pairs = task.preference_pairs(200, gen(6))
    assert pairs == task.preference_pairs(200, gen(6))
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["chosen"][-1] == EOS and p["rejected"][-1] == EOS
        assert task.gold_score(p["prompt"], p["chosen"]) != task.gold_score(p["prompt"], p["rejected"])


def test_labels_follow_bradley_terry(task):
    n = 3000
    pairs = task.preference_pairs(n, gen(7))
    agree, expected = 0, 0.0
    for p in pairs:
        gap = task.gold_score(p["prompt"], p["chosen"]) - task.gold_score(p["prompt"], p["rejected"])
        agree += gap > 0
        expected += 1 / (1 + math.exp(-abs(gap) / task.label_temperature))
    # Agreement with gold is a sum of independent Bernoulli(sigmoid(|gap| / T)); 5 sd bound.
    assert abs(agree - expected) < 5 * math.sqrt(n * 0.25)
    # The default labels are noisy but learnable: the Bayes accuracy a reward model can reach.
    assert 0.85 < agree / n < 0.95
    sharp = SortingTask(label_temperature=1e-4).preference_pairs(300, gen(8))
    assert all(task.gold_score(p["prompt"], p["chosen"]) > task.gold_score(p["prompt"], p["rejected"]) for p in sharp)


# ---- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(min_digits=0), ValueError, "min_digits"),
        (dict(min_digits=4, max_digits=3), ValueError, "max_digits"),
        (dict(demo_noise=1.5), ValueError, "demo_noise"),
        (dict(demo_noise="0.5"), TypeError, "demo_noise"),
        (dict(label_temperature=0.0), ValueError, "label_temperature"),
        (dict(pair_max_edits=0), ValueError, "pair_max_edits"),
        (dict(max_digits=4.0), TypeError, "max_digits"),
        (dict(vocab_size=20), ValueError, "vocab_size"),
    ],
)
def test_config_validation(kwargs, error, name):
    with pytest.raises(error, match=name):
        SortingTask(**kwargs)


def test_sampling_argument_validation(task):
    with pytest.raises(TypeError, match="generator"):
        task.sample_prompts(3, 0)
    with pytest.raises(ValueError, match="n"):
        task.demonstrations(-1, gen())
    with pytest.raises(TypeError, match="response"):
        task.gold_score([1, 5, 3], "1<eos>")


# ---- padding ---------------------------------------------------------------------------


def test_left_and_right_pad():
    seqs = [[5, 6, 7], [8], []]
    ids, mask = left_pad(seqs, 0)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == (3, 3)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3]
    ids, mask = right_pad(seqs, 9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]


@pytest.mark.parametrize(
    "seqs, pad_id, error, name",
    [([], 0, ValueError, "seqs"), ([[1, 2.0]], 0, TypeError, r"seqs\[0\]"), ([[1]], None, TypeError, "pad_id"),
     ("12", 0, TypeError, "seqs")],
)
def test_pad_validation(seqs, pad_id, error, name):
    with pytest.raises(error, match=name):
        left_pad(seqs, pad_id)


# ---- JSONL -------------------------------------------------------------------------------

REQUIRED = {"prompt": str, "score": float, "n": int}


def write_lines(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_jsonl_good(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"prompt": "a", "score": 1, "n": 2, "extra": [1]}), "",
                                  json.dumps({"prompt": "b", "score": 0.5, "n": 3})])
    records = read_jsonl(path, REQUIRED)
    assert [r["prompt"] for r in records] == ["a", "b"] and records[0]["extra"] == [1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"prompt": "b", "score": 1, ', "malformed JSON"),
        ('[1, 2]', "expected a JSON object"),
        ('{"prompt": "b", "n": 1}', "missing field 'score'"),
        ('{"prompt": 3, "score": 1, "n": 1}', "field 'prompt' must be str, got int"),
        ('{"prompt": "b", "score": 1, "n": true}', "field 'n' must be int, got bool"),
        ('{"prompt": "b", "score": 1, "n": 1.5}', "field 'n' must be int, got float"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, [json.dumps({"prompt": "a", "score": 1, "n": 2}), "", bad])
    with pytest.raises(ValueError) as info:
        read_jsonl(path, REQUIRED)
    assert f"{path}:3:" in str(info.value) and message in str(info.value)


def test_read_jsonl_check_names_the_line_of_the_first_bad_record(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"prompt": "a", "score": 1, "n": 2}), "",
                                  json.dumps({"prompt": "b", "score": -1, "n": 3})])

    def nonnegative(record):
        return None if record["score"] >= 0 else f"score must be >= 0, got {record['score']}"

    with pytest.raises(ValueError, match=f"{path}:3: score must be >= 0, got -1"):
        read_jsonl(path, REQUIRED, check=nonnegative)
    assert len(read_jsonl(path, REQUIRED, check=lambda record: None)) == 2


def test_read_jsonl_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="required"):
        read_jsonl(tmp_path / "x.jsonl", {"prompt": "str"})
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl", REQUIRED)
