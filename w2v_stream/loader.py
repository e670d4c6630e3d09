"""The loader the trainer holds: a torch DataLoader over the shard stream, with a position.

It counts the batches the trainer has consumed, so ``state_dict()`` says exactly where to
restart; ``StreamingLoader(config, state=...)`` then yields the batches that would have come
next, reading only the shards still needed and decoding nothing already consumed. It also
keeps the counters a trainer logs and enforces the bad-data budget.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .stream import ErrorBudgetExceeded, StreamConfig, batch_arrays, stream_batches

# 2: masks, negatives and crops drawn from PCG64 (1: the legacy Mersenne Twister). A version 1
# state still resumes the same data in the same order, with a warning that they differ.
STATE_VERSION = 2


class ShardStream(IterableDataset):
    """One rank's batches; each DataLoader worker runs one stream of the plan."""

    def __init__(self, config: StreamConfig, num_workers: int, epoch: int, position: int,
                 ring: BatchRing | None = None):
        self.config = config
        self.num_workers = num_workers
        self.epoch = epoch
        self.position = position
        self.ring = ring

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        if info is None:  # in the trainer's own process: nothing to hand over
            yield from stream_batches(self.config, self.num_workers, 0, self.epoch,
                                      self.position)
            return
        torch.set_num_threads(1)  # a worker's own torch work stays on one thread
        writer = self.ring.writer(info.id)
        batches = stream_batches(self.config, self.num_workers, info.id, self.epoch,
                                 self.position, writer)
        while True:
            writer.acquire()  # the batch below is built in this slot's buffers
            yield writer.handed_over(next(batches))


@dataclass
class SlotBatch:
    """What crosses from a worker: where its batch lies in the ring, and its small values."""

    worker: int
    slot: int
    shapes: dict[str, tuple[int, ...]]
    info: dict


class BatchRing:
    """Shared-memory buffers the trainer's process makes once and the workers fill in turn.

    Each worker cycles through a few slots, each a buffer per array of a batch, sized for the
    plan's largest bucket. A worker builds a batch in place in a free slot and sends only its
    shapes; the trainer's side copies it out of the slot (into page-locked memory for CUDA)
    and gives the slot back. Against a batch made in fresh shared memory and passed as file
    descriptors, nothing is mapped, faulted in or sent per batch (a fresh 16 MB batch cost 10
    ms of page faults), and what the trainer holds is its own, whatever it keeps.
    """

    def __init__(self, config: StreamConfig, num_workers: int, slots: int):
        layouts = [batch_arrays(config, k) for k in range(len(config.plan.lengths))]
        self.dtypes = {name: np.dtype(dtype) for name, (_, dtype) in layouts[0].items()}
        nbytes = {name: max(int(np.prod(layout[name][0])) for layout in layouts)
                  * self.dtypes[name].itemsize for name in self.dtypes}
        _check_shared_memory(num_workers * slots * sum(nbytes.values()))
        # busy[w, s] is 1 while worker w's slot s holds a batch the trainer has not copied.
        self.busy = torch.zeros(num_workers, slots, dtype=torch.int32).share_memory_()
        self.buffers = [[{name: torch.UntypedStorage._new_shared(max(n, 1))
                          for name, n in nbytes.items()} for _ in range(slots)]
                        for _ in range(num_workers)]

    def writer(self, worker: int) -> SlotWriter:
        return SlotWriter(self, worker)

    def view(self, worker: int, slot: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Array ``name`` of a slot, as ``shape``: a view of its shared buffer."""
        storage = self.buffers[worker][slot][name]
        flat = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()  # the whole buffer
        dtype = self.dtypes[name]
        return flat[:int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)

    def take(self, batch: SlotBatch, pin_memory: bool = False) -> dict:
        """The batch copied out of its slot, which goes back to its worker."""
        out = dict(batch.info)
        for name, shape in batch.shapes.items():
            view = self.view(batch.worker, batch.slot, name, shape)
            copy = torch.empty(shape, dtype=torch.from_numpy(view).dtype, pin_memory=pin_memory)
            # numpy's copy runs on this thread; torch's would wake its thread pool, whose
            # spinning threads fight the workers for the cores (10 ms against 1 a batch).
            np.copyto(copy.numpy(), view)
            out[name] = copy
        self.busy[batch.worker, batch.slot] = 0
        return out


def _check_shared_memory(needed: int, folder: str = "/dev/shm") -> None:
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
            f"--shm-size=...), or lower --num_workers or the batch budget")


class SlotWriter:
    """A worker's side of the ring: the ``alloc(name, shape, dtype)`` that ``assemble``
    builds a batch with, as views of the current slot's buffers (uninitialised)."""

    def __init__(self, ring: BatchRing, worker: int):
        self.ring, self.worker = ring, worker
        self.busy = ring.busy[worker].numpy()
        self.slot = -1

    def acquire(self) -> None:
        """Wait until a slot is free (the trainer copied its batch out), and take it."""
        slots = len(self.busy)
        while True:
            for step in range(1, slots + 1):
                candidate = (self.slot + step) % slots
                if not self.busy[candidate]:
                    self.busy[candidate] = 1
                    self.slot = candidate
                    return
            time.sleep(0.0005)

    def __call__(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if np.dtype(dtype) != self.ring.dtypes[name]:
            raise TypeError(f"{name}: the ring holds {self.ring.dtypes[name]}, not {dtype}")
        return self.ring.view(self.worker, self.slot, name, shape)

    def handed_over(self, batch: dict) -> SlotBatch:
        shapes = {k: v.shape for k, v in batch.items() if k in self.ring.dtypes}
        info = {k: v for k, v in batch.items() if k not in self.ring.dtypes}
        return SlotBatch(self.worker, self.slot, shapes, info)


# Slots per worker: the DataLoader holds at most prefetch_factor of a worker's batches
# before the trainer takes one, plus the one being built.
RING_SLOTS_EXTRA = 1


@dataclass
class Counters:
    batches: int = 0
    utterances: int = 0
    audio_samples: int = 0
    padded_samples: int = 0
    skipped: Counter = field(default_factory=Counter)

    def padding_efficiency(self) -> float:
        return self.audio_samples / self.padded_samples if self.padded_samples else 0.0

    def to_json(self) -> dict:
        return {"batches": self.batches, "utterances": self.utterances,
                "audio_samples": self.audio_samples, "padded_samples": self.padded_samples,
                "skipped": dict(self.skipped)}


class StreamingLoader:
    """Endless fixed-shape batches for one rank; ``max_train_steps`` is the trainer's stop."""

    def __init__(self, config: StreamConfig, num_workers: int = 2, prefetch_factor: int = 2,
                 max_bad_fraction: float = 0.01, min_for_budget: int = 200,
                 state: dict | None = None, multiprocessing_context: str = "fork",
                 pin_memory: bool = False):
        self.config = config
        # CUDA: batches land in page-locked memory (copied there out of the workers' ring),
        # so the trainer's non_blocking copies to the GPU overlap its compute.
        self.pin_memory = pin_memory
        # "fork" starts workers fastest; a process that already runs threads (a gloo or NCCL
        # process group) should use "forkserver": forking it can deadlock at shutdown.
        self.multiprocessing_context = multiprocessing_context
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.max_bad_fraction = max_bad_fraction
        self.min_for_budget = min_for_budget
        self.epoch = 0
        self.position = 0
        self.counters = Counters()
        if state:
            self.load_state_dict(state)
        self._buckets: dict[int, np.ndarray] = {}

    def _epoch_buckets(self, epoch: int) -> np.ndarray:
        """The bucket of each of this rank's batches in ``epoch``, in the order they come
        (the epoch's plan itself is not kept: for a large corpus it is big)."""
        if epoch not in self._buckets:  # the current epoch and the next, at most
            plan = self.config.epoch_plan(epoch, self.num_workers)
            workers = max(self.num_workers, 1)
            mine = plan.streams[self.config.rank * workers:(self.config.rank + 1) * workers]
            # Rank-level position p comes from stream role p % W, its batch p // W.
            order = [batch.bucket for column in zip(*mine) for batch in column]
            self._buckets = {e: b for e, b in self._buckets.items() if e >= epoch - 1}
            self._buckets[epoch] = np.asarray(order, dtype=np.int32)
        return self._buckets[epoch]

    def _batches_in_epoch(self) -> int:
        return len(self._epoch_buckets(self.epoch))

    def upcoming_buckets(self, n: int) -> list[int]:
        """The buckets of the next ``n`` batches, from the epoch plans alone (nothing is read
        or decoded): a backend that pays to change shape decides with it how many batches to
        take in one call, without taking any it would then have to give back."""
        out, epoch, position = [], self.epoch, self.position
        while len(out) < n:
            buckets = self._epoch_buckets(epoch)
            if not len(buckets):
                raise ValueError("the plan has no batch for this epoch: no usable utterance")
            out += buckets[position:position + n - len(out)].tolist()
            epoch, position = epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[dict]:
        ring = (BatchRing(self.config, self.num_workers, self.prefetch_factor + RING_SLOTS_EXTRA)
                if self.num_workers else None)
        dataset = ShardStream(self.config, self.num_workers, self.epoch, self.position, ring)
        extra = ({"prefetch_factor": self.prefetch_factor,
                  "multiprocessing_context": self.multiprocessing_context}
                 if self.num_workers else {})
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the
        # global torch RNG, and a resumed run would then see different dropout and gumbel noise.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.config.seed),
                            pin_memory=self.pin_memory and not self.num_workers, **extra)
        for batch in loader:
            if isinstance(batch, SlotBatch):
                batch = ring.take(batch, self.pin_memory)
            self._count(batch)
            self.position += 1
            if self.position >= self._batches_in_epoch():
                self.epoch += 1
                self.position = 0
            yield batch

    def _count(self, batch: dict) -> None:
        c = self.counters
        c.batches += 1
        c.utterances += int(batch["num_utterances"])
        c.audio_samples += int(batch["audio_samples"])
        c.padded_samples += int(batch["padded_samples"])
        c.skipped.update(batch["skipped"])
        bad = sum(c.skipped.values())
        seen = bad + c.utterances
        if seen >= self.min_for_budget and bad > self.max_bad_fraction * seen:
            reasons = ", ".join(f"{k}: {v}" for k, v in c.skipped.most_common())
            raise ErrorBudgetExceeded(
                f"{bad} of {seen} utterances were bad ({reasons}), over the budget of "
                f"{self.max_bad_fraction:.1%}; check the shards with tools/make_shards.py "
                f"--verify or raise --max_bad_fraction")

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "seed": self.config.seed, "world_size": self.config.world_size,
                "num_workers": self.num_workers, "plan": self.config.plan.to_json(),
                "num_shards": len(self.config.shards.urls),
                "round_items": self.config.round_items, "bucket_runs": self.config.bucket_runs,
                "counters": self.counters.to_json()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") == 1:
            warnings.warn("this loader state was written before masks and negatives were drawn "
                          "from PCG64: the same utterances come in the same order, but their "
                          "masks, negatives and crops differ from the interrupted run's",
                          stacklevel=2)
            state = {**state, "version": STATE_VERSION}
        expect = {"version": STATE_VERSION, "seed": self.config.seed,
                  "world_size": self.config.world_size, "num_workers": self.num_workers,
                  "plan": self.config.plan.to_json(), "num_shards": len(self.config.shards.urls)}
        # Written by every version 1 state since round_items and bucket_runs came in; older
        # ones used the defaults.
        expect.update(round_items=self.config.round_items, bucket_runs=self.config.bucket_runs)
        defaults = {"round_items": 256, "bucket_runs": False}
        for key, value in expect.items():
            if state.get(key, defaults.get(key)) != value:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this run has "
                                 f"{value!r}: an exact resume needs the same seed, world size, "
                                 f"worker count, shape plan, round and bucket-run settings "
                                 f"and shards")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        counters = state.get("counters", {})
        self.counters = Counters(counters.get("batches", 0), counters.get("utterances", 0),
                                 counters.get("audio_samples", 0),
                                 counters.get("padded_samples", 0),
                                 Counter(counters.get("skipped", {})))
