"""Data-parallel training on FSDP2 under ``torchrun`` (one node or many).

Small modules with one job each:

* ``group``: the process group from the torchrun environment (gloo on the CPU, nccl on
  CUDA), and :class:`DataParallel`, what a trainer asks of it (rank, world size, which
  global rows are its own, all-reduced sums). A single process gets :data:`SINGLE`, which
  runs no collective at all.
* ``batches``: the checks, made before any model is loaded, that a world size divides the
  batches and keeps every group of samples on one rank.
* ``sharding``: ``fully_shard`` per decoder layer then the root, for the trained roles.
* ``checkpoint``: sharded ``torch.distributed.checkpoint`` step folders made visible by an
  atomic rename, and the final model gathered to rank 0 as a plain Hugging Face folder.
* ``launch``: ``rlhf-engine train --nproc N`` re-launched under ``torch.distributed.run``.

Nothing here runs when ``WORLD_SIZE`` is unset (no torchrun): the single-process trainer
path is the same code with :data:`SINGLE`, whose collectives return their input.
"""

from rlhf_engine.distributed.group import SINGLE, DataParallel, current, launched_by_torchrun

__all__ = ["SINGLE", "DataParallel", "current", "launched_by_torchrun"]
