"""What the TRL drop-ins refuse, in one place: the MoE load-balancing loss (the fused head
returns no router logits) and vision-language batches (the loss steps run text-only models)."""

from __future__ import annotations

# Inputs of vision-language batches.
MULTIMODAL_INPUTS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


def _names(trainer) -> tuple[str, str]:
    """``("FusedGRPOTrainer", "GRPO")`` for a drop-in subclassing ``trl.GRPOTrainer``."""
    base = next(cls for cls in type(trainer).__mro__ if cls.__module__.startswith("trl."))
    return type(trainer).__name__, base.__name__.removesuffix("Trainer")


def refuse_aux_loss(trainer) -> None:
    """ValueError at construction when TRL would ask the policy for router logits at every step."""
    if trainer.aux_loss_enabled:
        ours, kind = _names(trainer)
        raise ValueError(
            f"{ours} does not compute the MoE load-balancing loss: set router_aux_loss_coef=0.0 in the "
            f"{kind}Config, or use trl.{kind}Trainer"
        )


def refuse_multimodal(trainer, inputs: dict) -> None:
    """ValueError for a batch carrying vision-language inputs."""
    present = [name for name in MULTIMODAL_INPUTS if inputs.get(name) is not None]
    if present:
        ours, kind = _names(trainer)
        raise ValueError(f"{ours} runs text-only models; this batch carries {present}: use trl.{kind}Trainer")
