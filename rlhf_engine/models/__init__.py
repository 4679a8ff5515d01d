"""Policy, critic and reward-model wrappers over transformers models; checkpoints."""

from rlhf_engine.models.checkpoint import (
    atomic_save_safetensors,
    atomic_write_bytes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rlhf_engine.models.configs import MODEL_SIZES, llama_config
from rlhf_engine.models.heads import ScalarHeadModel
from rlhf_engine.models.inputs import position_ids_from_mask
from rlhf_engine.models.policy import PolicyModel

__all__ = [
    "MODEL_SIZES",
    "PolicyModel",
    "ScalarHeadModel",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "latest_checkpoint",
    "llama_config",
    "load_checkpoint",
    "position_ids_from_mask",
    "save_checkpoint",
]
