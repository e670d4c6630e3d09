"""Mask spans and negatives: transformers' semantics, deterministic, never on padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import (_compute_mask_indices,
                                                            _sample_negative_indices)

from w2v_stream.masking import compute_mask, sample_negatives

T = 200


@pytest.mark.parametrize("seed", range(8))
def test_same_arrays_as_transformers_for_the_same_seed(seed):
    lengths = [200, 150, 37, 90]
    attention = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
    np.random.seed(seed)
    theirs = _compute_mask_indices((len(lengths), T), 0.65, 10, attention, 2)
    ours = compute_mask([[(0, n)] for n in lengths], T, 0.65, 10, 2,
                        np.random.RandomState(seed))
    assert (theirs == ours).all()
    np.random.seed(seed + 1)
    theirs_neg = _sample_negative_indices((len(lengths), T), 100, theirs)
    ours_neg = sample_negatives(ours.copy(), [[(0, n)] for n in lengths], 100,
                                np.random.RandomState(seed + 1))
    assert (theirs_neg == ours_neg).all()


def test_segments_dummy_rows_and_single_frames():
    segments = [[(0, 60), (62, 150)], [], [(0, 12)], [(5, 40)]]
    rs = np.random.RandomState(3)
    mask = compute_mask(segments, T, 0.65, 10, 2, rs)
    neg = sample_negatives(mask, segments, 50, rs)
    valid = np.zeros_like(mask)
    for row, segs in enumerate(segments):
        for a, b in segs:
            valid[row, a:b] = True
    assert not (mask & ~valid).any(), "a mask touches padding or a segment gap"
    assert not mask[1].any(), "a dummy row must have no mask"
    for row, segs in enumerate(segments):
        for a, b in segs:
            masked = np.flatnonzero(mask[row, a:b]) + a
            for t in masked:
                targets = neg[row, t] - row * T
                assert (targets != t).all(), "a negative equals its positive"
                assert set(targets) <= set(masked), "a negative left its segment"
    single = np.zeros((1, T), dtype=bool)
    single[0, 7] = True
    sample_negatives(single, [[(0, 20)]], 10, rs)
    assert not single.any(), "one masked frame cannot have negatives: it is unmasked"


def test_deterministic_under_seed():
    segs = [[(0, 180)]] * 3
    a = compute_mask(segs, T, 0.65, 10, 2, np.random.RandomState(11))
    b = compute_mask(segs, T, 0.65, 10, 2, np.random.RandomState(11))
    c = compute_mask(segs, T, 0.65, 10, 2, np.random.RandomState(12))
    assert (a == b).all() and (a != c).any()
    assert 0.3 < a.mean() < 0.7  # about mask_prob after overlaps
