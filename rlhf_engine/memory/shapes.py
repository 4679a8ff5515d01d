"""Model shapes read from Hugging Face configs: what the memory estimate needs, nothing else.

A :class:`ModelShape` holds the sizes of a decoder-only transformer of the Llama family
(Llama, Qwen2/2.5/3, Mistral and their kin: pre-norm blocks of grouped-query attention
and a gated MLP) and counts its parameters exactly, the same way ``transformers`` builds
them. ``from_config`` accepts a ``PretrainedConfig``, a plain ``config.json`` mapping or a
path to a ``config.json`` / a model folder, so a 70B run can be planned from its config
alone, without its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Model types whose blocks are the Llama layout; the value says whether q/k/v carry a bias
# (Qwen2's attention does; the others' do not unless ``attention_bias`` says so).
SUPPORTED_MODEL_TYPES: dict[str, bool] = {"llama": False, "mistral": False, "qwen2": True, "qwen3": False}

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one decoder-only transformer.

    Attributes:
        hidden_size ``H``, num_layers ``L``, num_heads, num_kv_heads, head_dim ``d``,
        intermediate_size ``I``, vocab_size ``V``; tied_embeddings: the lm_head is the input
        embedding; qkv_bias: q/k/v projections have a bias (Qwen2, or ``attention_bias``);
        o_bias: so does the output projection (``attention_bias`` outside Qwen2); mlp_bias:
        gate/up/down have biases (``mlp_bias``); qk_norm: per-head RMSNorm on
        q and k (Qwen3); model_type: the config's ``model_type``.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config: Any, *, source: str | None = None) -> ModelShape:
        """The shape of a ``PretrainedConfig``, a ``config.json`` mapping, or a path to a
        ``config.json`` file or a folder holding one.

        Raises:
            ValueError naming ``source`` (the file, or "config") and the missing or invalid
            field, or the unsupported ``model_type``.
        """
        values, source = _config_values(config, source)
        model_type = values.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported by the memory planner; "
                f"supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        for name in _REQUIRED:
            value = values.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: field {name!r} must be a positive int, got {value!r}")
        heads = values["num_attention_heads"]
        values = {**_class_defaults(model_type, values), **{k: v for k, v in values.items() if v is not None}}
        kv_heads = values.get("num_key_value_heads") or heads
        head_dim = values.get("head_dim") or values["hidden_size"] // heads
        for name, value in (("num_key_value_heads", kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: field {name!r} must be a positive int, got {value!r}")
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        return cls(
            hidden_size=values["hidden_size"], num_layers=values["num_hidden_layers"], num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=values["intermediate_size"],
            vocab_size=values["vocab_size"], tied_embeddings=bool(values.get("tie_word_embeddings", False)),
            qkv_bias=bool(values.get("attention_bias", SUPPORTED_MODEL_TYPES[model_type])),
            o_bias=model_type != "qwen2" and bool(values.get("attention_bias", False)),
            mlp_bias=bool(values.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3", model_type=model_type,
        )  # fmt: skip

    # -- parameter counts ----------------------------------------------------------------
    @property
    def q_size(self) -> int:
        """Width of the attention's q (and output) projection: ``num_heads * d``."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of k and v: ``num_kv_heads * d``."""
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """``(in, out)`` of each linear layer of one block: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q_size), (h, self.kv_size), (h, self.kv_size), (self.q_size, h), (h, i), (h, i), (i, h)]

    def layer_parameters(self) -> int:
        """Parameters of one block: the seven projections, their biases where the config has
        them, two RMSNorm weights (and the per-head q/k norms of Qwen3)."""
        weights = sum(a * b for a, b in self.linear_shapes())
        bias = (self.q_size + 2 * self.kv_size if self.qkv_bias else 0) + (self.hidden_size if self.o_bias else 0)
        bias += 2 * self.intermediate_size + self.hidden_size if self.mlp_bias else 0
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return weights + bias + norms

    def backbone_parameters(self) -> int:
        """Embedding ``V·H``, the blocks, the final norm ``H`` (what ``AutoModel`` builds)."""
        return self.vocab_size * self.hidden_size + self.num_layers * self.layer_parameters() + self.hidden_size

    def parameters(self, head: str = "lm") -> int:
        """All parameters with ``head="lm"`` (the causal LM: an lm_head ``V·H`` unless tied) or
        ``head="scalar"`` (a critic / reward model: the backbone and a bias-free ``score``
        ``Linear(H, 1)``, the layout of ``AutoModelForSequenceClassification``)."""
        if head == "lm":
            return self.backbone_parameters() + (0 if self.tied_embeddings else self.vocab_size * self.hidden_size)
        if head == "scalar":
            return self.backbone_parameters() + self.hidden_size
        raise ValueError(f"ModelShape.parameters: head must be 'lm' or 'scalar', got {head!r}")

    def lora_parameters(self, rank: int) -> int:
        """LoRA adapter parameters of rank ``r`` on every projection of every block:
        ``r·(in + out)`` per linear layer (peft's A ``[r, in]`` and B ``[out, r]``)."""
        return self.num_layers * sum(rank * (a + b) for a, b in self.linear_shapes())

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """KV-cache bytes one token holds: keys and values of every layer, ``2·L·kv_heads·d``
        elements."""
        return 2 * self.num_layers * self.kv_size * element_bytes


def _class_defaults(model_type: str, values: dict) -> dict:
    """The optional fields a ``config.json`` may leave out, as transformers' config class of
    ``model_type`` fills them in (they differ: Mistral's default is 8 KV heads, Qwen2's 32,
    Qwen3's head_dim 128)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type, **{name: values[name] for name in _REQUIRED})
    except Exception:  # noqa: BLE001 -- the class rejects these sizes (its own error types): our checks say why
        return {}
    optional = ("num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")
    return {name: getattr(config, name) for name in optional if getattr(config, name, None) is not None}


def _config_values(config: Any, source: str | None) -> tuple[dict, str]:
    """The config as a plain mapping, and the name errors give it."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{config}: no config.json there (a model folder or a config.json file is expected)")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
        source = source or str(path)
    elif isinstance(config, dict):
        values, source = config, source or "config"
    elif hasattr(config, "to_dict"):
        values, source = config.to_dict(), source or type(config).__name__
    else:
        raise TypeError(f"ModelShape.from_config: expected a PretrainedConfig, a mapping or a path, got {type(config).__name__}")
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a JSON object of config fields, got {type(values).__name__}")
    # Multimodal and some newer configs nest the language model's fields.
    if "text_config" in values and "hidden_size" not in values:
        values = values["text_config"]
    return values, source
