"""The streaming pipeline: shards in, fixed-shape pre-training batches out.

Stages, each a small function: ``read_stream`` (a stream's virtual shards → held samples,
skipping what the plan does not need without decoding it), ``check_utterance`` (metadata
against the index), ``assemble`` (rows of FLAC bytes → a padded batch: each utterance decoded
straight into its place and normalised there, its segment id per sample, then masks and
negatives), and
``stream_batches``, the batch stream of one loader worker. The torch side (the
IterableDataset and the DataLoader with its resume position) is ``loader.py``.

Bad data (a truncated or missing shard, corrupt FLAC, missing or wrong metadata) becomes a
dummy row in its batch, never a new shape. Each batch counts its bad utterances by reason and
names them (``BadRecord``: shard, sample, what was wrong); the loader raises
``ErrorBudgetExceeded`` when the share of bad utterances passes ``max_bad_fraction``.
"""

from __future__ import annotations

import math
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from .audio import AudioError, AudioFormatError, read_into
from .buckets import ShapePlan, frames_to_min_samples
from .epochs import Batch, EpochPlan, batch_source, plan_epoch
from .masking import compute_mask, sample_negatives
from .shards import (
    BadSample as BadUtterance,  # a sample the loader cannot use, by reason
    ShardFormatError,
    check_sample as check_utterance,  # the per-sample check --verify runs too
    iter_samples,
)
from .sources import ShardList, SourceError, open_url

NORM_EPS = 1e-7  # as transformers' Wav2Vec2FeatureExtractor zero_mean_unit_var_norm


class ErrorBudgetExceeded(RuntimeError):
    """More bad utterances than the configured budget allows."""


@dataclass(frozen=True)
class StreamConfig:
    """Everything a loader worker needs; plain values so it pickles into workers."""

    shards: ShardList
    plan: ShapePlan
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    shuffle_seconds: float = 600.0  # audio held by each stream's shuffle buffer
    round_items: int = 256
    bucket_runs: bool = False  # keep a round's batches of one bucket together (IPU)
    passes_per_epoch: int = 0  # 0: enough that each stream reads >= 16 virtual shards
    mask_time_prob: float = 0.65
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    num_negatives: int = 100
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    allow_pipe: bool = False
    s3_endpoint_url: str | None = None

    def __post_init__(self):
        stride = math.prod(self.conv_stride)
        if self.plan.policy == "pack" and self.plan.align % stride:
            raise ValueError(
                f"the pack plan starts utterances at multiples of "
                f"{self.plan.align} samples but the feature encoder's stride is "
                f"{stride}: make the plan with buckets.plan_for_shards for this "
                f"conv stack"
            )

    def epoch_plan(self, epoch: int, num_workers: int) -> EpochPlan:
        streams = self.world_size * max(num_workers, 1)
        return plan_epoch(
            self.shards.lengths,
            self.plan,
            streams,
            epoch,
            self.seed,
            int(self.shuffle_seconds * self.plan.sample_rate),
            self.round_items,
            self.passes(streams),
            self.bucket_runs,
        )

    def passes(self, streams: int) -> int:
        if self.passes_per_epoch:
            return self.passes_per_epoch
        shards = len(self.shards.urls)
        virtual = shards * -(-streams // shards)
        return -(-16 * streams // virtual)


def decode_piece(
    flac: bytes, out: np.ndarray, start: int, num_samples: int, sample_rate: int
) -> None:
    """Decode ``len(out)`` samples from ``start`` into ``out`` and normalise them in place."""
    try:
        read_into(flac, out, start, sample_rate, num_samples)
    except AudioFormatError as exc:
        raise BadUtterance("wrong_format", str(exc)) from None
    except AudioError as exc:
        raise BadUtterance("corrupt_audio", str(exc)) from None
    normalise(out, out=out)


def normalise(audio: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Zero mean, unit variance over the samples given (only valid ones: padding comes later).

    Written into ``out`` when given (``out=audio`` works in place). float32 pairwise sums as
    numpy's mean/var, which transformers' feature extractor uses. No np.dot: it would call a
    multi-threaded BLAS inside every loader worker and oversubscribe the cores.
    """
    count = audio.shape[0]
    if count == 0:
        return audio if out is None else out
    mean = np.add.reduce(audio, dtype=np.float32) / np.float32(count)
    out = np.subtract(audio, mean, out=out)
    variance = float(np.einsum("i,i->", out, out)) / count
    np.multiply(out, np.float32(1.0 / np.sqrt(variance + NORM_EPS)), out=out)
    return out


class BadRecord(NamedTuple):
    """One bad utterance: where it came from and what was wrong."""

    shard: str  # the shard's URL or path
    key: str  # the sample's key, or "#POS" when it could not be read
    problem: str  # "reason: detail"


class ReadSample(NamedTuple):
    """A needed sample as read from its shard: its members, or why they cannot be had."""

    read: int  # index in the stream's reads this epoch
    pos: int  # position in the shard
    key: str
    parts: dict[str, bytes] | BadUtterance


@dataclass(frozen=True)
class Piece:
    """One utterance for a row of ``assemble``."""

    flac: bytes
    num_samples: int
    shard: str
    key: str


def read_stream(config: StreamConfig, reads, needed: set[tuple[int, int]]) -> Iterator[ReadSample]:
    """Yield each needed sample of these virtual shards once (``needed`` holds ``(read,
    pos)``; ``read`` indexes ``reads``: a shard may be read once per pass).

    Samples the plan does not need are stepped over without decoding; a shard holding no
    needed sample is not opened. A sample that cannot be had (shard unreachable, truncated,
    shorter than its index says) comes with a BadUtterance instead of its parts.
    """
    by_read: dict[int, set[int]] = {}
    for read, pos in needed:
        by_read.setdefault(read, set()).add(pos)
    for read, (shard, _pass, _parity) in enumerate(reads):
        want = by_read.get(read, set())
        if not want:
            continue
        url = config.shards.urls[shard]
        got: set[int] = set()
        error = None
        try:
            with open_url(url, config.allow_pipe, config.s3_endpoint_url) as f:
                for pos, (key, parts) in enumerate(iter_samples(f, url)):
                    if pos in want:
                        got.add(pos)
                        yield ReadSample(read, pos, key, parts)
                        if len(got) == len(want):
                            break
        except SourceError as exc:
            error = BadUtterance("unreadable_shard", str(exc))
        except (ShardFormatError, tarfile.TarError, OSError, EOFError) as exc:
            error = BadUtterance("broken_shard", str(exc))
        for pos in sorted(want - got):
            yield ReadSample(
                read,
                pos,
                f"#{pos}",
                error or BadUtterance("missing_sample", f"the shard has no sample #{pos}"),
            )


def assemble(
    config: StreamConfig,
    batch: Batch,
    rows: list[list[Piece]],
    rng: np.random.Generator,
    alloc=None,
) -> dict:
    """Rows of utterances → the fixed-shape arrays of one batch.

    ``rows[i]`` holds the utterances of row i (empty for a dummy row). Each is cropped as the
    policy says, decoded straight into the row at the first multiple of the encoder's total
    stride after the previous one and normalised over its own samples; the rest is exact
    zeros. ``segment_ids`` numbers each row's utterances 1..n per sample (0: padding and
    gaps); ``attention_mask`` is where it is not 0. Audio that fails to decode leaves zeros, a
    count in ``skipped`` and a ``BadRecord`` in ``bad``. Masks and negatives stay inside each
    utterance's frames.
    ``alloc(name, shape, dtype)`` makes the arrays, uninitialised like ``np.empty``: every
    element is written here (the loader builds them in reused shared memory, so nothing is
    copied or freshly mapped on the way to the trainer).
    """
    plan = config.plan
    k = batch.bucket
    frames = plan.frames[k]
    stride = int(np.prod(config.conv_stride))
    field = frames_to_min_samples(1, config.conv_kernel, config.conv_stride)
    alloc = alloc or _fresh
    arrays = {
        name: alloc(name, shape, dtype) for name, (shape, dtype) in batch_arrays(config, k).items()
    }
    values, attention = arrays["input_values"], arrays["attention_mask"]
    segment_ids = arrays["segment_ids"]
    segment_ids.fill(0)
    size, length = values.shape
    segments: list[list[tuple[int, int]]] = []
    skipped: Counter = Counter()
    bad_records: list[BadRecord] = []
    audio_samples = utterances = 0
    for i, pieces in enumerate(rows):
        offset = 0  # where the row's audio ends so far
        row_segments = []  # (first, last) frames of each utterance with frames
        count = 0  # utterances in the row so far
        for piece in pieces:
            # Each utterance starts at a multiple of the total stride, so its frames are the
            # frames it has alone; the samples in between are gap (exact zeros, id 0).
            begin = -(-offset // stride) * stride
            num_samples = piece.num_samples
            target = length if plan.policy == "crop" else length - begin
            take = min(num_samples, target)
            start = int(rng.integers(0, num_samples - take + 1)) if num_samples > take else 0
            end = begin + take
            try:
                decode_piece(piece.flac, values[i, begin:end], start, num_samples, plan.sample_rate)
            except BadUtterance as bad:  # the next piece (or the zeros below) goes here
                skipped[bad.reason] += 1
                bad_records.append(BadRecord(piece.shard, piece.key, str(bad)))
                continue
            values[i, offset:begin] = 0.0
            count += 1
            segment_ids[i, begin:end] = count
            last = (end - field) // stride + 1 if end >= field else 0
            if last > begin // stride:
                row_segments.append((begin // stride, min(last, frames)))
            offset = end
            audio_samples += take
            utterances += 1
        values[i, offset:] = 0.0  # exact zeros after the row's audio
        np.greater(segment_ids[i], 0, out=attention[i])
        segments.append(row_segments)
    mask = compute_mask(
        segments,
        frames,
        config.mask_time_prob,
        config.mask_time_length,
        config.mask_time_min_masks,
        rng,
        out=arrays["mask_time_indices"],
    )
    sample_negatives(
        mask, segments, config.num_negatives, rng, out=arrays["sampled_negative_indices"]
    )
    frame_mask = arrays["frame_mask"]
    frame_mask.fill(False)
    for i, row_segments in enumerate(segments):
        for first, last in row_segments:
            frame_mask[i, first:last] = True
    return {
        **arrays,
        "bucket": k,
        "num_utterances": utterances,
        "audio_samples": audio_samples,
        "padded_samples": size * length,
        "skipped": dict(skipped),
        "bad": bad_records,
    }


def batch_arrays(config: StreamConfig, bucket: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Name → (shape, dtype) of each array of a batch of ``bucket``: the batch layout."""
    plan = config.plan
    rows, length, frames = plan.batch_sizes[bucket], plan.lengths[bucket], plan.frames[bucket]
    return {
        "input_values": ((rows, length), np.float32),
        # 1 byte a sample; transformers only sums it
        "attention_mask": ((rows, length), np.bool_),
        "mask_time_indices": ((rows, frames), np.bool_),
        # int32 halves what crosses from the workers; the device widens it for indexing
        "sampled_negative_indices": ((rows, frames, config.num_negatives), np.int32),
        "frame_mask": ((rows, frames), np.bool_),
        # per sample: the row's n-th utterance is n, padding and gaps 0 (see model.encode)
        "segment_ids": ((rows, length), np.int32),
    }


def _fresh(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def batch_seed(seed: int, epoch: int, stream: int, index: int) -> np.ndarray:
    return np.random.SeedSequence([seed, epoch, stream, index]).generate_state(4)


def stream_batches(
    config: StreamConfig,
    num_workers: int,
    worker: int,
    start_epoch: int,
    start_position: int,
    alloc=None,
    end_epoch: int | None = None,
) -> Iterator[dict]:
    """The batch stream of one loader worker: endless, or until ``end_epoch`` begins.

    The DataLoader takes a rank's workers in turn, so worker w's first batch is the one at
    rank-level position ``start_position + w`` of ``start_epoch``; ``batch_source`` says
    which stream of the plan it comes from, and the worker keeps to that stream.
    """
    source = batch_source(config.rank, num_workers, start_position + worker)
    stream, index = source.stream, source.index
    epoch = start_epoch
    while end_epoch is None or epoch < end_epoch:
        eplan = config.epoch_plan(epoch, num_workers)
        batches = eplan.streams[stream]
        if not batches:
            raise ValueError("the plan has no batch for this epoch: no usable utterance")
        if index >= len(batches):
            index -= len(batches)
            epoch += 1
            continue
        yield from _epoch_batches(config, eplan, stream, epoch, index, alloc)
        epoch += 1
        index = 0


def _epoch_batches(
    config: StreamConfig, eplan: EpochPlan, stream: int, epoch: int, first: int, alloc
) -> Iterator[dict]:
    batches = eplan.streams[stream][first:]
    needed = {(it.read, it.pos) for b in batches for row in b.rows for it in row}
    reader = read_stream(config, eplan.reads[stream], needed)
    held: dict[tuple[int, int], ReadSample] = {}
    for index, batch in enumerate(batches, start=first):
        skipped: Counter = Counter()
        bad_records: list[BadRecord] = []
        rows: list[list[Piece]] = []
        for row in batch.rows:
            pieces = []
            for item in row:
                key = (item.read, item.pos)
                while key not in held:
                    sample = next(reader)
                    held[sample.read, sample.pos] = sample
                sample = held.pop(key)
                url = config.shards.urls[item.shard]
                try:
                    if isinstance(sample.parts, BadUtterance):
                        raise sample.parts
                    flac = check_utterance(sample.parts, item.length)
                    pieces.append(Piece(flac, item.length, url, sample.key))
                except BadUtterance as bad:
                    skipped[bad.reason] += 1
                    bad_records.append(BadRecord(url, sample.key, str(bad)))
            rows.append(pieces)
        rng = np.random.Generator(np.random.PCG64(batch_seed(config.seed, epoch, stream, index)))
        out = assemble(config, batch, rows, rng, alloc)
        skipped.update(out["skipped"])
        out.update(epoch=epoch, skipped=dict(skipped), bad=bad_records + out["bad"])
        yield out
