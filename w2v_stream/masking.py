"""Mask spans and negative indices for Wav2Vec2 pre-training, in fixed shapes, on the host.

The algorithms are transformers' ``_compute_mask_indices`` and ``_sample_negative_indices``
(transformers 5.23.0) made deterministic: they draw from a ``numpy.random.Generator`` the
caller seeds per batch instead of numpy's global state, in the same order. The loader's is
PCG64, whose bounded integers (Lemire's method) keep the negatives of every masked frame
cheap; given numpy's legacy ``RandomState`` behind the same method names, the functions give
transformers' very arrays for the same seed (tests/test_masking.py checks this).
Two deliberate differences, both about padding: a row with no valid frames gets no mask at
all (transformers masks its last, padded, frame as a placeholder), and a row with a single
masked frame is unmasked (transformers fails: there is no other frame to draw a negative
from). Masks never touch padding; a negative is never the positive.

Segments: a row may hold several utterances (the ``pack`` policy). Each segment is masked on
its own and draws negatives only from its own masked frames.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

Segment = Tuple[int, int]  # [start, end) frames of one utterance within a row


def compute_mask(
    segments: Sequence[Sequence[Segment]],
    num_frames: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(B, T) bool: spans of ``mask_length`` covering about ``mask_prob`` of each segment.

    Written into ``out`` when given (any contents: it is cleared first)."""
    if mask_length < 1:
        raise ValueError("mask_length must be >= 1")
    if mask_length > num_frames:
        raise ValueError(f"mask_length {mask_length} > {num_frames} frames")
    mask = np.empty((len(segments), num_frames), dtype=bool) if out is None else out
    mask.fill(False)
    epsilon = rng.random(1).item()  # one probabilistic rounding for the whole batch

    def spans_for(length: int) -> int:
        count = max(int(mask_prob * length / mask_length + epsilon), min_masks)
        if count * mask_length > num_frames:
            count = num_frames // mask_length
        if length - (mask_length - 1) < count:
            count = max(length - (mask_length - 1), 0)
        return count

    if spans_for(num_frames) == 0:
        return mask
    for row, row_segments in enumerate(segments):
        for start, end in row_segments:
            length = end - start
            count = spans_for(length)
            starts = rng.choice(np.arange(length - (mask_length - 1)), count, replace=False)
            if count == 0:
                continue
            idx = (starts[:, None] + np.arange(mask_length)[None, :]).reshape(-1)
            mask[row, start + np.minimum(idx, length - 1)] = True
    return mask


def sample_negatives(
    mask: np.ndarray,
    segments: Sequence[Sequence[Segment]],
    num_negatives: int,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(B, T, K) int32 indices into the flattened (B*T) features, batch offset included.

    int32 halves what crosses from loader workers; widen to int64 on the device for indexing.
    Written into ``out`` when given (every element is written).

    For each masked frame, ``num_negatives`` other masked frames of the same segment, drawn
    uniformly with replacement, never the frame itself. Unmasked frames point at their row's
    first frame (they are not used). Segments with a single masked frame are unmasked in
    ``mask`` (in place).
    """
    batch, frames = mask.shape
    if out is None:
        out = np.empty((batch, frames, num_negatives), np.int32)
    for row, row_segments in enumerate(segments):
        offset = row * frames
        out[row].fill(offset)  # unmasked frames point at the row's first frame
        for start, end in row_segments:
            masked = np.flatnonzero(mask[row, start:end]) + start
            if masked.size == 1:
                mask[row, masked] = False
                continue
            if masked.size == 0:
                continue
            high = masked.size - 1
            # int64 draws, as transformers' (numpy's bounded int32 path is the slower one).
            drawn = rng.integers(0, high, size=(high + 1, num_negatives))
            # Skip the positive (row i of drawn belongs to masked frame i), keep it uniform.
            np.add(drawn, drawn >= np.arange(high + 1)[:, None], out=drawn)
            table = (masked + offset).astype(np.int32)
            out[row, masked] = np.take(table, drawn)
    return out
