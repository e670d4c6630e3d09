"""The shared-memory batch ring between loader workers and the trainer's process.

The trainer's process makes the buffers once; each worker cycles through a few slots, each a
buffer per array of a batch, sized for the plan's largest bucket. A worker builds a batch in
place in a free slot and sends only its shapes and small values (``SlotBatch``); the trainer's
side copies the arrays out of the slot (into page-locked memory for CUDA) and gives the slot
back. Nothing is mapped, faulted in or sent per batch, and what the trainer holds is its own,
whatever it keeps. The ring knows batch layouts only as name → (shape, dtype) per bucket.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch

Layout = Dict[str, Tuple[Tuple[int, ...], type]]  # array name → (shape, dtype) of one bucket

# Slots per worker: the DataLoader holds at most prefetch_factor of a worker's batches
# before the trainer takes one, plus the one being built.
RING_SLOTS_EXTRA = 1


@dataclass
class SlotBatch:
    """What crosses from a worker: where its batch lies in the ring, and its small values."""

    worker: int
    slot: int
    shapes: dict[str, tuple[int, ...]]
    info: dict


class BatchRing:
    """Shared-memory slots for ``num_workers`` workers, ``slots`` each, every slot large
    enough for a batch of any of ``layouts`` (one per bucket)."""

    def __init__(self, layouts: list[Layout], num_workers: int, slots: int):
        self.dtypes = {name: np.dtype(dtype) for name, (_, dtype) in layouts[0].items()}
        nbytes = slot_bytes(layouts)
        check_shared_memory(num_workers * slots * sum(nbytes.values()))
        # busy[w, s] is 1 while worker w's slot s holds a batch the trainer has not copied.
        self.busy = torch.zeros(num_workers, slots, dtype=torch.int32).share_memory_()
        self.buffers = [
            [
                {name: torch.UntypedStorage._new_shared(max(n, 1)) for name, n in nbytes.items()}
                for _ in range(slots)
            ]
            for _ in range(num_workers)
        ]

    def writer(self, worker: int) -> SlotWriter:
        return SlotWriter(self, worker)

    def view(self, worker: int, slot: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Array ``name`` of a slot, as ``shape``: a view of its shared buffer."""
        storage = self.buffers[worker][slot][name]
        flat = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()  # the whole buffer
        dtype = self.dtypes[name]
        return flat[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)

    def take(self, batch: SlotBatch, pin_memory: bool = False) -> dict:
        """The batch copied out of its slot, which goes back to its worker."""
        out = dict(batch.info)
        for name, shape in batch.shapes.items():
            view = self.view(batch.worker, batch.slot, name, shape)
            copy = torch.empty(shape, dtype=torch.from_numpy(view).dtype, pin_memory=pin_memory)
            # numpy's copy runs on this thread; torch's would wake its thread pool, whose
            # spinning threads would compete with the workers for the cores.
            np.copyto(copy.numpy(), view)
            out[name] = copy
        self.release(batch)
        return out

    def release(self, batch: SlotBatch) -> None:
        """Give a batch's slot back to its worker without copying it out."""
        self.busy[batch.worker, batch.slot] = 0


def slot_bytes(layouts: list[Layout]) -> dict[str, int]:
    """Bytes of each array of a slot: enough for that array in a batch of any layout."""
    return {
        name: max(int(np.prod(layout[name][0])) for layout in layouts) * np.dtype(dtype).itemsize
        for name, (_, dtype) in layouts[0].items()
    }


def check_shared_memory(needed: int, folder: str = "/dev/shm") -> None:
    """Refuse a ring that the shared-memory file system cannot hold: a worker writing past
    its end would die of SIGBUS instead of an error that says what to do."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return  # no such folder here: torch's shared memory lives elsewhere
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        raise RuntimeError(
            f"the loader's batch buffers need {needed / 2**20:.0f} MiB of shared memory but "
            f"{folder} has {free / 2**20:.0f} MiB free; give the container more (docker run "
            f"--shm-size=...), or lower --num_workers or the batch budget"
        )


class SlotWriter:
    """A worker's side of the ring: the ``alloc(name, shape, dtype)`` that a batch is built
    with, as views of a free slot's buffers (uninitialised). The first array of a batch
    takes the slot; ``handed_over`` ends the batch."""

    def __init__(self, ring: BatchRing, worker: int):
        self.ring, self.worker = ring, worker
        self.busy = ring.busy[worker].numpy()
        self.slot = -1
        self.holding = False  # a slot is taken for the batch being built
        self.parent = os.getppid()  # the process that started this worker

    def acquire(self) -> None:
        """Wait until a slot is free (the trainer copied its batch out), and take it."""
        slots = len(self.busy)
        while True:
            for step in range(1, slots + 1):
                candidate = (self.slot + step) % slots
                if not self.busy[candidate]:
                    self.busy[candidate] = 1
                    self.slot = candidate
                    self.holding = True
                    return
            if os.getppid() != self.parent:  # the trainer is gone: no slot will be freed
                raise RuntimeError("the trainer's process is gone; this loader worker stops")
            time.sleep(0.0005)

    def __call__(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if np.dtype(dtype) != self.ring.dtypes[name]:
            raise TypeError(f"{name}: the ring holds {self.ring.dtypes[name]}, not {dtype}")
        if not self.holding:
            self.acquire()
        return self.ring.view(self.worker, self.slot, name, shape)

    def handed_over(self, batch: dict) -> SlotBatch:
        """The batch built in the current slot, as it crosses to the trainer."""
        self.holding = False
        shapes = {k: v.shape for k, v in batch.items() if k in self.ring.dtypes}
        info = {k: v for k, v in batch.items() if k not in self.ring.dtypes}
        return SlotBatch(self.worker, self.slot, shapes, info)
