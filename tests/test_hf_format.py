"""ScalarHeadModel folders are transformers' AutoModelForSequenceClassification folders (TRL's reward models)."""

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForSequenceClassification, Qwen2Config

from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.models.policy import save_pretrained_layout

VOCAB, PAD = 32, 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_qwen2() -> Qwen2Config:
    """A Qwen2 as small as the tiny Llama (q/k/v with biases, untied embeddings)."""
    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)  # fmt: skip


CONFIGS = {
    "llama": (lambda: llama_config("tiny", VOCAB, pad_token_id=PAD), "LlamaForSequenceClassification"),
    "qwen2": (tiny_qwen2, "Qwen2ForSequenceClassification"),
}


def right_padded_batch(lengths, total, seed=0):
    """Rows of real tokens (ids >= 3, never the pad id) left-aligned in ``[B, total]``, PAD after them:
    the layout where transformers' last-non-pad-token rule and our last-real-token rule agree."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), total), generator=g)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, PAD), mask


def hf_scores(classifier, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        logits = classifier(input_ids=ids, attention_mask=mask.long()).logits
    assert logits.shape == (ids.shape[0], 1)
    return logits[:, 0].float()


def scored_model(config, seed=0) -> ScalarHeadModel:
    model = ScalarHeadModel.from_config(config, seed=seed).eval()
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(seed + 1))
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_our_save_loads_in_transformers_with_equal_scores(tmp_path, name):
    make_config, architecture = CONFIGS[name]
    model = scored_model(make_config())
    assert model.head.bias is None
    ids, mask = right_padded_batch([7, 3, 5, 1], 7)
    expected = model.rewards(ids, mask)
    assert expected.std() > 0
    model.save(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [architecture] and saved["pad_token_id"] == PAD and len(saved["id2label"]) == 1
    stored = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert set(stored) == {"score.weight"} | {f"model.{k}" for k in model.backbone.state_dict()}
    assert model.config.architectures != [architecture]  # the live config is untouched

    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(classifier).__name__ == architecture
    torch.testing.assert_close(hf_scores(classifier, ids, mask), expected, rtol=1e-5, atol=1e-6)
    loaded = ScalarHeadModel.load(tmp_path)
    assert torch.equal(loaded.values(ids, mask), model.values(ids, mask))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_folder_loads_with_equal_scores(tmp_path, name):
    make_config, _ = CONFIGS[name]
    config = make_config()
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        classifier = AutoModelForSequenceClassification.from_config(config).eval()
    classifier.save_pretrained(tmp_path)
    ids, mask = right_padded_batch([2, 6, 4], 6, seed=1)
    expected = hf_scores(classifier, ids, mask)
    assert expected.std() > 0  # transformers initializes `score` at random
    for loaded in (ScalarHeadModel.load(tmp_path), ScalarHeadModel.from_pretrained(tmp_path)):
        assert torch.equal(loaded.head.weight, classifier.score.weight)
        torch.testing.assert_close(loaded.rewards(ids, mask), expected, rtol=1e-5, atol=1e-6)
    assert ScalarHeadModel.load(tmp_path, dtype=torch.bfloat16).head.weight.dtype == torch.bfloat16


def test_old_layout_with_a_zero_bias_loads_and_a_nonzero_bias_is_refused(tmp_path):
    model = scored_model(llama_config("tiny", VOCAB, pad_token_id=PAD))
    ids, mask = right_padded_batch([4, 2], 4)
    old = {f"backbone.{k}": t for k, t in model.backbone.state_dict().items()} | {"head.weight": model.head.weight}
    save_pretrained_layout(old | {"head.bias": torch.zeros(1)}, model.config, tmp_path / "zero")
    assert torch.equal(ScalarHeadModel.load(tmp_path / "zero").values(ids, mask), model.values(ids, mask))
    save_pretrained_layout(old | {"head.bias": torch.full((1,), 0.5)}, model.config, tmp_path / "biased")
    with pytest.raises(ValueError, match="bias"):
        ScalarHeadModel.load(tmp_path / "biased")


def test_folders_without_one_scalar_head_are_refused(tmp_path):
    config = llama_config("tiny", VOCAB, pad_token_id=PAD)
    PolicyModel.from_config(config, seed=0).save(tmp_path / "lm")
    with pytest.raises(ValueError, match="no reward / value head"):
        ScalarHeadModel.load(tmp_path / "lm")
    assert torch.all(ScalarHeadModel.from_pretrained(tmp_path / "lm").head.weight == 0)  # a causal LM: a zero head

    config.num_labels = 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "two")
    for read in (ScalarHeadModel.load, ScalarHeadModel.from_pretrained):
        with pytest.raises(ValueError, match="num_labels=2"):
            read(tmp_path / "two")
