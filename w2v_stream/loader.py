"""The loader the trainer holds: a torch DataLoader over the shard stream, with a position.

It counts the batches the trainer has consumed, so ``state_dict()`` says exactly where to
restart; ``StreamingLoader(config, state=...)`` then yields the batches that would have come
next, reading only the shards still needed and decoding nothing already consumed. It also
keeps the counters a trainer logs and enforces the bad-data budget.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .stream import ErrorBudgetExceeded, StreamConfig, stream_batches

STATE_VERSION = 1


class ShardStream(IterableDataset):
    """One rank's batches; each DataLoader worker runs one stream of the plan."""

    def __init__(self, config: StreamConfig, num_workers: int, epoch: int, position: int,
                 busy: torch.Tensor | None = None):
        self.config = config
        self.num_workers = num_workers
        self.epoch = epoch
        self.position = position
        self.busy = busy  # (workers, RING_SLOTS) int32 in shared memory: see SlotRing

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:  # in the trainer's own process: nothing to hand over
            yield from stream_batches(self.config, self.num_workers, 0, self.epoch,
                                      self.position, np.empty)
            return
        torch.set_num_threads(1)  # a worker's own torch work stays on one thread
        ring = SlotRing(self.busy[info.id].numpy())
        batches = stream_batches(self.config, self.num_workers, info.id, self.epoch,
                                 self.position, ring)
        while True:
            slot = ring.acquire()  # the batch below is built in this slot's buffers
            batch = next(batches)
            out = {k: ring.tensor(v) if isinstance(v, np.ndarray) else v
                   for k, v in batch.items()}
            out["slot"] = (info.id, slot)
            yield out


# Buffers each worker cycles through: the DataLoader holds at most prefetch_factor of a
# worker's batches before the trainer takes one, plus the one being built.
RING_SLOTS_EXTRA = 2


class SlotRing:
    """An ``alloc(shape, dtype)`` for loader workers: arrays in shared memory, reused.

    Every batch of a worker is built in one of a few slots, each a set of shared-memory
    buffers (one per array of the batch, grown to the largest shape asked), so a batch
    crosses to the trainer without a copy and without fresh shared memory (whose page
    faults cost a fresh 16 MB batch 10 ms: 5x its hand-over). ``busy[slot]`` is 1 from
    ``acquire`` until the trainer's process has copied the batch out (``release_slot``);
    the worker waits for a free slot, so a batch is never overwritten while it is read.
    Arrays come back uninitialised (``np.empty``): ``assemble`` writes every element.
    """

    def __init__(self, busy: np.ndarray):
        self.busy = busy  # (slots,) int32 shared with the trainer's process
        self.buffers: list[dict[tuple[str, int], torch.Tensor]] = [{} for _ in busy]
        self.slot = -1
        self._calls: Counter = Counter()
        self._tensors: dict[int, torch.Tensor] = {}

    def acquire(self) -> int:
        """Wait for a free slot, mark it busy and build the next batch in it."""
        slots = len(self.busy)
        while True:
            for step in range(1, slots + 1):
                candidate = (self.slot + step) % slots
                if not self.busy[candidate]:
                    self.busy[candidate] = 1
                    self.slot, self._calls = candidate, Counter()
                    return candidate
            time.sleep(0.0005)

    def __call__(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        key = (dtype.str, self._calls[dtype.str])  # the n-th array of this dtype
        self._calls[dtype.str] += 1
        count = int(np.prod(shape))
        nbytes = max(count * dtype.itemsize, 1)
        buffers = self.buffers[self.slot]
        if key not in buffers or buffers[key].nbytes() < nbytes:
            buffers[key] = torch.UntypedStorage._new_shared(nbytes)
        tensor = torch.empty(0, dtype=_TORCH_DTYPES[dtype]).set_(buffers[key], 0, shape)
        array = tensor.numpy()
        self._tensors[array.ctypes.data] = tensor
        return array

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """The shared tensor behind an array this ring made; others become tensors as they
        are (torch moves them to shared memory on the way out)."""
        tensor = self._tensors.pop(array.ctypes.data, None)
        return tensor if tensor is not None else torch.from_numpy(array)


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool,
                 np.dtype(np.int32): torch.int32, np.dtype(np.int16): torch.int16}


def release_slot(batch: dict, busy: torch.Tensor) -> dict:
    """The batch with its tensors out of the worker's slot, and the slot given back.

    Pinned batches (CUDA) were copied into page-locked memory by the DataLoader already;
    others are copied here, so what the trainer holds is its own whatever it keeps.
    """
    worker, slot = batch.pop("slot")
    out = {k: v if not isinstance(v, torch.Tensor) or v.is_pinned() else v.clone()
           for k, v in batch.items()}
    busy[worker, slot] = 0
    return out


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
        # CUDA: batches land in page-locked memory (a thread of this process copies them), so
        # the trainer's non_blocking copies to the GPU overlap its compute.
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
        # Made here and shared with the workers: which of each worker's slots the trainer's
        # side still reads (SlotRing).
        busy = torch.zeros(max(self.num_workers, 1), self.prefetch_factor + RING_SLOTS_EXTRA,
                           dtype=torch.int32).share_memory_()
        dataset = ShardStream(self.config, self.num_workers, self.epoch, self.position, busy)
        extra = ({"prefetch_factor": self.prefetch_factor,
                  "multiprocessing_context": self.multiprocessing_context}
                 if self.num_workers else {})
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the
        # global torch RNG, and a resumed run would then see different dropout and gumbel noise.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.config.seed),
                            pin_memory=self.pin_memory, **extra)
        for batch in loader:
            if "slot" in batch:
                batch = release_slot(batch, busy)
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
