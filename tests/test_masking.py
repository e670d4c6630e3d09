"""Mask spans and negatives: transformers' semantics, deterministic, never on padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    _compute_mask_indices,
    _sample_negative_indices,
)

from w2v_stream.masking import compute_mask, sample_negatives

T = 200


class Legacy:
    """numpy's legacy generator (transformers draws from its global one) behind the
    Generator method names the masking functions call."""

    def __init__(self, seed: int):
        self.rs = np.random.RandomState(seed)

    def random(self, size):
        return self.rs.rand(size)

    def choice(self, a, size, replace):
        return self.rs.choice(a, size, replace=replace)

    def integers(self, low, high, size):
        return self.rs.randint(low, high, size=size)


@pytest.mark.parametrize("seed", range(8))
def test_same_arrays_as_transformers_for_the_same_seed(seed):
    lengths = [200, 150, 37, 90]
    attention = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
    np.random.seed(seed)
    theirs = _compute_mask_indices((len(lengths), T), 0.65, 10, attention, 2)
    ours = compute_mask([[(0, n)] for n in lengths], T, 0.65, 10, 2, Legacy(seed))
    assert (theirs == ours).all()
    np.random.seed(seed + 1)
    theirs_neg = _sample_negative_indices((len(lengths), T), 100, theirs)
    ours_neg = sample_negatives(ours.copy(), [[(0, n)] for n in lengths], 100, Legacy(seed + 1))
    assert (theirs_neg == ours_neg).all()


def test_segments_dummy_rows_and_single_frames():
    segments = [[(0, 60), (62, 150)], [], [(0, 12)], [(5, 40)]]
    rs = np.random.default_rng(3)
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
    a = compute_mask(segs, T, 0.65, 10, 2, np.random.default_rng(11))
    b = compute_mask(segs, T, 0.65, 10, 2, np.random.default_rng(11))
    c = compute_mask(segs, T, 0.65, 10, 2, np.random.default_rng(12))
    assert (a == b).all() and (a != c).any()
    assert 0.3 < a.mean() < 0.7  # about mask_prob after overlaps


def test_negatives_are_uniform_over_the_other_masked_frames():
    mask = np.zeros((1, T), dtype=bool)
    mask[0, 10:60] = True
    neg = sample_negatives(mask, [[(0, T)]], 4900, np.random.default_rng(5))
    for t in (10, 35, 59):
        counts = np.bincount(neg[0, t], minlength=T)
        others = [f for f in range(10, 60) if f != t]
        assert counts[t] == 0 and counts.sum() == counts[others].sum() == 4900
        assert counts[others].min() > 60 and counts[others].max() < 140  # 100 expected each
