"""Data-parallel training under torchrun: which process this is, and the few collectives training needs.

Started plainly, training runs as a world of one and none of this does anything. Under
`torchrun --nproc_per_node=N -m translator train RECIPE`, each process joins a process group
(gloo on CPU, NCCL on CUDA), reads its own share of every step's batches, and only rank 0
validates, logs and writes.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
OBJECTS_TIMEOUT = datetime.timedelta(days=1)  # how long ranks wait for rank 0 (World.objects)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live: NCCL reduces GPU tensors only
    objects: dist.ProcessGroup | None = None  # gloo, for Python objects and waits on rank 0 (join); None: the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (on this world's device) added up, in place, on every rank; no host sync."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (e.g. a signal reached one of them)."""
        if self.size == 1:
            return flag
        return bool(self.sum_(torch.tensor([float(flag)], device=self.device)).item())

    def gather(self, value) -> list:
        """Every rank's value, by rank, on every rank."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.objects)
        return values

    def from_main(self, value):
        """Rank 0's value, on every rank (e.g. the validation verdicts only rank 0 computes)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def computed_by_main(self, compute: Callable[[], T]) -> T:
        """compute() run on rank 0 only (a checkpoint's choice, a random draw), its result on every rank."""
        return self.from_main(compute() if self.is_main else None)

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (downloads, tokenisation caches), the others after it, from its results."""
        if not self.is_main:
            dist.barrier(group=self.objects)
        yield
        if self.is_main and self.size > 1:
            dist.barrier(group=self.objects)

    def weights_agree(self, model: torch.nn.Module) -> bool:
        """Whether every rank holds bitwise the same weights (they must, after data-parallel updates)."""
        if self.size == 1:
            return True
        digest = hashlib.sha256()
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return len(set(self.gather(digest.hexdigest()))) == 1


def join(device: torch.device = torch.device("cpu")) -> World:
    """The world torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR, ...), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # Python objects (an epoch's batches, validation verdicts) and the waits for rank 0 go through a gloo group: NCCL
    # would carry them through GPU memory, and its watchdog ends any wait over 10 minutes (gloo's default: 30), where
    # rank 0 alone may prepare a large corpus for hours. A rank that fails ends the job through torchrun, not a timeout.
    objects = dist.new_group(backend="gloo", timeout=OBJECTS_TIMEOUT)
    return World(dist.get_rank(), size, device, objects)


def leave(world: World) -> None:
    """Every rank leaves the process group at the same point, once training's collectives are done.

    Destroying the group is itself collective: a rank that tears down its connections while
    another still holds them (e.g. rank 1 exiting while rank 0 runs the test evaluation) can
    abort with SIGABRT in gloo. (DistributedDataParallel still keeps gloo's threads alive after
    this, so `translator train` under torchrun also ends its processes with os._exit: cli.py.) After an error, no rank calls this: its peers may be waiting
    in a collective, and torchrun stops them when this process fails.
    """
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
