"""The order of a rank's batches across its loader workers (``epochs.batch_source``), which
the loader and every worker's stream both follow."""

from __future__ import annotations

import itertools

import pytest

from w2v_stream import epochs


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_each_position_has_its_own_batch_of_the_ranks_streams(num_workers):
    workers, per_stream = max(num_workers, 1), 5
    for rank in (0, 2):
        sources = [epochs.batch_source(rank, num_workers, p) for p in range(per_stream * workers)]
        assert sorted((s.stream, s.index) for s in sources) == sorted(
            itertools.product(range(rank * workers, (rank + 1) * workers), range(per_stream))
        )
        for p, s in enumerate(sources):  # workers take turns; each keeps to its stream
            assert s.stream == rank * workers + p % workers and s.index == p // workers


def test_a_worker_started_anywhere_continues_its_stream():
    # A loader resumed at position 7 with 3 workers: worker w's first batch is position 7 + w,
    # and its later ones come every 3 positions, one step along the same stream.
    for w in range(3):
        first = epochs.batch_source(1, 3, 7 + w)
        later = [epochs.batch_source(1, 3, 7 + w + 3 * k) for k in range(1, 4)]
        assert all(s.stream == first.stream for s in later)
        assert [s.index for s in later] == [first.index + k for k in range(1, 4)]
