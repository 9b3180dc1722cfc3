"""Multi-GPU and multi-node training with torch DDP, launched by ``torchrun``.

``torchrun --nproc-per-node N -m tlpipe fit ./data --strategy full`` starts N copies of the same
fit. Each reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from the environment torchrun sets, trains
on its share of every epoch (``EpochSampler`` with ``num_replicas``) and averages gradients
through DDP. Validation is split across ranks too and summed, so every rank sees the same metric
and takes the same early-stopping decision. The frozen pass is sharded too (each rank
extracts every ``world_size``-th batch, the codes gathered on all). Rank 0 alone logs, checkpoints and saves: the output
folder must be on a file system all nodes share (other ranks read the checkpoint to resume).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from tlpipe.errors import TlpipeError


@dataclass(frozen=True)
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        return self._all_reduce(values, dist.ReduceOp.SUM) if self.enabled else values

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object the ranks made themselves)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_min(self, value: int) -> int:
        """The smallest ``value`` of all ranks (e.g. the batch size that fits every GPU)."""
        return int(self._all_reduce([value], dist.ReduceOp.MIN)[0]) if self.enabled else value

    def shard(self, n: int, block: int = 1) -> np.ndarray:
        """This rank's rows of ``n``: every ``world_size``-th block of ``block`` rows from its rank
        (all in one process). A block of a batch keeps each image in the batch it has in one process,
        so its results are those of one process to the bit."""
        rows = np.arange(n)
        return rows if not self.enabled else np.concatenate(
            [rows[start:start + block] for start in range(self.rank * block, n, self.world_size * block)] or [rows[:0]])

    def gathered(self, part: np.ndarray, n: int, block: int = 1) -> np.ndarray:
        """The whole ``n`` rows on every rank, from each rank's ``part`` (its ``shard``), in order."""
        if not self.enabled:
            return part
        shards = [DistContext(self.world_size, rank).shard(n, block) for rank in range(self.world_size)]
        longest = max(map(len, shards))  # the shards differ by a block at most: padded to the longest
        padded = torch.zeros((longest, *part.shape[1:]), dtype=torch.from_numpy(part).dtype, device=_collective_device())
        padded[:len(part)] = torch.from_numpy(part)
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        whole = np.empty((n, *part.shape[1:]), dtype=part.dtype)
        for rows, piece in zip(shards, pieces):
            whole[rows] = piece[:len(rows)].cpu().numpy()
        return whole

    @staticmethod
    def _all_reduce(values: list[float], op) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor, op)
        return tensor.tolist()

    def main_alone(self, when: bool = True, wait: bool = False) -> None:
        """From here on (``when``), rank 0 goes on alone: the other ranks raise ``RankDone`` (after a
        barrier with rank 0 when ``wait``). Nothing happens in a single process."""
        if not (self.enabled and when):
            return
        if wait:
            self.barrier()
        if not self.is_main:
            raise RankDone

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. to build a shared cache), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


class RankDone(Exception):
    """Raised on a rank other than 0 whose part of the fit is over (``DistContext.main_alone``):
    ``pipeline.fit`` returns None for it; rank 0 records the fit."""


@contextmanager
def distributed(device: torch.device) -> Iterator[DistContext]:
    """The fit's process group for the block (``init_distributed``), left at its end, also when a
    rank leaves it with ``RankDone``."""
    context = init_distributed(device)
    try:
        yield context
    finally:
        shutdown()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (NCCL on CUDA, else gloo); a no-op when the
    process was not started by torchrun. Each CUDA rank takes the GPU of its ``LOCAL_RANK``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "mps":
        raise TlpipeError("distributed training runs on CUDA or the CPU, not MPS: use --device cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return DistContext(world_size, rank, local_rank)


def rank_device(device: torch.device, context: DistContext) -> torch.device:
    """The device of this rank: its own GPU under torchrun, else ``device`` unchanged."""
    if context.enabled and device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
