"""What a run logs: strict-JSON records, TensorBoard events, the collapse warning."""

from __future__ import annotations

import json
import math

from w2v_stream.metrics import MetricsLogger, collapse_warning, format_line

RECORD = {"step": 10, "loss": 4.2, "contrastive_loss": 4.1, "diversity_loss": 0.1,
          "percent_masked": 49.0, "prob_perplexity": 120.0, "code_perplexity": 110.0,
          "lr": 1e-3, "temperature": 1.99, "grad_norm": 0.5, "padding_efficiency": 0.9,
          "audio_seconds_per_second": 40.0}


def test_records_are_strict_json_and_tensorboard_gets_events(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger.log(RECORD)
    logger.log({**RECORD, "step": 11, "grad_norm": float("nan"), "loss": float("inf")})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: 1 / 0) for line in lines]
    assert records[0] == RECORD
    assert records[1]["grad_norm"] is None and records[1]["loss"] is None
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "step      10 | loss 4.2000" in format_line(RECORD)
    assert "grad nan" in format_line({**RECORD, "grad_norm": math.nan})


def test_collapse_warning_names_each_sign_and_stays_quiet_otherwise():
    assert collapse_warning(RECORD, num_groups=2) is None
    collapsed = {**RECORD, "prob_perplexity": 2.5, "contrastive_loss": 0.001,
                 "grad_norm": 1e-6}
    warning = collapse_warning(collapsed, num_groups=2)
    assert "perplexity" in warning and "contrastive" in warning and "gradient" in warning
    assert collapse_warning({**RECORD, "grad_norm": math.nan}, num_groups=2) is None


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    logger.log(RECORD)
    logger.close()
    assert not (tmp_path / "rank1").exists()
