"""LoRA for the policy and the critic / reward model, through peft, and the reference it makes free.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a linear layer's weight ``W [out, in]`` and
trains a low-rank update: ``y = x W^T + (alpha / r) · dropout(x) A^T B^T`` with ``A [r, in]``
random and ``B [out, r]`` zero at the start, so a fresh adapter changes nothing. peft's layers
are injected in place into the wrapper's transformer (``PolicyModel.lm``,
``ScalarHeadModel.backbone``), so every wrapper method (``hidden_states`` through
``lm.base_model``, the lm_head, the KV-cache step, ``values``, ``rewards``) runs unchanged.

The frozen base is the RL reference: :class:`AdapterDisabledPolicy` reads it from the policy's
own weights with the adapters switched off, so the reference costs no second copy.
``save`` merges the adapters into the weights it writes (:func:`~rlhf_engine.models.adapters.merged_state_dict`),
so a saved folder loads in plain ``transformers``; the live model keeps its adapters.

peft is imported only here, when LoRA is asked for (``pip install 'rlhf-engine[lora]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from transformers import PreTrainedModel

from rlhf_engine.models.adapters import adapters_off, lora_layers
from rlhf_engine.models.heads import ScalarHeadModel
from rlhf_engine.models.policy import PolicyModel


@dataclasses.dataclass
class LoraSettings:
    """LoRA shape.

    Attributes:
        rank: ``r``, the inner size of ``B @ A``; >= 1.
        alpha: the update is scaled by ``alpha / r``; > 0.
        dropout: dropout on the adapter's input (training mode only); in [0, 1).
        target_modules: names (or dotted suffixes, e.g. ``"q_proj"``, ``"mlp.down_proj"``) of
            the ``Linear`` layers to adapt; None: every ``Linear`` of the transformer blocks.
            The lm_head and the scalar head are never adapted.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"LoraSettings.{name} must be {expected}, got {getattr(self, name)!r}")

        check("rank", isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1, "an int >= 1")
        for name in ("alpha", "dropout"):
            check(name, isinstance(getattr(self, name), (int, float)) and not isinstance(getattr(self, name), bool), "a number")
        check("alpha", self.alpha > 0, "> 0")
        check("dropout", 0 <= self.dropout < 1, "in [0, 1)")
        names = self.target_modules
        check("target_modules", names is None or (isinstance(names, Sequence) and not isinstance(names, str) and len(names) > 0
              and all(isinstance(n, str) and n for n in names)), "None or a non-empty list of module names")  # fmt: skip
        if names is not None:
            self.target_modules = tuple(names)


def _import_peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'rlhf-engine[lora]' (or the dev extra)") from err
    return peft


def _adapted_module(op: str, model) -> PreTrainedModel:
    """The transformer LoRA goes into: ``model.lm`` or ``model.backbone``."""
    if isinstance(model, AdapterDisabledPolicy):
        raise TypeError(f"{op}: model is the adapter-disabled reference view; pass the policy itself")
    if isinstance(model, PolicyModel):
        return model.lm
    if isinstance(model, ScalarHeadModel):
        return model.backbone
    raise TypeError(f"{op}: model must be a PolicyModel or a ScalarHeadModel, got {type(model).__name__}")


def _target_names(op: str, transformer: PreTrainedModel, requested: tuple[str, ...] | None) -> list[str]:
    """Qualified names of the ``Linear`` layers to adapt (never the output embedding)."""
    lm_head = transformer.get_output_embeddings()
    linear = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and m is not lm_head]
    if requested is None:
        return linear

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    unknown = [t for t in requested if not any(matches(name, t) for name in linear)]
    if unknown:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(
            f"{op}: target_modules {unknown} name no Linear layer of the transformer blocks (the lm_head and the "
            f"scalar head are never adapted); the layers are {kinds}"
        )
    return [name for name in linear if any(matches(name, t) for t in requested)]


def apply_lora(model, settings: LoraSettings | None = None, *, seed: int):
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model``.

    ``model`` is a :class:`PolicyModel` (adapters in ``model.lm``; the lm_head, tied or not, is
    frozen) or a :class:`ScalarHeadModel` (adapters in ``model.backbone``; ``model.head`` keeps its
    ``requires_grad``: it stays fully trainable). Afterwards only the adapters' ``A`` and ``B``
    (and the critic's head) require grad; outputs are unchanged until the adapters train
    (``B = 0``). Adapters take the base layers' device; their random ``A`` is drawn from
    ``seed`` only (the global RNGs are untouched).

    Raises:
        TypeError for another kind of model; ValueError when it already has LoRA layers or a
        target name matches no ``Linear`` layer; ImportError naming the ``lora`` extra without peft.
    """
    op = "apply_lora"
    transformer = _adapted_module(op, model)
    settings = LoraSettings() if settings is None else settings
    if not isinstance(settings, LoraSettings):
        raise TypeError(f"{op}: settings must be a LoraSettings, got {type(settings).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int, got {type(seed).__name__}")
    peft = _import_peft()
    if lora_layers(transformer):
        raise ValueError(f"{op}: model already has LoRA layers (apply LoRA once)")
    targets = _target_names(op, transformer, settings.target_modules)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=targets, bias="none")  # fmt: skip
    cuda = sorted({p.device.index or 0 for p in transformer.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, transformer)
    return model


def has_lora(model) -> bool:
    """Whether the ``PolicyModel`` / ``ScalarHeadModel`` ``model`` holds LoRA layers."""
    return bool(lora_layers(_adapted_module("has_lora", model)))


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """Inside the block ``model`` (a LoRA ``PolicyModel`` / ``ScalarHeadModel``) computes with its
    base weights only: the model before LoRA (plus, for a critic, its current head).

    The adapters' weights and ``requires_grad`` flags are left as they were.

    Raises:
        ValueError when ``model`` has no LoRA layers (its "base" would silently be itself).
    """
    transformer = _adapted_module("adapter_disabled", model)
    if not lora_layers(transformer):
        raise ValueError("adapter_disabled: model has no LoRA layers (see apply_lora)")
    with adapters_off(transformer):
        yield


class AdapterDisabledPolicy(PolicyModel):
    """The reference of a LoRA policy: the same ``lm`` with its adapters switched off.

    A ``PolicyModel`` (so ``score_rollout(reference=...)`` and the trainer take it) whose
    forward passes (``hidden_states`` and everything built on it, ``next_token_logits``) and
    ``save`` run under :func:`adapter_disabled`. It holds no weights of its own: the policy is
    kept outside the module tree, so ``parameters()`` is empty and ``freeze``, ``.to()``,
    ``.eval()`` or an optimizer over the reference never reach the policy's weights (whose
    adapters train). It follows the policy's device and train/eval mode.
    """

    def __init__(self, policy: PolicyModel):
        if isinstance(policy, AdapterDisabledPolicy) or not isinstance(policy, PolicyModel):
            raise TypeError(f"AdapterDisabledPolicy: policy must be a PolicyModel with LoRA, got {type(policy).__name__}")
        if not has_lora(policy):
            raise ValueError("AdapterDisabledPolicy: policy has no LoRA layers (see apply_lora); copy it for a reference")
        torch.nn.Module.__init__(self)  # not PolicyModel.__init__: that would register the policy's lm as a child
        object.__setattr__(self, "_policy", policy)

    @property
    def lm(self) -> PreTrainedModel:
        return self._policy.lm

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with adapter_disabled(self._policy):
            return super().hidden_states(input_ids, attention_mask)

    def next_token_logits(self, input_ids, attention_mask, position_ids, past_key_values):
        with adapter_disabled(self._policy):
            return super().next_token_logits(input_ids, attention_mask, position_ids, past_key_values)

    def save(self, directory) -> None:
        """The base model (the policy before LoRA) in the Hugging Face layout."""
        with adapter_disabled(self._policy):
            super().save(directory)
