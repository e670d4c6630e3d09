#!/usr/bin/env python
"""Benchmark: padding efficiency of batching strategies on real LibriSpeech lengths.

    python tools/bench_buckets.py tests/data/librispeech-dev-clean.num_samples.tsv

One run, 2-20 s limits, a budget of 8 rows of 20 s per batch. Efficiency = real audio samples
/ samples in the padded batches. "no filler" ignores the dummy rows that fill the last batch
of each bucket; "with filler" counts them (one pass, one stream). The last column shows what
the loader's lock step costs on top when the data is split over 8 streams (epochs.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np

from w2v_stream import buckets, epochs

RATE = 16_000
LO, HI, ROWS = 2 * RATE, 20 * RATE, 8


def no_filler(plan: buckets.ShapePlan, lengths: np.ndarray) -> float:
    """Padding alone: every utterance padded to its bucket top (or packed), no filler rows."""
    if plan.policy == "pack":
        rows = len(buckets.pack_rows(lengths.tolist(), plan.lengths[0], plan.align))
        return lengths.sum() / (rows * plan.lengths[0])
    tops = np.array(plan.lengths)[[plan.bucket_for(int(n)) for n in lengths]]
    audio = tops if plan.policy == "crop" else lengths
    return audio.sum() / tops.sum()


def streams_efficiency(plan: buckets.ShapePlan, lengths: np.ndarray, streams: int) -> float:
    shard_lengths = [lengths[i : i + 100].tolist() for i in range(0, len(lengths), 100)]
    passes = -(-16 * streams // len(shard_lengths))  # the loader's default (StreamConfig)
    ep = epochs.plan_epoch(shard_lengths, plan, streams, 0, 0, 600 * RATE, passes=passes)
    real = padded = 0
    for stream in ep.streams:
        for b in stream:
            top = plan.lengths[b.bucket]
            padded += plan.batch_sizes[b.bucket] * top
            for row in b.rows:
                if plan.policy == "crop":
                    real += top if row else 0
                else:
                    real += min(sum(i.length for i in row), top)
    return real / padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lengths_tsv")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    lines = Path(args.lengths_tsv).read_text().splitlines()
    raw = np.array([int(line.split()[-1]) for line in lines if line.strip()])
    lengths = np.minimum(raw[raw >= LO], HI)
    rng = np.random.default_rng(args.seed)
    print(
        f"{len(raw)} utterances, {len(raw) - len(lengths)} under 2 s dropped, "
        f"{(raw > HI).sum()} over 20 s cropped to 20 s"
    )
    print("| strategy | shapes | efficiency, no filler | with filler | 8 streams |")
    print("|---|---|---|---|---|")
    n_batches = math.ceil(len(lengths) / ROWS)
    fixed = lengths.sum() / (n_batches * ROWS * HI)
    print(
        f"| one fixed 20 s shape (optimum-graphcore) | 1 | "
        f"{lengths.sum() / (len(lengths) * HI):.3f} | {fixed:.3f} | |"
    )
    order = rng.permutation(lengths)
    longest = sum(
        order[i : i + ROWS].max() * len(order[i : i + ROWS]) for i in range(0, len(order), ROWS)
    )
    distinct = len({int(order[i : i + ROWS].max()) for i in range(0, len(order), ROWS)})
    print(
        f"| random batches of {ROWS} padded to the longest (HF script) | {distinct} | "
        f"{lengths.sum() / longest:.3f} | {lengths.sum() / longest:.3f} | |"
    )
    for k in (8,):
        edges = np.quantile(lengths, np.arange(1, k + 1) / k)
        tops = np.ceil(edges / 320).astype(int) * 320
        tops[-1] = HI
        plan = buckets.ShapePlan(
            "pad",
            tuple(int(t) for t in tops),
            tuple(buckets.frames_for_samples(int(t)) for t in tops),
            tuple(max(1, ROWS * HI // int(t)) for t in tops),
            LO,
            HI,
        )
        stats = buckets.padded_efficiency(plan, lengths)
        print(
            f"| equal-count quantile buckets, pad | {k} | {no_filler(plan, lengths):.3f} | "
            f"{stats['efficiency']:.3f} | {streams_efficiency(plan, lengths, 8):.3f} |"
        )
    for policy, k in [("pad", 4), ("pad", 8), ("pad", 16), ("crop", 8), ("pack", 1)]:
        plan = buckets.plan_for_shards(
            [lengths],
            RATE,
            buckets.DEFAULT_CONV_KERNEL,
            buckets.DEFAULT_CONV_STRIDE,
            policy=policy,
            num_buckets=k,
            batch_size=ROWS,
            min_seconds=LO / RATE,
            max_seconds=HI / RATE,
        )
        # pack's utterances start at multiples of the total stride; "align 1" shows what
        # those gaps cost.
        variants = [("", plan)] + (
            [(", align 1", dataclasses.replace(plan, align=1))] if policy == "pack" else []
        )
        for label, variant in variants:
            stats = buckets.padded_efficiency(variant, lengths)
            kept = f" (audio kept {stats['audio_kept']:.3f})" if policy == "crop" else ""
            print(
                f"| w2v_stream `{policy}`{label}{kept} | {variant.num_buckets} | "
                f"{no_filler(variant, lengths):.4f} | {stats['efficiency']:.4f} | "
                f"{streams_efficiency(variant, lengths, 8):.4f} |"
            )


if __name__ == "__main__":
    main()
