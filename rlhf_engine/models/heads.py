"""Critic and reward model: a transformer backbone and a scalar head."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from rlhf_engine.models.checkpoint import load_state
from rlhf_engine.models.inputs import check_token_batch, position_ids_from_mask
from rlhf_engine.models.policy import (
    WEIGHTS_FILE,
    PolicyModel,
    check_local_dir,
    enable_activation_checkpointing,
    init_from_config,
    save_pretrained_layout,
)


class ScalarHeadModel(torch.nn.Module):
    """``backbone`` (``LlamaModel`` / ``AutoModel``) and ``head = Linear(H, 1)``: one scalar per token.

    The head starts at zero (weight and bias), so a new critic or reward model outputs 0
    everywhere until trained. As a critic, ``values`` is read per position; as a reward
    model, ``rewards`` reads the value at each row's last real token.
    """

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        if not isinstance(backbone, PreTrainedModel):
            raise TypeError(f"ScalarHeadModel: backbone must be a transformers PreTrainedModel, got {type(backbone).__name__}")
        self.backbone = backbone
        param = next(backbone.parameters())
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1, device=param.device, dtype=param.dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, config: PretrainedConfig, *, seed: int) -> ScalarHeadModel:
        """A freshly initialized fp32 backbone of ``config`` (init from ``seed``) and a zero head."""
        return cls(init_from_config(AutoModel.from_config, config, seed))

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.float32) -> ScalarHeadModel:
        """The backbone of the local causal-LM or base-model directory ``path`` and a zero head."""
        path = check_local_dir("ScalarHeadModel.from_pretrained", path)
        return cls(AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True))

    @classmethod
    def from_policy(cls, policy: PolicyModel) -> ScalarHeadModel:
        """A copy of ``policy``'s backbone (its lm_head dropped) and a zero head."""
        if not isinstance(policy, PolicyModel):
            raise TypeError(f"ScalarHeadModel.from_policy: policy must be a PolicyModel, got {type(policy).__name__}")
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
        """``directory/config.json`` (the backbone's) + ``directory/model.safetensors``
        (``backbone.*`` and ``head.*``), each written atomically."""
        save_pretrained_layout(self, self.config, directory)

    @classmethod
    def load(cls, directory, *, dtype: torch.dtype = torch.float32) -> ScalarHeadModel:
        """Rebuild a model saved by :meth:`save`, in ``dtype``."""
        directory = check_local_dir("ScalarHeadModel.load", directory)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        model = cls(init_from_config(AutoModel.from_config, config, seed=0)).to(dtype)
        load_state(model, directory / WEIGHTS_FILE)
        return model
