"""Cutting a long recording into pieces at its quietest moments.

A recording longer than the longest piece allowed is cut front to back: each cut goes at the
quietest moment (least short-time energy) in the last third of the window that starts at the
previous cut, so a cut falls in a pause wherever the window holds one, and no piece is longer
than allowed. Cuts keep every piece at least the shortest allowed when the recording leaves
room for it; a piece that is still too short is dropped, and its samples are reported. The
pieces, kept and dropped, laid end to end are the recording.
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
    longest, shortest = rule.max_samples, rule.min_samples
    energy = _cumulative_energy(samples)
    spans: list[Span] = []
    start = 0
    while total - start > longest:
        low = max(start + longest - longest // SEARCH_FRACTION, start + shortest)
        high = min(start + longest, total - shortest)  # leave the rest long enough
        if high < low:  # the rest cannot be long enough: it is dropped
            high = start + longest
        stop = _quietest(energy, low, high)
        spans.append(Span(start, stop))
        start = stop
    spans.append(Span(start, total))
    kept = [s for s in spans if s.stop - s.start >= shortest]
    return Pieces(kept, [s for s in spans if s.stop - s.start < shortest])


def _cumulative_energy(samples: np.ndarray) -> np.ndarray:
    """Cumulative sum of each hop's energy, with a leading 0: (hops + 1,) float64."""
    hops = samples.shape[0] // HOP
    power = np.square(samples[:hops * HOP].astype(np.float64)).reshape(hops, HOP).sum(axis=1)
    return np.concatenate([[0.0], np.cumsum(power)])


def _quietest(cumulative: np.ndarray, low: int, high: int) -> int:
    """The hop boundary in ``[low, high]`` whose surrounding window has least energy (the middle
    of the last run of equally quiet ones, so a silence is cut in its middle); ``high`` when
    no hop boundary lies in the range."""
    first, last = -(-low // HOP), high // HOP
    if first > last:
        return high
    hops = cumulative.shape[0] - 1
    candidates = np.arange(first, last + 1)
    half = WINDOW_HOPS // 2
    after, before = np.minimum(candidates + half, hops), np.maximum(candidates - half, 0)
    # Mean energy per hop: a window clipped by the recording's end is not favoured.
    energy = (cumulative[after] - cumulative[before]) / np.maximum(after - before, 1)
    best = energy.min()
    quiet = energy == best
    end = int(np.flatnonzero(quiet)[-1])
    begin = end
    while begin > 0 and quiet[begin - 1]:
        begin -= 1
    return int(candidates[(begin + end) // 2]) * HOP
