"""Per-update scalars as pure functions of the global optimizer-update counter.

Both are given to the step as inputs (the temperature as a tensor), never stored on the
model, so a compiled or IPU graph does not bake them in, and resuming restores them from the
update counter alone.
"""

from __future__ import annotations

SCHEDULES = ("linear", "polynomial", "constant_with_warmup")


def gumbel_temperature(
    update: int, max_temperature: float, min_temperature: float, decay: float
) -> float:
    """fairseq's ``max(max_t * decay ** update, min_t)``."""
    return max(max_temperature * decay**update, min_temperature)


def lr_factor(
    update: int, warmup: int, total: int, kind: str = "linear", power: float = 1.0
) -> float:
    """Multiplier of the peak learning rate at ``update``: linear warmup, then decay to 0
    (``polynomial``: ``left ** power``; power 1.0, fairseq's and transformers' default, is
    linear)."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule {kind!r}: choose one of {SCHEDULES}")
    if update < warmup:
        return (update + 1) / warmup
    if kind == "constant_with_warmup":
        return 1.0
    left = max(0.0, (total - update) / max(1, total - warmup))
    return left if kind == "linear" else left**power
