#!/usr/bin/env python
"""Benchmark: forward + backward time of PretrainingObjective on one fixed batch, eager.

    python tools/bench_invariance.py --preset demo --rows 4 --seconds 8
    python tools/bench_invariance.py --layout packed      # three utterances per row, segment ids

``padded``: one utterance per row, lengths spread from half the row to the whole row, the
attention mask only (no segment ids). ``packed``: each row holds three utterances of about a
third of the row, each starting at a multiple of the total stride, with (B, L) int32 segment
ids. Reported: the median of ``--repeats`` timed steps after one warm-up step, in seconds.
Runs against any checkout whose ``PretrainingObjective.forward`` takes these arguments
(``padded`` needs no ``segment_ids``), so the same command times two versions of the model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from w2v_stream.masking import compute_mask, sample_negatives
from w2v_stream.model import PretrainingObjective, build_model, resolve_config

RATE = 16_000
STRIDE = 320
FIELD = 400


def frames_of(samples: int) -> int:
    return max((samples - FIELD) // STRIDE + 1, 0)


def make_batch(config, rows: int, samples: int, layout: str, seed: int) -> dict:
    """Audio, attention mask, mask and negative indices (and segment ids when packed)."""
    rs = np.random.default_rng(seed)
    values = torch.zeros(rows, samples)
    ids = torch.zeros(rows, samples, dtype=torch.int32)
    segments = []
    pieces = 3 if layout == "packed" else 1
    for row in range(rows):
        offset, row_segments = 0, []
        for n in range(1, pieces + 1):
            room = samples - offset
            length = int(room * rs.uniform(0.5, 1.0)) if n == pieces else room // (pieces - n + 1)
            values[row, offset : offset + length] = torch.from_numpy(
                rs.standard_normal(length).astype(np.float32)
            )
            ids[row, offset : offset + length] = n
            row_segments.append((offset // STRIDE, offset // STRIDE + frames_of(length)))
            offset += -(-length // STRIDE) * STRIDE
        segments.append(row_segments)
    frames = frames_of(samples)
    mask = compute_mask(
        segments,
        frames,
        config.mask_time_prob,
        config.mask_time_length,
        config.mask_time_min_masks,
        rs,
    )
    negatives = sample_negatives(mask, segments, config.num_negatives, rs)
    batch = {
        "input_values": values,
        "attention_mask": ids > 0,
        "mask_time_indices": torch.from_numpy(mask),
        "sampled_negative_indices": torch.from_numpy(negatives).long(),
    }
    return {**batch, "segment_ids": ids} if layout == "packed" else batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--layout", choices=("padded", "packed"), default="padded")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = resolve_config(args.preset, None, {})
    torch.manual_seed(0)
    objective = PretrainingObjective(build_model(config)).train()
    batch = make_batch(config, args.rows, int(args.seconds * RATE), args.layout, seed=0)
    times = []
    for step in range(args.repeats + 1):
        start = time.perf_counter()
        out = objective(**batch, temperature=torch.tensor(2.0))
        out["loss"].backward()
        objective.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    print(
        f"{args.preset} {args.rows} x {args.seconds:g} s {args.layout}: forward + backward "
        f"{statistics.median(times):.3f} s (median of {args.repeats}, "
        f"{torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
