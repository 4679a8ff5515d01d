"""The policy: a causal LM whose training logprobs never materialize the full logits."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from rlhf_engine import ops
from rlhf_engine.models.adapters import merged_state_dict
from rlhf_engine.models.checkpoint import atomic_save_safetensors, atomic_write_bytes, load_state
from rlhf_engine.models.inputs import check_token_batch, position_ids_from_mask

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
IGNORE_INDEX = -100


def check_local_dir(op: str, path) -> Path:
    """``path`` must be an existing local directory (models are never fetched from a hub)."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"{op}: path must be a str or Path, got {type(path).__name__}")
    if not Path(path).is_dir():
        raise ValueError(f"{op}: path must be a local model directory, got {str(path)!r} (no hub downloads)")
    return Path(path)


def init_from_config(build, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """``build(config)`` in fp32 with its random init drawn from ``seed`` (global RNG untouched)."""
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"from_config: config must be a transformers PretrainedConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"from_config: seed must be an int, got {type(seed).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(config).to(torch.float32)


def save_pretrained_layout(tensors: dict[str, torch.Tensor], config: PretrainedConfig, directory) -> None:
    """``directory/config.json`` and ``directory/model.safetensors`` (``tensors``), each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(directory / WEIGHTS_FILE, tensors)
    atomic_write_bytes(directory / CONFIG_FILE, config.to_json_string().encode())


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Checkpoint each decoder layer of ``model`` with transformers' own mechanism (non-reentrant
    ``torch.utils.checkpoint``): a forward in train mode with gradients enabled keeps each layer's
    inputs only and recomputes the layer in backward; eval and no-grad passes are unchanged."""
    # activation_checkpointing_enable is the newer transformers' name of gradient_checkpointing_enable (now deprecated)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


@functools.lru_cache(maxsize=None)
def cache_argument(model_class: type) -> str:
    """The name a transformers base model takes its KV cache by, and returns it under:
    ``cache`` from transformers 5.25 (``past_key_values`` is deprecated there, with a warning
    on every call), ``past_key_values`` before (5.17, the GPU machine's). A wrapper whose
    forward takes ``**kwargs`` (peft's) passes either through: the wrapped model decides."""
    parameters = inspect.signature(model_class.forward).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    return "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"


class PolicyModel(torch.nn.Module):
    """A causal LM (``LlamaForCausalLM`` or any ``AutoModelForCausalLM``) for RLHF.

    Hidden states are the base model's ``last_hidden_state`` (after the final norm for
    Llama: ``lm_head(hidden) == lm(...).logits``). Training logprobs go through
    :func:`rlhf_engine.ops.fused_linear_logprobs` on those hidden states and the lm_head
    weight, never through ``[B, T, V]`` logits. Models whose logits are more than
    ``lm_head(hidden)`` (logit soft-capping or scaling) are not supported.

    Positions are ``position_ids_from_mask(attention_mask)``, so left padding is harmless.
    """

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        if not isinstance(lm, PreTrainedModel) or lm.get_output_embeddings() is None or lm.base_model is lm:
            raise TypeError(f"PolicyModel: lm must be a transformers causal LM with a base model and an lm_head, got {type(lm).__name__}")
        self.lm = lm

    @classmethod
    def from_config(cls, config: PretrainedConfig, *, seed: int) -> PolicyModel:
        """A freshly initialized fp32 model of ``config``; the init depends on ``seed`` only."""
        return cls(init_from_config(AutoModelForCausalLM.from_config, config, seed))

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.float32) -> PolicyModel:
        """Load a Hugging Face causal LM from the local directory ``path`` in ``dtype``."""
        path = check_local_dir("PolicyModel.from_pretrained", path)
        return cls(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True))

    @property
    def config(self) -> PretrainedConfig:
        return self.lm.config

    @property
    def vocab_size(self) -> int:
        """``V``, the number of rows of the lm_head."""
        return self.lm_head_weight.shape[0]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, H]``; the input embedding itself when the embeddings are tied."""
        return self.lm.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """``[V]`` or None."""
        return self.lm.get_output_embeddings().bias

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint every decoder layer of the LM (:func:`enable_activation_checkpointing`): the
        training forwards (``hidden_states`` and what calls it, in train mode) keep one hidden state
        per layer instead of all its activations, and recompute each layer in backward."""
        enable_activation_checkpointing(self.lm)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final (post-norm) hidden states ``[B, T, H]`` in the model dtype; no logits.

        Args:
            input_ids: long ``[B, T]``. attention_mask: ``[B, T]``, bool or 0/1.
        """
        check_token_batch("PolicyModel.hidden_states", input_ids, attention_mask)
        out = self.lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def response_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int) -> torch.Tensor:
        """``hidden[:, response_start - 1 : -1]``: ``[B, T - response_start, H]``, the states that
        predict tokens ``response_start .. T-1`` (the input of ``ops.fused_linear_policy_loss``)."""
        if isinstance(response_start, bool) or not isinstance(response_start, int):
            raise TypeError(f"PolicyModel.response_hidden: response_start must be an int, got {type(response_start).__name__}")
        if not 1 <= response_start <= input_ids.shape[-1]:
            raise ValueError(
                f"PolicyModel.response_hidden: response_start must be in [1, T={input_ids.shape[-1]}], got {response_start}"
            )
        return self.hidden_states(input_ids, attention_mask)[:, response_start - 1 : -1]

    def response_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ):
        """Logprobs of ``input_ids[:, t]`` for ``t >= response_start`` under the tempered policy.

        ``logp[b, t - response_start] = log_softmax((hidden[b, t-1] @ W.T + bias) / temperature)[input_ids[b, t]]``,
        computed by ``ops.fused_linear_logprobs`` (chunked; no ``[B, T, V]`` logits).

        Returns:
            fp32 ``[B, T - response_start]`` (and the entropy, same shape), 0 where
            ``attention_mask`` is 0. Differentiable.
        """
        hidden = self.response_hidden(input_ids, attention_mask, response_start)
        labels = input_ids[:, response_start:].masked_fill(~attention_mask[:, response_start:].bool(), IGNORE_INDEX)
        return ops.fused_linear_logprobs(
            hidden, self.lm_head_weight, labels, bias=self.lm_head_bias, temperature=temperature,
            ignore_index=IGNORE_INDEX, return_entropy=return_entropy,
        )  # fmt: skip

    def next_token_logits(self, input_ids, attention_mask, position_ids, past_key_values):
        """One generation step with the KV cache.

        Args:
            input_ids: long ``[B, S]``, the tokens not yet in the cache (the prompt, then one token).
            attention_mask: ``[B, C + S]``, every token so far (cached and new).
            position_ids: long ``[B, S]``.
            past_key_values: the cache returned by the previous step, or None.

        Returns:
            (fp32 logits ``[B, V]`` of the last position, the updated cache). The logits are
            ``lm_head(hidden)`` in the model dtype, then cast, as the fused training op sees them.
        """
        base = self.lm.base_model
        name = cache_argument(type(base))
        out = base(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            use_cache=True,
            **{name: past_key_values},
        )
        logits = F.linear(out.last_hidden_state[:, -1], self.lm_head_weight, self.lm_head_bias)
        return logits.float(), getattr(out, name)

    def save(self, directory) -> None:
        """``directory/config.json`` + ``directory/model.safetensors`` (the Hugging Face layout, so
        ``from_pretrained`` reads it too); tied weights stored once; each file written atomically.
        A LoRA policy writes its merged weights (``W + (alpha / r) B @ A``): a plain full model."""
        save_pretrained_layout(merged_state_dict(self.lm), self.config, directory)

    @classmethod
    def load(cls, directory, *, dtype: torch.dtype = torch.float32) -> PolicyModel:
        """Rebuild a model saved by :meth:`save`, in ``dtype``."""
        directory = check_local_dir("PolicyModel.load", directory)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        policy = cls(init_from_config(AutoModelForCausalLM.from_config, config, seed=0).to(dtype))
        load_state(policy.lm, directory / WEIGHTS_FILE)
        return policy
