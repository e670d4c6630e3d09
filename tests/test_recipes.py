"""The recipes as a user runs them: the demo, continued pre-training on a folder of your own audio
from a saved model, and the shared script's data-parallel launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from w2v_stream.model import build_model, resolve_config

from conftest import REPO, read_records

TINY = (
    "--max_train_steps 2 --num_warmup_steps 0 "
    "--gradient_accumulation_steps 1 --per_device_train_batch_size 2 "
    "--max_duration_in_seconds 4 --num_buckets 2 --num_workers 0 "
    "--no_tensorboard --saving_steps 2 --logging_steps 1"
).split()


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Bursts of harmonics with pauses between them, 16 kHz."""
    rs = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    voiced = np.sin(2 * np.pi * 0.8 * t + seed) > -0.2
    wave = sum(np.sin(2 * np.pi * k * (110 + 20 * seed) * t) / k for k in (1, 2, 3))
    return (0.3 * wave * voiced + 0.003 * rs.standard_normal(t.size)).astype(np.float32)


def recipe(script: str, env: dict, *flags: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    proc = subprocess.run(
        ["bash", f"recipes/{script}", *flags],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=900,
        env={**os.environ, "PATH": path, "SHARD_WORKERS": "1", **env},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def my_audio(tmp_path) -> Path:
    """A folder of your own audio: clips in sub-folders and one 25 s recording."""
    root = tmp_path / "my audio"
    for i in range(6):
        (root / f"day {i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(root / f"day {i % 2}" / f"clip{i}.wav", speech_like(3.0, i), 16_000)
    sf.write(root / "long talk.flac", speech_like(25.0, 9), 16_000)
    return root


def test_continue_recipe_shards_your_audio_and_trains_from_a_saved_model(my_audio, tmp_path):
    init = tmp_path / "released"
    build_model(resolve_config("demo", None, {})).save_pretrained(init)
    work = tmp_path / "work"
    proc = recipe(
        "continue.sh",
        {"AUDIO": str(my_audio), "EVAL_AUDIO": str(my_audio), "INIT": str(init), "WORK": str(work)},
        *TINY,
    )
    assert (work / "model" / "checkpoint-2" / "model.safetensors").exists()
    assert (work / "model" / "report.png").stat().st_size > 10_000
    records = read_records(work / "model" / "metrics.jsonl")
    assert records[0]["run"]["init_from"] == str(init)
    assert any("eval_loss" in r for r in records) and "starting fresh: nothing" in proc.stdout
    index = json.loads((work / "shards" / "train" / "index.json").read_text())
    lengths = [n for shard in index["shards"] for n in shard["num_samples"]]
    assert len(lengths) > 7 and max(lengths) <= 20 * 16_000  # the 25 s recording was cut


@pytest.mark.slow
def test_pretrain_launches_torchrun_when_nproc_is_above_one(my_audio, tmp_path):
    work = tmp_path / "work"
    flags = "--preset demo " + " ".join(TINY)
    proc = recipe(
        "pretrain.sh",
        {
            "RECIPE": "ddp",
            "TRAIN_INPUTS": str(my_audio),
            "WORK": str(work),
            "TRAIN_FLAGS": flags,
            "NPROC": "2",
            "MASTER_PORT": "29531",
            "OMP_NUM_THREADS": "1",
            "BACKEND": "cpu",
        },
    )
    text = proc.stdout + proc.stderr
    assert "rank 0 finished at update 2" in text and "rank 1 finished at update 2" in text
    state = json.loads((work / "model" / "checkpoint-2" / "trainer_state.json").read_text())
    assert set(state["loader"]) == {"0", "1"}


@pytest.mark.slow
def test_demo_recipe_ends_with_eval_numbers_and_the_report_picture(tmp_path):
    work = tmp_path / "demo"
    env = {"WORK": str(work), "NUM_SPEAKERS": "2", "UTTERANCES_PER_CHAPTER": "3", "STEPS": "4"}
    flags = "--num_warmup_steps 1 --logging_steps 2 --saving_steps 2 --num_workers 0".split()
    proc = recipe("demo.sh", env, *flags)
    last = proc.stdout.strip().splitlines()[-3:]
    assert last[0].startswith("eval loss: ") and "at step 0 -> " in last[0], last
    assert "at step 4; its contrastive term " in last[0] and "; accuracy " in last[0], last
    assert last[1].startswith(f"model saved in {work / 'model' / 'checkpoint-4'}"), last
    assert last[2] == f"training report: {work / 'model' / 'report.png'}"
    assert (work / "model" / "report.png").stat().st_size > 10_000
    records = read_records(work / "model" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
