"""The world-size checks of a data-parallel run, made from the config before any model loads.

Every rank trains on a contiguous equal share of each global batch, and an RL rank samples
and scores whole groups (a prompt's ``group_size`` samples stay on one rank), so:

* SFT, DPO, reward model: ``batch_size`` divisible by the world size;
* RL: ``prompts_per_step`` divisible by it (whole groups per rank), and ``minibatch_size``
  too when it is smaller than the rollout (each global minibatch is split evenly over the
  ranks; the last, shorter one then splits evenly as well, since the rollout's rows do).
"""

from __future__ import annotations


def _divisors(n: int, limit: int = 64) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _require(config, name: str, world_size: int, why: str) -> None:
    value = getattr(config, name)
    if value % world_size:
        multiples = [m for m in range(world_size, value + 2 * world_size, world_size) if m > 0][:3]
        raise ValueError(
            f"{type(config).__name__}.{name} = {value} does not split over {world_size} ranks ({why}): use a "
            f"multiple of {world_size} (e.g. {multiples}) or a world size that divides {value} ({_divisors(value)})"
        )


def check_world_size(algo: str, config, world_size: int) -> None:
    """ValueError naming the config field, the world size and what would divide, when ``config``
    cannot run data-parallel on ``world_size`` ranks (nothing is loaded before this check)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if algo == "rejection_sampling":
        raise ValueError("--algo rejection_sampling runs in one process (without torchrun or --nproc): its trainer is "
                         "not data-parallel")  # fmt: skip
    if algo in ("sft", "dpo", "rm"):
        _require(config, "batch_size", world_size, "each rank trains on an equal share of every batch")
        return
    _require(config, "prompts_per_step", world_size,
             f"each rank samples whole groups of group_size = {config.group_size} samples of its own prompts")  # fmt: skip
    if config.minibatch_size < config.prompts_per_step * config.group_size:  # else one minibatch of the whole rollout
        _require(config, "minibatch_size", world_size, "each global minibatch is split evenly over the ranks")
    if config.generate_micro_batch_size is not None:
        raise ValueError(f"RLConfig.generate_micro_batch_size = {config.generate_micro_batch_size}: under torchrun each "
                         "rank samples its share of the rollout in one batch (set it to null)")  # fmt: skip
