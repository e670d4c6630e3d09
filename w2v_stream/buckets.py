"""The shape plan: which padded lengths (buckets) exist and how many rows each batch has.

Computed from utterance lengths alone (``index.json``), never from audio. Three policies:

- ``pad``: each utterance goes to the smallest bucket that holds it and is zero-padded to the
  bucket's top. Tops are chosen by dynamic programming to minimise padded samples for the
  real length histogram (exact on a grid of ``quantum`` samples, one frame hop by default).
- ``crop``: each utterance goes to the largest bucket whose floor it reaches and is randomly
  cropped to that floor (fairseq style): no padding, some audio left out.
- ``pack``: utterances are concatenated into rows of one fixed length, each starting at a
  multiple of the feature encoder's total stride (``align``): one shape per run.

Batch sizes come from a budget of samples per batch (``max_tokens``, as in fairseq), so short
buckets get more rows and memory is flat across buckets.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

POLICIES = ("pad", "crop", "pack")
# The default Wav2Vec2 feature encoder (transformers' conv_kernel / conv_stride).
DEFAULT_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
DEFAULT_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def frames_for_samples(
    num_samples: int,
    conv_kernel: Sequence[int] = DEFAULT_CONV_KERNEL,
    conv_stride: Sequence[int] = DEFAULT_CONV_STRIDE,
) -> int:
    """Frames the conv feature encoder makes from ``num_samples`` (transformers' formula)."""
    length = num_samples
    for kernel, stride in zip(conv_kernel, conv_stride):
        length = (length - kernel) // stride + 1
    return max(length, 0)


@dataclass(frozen=True)
class ShapePlan:
    policy: str
    lengths: tuple[int, ...]  # padded samples per bucket, ascending
    frames: tuple[int, ...]  # encoder frames per bucket
    batch_sizes: tuple[int, ...]  # rows per batch per bucket
    min_samples: int  # shorter utterances are dropped
    max_samples: int  # longer ones are cropped to this (pad, pack) or to a floor (crop)
    sample_rate: int = 16_000
    # pack: the feature encoder's total stride; packed utterances start at multiples of it, so
    # each utterance's frames are the frames it has alone. 1 for pad and crop (one per row).
    align: int = 1

    @property
    def num_buckets(self) -> int:
        return len(self.lengths)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch size, padded samples) a batch can have."""
        return list(zip(self.batch_sizes, self.lengths))

    def bucket_for(self, num_samples: int) -> int | None:
        """Bucket index for an utterance of ``num_samples``; None if it is dropped."""
        if num_samples < self.min_samples:
            return None
        n = min(num_samples, self.max_samples)
        if self.policy == "pack":
            return 0
        # bisect on the tuple: np.searchsorted would turn it into an array at every call, and
        # epoch plans ask once per utterance.
        if self.policy == "pad":
            return bisect.bisect_left(self.lengths, n)
        k = bisect.bisect_right(self.lengths, n) - 1  # crop: largest floor <= n
        return k if k >= 0 else None

    def to_json(self) -> dict:
        """Plain values; ``align`` only where it is not 1, so a loader state saved without it
        (pad, crop) still matches its plan on resume."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if k != "align" or v != 1
        }

    @classmethod
    def from_json(cls, data: dict) -> ShapePlan:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _optimal_tops(hist: np.ndarray, num_buckets: int, cost_top: bool, rows_for=None) -> list[int]:
    """Bin indices of bucket edges minimising padding (``cost_top``) or cropping.

    ``hist[j]`` counts utterances in grid bin j (length in (j-1, j] quanta). For pad, a bucket
    with top j costs the samples of its batches: ``ceil(count / rows) * rows * j`` with
    ``rows = rows_for(j)``, so the filler rows of its last batch count too; for crop, a bucket
    with floor i costs the audio it cuts, ``sum(len) - count * i``. Both are solved exactly by
    dynamic programming over the bins that hold utterances.
    """
    bins = np.flatnonzero(hist)
    counts = hist[bins].astype(np.float64)
    n = len(bins)
    k = min(num_buckets, n)
    csum = np.concatenate([[0.0], np.cumsum(counts)])
    lsum = np.concatenate([[0.0], np.cumsum(counts * bins)])
    inf = float("inf")
    # best[m][j]: min cost of covering the first j occupied bins with m buckets.
    best = np.full((k + 1, n + 1), inf)
    best[0][0] = 0.0
    choice = np.zeros((k + 1, n + 1), dtype=np.int64)
    for m in range(1, k + 1):
        for j in range(1, n + 1):
            i = np.arange(0, j)  # the bucket covers occupied bins i..j-1
            if cost_top:
                rows = rows_for(int(bins[j - 1]))
                cost = np.ceil((csum[j] - csum[i]) / rows) * rows * bins[j - 1]
            else:
                cost = (lsum[j] - lsum[i]) - (csum[j] - csum[i]) * bins[i]
            total = best[m - 1][i] + cost
            choice[m][j] = int(np.argmin(total))
            best[m][j] = total[choice[m][j]]
    m = int(np.argmin(best[:, n]))
    edges = []
    j = n
    while m > 0:
        i = choice[m][j]
        edges.append(int(bins[j - 1]) if cost_top else int(bins[i]))
        j, m = i, m - 1
    return sorted(edges)


def make_plan(
    lengths: Sequence[int],
    policy: str = "pad",
    num_buckets: int = 8,
    max_tokens: int | None = None,
    batch_size: int = 8,
    min_samples: int = 0,
    max_samples: int | None = None,
    quantum: int = 320,
    batch_multiple: int = 1,
    sample_rate: int = 16_000,
    conv_kernel: Sequence[int] = DEFAULT_CONV_KERNEL,
    conv_stride: Sequence[int] = DEFAULT_CONV_STRIDE,
) -> ShapePlan:
    """The shape plan for utterances of ``lengths`` samples.

    ``max_tokens`` is the budget of padded samples per batch; by default ``batch_size`` rows of
    the longest bucket. ``batch_multiple`` rounds every batch size down to a multiple (for
    replicas x accumulation on an IPU).
    """
    if policy not in POLICIES:
        raise ValueError(f"length policy {policy!r}: choose one of {POLICIES}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    arr = np.asarray(lengths, dtype=np.int64)
    longest = int(arr.max()) if arr.size else 0
    max_samples = int(max_samples or longest)
    kept = np.minimum(arr[arr >= min_samples], max_samples)
    if kept.size == 0:
        raise ValueError("no utterance is within the duration limits: nothing to plan")
    if max_samples < quantum or frames_for_samples(max_samples, conv_kernel, conv_stride) < 2:
        raise ValueError(
            f"max length {max_samples} samples is shorter than the feature "
            f"encoder's receptive field"
        )
    top = -(-max_samples // quantum)  # grid bins: length in quanta, rounded up
    tokens = max_tokens or batch_size * top * quantum

    def rows_for(length: int) -> int:
        rows = max(1, tokens // length)
        return max(batch_multiple, rows // batch_multiple * batch_multiple)

    if policy == "pack":
        edges = [max_samples // quantum * quantum or max_samples]
    else:
        grid = -(-kept // quantum) if policy == "pad" else kept // quantum
        hist = np.bincount(grid, minlength=top + 1)
        edges_q = _optimal_tops(hist, num_buckets, policy == "pad", lambda q: rows_for(q * quantum))
        edges = [max(e * quantum, 1) for e in edges_q]
        if policy == "crop":
            edges = [max(e, frames_to_min_samples(2, conv_kernel, conv_stride)) for e in edges]
        edges = sorted(set(min(e, max_samples) if policy == "crop" else e for e in edges))
    sizes = [rows_for(length) for length in edges]
    frames = [frames_for_samples(e, conv_kernel, conv_stride) for e in edges]
    return ShapePlan(
        policy,
        tuple(edges),
        tuple(frames),
        tuple(sizes),
        int(min_samples),
        max_samples,
        sample_rate,
        math.prod(conv_stride) if policy == "pack" else 1,
    )


def plan_for_shards(
    shard_lengths: Sequence[Sequence[int]],
    sample_rate: int,
    conv_kernel: Sequence[int],
    conv_stride: Sequence[int],
    *,
    policy: str = "pad",
    num_buckets: int = 8,
    batch_size: int = 8,
    max_tokens: int | None = None,
    min_seconds: float = 2.0,
    max_seconds: float = 20.0,
    split: int = 1,
) -> ShapePlan:
    """The shape plan the trainer uses for shards of ``shard_lengths`` (``index.json``'s
    per-shard utterance lengths) and a model with this conv stack.

    ``batch_size`` and ``max_tokens`` are per device batch, as the trainer's flags.
    ``split`` > 1 (an IPU's replicas x accumulation) makes each batch one optimizer update
    of ``split`` micro-batches: the budget grows ``split``-fold and every batch size is a
    multiple of ``split``.
    """
    lengths = [n for shard in shard_lengths for n in shard]
    return make_plan(
        lengths,
        policy,
        num_buckets,
        max_tokens=max_tokens * split if max_tokens else None,
        batch_size=batch_size * split,
        batch_multiple=split,
        min_samples=int(min_seconds * sample_rate),
        max_samples=int(max_seconds * sample_rate),
        sample_rate=sample_rate,
        conv_kernel=conv_kernel,
        conv_stride=conv_stride,
    )


def frames_to_min_samples(
    frames: int,
    conv_kernel: Sequence[int] = DEFAULT_CONV_KERNEL,
    conv_stride: Sequence[int] = DEFAULT_CONV_STRIDE,
) -> int:
    """Fewest samples that give ``frames`` encoder frames."""
    length = frames
    for kernel, stride in reversed(list(zip(conv_kernel, conv_stride))):
        length = (length - 1) * stride + kernel
    return length


def padded_efficiency(plan: ShapePlan, lengths: Sequence[int]) -> dict:
    """Real audio samples / samples in the padded batches of one pass over ``lengths``.

    Counts partial-batch filler rows (the last batch of each bucket is filled to full size)
    and, for pack, the gaps between utterances (each starts at a multiple of ``plan.align``)
    and at row ends (rows packed first-fit decreasing). Also gives, per
    bucket, the share of utterances, batches and efficiency, and the audio kept (crop leaves
    some out; pad and pack crop only what exceeds the maximum).
    """
    arr = np.asarray(lengths, dtype=np.int64)
    kept = arr[arr >= plan.min_samples]
    capped = np.minimum(kept, plan.max_samples)
    buckets = np.array([plan.bucket_for(int(n)) for n in capped], dtype=object)
    valid = np.array([b is not None for b in buckets], dtype=bool)
    used = capped[valid]
    if plan.policy == "pack":
        counts = [len(pack_rows(used.tolist(), plan.lengths[0], plan.align))]
        audio = [int(used.sum())]
    else:
        index = buckets[valid].astype(np.int64)
        counts = np.bincount(index, minlength=plan.num_buckets).tolist()
        if plan.policy == "crop":
            used = np.asarray(plan.lengths)[index]
        audio = np.bincount(index, weights=used, minlength=plan.num_buckets).tolist()
    batches = [math.ceil(c / b) for c, b in zip(counts, plan.batch_sizes)]
    padded = [n * b * length for n, b, length in zip(batches, plan.batch_sizes, plan.lengths)]
    utterances = max(int(valid.sum()), 1)
    return {
        "efficiency": sum(audio) / sum(padded) if sum(padded) else 0.0,
        "audio_kept": sum(audio) / max(int(capped.sum()), 1),
        "dropped": int(arr.size - valid.sum()),
        "batches": batches,
        "bucket_efficiency": [a / p if p else 0.0 for a, p in zip(audio, padded)],
        "share": ([1.0] if plan.policy == "pack" else [c / utterances for c in counts]),
    }


def pack_rows(lengths: Sequence[int], row_length: int, align: int = 1) -> list[list[int]]:
    """First-fit-decreasing packing of utterance indices into rows of ``row_length`` samples,
    each row's indices in the order they sit in it: each utterance starts at the first
    multiple of ``align`` after the previous one ends, and ends within the row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    ends: list[int] = []  # per row, where its last utterance ends
    for i in order:
        need = min(lengths[i], row_length)
        for r, end in enumerate(ends):
            start = -(-end // align) * align
            if start + need <= row_length:
                rows[r].append(i)
                ends[r] = start + need
                break
        else:
            rows.append([i])
            ends.append(need)
    return rows
