"""What a run logs: strict-JSON records, TensorBoard events, the collapse warning."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from w2v_stream.metrics import MetricsLogger, collapse_warning, format_line

from conftest import read_records

REPO = Path(__file__).resolve().parents[1]

RECORD = {
    "step": 10,
    "loss": 4.2,
    "contrastive_loss": 4.1,
    "diversity_loss": 0.1,
    "accuracy": 0.25,
    "percent_masked": 49.0,
    "prob_perplexity": 120.0,
    "code_perplexity": 110.0,
    "lr": 1e-3,
    "temperature": 1.99,
    "grad_norm": 0.5,
    "padding_efficiency": 0.9,
    "audio_seconds_per_second": 40.0,
    "audio_hours": 1.25,
    "elapsed_seconds": 3725.0,
    "eta_seconds": 59.0,
}


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
    assert format_line(RECORD).endswith("| 1.25 h audio | 1:02:05 elapsed, ETA 0:00:59")


def test_collapse_warning_names_each_sign_and_stays_quiet_otherwise():
    assert collapse_warning(RECORD, num_groups=2) is None
    collapsed = {**RECORD, "prob_perplexity": 2.5, "contrastive_loss": 0.001, "grad_norm": 1e-6}
    warning = collapse_warning(collapsed, num_groups=2)
    assert "perplexity" in warning and "contrastive" in warning and "gradient" in warning
    assert collapse_warning({**RECORD, "grad_norm": math.nan}, num_groups=2) is None


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    logger.log(RECORD)
    logger.close()
    assert not (tmp_path / "rank1").exists()


def steps_in_events(folder) -> dict[int, float]:
    """TensorBoard's own view of the "loss" scalar: step -> value, after its purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    seen = [(e.step, e.value) for e in events.Scalars("loss")]
    assert len(seen) == len({step for step, _ in seen}), seen
    return dict(seen)


def test_a_resumed_run_logs_each_step_once_after_a_kill_tore_the_last_line(tmp_path):
    first = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    for step in range(1, 7):
        first.log({**RECORD, "step": step, "loss": float(step)})
    first.log({"step": 6, "eval_loss": 3.0})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a kill in the middle of step 7's line
        f.write(json.dumps({**RECORD, "step": 7})[:40])

    resumed = MetricsLogger(tmp_path, enabled=True, tensorboard=True, resume_step=4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    for step in range(5, 9):
        resumed.log({**RECORD, "step": step, "loss": 10.0 + step})
    resumed.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 4.0, 15.0, 16.0, 17.0, 18.0]
    assert steps_in_events(tmp_path / "tensorboard") == {
        1: 1.0,
        2: 2.0,
        3: 3.0,
        4: 4.0,
        5: 15.0,
        6: 16.0,
        7: 17.0,
        8: 18.0,
    }


def test_a_run_without_resume_keeps_every_record_but_a_torn_line(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    logger.log(RECORD)
    logger.close()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    MetricsLogger(tmp_path, enabled=True, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 11, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    logger.log({**RECORD, "step": 12})
    logger.close()
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [10, 12]
    assert not list(tmp_path.glob("*.tmp"))


def test_each_record_reaches_the_file_in_one_write_call(tmp_path):
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    script = (
        "from w2v_stream.metrics import MetricsLogger\n"
        f"logger = MetricsLogger({str(tmp_path)!r}, enabled=True, tensorboard=False)\n"
        "logger.log({'step': 1, 'note': 'x' * 50_000})\n"
        "logger.log({'step': 2, 'note': 'y'})\n"
        "logger.close()\n"
    )
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(
        [
            strace,
            "-f",
            "-e",
            "trace=write",
            "-e",
            "signal=none",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            script,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    returned = [
        int(line.rsplit("=", 1)[1])
        for line in trace.read_text().splitlines()
        if '"{\\"note\\": ' in line
    ]
    assert returned == [len(lines[0]), len(lines[1])]
