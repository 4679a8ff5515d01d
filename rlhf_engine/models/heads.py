"""Critic and reward model: a transformer backbone and a scalar head, stored as TRL stores them."""

from __future__ import annotations

import copy
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from rlhf_engine.models.adapters import lora_layers, merged_state_dict
from rlhf_engine.models.inputs import check_token_batch, position_ids_from_mask
from rlhf_engine.models.policy import (
    WEIGHTS_FILE,
    PolicyModel,
    check_local_dir,
    enable_activation_checkpointing,
    init_from_config,
    save_pretrained_layout,
)

# Prefix of the weights written by older versions of ScalarHeadModel.save (``backbone.*``,
# ``head.weight``, ``head.bias``), before the TRL layout.
LEGACY_BACKBONE_PREFIX = "backbone."


def is_sequence_classifier(config: PretrainedConfig) -> bool:
    """Whether ``config`` describes an ``AutoModelForSequenceClassification`` folder (TRL's reward models)."""
    return any(name.endswith("ForSequenceClassification") for name in config.architectures or ())


class ScalarHeadModel(torch.nn.Module):
    """``backbone`` (``LlamaModel`` / ``AutoModel``) and ``head = Linear(H, 1, bias=False)``: one
    scalar per token, ``value[b, t] = hidden[b, t] · w``.

    The head has no bias, like the ``score`` layer of transformers'
    ``*ForSequenceClassification`` that TRL's RewardTrainer (and its PPO critic) trains, so a
    saved model *is* such a folder (:meth:`save`) and TRL's folders load as they are
    (:meth:`load`). For a reward model a bias is irrelevant (pairwise losses see only
    differences); a critic's constant offset is left to the backbone, as in TRL.

    The head starts at zero, so a new critic or reward model outputs 0 everywhere until
    trained. As a critic, ``values`` is read per position; as a reward model, ``rewards``
    reads the value at each row's last real token.
    """

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        if not isinstance(backbone, PreTrainedModel):
            raise TypeError(f"ScalarHeadModel: backbone must be a transformers PreTrainedModel, got {type(backbone).__name__}")
        self.backbone = backbone
        param = next(backbone.parameters())
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1, bias=False, device=param.device, dtype=param.dtype)
        torch.nn.init.zeros_(self.head.weight)

    @classmethod
    def from_config(cls, config: PretrainedConfig, *, seed: int) -> ScalarHeadModel:
        """A freshly initialized fp32 backbone of ``config`` (init from ``seed``) and a zero head."""
        return cls(init_from_config(AutoModel.from_config, config, seed))

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.float32) -> ScalarHeadModel:
        """The model in the local directory ``path``, in ``dtype``: a sequence-classification folder
        (ours or TRL's: see :meth:`load`) with its head; else the backbone of a causal-LM or
        base-model folder and a zero head."""
        path = check_local_dir("ScalarHeadModel.from_pretrained", path)
        if is_sequence_classifier(AutoConfig.from_pretrained(path, local_files_only=True)):
            return cls._from_sequence_classifier("ScalarHeadModel.from_pretrained", path, dtype)
        return cls(AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True))

    @classmethod
    def _from_sequence_classifier(cls, op: str, path: Path, dtype: torch.dtype) -> ScalarHeadModel:
        """Backbone and ``score`` of an ``AutoModelForSequenceClassification`` folder with one label."""
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.num_labels != 1:
            raise ValueError(f"{op}: {path} is a classifier with num_labels={config.num_labels}; a reward model / critic has 1")
        classifier = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, local_files_only=True)
        score = getattr(classifier, "score", None)
        if not isinstance(score, torch.nn.Linear) or score.bias is not None or score.out_features != 1:
            raise ValueError(f"{op}: {type(classifier).__name__} in {path} has no bias-free `score` Linear(H, 1) head, got {score!r}")
        model = cls(classifier.base_model)
        with torch.no_grad():
            model.head.weight.copy_(score.weight)
        return model

    @classmethod
    def from_policy(cls, policy: PolicyModel) -> ScalarHeadModel:
        """A copy of ``policy``'s backbone (its lm_head dropped) and a zero head."""
        if not isinstance(policy, PolicyModel):
            raise TypeError(f"ScalarHeadModel.from_policy: policy must be a PolicyModel, got {type(policy).__name__}")
        if lora_layers(policy.lm):
            raise ValueError(
                "ScalarHeadModel.from_policy: policy has LoRA layers (the copy would silently carry them); build the "
                "critic before apply_lora, or from_pretrained on the policy's saved (merged) folder"
            )
        return cls(copy.deepcopy(policy.lm.base_model))

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint every decoder layer of the backbone (:func:`enable_activation_checkpointing`)
        in ``values`` / ``rewards`` forwards in train mode."""
        enable_activation_checkpointing(self.backbone)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fp32 ``[B, T]``: ``head(hidden[b, t])`` for every position (padding included).

        Args:
            input_ids: long ``[B, T]``. attention_mask: ``[B, T]``, bool or 0/1.
        """
        check_token_batch("ScalarHeadModel.values", input_ids, attention_mask)
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fp32 ``[B]``: ``values[b, t_b]`` with ``t_b`` the last position where ``attention_mask`` is 1.

        Each row needs at least one real token (a row of zeros reads position ``T - 1``).
        """
        values = self.values(input_ids, attention_mask)
        last = attention_mask.shape[1] - 1 - attention_mask.bool().flip(-1).long().argmax(-1)
        return values.gather(1, last.unsqueeze(1)).squeeze(1)

    def save(self, directory) -> None:
        """An ``AutoModelForSequenceClassification`` folder, as TRL's RewardTrainer writes it:
        ``config.json`` (the backbone's config with ``architectures = ["<Model>ForSequenceClassification"]``
        and ``num_labels = 1``) and ``model.safetensors`` (the backbone under its
        ``base_model_prefix``, e.g. ``model.*``, LoRA merged in; ``score.weight = head.weight [1, H]``),
        each written atomically.

        ``transformers.AutoModelForSequenceClassification.from_pretrained(directory)`` then scores
        like :meth:`rewards` on right-padded batches: it reads the last token that is not
        ``config.pad_token_id`` (keep the pad id set; with None it takes batches of one only).

        Raises:
            ValueError when transformers has no sequence-classification class for the model type.
        """
        self.save_weights(merged_state_dict(self.backbone), self.head.weight, directory)

    def save_weights(self, backbone: dict[str, torch.Tensor], head: torch.Tensor, directory) -> None:
        """:meth:`save` of the given weights: ``backbone`` (plain names of the backbone, adapters
        merged) and ``head`` ``[1, H]`` (a data-parallel run passes the ones it gathered)."""
        model_type = self.config.model_type
        architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
        if architecture is None:
            raise ValueError(f"ScalarHeadModel.save: transformers has no AutoModelForSequenceClassification for model_type {model_type!r}")
        config = copy.deepcopy(self.config)
        config.architectures = [architecture]
        config.num_labels = 1
        prefix = self.backbone.base_model_prefix
        tensors = {f"{prefix}.{name}": t for name, t in backbone.items()}
        tensors["score.weight"] = head
        save_pretrained_layout(tensors, config, directory)

    @classmethod
    def load(cls, directory, *, dtype: torch.dtype = torch.float32) -> ScalarHeadModel:
        """A reward model / critic from the local ``directory``, in ``dtype``.

        Reads an ``AutoModelForSequenceClassification`` folder with one label and a bias-free
        ``score`` (what :meth:`save` and TRL's RewardTrainer write, sharded or not), and the
        folders of older versions of :meth:`save` (``backbone.*``, ``head.weight``,
        ``head.bias``): their bias is dropped when it is 0 and refused otherwise.

        Raises:
            ValueError for a folder without a scalar head (a causal LM: use
            :meth:`from_pretrained` for a zero head), ``num_labels != 1``, a head with a bias.
        """
        op = "ScalarHeadModel.load"
        directory = check_local_dir(op, directory)
        weights = directory / WEIGHTS_FILE
        if weights.is_file():
            with safetensors.safe_open(str(weights), framework="pt") as stored:
                if any(name.startswith(LEGACY_BACKBONE_PREFIX) for name in stored.keys()):
                    return cls._load_legacy(directory, dtype)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        if not is_sequence_classifier(config):
            raise ValueError(
                f"{op}: {directory} holds no reward / value head (architectures {config.architectures}); "
                "ScalarHeadModel.from_pretrained starts one at zero on a causal LM"
            )
        return cls._from_sequence_classifier(op, directory, dtype)

    @classmethod
    def _load_legacy(cls, directory: Path, dtype: torch.dtype) -> ScalarHeadModel:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        model = cls(init_from_config(AutoModel.from_config, config, seed=0)).to(dtype)
        tensors = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
        bias = tensors.pop("head.bias", None)
        if bias is not None and bool(bias.any()):
            raise ValueError(
                f"ScalarHeadModel.load: {directory} is an old-format model whose head has a bias ({bias.tolist()}); "
                "the head is bias-free now (like transformers' `score`), so it cannot be represented"
            )
        model.load_state_dict(tensors, strict=True)
        return model
