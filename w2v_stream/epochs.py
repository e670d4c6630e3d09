"""Which utterances make which batch, for every stream, in every epoch: a pure function.

A *stream* is one loader worker on one rank (``world_size * num_workers`` streams in all).
Everything here works on utterance lengths from ``index.json``; no audio is read. Per epoch:

1. An epoch is ``passes`` passes over the data. Each pass permutes the shards (seeded). If
   there are fewer shards than streams, each shard is split into ``m`` interleaved virtual
   shards (samples ``p % m == j``), so every stream gets data. Virtual shards go to streams
   round robin, the deal continuing from pass to pass, so over an epoch the streams' shares
   differ by at most one virtual shard; each stream reads its own. More passes per epoch
   make that difference, and the dummy rows it costs at the epoch's end, smaller.
2. Each stream passes its utterances through a shuffle buffer bounded in audio samples.
3. Streams advance in lock step, ``round_items`` utterances per round. Per round and bucket,
   every stream emits the same number of batches (the fewest full batches any stream has,
   unless some stream holds ``PENDING_CAP`` batches' worth, then the most), in one shared
   shuffled bucket order. A stream short of utterances for a batch borrows from other
   buckets (pad: shorter ones, padded further; crop: longer ones, cropped down) before it
   falls back to dummy rows (with ``bucket_runs``, each bucket's batches of a round stay
   together and the order of the buckets is shuffled). So all streams yield the same
   number of batches with the same shape at the same step: DDP and IPU replicas never wait
   for a shape or a batch that does not come. At the epoch's end the rest is flushed.

The result fixes the whole epoch, so loading is deterministic and resuming is a matter of
skipping to a batch index; memory is what a stream has read but not emitted, which the
shuffle buffer and the pending cap bound.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from .buckets import ShapePlan, pack_rows

PENDING_CAP = 3  # batches' worth of one bucket a stream may hold before others must fill
PACK_MIN_FILL = 0.9  # packed rows fuller than this are emitted; the rest wait a round


@dataclass(frozen=True)
class Item:
    read: int  # index in the stream's reads this epoch (a shard may be read once per pass)
    shard: int  # index in the shard list
    pos: int  # sample position within the shard
    length: int  # samples, as in the index


Row = Tuple[Item, ...]  # the utterances of one row: one, or several when packing; () is filler


@dataclass(frozen=True)
class Batch:
    bucket: int
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class EpochPlan:
    streams: tuple[tuple[Batch, ...], ...]  # per stream, its batches in order
    reads: tuple[tuple[tuple[int, int, int], ...], ...]  # per stream: (shard, j, m) in order
    dropped: int  # utterances under the minimum length

    @property
    def batches_per_stream(self) -> int:
        return len(self.streams[0]) if self.streams else 0


@dataclass(frozen=True)
class BatchSource:
    """Where one of a rank's batches lies in an epoch plan."""

    stream: int  # index in ``EpochPlan.streams``
    index: int  # index among that stream's batches


def batch_source(rank: int, num_workers: int, position: int) -> BatchSource:
    """The batch at rank-level ``position`` (batches this rank has had in the epoch).

    A rank's ``W`` loader workers take turns, so position p comes from the rank's stream role
    ``p % W``, its batch ``p // W``. The loader orders its batches with this and each worker
    finds its first batch with it, so a resumed run continues exactly where it stopped.
    """
    workers = max(num_workers, 1)
    return BatchSource(rank * workers + position % workers, position // workers)


def _rng(seed: int, epoch: int, purpose: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, purpose, stream])


def assign_shards(
    num_shards: int, num_streams: int, epoch: int, seed: int, passes: int = 1
) -> list[list[tuple[int, int, int]]]:
    """Per stream, the (shard, j, m) virtual shards it reads this epoch, in order."""
    if num_shards < 1:
        raise ValueError("no shards to read")
    m = math.ceil(num_streams / num_shards)
    virtual = [
        (int(s), j, m)
        for p in range(passes)
        for s in _rng(seed, epoch * passes + p, 0).permutation(num_shards)
        for j in range(m)
    ]
    streams: list[list[tuple[int, int, int]]] = [[] for _ in range(num_streams)]
    for v, entry in enumerate(virtual):
        streams[v % num_streams].append(entry)
    return streams


def _shuffled(items: list[Item], capacity: int, rng: np.random.Generator) -> list[Item]:
    """A shuffle buffer holding at most ``capacity`` samples of audio (at least one item)."""
    buffer: list[Item] = []
    held = 0
    out: list[Item] = []
    for item in items:
        buffer.append(item)
        held += item.length
        while held > capacity and len(buffer) > 1:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            out.append(buffer.pop())
            held -= out[-1].length
    while buffer:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        out.append(buffer.pop())
    return out


def plan_epoch(
    shard_lengths: Sequence[Sequence[int]],
    plan: ShapePlan,
    num_streams: int,
    epoch: int,
    seed: int,
    shuffle_samples: int,
    round_items: int = 256,
    passes: int = 1,
    bucket_runs: bool = False,
) -> EpochPlan:
    """The batches of every stream for ``epoch`` (see the module docstring).

    ``bucket_runs`` keeps each round's batches of one bucket together (the order of the
    buckets is shuffled instead of the order of the batches), for backends that pay to change
    shape: an IPU swaps executables, and the weights and optimizer state with them.
    """
    reads = assign_shards(len(shard_lengths), num_streams, epoch, seed, passes)
    dropped = 0
    queues: list[list[Item]] = []
    for s, virtual in enumerate(reads):
        items = []
        for read, (shard, j, m) in enumerate(virtual):
            for pos in range(j, len(shard_lengths[shard]), m):
                length = int(shard_lengths[shard][pos])
                if plan.bucket_for(length) is None:
                    dropped += 1
                else:
                    items.append(Item(read, shard, pos, length))
        queues.append(_shuffled(items, shuffle_samples, _rng(seed, epoch, 1, s)))

    k_count = plan.num_buckets
    pending = [[deque() for _ in range(k_count)] for _ in range(num_streams)]
    carry: list[list[Item]] = [[] for _ in range(num_streams)]
    cursor = [0] * num_streams
    out: list[list[Batch]] = [[] for _ in range(num_streams)]
    order_rng = _rng(seed, epoch, 2)
    while True:
        for s in range(num_streams):
            taken = queues[s][cursor[s] : cursor[s] + round_items]
            cursor[s] += len(taken)
            last = cursor[s] >= len(queues[s])
            if plan.policy == "pack":
                for row in _pack(carry[s] + taken, plan.lengths[0], plan.align, last, carry, s):
                    pending[s][0].append(row)
            else:
                for item in taken:
                    pending[s][plan.bucket_for(item.length)].append((item,))
        done = all(cursor[s] >= len(queues[s]) and not carry[s] for s in range(num_streams))
        # Longest buckets first for pad (their batches may borrow shorter utterances), shortest
        # first for crop (theirs may borrow longer ones, cropped down).
        kinds = range(k_count - 1, -1, -1) if plan.policy != "crop" else range(k_count)
        made: list[list[Batch]] = [[] for _ in range(num_streams)]
        for k in kinds:
            size = plan.batch_sizes[k]
            held = [len(pending[s][k]) for s in range(num_streams)]
            if done:
                n = max(math.ceil(h / size) for h in held)
            elif max(held) >= PENDING_CAP * size:
                n = max(h // size for h in held)
            else:
                n = min(h // size for h in held)
            donors = [j for j in kinds if (j < k if plan.policy != "crop" else j > k)]
            for s in range(num_streams):
                for _ in range(n):
                    made[s].append(
                        Batch(k, tuple(_take(pending[s], k, donors) for _ in range(size)))
                    )
        order = _round_order(made[0], bucket_runs, order_rng)
        for s in range(num_streams):
            out[s] += [made[s][i] for i in order]
        if done:
            break
    return EpochPlan(tuple(tuple(b) for b in out), tuple(tuple(r) for r in reads), dropped)


def _round_order(batches: list[Batch], bucket_runs: bool, rng: np.random.Generator) -> list[int]:
    """The order of a round's batches (the same for every stream: they hold the same shapes).
    ``batches`` come grouped by bucket; runs keep the groups whole and shuffle their order."""
    if not batches:
        return []
    if not bucket_runs:
        return list(rng.permutation(len(batches)))
    groups: list[list[int]] = []
    for i, batch in enumerate(batches):
        if groups and batches[groups[-1][0]].bucket == batch.bucket:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [i for g in rng.permutation(len(groups)) for i in groups[g]]


def _take(pending: list[deque], k: int, donors: Sequence[int]) -> Row:
    """The next row for a batch of bucket k: its own utterances first, then a donor's (a
    shorter one padded further, or for crop a longer one cropped), else a dummy row."""
    for j in (k, *donors):
        if pending[j]:
            return pending[j].popleft()
    return ()


def _pack(
    items: list[Item], row_length: int, align: int, last: bool, carry: list[list[Item]], stream: int
) -> list[Row]:
    """Pack ``items`` into rows, each utterance starting at a multiple of ``align`` samples;
    rows with less than PACK_MIN_FILL of audio wait for the next round, unless it is the
    stream's ``last``."""
    lengths = [min(i.length, row_length) for i in items]
    rows = []
    carry[stream] = []
    for row in pack_rows(lengths, row_length, align):
        fill = sum(lengths[i] for i in row) / row_length
        if fill >= PACK_MIN_FILL or last:
            rows.append(tuple(items[i] for i in row))
        else:
            carry[stream] += [items[i] for i in row]
    return rows
