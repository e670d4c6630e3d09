"""The loader the trainer holds: a torch DataLoader over the shard stream, with a position.

It counts the batches of this rank's plan that have come, so ``state_dict()`` says exactly
where to restart; ``StreamingLoader(config, state=...)`` then yields the batches that would
have come next, reading only the shards still needed and decoding nothing already consumed.
It also keeps the counters a trainer logs, enforces the bad-data budget, and holds back a
batch whose every utterance was bad: it advances the position like any other, so a resume stays
exact. (A batch the plan itself fills with dummy rows, to keep the ranks in lock step at an
epoch's end, is given as planned.)

Loader workers ignore the signals meant for the trainer (``WORKER_IGNORES``): a signal to the
whole process group reaches only the trainer, which saves and closes the loader, and the
workers leave when it does.
"""

from __future__ import annotations

import atexit
import functools
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .epochs import batch_source
from .ring import RING_SLOTS_EXTRA, BatchRing, SlotBatch
from .stream import BadRecord, ErrorBudgetExceeded, StreamConfig, batch_arrays, stream_batches

STATE_VERSION = 2
# Signals a user, `timeout` or Slurm sends to the whole process group (Ctrl-C, scancel, and
# --signal=USR1 ahead of the time limit): the trainer's to handle, never a worker's.
WORKER_IGNORES = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
MAX_BAD_EXAMPLES = 20  # bad utterances named in the counters (and so in checkpoints)


def _ignore_trainer_signals(worker_id: int) -> None:
    """The DataLoader's ``worker_init_fn``: runs first in every worker."""
    for signum in WORKER_IGNORES:
        signal.signal(signum, signal.SIG_IGN)


class ShardStream(IterableDataset):
    """One rank's batches; each DataLoader worker runs one stream of the plan."""

    def __init__(
        self,
        config: StreamConfig,
        num_workers: int,
        epoch: int,
        position: int,
        end_epoch: int | None,
        ring: BatchRing | None = None,
    ):
        self.config = config
        self.num_workers = num_workers
        self.epoch = epoch
        self.position = position
        self.end_epoch = end_epoch
        self.ring = ring

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        if info is None:  # in the trainer's own process: nothing to hand over
            yield from stream_batches(
                self.config,
                self.num_workers,
                0,
                self.epoch,
                self.position,
                end_epoch=self.end_epoch,
            )
            return
        torch.set_num_threads(1)  # a worker's own torch work stays on one thread
        writer = self.ring.writer(info.id)  # each batch is built in a slot of the ring
        for batch in stream_batches(
            self.config,
            self.num_workers,
            info.id,
            self.epoch,
            self.position,
            writer,
            self.end_epoch,
        ):
            yield writer.handed_over(batch)


@dataclass
class Counters:
    batches: int = 0  # given to the trainer
    empty_batches: int = 0  # held back: every utterance in them was bad
    utterances: int = 0
    audio_samples: int = 0
    padded_samples: int = 0  # of the batches given to the trainer
    skipped: Counter = field(default_factory=Counter)  # bad utterances by reason
    bad_by_shard: Counter = field(default_factory=Counter)  # bad utterances by shard URL
    bad_examples: list[str] = field(default_factory=list)  # "SHARD: KEY: reason: detail"

    def padding_efficiency(self) -> float:
        return self.audio_samples / self.padded_samples if self.padded_samples else 0.0

    def add_bad(self, records: list[BadRecord]) -> None:
        for record in records:
            self.bad_by_shard[record.shard] += 1
            if len(self.bad_examples) < MAX_BAD_EXAMPLES:
                self.bad_examples.append(f"{record.shard}: {record.key}: {record.problem}")

    def to_json(self) -> dict:
        return {
            "batches": self.batches,
            "empty_batches": self.empty_batches,
            "utterances": self.utterances,
            "audio_samples": self.audio_samples,
            "padded_samples": self.padded_samples,
            "skipped": dict(self.skipped),
            "bad_by_shard": dict(self.bad_by_shard),
            "bad_examples": list(self.bad_examples),
        }

    @classmethod
    def from_json(cls, data: dict) -> Counters:
        """Counters from ``to_json``; a field the state lacks starts from zero."""
        return cls(
            **{
                **data,
                "skipped": Counter(data.get("skipped", {})),
                "bad_by_shard": Counter(data.get("bad_by_shard", {})),
                "bad_examples": list(data.get("bad_examples", [])),
            }
        )


class StreamingLoader:
    """Fixed-shape batches for one rank: endless (``max_train_steps`` is the trainer's stop),
    or, with ``max_epochs``, until this rank's plan for epochs ``0 .. max_epochs - 1`` is
    through (an eval over a whole held-out set)."""

    def __init__(
        self,
        config: StreamConfig,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        max_bad_fraction: float = 0.01,
        min_for_budget: int = 200,
        state: dict | None = None,
        multiprocessing_context: str = "fork",
        pin_memory: bool = False,
        max_epochs: int | None = None,
    ):
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
        self.max_epochs = max_epochs
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
            sources = [
                batch_source(self.config.rank, self.num_workers, position)
                for position in range(plan.batches_per_stream * max(self.num_workers, 1))
            ]
            order = [plan.streams[s.stream][s.index].bucket for s in sources]
            self._buckets = {e: b for e, b in self._buckets.items() if e >= epoch - 1}
            self._buckets[epoch] = np.asarray(order, dtype=np.int32)
        return self._buckets[epoch]

    def _batches_in_epoch(self) -> int:
        return len(self._epoch_buckets(self.epoch))

    def upcoming_buckets(self, n: int) -> list[int]:
        """The buckets of the next ``n`` batches, from the epoch plans alone (nothing is read
        or decoded): a backend that pays to change shape decides with it how many batches to
        take in one call, without taking any it would then have to give back. A batch held
        back because all its utterances are bad is not foreseen."""
        out, epoch, position = [], self.epoch, self.position
        while len(out) < n:
            buckets = self._epoch_buckets(epoch)
            if not len(buckets):
                raise ValueError("the plan has no batch for this epoch: no usable utterance")
            out += buckets[position : position + n - len(out)].tolist()
            epoch, position = epoch + 1, 0
        return out

    def _finished(self) -> bool:
        return self.max_epochs is not None and self.epoch >= self.max_epochs

    def __iter__(self) -> Iterator[dict]:
        if self._finished():
            return
        ring = None
        extra = {}
        if self.num_workers:
            layouts = [batch_arrays(self.config, k) for k in range(self.config.plan.num_buckets)]
            ring = BatchRing(layouts, self.num_workers, self.prefetch_factor + RING_SLOTS_EXTRA)
            extra = {
                "prefetch_factor": self.prefetch_factor,
                "multiprocessing_context": self.multiprocessing_context,
                "worker_init_fn": _ignore_trainer_signals,
            }
        dataset = ShardStream(
            self.config, self.num_workers, self.epoch, self.position, self.max_epochs, ring
        )
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the
        # global torch RNG, and a resumed run would then see different dropout and gumbel noise.
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.config.seed),
            pin_memory=self.pin_memory and not self.num_workers,
            **extra,
        )
        batches = iter(loader)
        stop = functools.partial(_stop_workers, batches)
        # Workers ignore SIGTERM, the DataLoader's last word at exit: an iteration left open
        # (the trainer died of an uncaught error) stops them before the interpreter waits
        # for them.
        atexit.register(stop)
        try:
            for batch in batches:
                batch = self._receive(batch, ring)
                if batch is not None:
                    yield batch
                if self._finished():
                    return
        finally:
            atexit.unregister(stop)
            stop()

    def _receive(self, batch: dict | SlotBatch, ring: BatchRing | None) -> dict | None:
        """Count a batch and move the position past it; the batch, or None when every
        utterance in it was bad."""
        info = batch.info if isinstance(batch, SlotBatch) else batch
        empty = int(info["num_utterances"]) == 0 and bool(info["skipped"])
        if isinstance(batch, SlotBatch):
            if empty:
                ring.release(batch)
            else:
                batch = ring.take(batch, self.pin_memory)
        self._count(info, empty)
        self.position += 1
        if self.position >= self._batches_in_epoch():
            self.epoch += 1
            self.position = 0
        return None if empty else batch

    def _count(self, info: dict, empty: bool) -> None:
        c = self.counters
        if empty:
            c.empty_batches += 1
        else:
            c.batches += 1
            c.audio_samples += int(info["audio_samples"])
            c.padded_samples += int(info["padded_samples"])
        c.utterances += int(info["num_utterances"])
        c.skipped.update(info["skipped"])
        c.add_bad(info["bad"])
        self._check_budget()

    def _check_budget(self) -> None:
        """Stop once bad utterances pass ``max_bad_fraction`` of those seen, counting at least
        ``min_for_budget`` seen: a run whose shards are all bad stops within its first
        ``max_bad_fraction * min_for_budget`` + 1 bad utterances, not after many updates on
        batches without audio, and one bad utterance early on is not yet a failure."""
        c = self.counters
        bad = sum(c.skipped.values())
        seen = bad + c.utterances
        if bad <= self.max_bad_fraction * max(seen, self.min_for_budget):
            return
        reasons = ", ".join(f"{k}: {v}" for k, v in c.skipped.most_common())
        worst = c.bad_by_shard.most_common(5)
        shards = ", ".join(f"{url} ({n})" for url, n in worst)
        if len(c.bad_by_shard) > len(worst):
            shards += f" and {len(c.bad_by_shard) - len(worst)} more shard(s)"
        examples = "; ".join(c.bad_examples[:3])
        raise ErrorBudgetExceeded(
            f"{bad} of {seen} utterances were bad ({reasons}), over the budget of "
            f"{self.max_bad_fraction:.1%} of at least {self.min_for_budget}; from {shards}; "
            f"for example {examples}. Check the shards with tools/make_shards.py --verify "
            f"or raise --max_bad_fraction"
        )

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.config.seed,
            "world_size": self.config.world_size,
            "num_workers": self.num_workers,
            "plan": self.config.plan.to_json(),
            "num_shards": len(self.config.shards.urls),
            "round_items": self.config.round_items,
            "bucket_runs": self.config.bucket_runs,
            "counters": self.counters.to_json(),
        }

    def load_state_dict(self, state: dict) -> None:
        expect = {
            "version": STATE_VERSION,
            "seed": self.config.seed,
            "world_size": self.config.world_size,
            "num_workers": self.num_workers,
            "plan": self.config.plan.to_json(),
            "num_shards": len(self.config.shards.urls),
            "round_items": self.config.round_items,
            "bucket_runs": self.config.bucket_runs,
        }
        for key, value in expect.items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this run has "
                    f"{value!r}: an exact resume needs the same seed, world size, "
                    f"worker count, shape plan, round and bucket-run settings, "
                    f"shards and loader-state version"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.counters = Counters.from_json(state["counters"])


def _stop_workers(batches) -> None:
    """Stop the DataLoader's workers now. They ignore SIGTERM, so one still busy when the
    DataLoader has waited for it (it asks, then sends SIGTERM) is killed."""
    shut_down = getattr(batches, "_shutdown_workers", None)  # absent without workers
    if shut_down is None:
        return
    shut_down()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()
