"""The process group of a torchrun launch, and what a trainer asks of it.

:class:`DataParallel` is all the trainers see: ``rank``, ``world_size``, ``rows(n)`` (this
rank's contiguous share of ``n`` global rows) and all-reduced ``sum`` / ``max``. The
single-process instance :data:`SINGLE` returns its input from every collective, so the
trainers have one code path and the single-process run pays nothing for it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its rendezvous variables are set),
    even with one process: ``torchrun --nproc-per-node 1`` runs the FSDP2 path too."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@dataclass(frozen=True)
class DataParallel:
    """One rank of a data-parallel run (``distributed`` False: the single process)."""

    rank: int = 0
    world_size: int = 1
    distributed: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes the model folder."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` global rows (``n`` divisible by the world size,
        checked before the run by :mod:`rlhf_engine.distributed.batches`)."""
        if n % self.world_size:
            raise ValueError(f"DataParallel.rows: {n} rows do not split over {self.world_size} ranks")
        share = n // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor; ``tensor`` itself single-process)."""
        return self._reduce(tensor, "SUM")

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of ``tensor`` over the ranks."""
        return self._reduce(tensor, "MAX")

    @property
    def alone(self) -> bool:
        """No other rank to talk to (single-process, or a world of one): the collectives below are
        identities then, and skipping them saves a round trip (and a device sync) per call."""
        return self.world_size == 1

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.alone:
            return tensor
        import torch.distributed as dist

        # gloo and nccl reduce on the process group's device: move there and back.
        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
        return out.to(tensor.device)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (the same shape on every rank) concatenated along dim 0 in rank
        order: the global batch, when each rank holds its :meth:`rows`."""
        if self.alone:
            return tensor
        import torch.distributed as dist

        # gloo gathers no bool tensors: as uint8 and back
        local = tensor.detach().to(self.device, dtype=torch.uint8 if tensor.dtype == torch.bool else tensor.dtype).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(device=tensor.device, dtype=tensor.dtype)

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """``{name: sum over ranks}`` in one all-reduce (fp64)."""
        if self.alone or not values:
            return dict(values)
        total = self.sum(torch.tensor(list(values.values()), dtype=torch.float64))
        return dict(zip(values, total.tolist()))

    def shard(self, model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
        """A trained role as FSDP2 units (:func:`rlhf_engine.distributed.sharding.shard_model`), on
        this rank's device; single-process: ``model`` untouched."""
        if not self.distributed:
            return model
        from rlhf_engine.distributed.sharding import device_mesh, shard_model

        return shard_model(model.to(self.device), device_mesh(self), param_dtype=param_dtype)

    def unsharded(self, model: torch.nn.Module):
        """Context in which a sharded ``model``'s layers stay gathered (for sampling:
        :func:`rlhf_engine.distributed.sharding.unsharded_layers`); single-process: nothing."""
        if not self.distributed:
            return contextlib.nullcontext()
        from rlhf_engine.distributed.sharding import unsharded_layers

        return unsharded_layers(model)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


SINGLE = DataParallel()
_CURRENT = [SINGLE]


def current() -> DataParallel:
    """The :class:`DataParallel` of this process (:data:`SINGLE` until :func:`init_process_group`)."""
    return _CURRENT[0]


def init_process_group(device: torch.device) -> DataParallel:
    """Join the torchrun process group (gloo for the CPU, nccl for CUDA, one GPU per local
    rank) and make it :func:`current`. Idempotent."""
    import torch.distributed as dist

    if not launched_by_torchrun():
        raise RuntimeError("init_process_group: not launched by torchrun (RANK, WORLD_SIZE, ... are unset)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"distributed training runs on cpu (gloo) or cuda (nccl), got --device {device}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    group = DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size(), distributed=True, device=device)
    _CURRENT[0] = group
    return group


def destroy_process_group() -> None:
    import torch.distributed as dist

    from rlhf_engine.distributed.sharding import forget_meshes

    forget_meshes()  # they belong to the group destroyed here
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT[0] = SINGLE
