"""Cutting a long recording into pieces at its quietest moments.

A recording longer than the longest piece allowed is cut front to back: each cut goes at the
quietest moment (least short-time energy) in the last third of the window that starts at the
previous cut, so a cut falls in a pause wherever the window holds one, and no piece is longer
than allowed. A cut is only put where the rest of the recording can still be cut into pieces
of allowed lengths, so no piece is shorter than the shortest allowed when any cutting allows
it; when none does, the last piece is dropped, and reported. The pieces, kept and dropped,
laid end to end are the recording.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

HOP = 160  # samples between candidate cuts: 10 ms at 16 kHz
WINDOW_HOPS = 10  # a candidate's energy is that of the 100 ms centred on it
SEARCH_FRACTION = 3  # cuts are looked for in the last 1/3 of each window


class Rule(NamedTuple):
    """How long pieces may be, in samples."""

    max_samples: int
    min_samples: int = 0


class Span(NamedTuple):
    """Samples ``start`` up to (not including) ``stop`` of a recording."""

    start: int
    stop: int


class Pieces(NamedTuple):
    kept: list[Span]
    dropped: list[Span]  # shorter than the rule's minimum


def cut(samples: np.ndarray, rule: Rule) -> Pieces:
    """Where to cut ``samples`` (1-D) so that every piece is at most ``rule.max_samples``."""
    total = samples.shape[0]
    energy = _cumulative_energy(samples)
    spans: list[Span] = []
    start = 0
    while total - start > rule.max_samples:
        stop = _next_cut(energy, start, total, rule)
        spans.append(Span(start, stop))
        start = stop
    spans.append(Span(start, total))
    kept = [s for s in spans if s.stop - s.start >= rule.min_samples]
    return Pieces(kept, [s for s in spans if s.stop - s.start < rule.min_samples])


def _next_cut(cumulative: np.ndarray, start: int, total: int, rule: Rule) -> int:
    """The cut that ends the piece from ``start``: the quietest hop boundary in the last
    third of the window whose rest can still be cut into pieces of allowed lengths; else
    the quietest such boundary anywhere the piece may end; else (the rest cannot be cut
    well: its last piece will be dropped) the quietest in the last third."""
    longest, shortest = rule.max_samples, rule.min_samples
    high = start + longest
    last_third = max(high - longest // SEARCH_FRACTION, start + shortest)
    for low, fits in ((last_third, True), (start + shortest, True), (last_third, False)):
        candidates = np.arange(-(-low // HOP), high // HOP + 1)
        if fits and shortest:
            rest = total - candidates * HOP
            candidates = candidates[-(-rest // longest) <= rest // shortest]
        if candidates.size:
            return _quietest(cumulative, candidates)
    return high  # a window too short to hold a hop boundary


def _cumulative_energy(samples: np.ndarray) -> np.ndarray:
    """Cumulative sum of each hop's energy, with a leading 0: (hops + 1,) float64."""
    hops = samples.shape[0] // HOP
    power = np.square(samples[: hops * HOP].astype(np.float64)).reshape(hops, HOP).sum(axis=1)
    return np.concatenate([[0.0], np.cumsum(power)])


def _quietest(cumulative: np.ndarray, candidates: np.ndarray) -> int:
    """The sample of the candidate hop boundary whose surrounding window has least energy:
    the middle of the last run of equally quiet ones, so a silence is cut in its middle."""
    hops = cumulative.shape[0] - 1
    half = WINDOW_HOPS // 2
    after, before = np.minimum(candidates + half, hops), np.maximum(candidates - half, 0)
    # Mean energy per hop: a window clipped by the recording's end is not favoured.
    energy = (cumulative[after] - cumulative[before]) / np.maximum(after - before, 1)
    quiet = energy == energy.min()
    end = int(np.flatnonzero(quiet)[-1])
    begin = end
    while begin > 0 and quiet[begin - 1]:
        begin -= 1
    return int(candidates[(begin + end) // 2]) * HOP
