"""Learning-rate and gumbel-temperature schedules as pure functions of the update counter."""

from __future__ import annotations

import pytest

from w2v_stream.schedule import gumbel_temperature, lr_factor


def test_warmup_then_linear_decay_to_zero():
    assert [lr_factor(u, 4, 12) for u in (0, 3)] == [0.25, 1.0]
    assert lr_factor(8, 4, 12) == pytest.approx(0.5) and lr_factor(12, 4, 12) == 0.0


def test_polynomial_decays_with_power_one_by_default_as_fairseq_and_transformers():
    assert lr_factor(8, 4, 12, "polynomial") == pytest.approx(lr_factor(8, 4, 12, "linear"))
    assert lr_factor(8, 4, 12, "polynomial", power=2.0) == pytest.approx(0.25)
    assert lr_factor(100, 4, 12, "constant_with_warmup") == 1.0
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(0, 0, 1, "cosine")


def test_gumbel_temperature_decays_to_its_floor():
    assert gumbel_temperature(0, 2.0, 0.5, 0.999995) == 2.0
    assert gumbel_temperature(10**7, 2.0, 0.5, 0.999995) == 0.5
