"""The training command end to end: CLI, checkpoints, exact resume after SIGKILL, data
parallel, static compilation, the model's loss, and the IPU backend's absence."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from w2v_stream.masking import compute_mask, sample_negatives
from w2v_stream.model import PretrainingObjective, build_model, resolve_config

from conftest import CPU_HALF_CONV, REPO, read_records

FAST = (
    "--preset demo --per_device_train_batch_size 2 "
    "--max_duration_in_seconds 4 --min_duration_in_seconds 1 "
    "--num_buckets 2 --num_workers 1 --learning_rate 1e-3 "
    "--num_warmup_steps 2 --no_tensorboard"
).split()


def train_cmd(shards, out, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "w2v_stream.train",
        "--train_shards",
        str(shards),
        "--output_dir",
        str(out),
        *FAST,
        *map(str, extra),
    ]


def run(cmd, check=True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def losses(out: Path) -> dict[int, float]:
    records = read_records(out / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_train_eval_checkpoint_and_load_with_transformers(shard_dir, tmp_path):
    out = tmp_path / "run"
    proc = run(
        train_cmd(
            shard_dir,
            out,
            "--max_train_steps",
            6,
            "--logging_steps",
            1,
            "--saving_steps",
            3,
            "--save_total_limit",
            1,
            "--eval_shards",
            shard_dir,
        )
    )
    assert re.search(r"step +6 \| loss [0-9.]+ \| contrastive", proc.stdout)
    records = read_records(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in (
        "contrastive_loss",
        "diversity_loss",
        "feature_penalty",
        "accuracy",
        "percent_masked",
        "code_perplexity",
        "prob_perplexity",
        "lr",
        "temperature",
        "grad_norm",
        "padding_efficiency",
        "audio_seconds_per_second",
    ):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[0]["temperature"] == 2.0 and train[-1]["temperature"] < 2.0
    assert 30 < train[-1]["percent_masked"] < 70
    assert sorted(r["step"] for r in records if "eval_loss" in r) == [0, 3, 6]
    evals = [r for r in records if "eval_loss" in r]
    assert all(
        r["eval_utterances"] == 2 * 2 * 3 and r["eval_bad_utterances"] == 0 for r in evals
    )  # every utterance of the held-out set, each eval
    assert all(0 <= r["accuracy"] <= 1 and r["feature_penalty"] > 0 for r in train)
    assert all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    for r in evals:  # the terms add up to the loss, as in training (diversity weight 0.1)
        terms = r["eval_contrastive_loss"] + 0.1 * r["eval_diversity_loss"]
        assert r["eval_loss"] == pytest.approx(terms + 10.0 * r["eval_feature_penalty"])
        assert r["eval_feature_penalty"] > 0
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]  # rotated
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining, Wav2Vec2Model

    ckpt = out / "checkpoint-6"
    assert (ckpt / "model.safetensors").exists()
    Wav2Vec2ForPreTraining.from_pretrained(ckpt)
    Wav2Vec2Model.from_pretrained(ckpt)
    assert Wav2Vec2FeatureExtractor.from_pretrained(ckpt).sampling_rate == 16000
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["update"] == 6 and state["loader"]["0"]["position"] >= 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["model"]["mask_time_prob"] == 0.65 and config["model"]["apply_spec_augment"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(shard_dir, tmp_path):
    args = ("--max_train_steps", 8, "--logging_steps", 1, "--saving_steps", 4)
    whole = tmp_path / "whole"
    run(train_cmd(shard_dir, whole, *args))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(shard_dir, killed, *args),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint-4").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-4").exists() and not (killed / "checkpoint-8").exists()
    run(train_cmd(shard_dir, killed, *args, "--resume_from_checkpoint", "latest"))
    expected, got = losses(whole), losses(killed)
    assert [got[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]
    records = read_records(killed / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # each step once
    assert [r["run"]["resumed_from"] for r in records if "run" in r] == [
        None,
        str(killed / "checkpoint-4"),
    ]


@pytest.mark.slow
def test_a_second_trainer_on_the_same_output_dir_exits_naming_the_first(shard_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        train_cmd(shard_dir, out, "--max_train_steps", 10_000, "--saving_steps", 10_000),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "train_config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = run(train_cmd(shard_dir, out, "--max_train_steps", 2), check=False)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    assert second.returncode == 1 and f"pid {first.pid}" in second.stderr, second.stderr
    assert "in use by another trainer" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0


def _with_audio_garbled(shards: Path, dest: Path) -> Path:
    """A copy of ``shards`` whose every FLAC's frames are overwritten (tar and index intact)."""
    shutil.copytree(shards, dest)
    for path in dest.glob("*.tar"):
        data = bytearray(path.read_bytes())
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".flac"):  # all but the FLAC header
                    data[member.offset_data + 100 : member.offset_data + member.size] = b"\x5a" * (
                        member.size - 100
                    )
        path.write_bytes(bytes(data))
    return dest


def test_an_eval_set_that_reads_nothing_stops_the_run_naming_the_shards(shard_dir, tmp_path):
    bad = _with_audio_garbled(shard_dir, tmp_path / "bad")
    proc = run(
        train_cmd(shard_dir, tmp_path / "run", "--max_train_steps", 2, "--eval_shards", bad),
        check=False,
    )
    assert proc.returncode == 1 and "eval read no utterance" in proc.stderr, proc.stderr
    assert str(bad / "shard-000000.tar") in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_training_on_unreadable_audio_stops_before_any_update(shard_dir, tmp_path):
    bad = _with_audio_garbled(shard_dir, tmp_path / "bad")
    proc = run(train_cmd(bad, tmp_path / "run", "--max_train_steps", 20), check=False)
    assert proc.returncode == 1 and "shard-0000" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not [
        line
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]


@pytest.mark.slow
def test_resume_latest_skips_a_damaged_checkpoint_and_a_named_one_is_an_error(shard_dir, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(shard_dir, out, "--max_train_steps", 4, "--saving_steps", 2))
    weights = out / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-90] = b"\xff" * 10  # bytes flipped in place, size unchanged
    weights.write_bytes(bytes(data))
    named = run(
        train_cmd(
            shard_dir, out, "--max_train_steps", 6, "--resume_from_checkpoint", out / "checkpoint-4"
        ),
        check=False,
    )
    assert named.returncode == 1 and "model.safetensors" in named.stderr, named.stderr
    assert "Traceback" not in named.stderr
    latest = run(
        train_cmd(shard_dir, out, "--max_train_steps", 6, "--resume_from_checkpoint", "latest")
    )
    assert "WARNING: skipping checkpoint-4" in latest.stdout + latest.stderr
    assert f"resumed from {out / 'checkpoint-2'} at update 2" in latest.stdout
    assert (out / "checkpoint-6").is_dir()


def test_a_full_disk_at_a_save_names_the_file_and_leaves_no_partial_folder(shard_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = run(
            train_cmd(shard_dir, disk / "run", "--max_train_steps", 2, "--saving_steps", 2),
            check=False,
        )
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "could not write" in proc.stderr and "No space left" in proc.stderr
        assert "Traceback" not in proc.stderr and not list((disk / "run").glob("checkpoint-*"))
        assert [r["step"] for r in read_records(disk / "run" / "metrics.jsonl")]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_to_the_whole_process_group_saves_and_exits_0(shard_dir, tmp_path, signum):
    # What `timeout`, `kill -TERM -PGID`, Slurm's scancel and Ctrl-C do: every process of the
    # group gets the signal, loader workers included.
    out = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(
            shard_dir,
            out,
            "--max_train_steps",
            10_000,
            "--logging_steps",
            1,
            "--saving_steps",
            10_000,
            "--num_workers",
            2,
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signum)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "killed by signal" not in text, text[-3000:]
    saved = list(out.glob("checkpoint-*"))
    assert len(saved) == 1 and f"signal {int(signum)}: checkpoint saved" in text
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert saved[0].name == f"checkpoint-{state['update']}" and state["update"] >= 1


def test_a_second_ctrl_c_aborts_at_once():
    from w2v_stream.train import StopRequest

    before = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    try:
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of this thread
        assert stop and stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # a launcher's forward of the same Ctrl-C
        time.sleep(0.01)
        stop.at -= 2.0  # a person pressing again, seconds later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@pytest.mark.slow
def test_two_ranks_take_the_same_steps_and_end_identical(shard_dir, tmp_path):
    out = tmp_path / "ddp"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    logs = tmp_path / "logs"  # one stdout file per rank: printed together, lines interleave
    cmd = [
        sys.executable,
        *(
            "-m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port"
        ).split(),
        port,
        "--log_dir",
        logs,
        *"--redirects 1 -m w2v_stream.train --train_shards".split(),
        str(shard_dir),
        "--output_dir",
        str(out),
        *FAST,
        "--max_train_steps",
        4,
        "--logging_steps",
        1,
        "--saving_steps",
        4,
        "--gradient_accumulation_steps",
        2,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run([str(c) for c in cmd], env=env)
    text = "".join(p.read_text() for p in logs.rglob("stdout.log"))
    finals = re.findall(r"rank (\d) finished at update (\d+), weights checksum (\S+)", text)
    assert sorted(r for r, _, _ in finals) == ["0", "1"]
    assert {u for _, u, _ in finals} == {"4"} and len({c for _, _, c in finals}) == 1
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert set(state["loader"]) == {"0", "1"}


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_data_parallel_job(shard_dir, tmp_path):
    # accelerate's torchrun launcher is its --multi_gpu mode; on a CPU-only machine it starts
    # CPU processes and the trainer picks gloo, as under torchrun.
    out = tmp_path / "accelerate"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cmd = [
        sys.executable,
        *(
            "-m accelerate.commands.launch --multi_gpu --num_processes 2 "
            "--num_machines 1 --mixed_precision no --dynamo_backend no "
            "--main_process_ip 127.0.0.1 --main_process_port"
        ).split(),
        port,
        "-m",
        "w2v_stream.train",
        "--train_shards",
        str(shard_dir),
        "--output_dir",
        str(out),
        *FAST,
        "--max_train_steps",
        3,
        "--logging_steps",
        1,
        "--saving_steps",
        3,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    text = run([str(c) for c in cmd], env=env).stdout
    finals = re.findall(
        r"rank (\d) finished at update (\d+), weights checksum ([-+.\deE]+?)"
        r"(?=rank|\s|$)",
        text,
    )
    assert sorted(r for r, _, _ in finals) == ["0", "1"], text[-2000:]
    assert {u for _, u, _ in finals} == {"3"} and len({c for _, _, c in finals}) == 1
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert set(state["loader"]) == {"0", "1"}


def _batch(config, rows, samples, seed):
    rs = np.random.default_rng(seed)
    model = build_model(config)
    frames = int(model._get_feat_extract_output_lengths(samples))
    lengths = [frames] * (rows - 1) + [frames // 2]
    segments = [[(0, n)] for n in lengths]
    mask = compute_mask(segments, frames, 0.65, 10, 2, rs)
    negatives = sample_negatives(mask, segments, config.num_negatives, rs)
    attention = torch.ones(rows, samples, dtype=torch.bool)
    attention[-1, samples // 2 :] = False
    return {
        "input_values": torch.randn(rows, samples) * attention,
        "attention_mask": attention,
        "mask_time_indices": torch.from_numpy(mask),
        "sampled_negative_indices": torch.from_numpy(negatives).long(),
    }


def test_bad_flags_fail_before_any_work(shard_dir, tmp_path):
    bad = run(
        train_cmd(
            shard_dir, tmp_path / "o", "--max_train_steps", 2, "--min_duration_in_seconds", 30
        ),
        check=False,
    )
    assert bad.returncode == 2 and "--min_duration_in_seconds <" in bad.stderr
    assert not (tmp_path / "o").exists()
    both = run(
        [
            sys.executable,
            "-m",
            "w2v_stream.train",
            "--train_shards",
            str(shard_dir),
            "--output_dir",
            str(tmp_path / "o"),
            "--max_train_steps",
            "1",
        ],
        check=False,
    )
    assert both.returncode == 2 and "--preset" in both.stderr


def test_batches_the_machine_cannot_hold_exit_2_before_training(shard_dir, tmp_path):
    proc = run(
        train_cmd(
            shard_dir,
            tmp_path / "o",
            "--max_train_steps",
            2,
            "--per_device_train_batch_size",
            200_000,
        ),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "GiB of /dev/shm" in proc.stderr and "lower --per_device_train_batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr and not list((tmp_path / "o").glob("checkpoint-*"))


def test_a_preset_sets_the_training_values_it_implies_and_flags_override_them():
    from w2v_stream.train import parse_args

    argv = ["--train_shards", "s", "--output_dir", "o", "--max_train_steps", "3"]
    large = parse_args(argv + ["--preset", "large"])
    assert (
        large.feature_grad_mult,
        large.feature_penalty_weight,
        large.min_gumbel_temperature,
    ) == (1.0, 0.0, 0.1)
    base = parse_args(argv + ["--preset", "base", "--feature_penalty_weight", "0"])
    assert (base.feature_grad_mult, base.feature_penalty_weight, base.min_gumbel_temperature) == (
        0.1,
        0.0,
        0.5,
    )
    config = resolve_config("large", None, {})
    assert config.layerdrop == config.hidden_dropout == config.attention_dropout == 0.0
    assert config.feat_proj_dropout == config.feat_quantizer_dropout == 0.0


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--learning_rate", "inf"),
        ("--weight_decay", "nan"),
        ("--max_grad_norm", "nan"),
        ("--adam_epsilon", "0"),
        ("--max_bad_fraction", "-1"),
        ("--shuffle_seconds", "-5"),
        ("--num_negatives", "0"),
        ("--eval_steps", "0"),
        ("--feature_grad_mult", "nan"),
        ("--max_duration_in_seconds", "inf"),
        ("--mask_time_length", "0"),
        ("--save_total_limit", "-1"),
        ("--max_train_steps", "0"),
        ("--mask_time_prob", "1"),
        ("--adam_beta2", "1"),
        ("--seed", "-1"),
        ("--gumbel_temperature_decay", "0"),
        ("--num_workers", "2.5"),
    ],
)
def test_each_bad_value_exits_2_with_a_one_line_reason(flag, value, capsys):
    from w2v_stream.train import parse_args

    argv = "--train_shards s --output_dir o --preset demo --max_train_steps 3".split()
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv + [flag, value])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"argument {flag}: must be a finite" in last, last


def test_ipu_backend_without_poptorch_says_how_to_get_it(shard_dir, tmp_path):
    pytest.importorskip("transformers")
    if __import__("importlib").util.find_spec("poptorch"):
        pytest.skip("poptorch is installed here")
    proc = run(
        train_cmd(shard_dir, tmp_path / "o", "--max_train_steps", 2, "--backend", "ipu"),
        check=False,
    )
    assert proc.returncode == 1 and "Poplar SDK" in proc.stderr


def test_ipu_host_batches_are_whole_updates_of_one_shape_in_runs(shard_dir, tmp_path):
    # What the IPU path asks of the loader, checked without poptorch: each batch is one host
    # call of replicas x accumulation micro-batches of one bucket, and shapes come in runs.
    from w2v_stream.train import make_stream_config, parse_args

    args = parse_args(
        [
            "--train_shards",
            str(shard_dir),
            "--output_dir",
            str(tmp_path),
            *(
                "--preset demo --max_train_steps 1 --backend ipu --ipu_replicas 2 "
                "--gradient_accumulation_steps 3 --per_device_train_batch_size 2 "
                "--max_duration_in_seconds 4 --min_duration_in_seconds 1 "
                "--num_buckets 2"
            ).split(),
        ]
    )
    config = resolve_config("demo", None, {})
    micro = make_stream_config(args.train_shards, args, config, 0, 1).plan
    host = make_stream_config(args.train_shards, args, config, 0, 1, split=6, bucket_runs=True)
    assert host.plan.lengths == micro.lengths
    assert host.plan.batch_sizes == tuple(6 * b for b in micro.batch_sizes)
    assert host.bucket_runs and host.round_items >= 4 * max(host.plan.batch_sizes)
    with pytest.raises(SystemExit):
        parse_args(
            [
                "--train_shards",
                str(shard_dir),
                "--output_dir",
                str(tmp_path),
                *"--preset demo --max_train_steps 1 --ipu_replicas 2".split(),
            ]
        )


def test_ipu_micro_batches_get_negatives_into_their_own_frames():
    # poptorch runs each run of B / split rows of a host batch as its own micro-batch: the
    # loader's negatives (into the host batch's frames) must be moved into the micro-batch's.
    from w2v_stream.backends.ipu import micro_batch_negatives

    rows, frames, split = 6, 40, 3
    segments = [[(0, frames - 3 * r)] for r in range(rows)]
    rs = np.random.default_rng(0)
    mask = compute_mask(segments, frames, 0.65, 4, 2, rs)
    host = torch.from_numpy(sample_negatives(mask, segments, 5, rs))
    local = micro_batch_negatives(host, split)
    assert local.dtype == torch.int32
    features = torch.randn(rows, frames, 8)
    micro = rows // split
    for m in range(split):
        chunk = slice(m * micro, (m + 1) * micro)
        idx = local[chunk].long()
        assert int(idx.min()) >= 0 and int(idx.max()) < micro * frames
        picked = features[chunk].reshape(-1, 8)[idx.reshape(-1)]
        expected = features.reshape(-1, 8)[host[chunk].long().reshape(-1)]
        assert torch.equal(picked, expected)


def test_ipu_call_size_takes_whole_runs_and_stops_at_every_event():
    from w2v_stream.backends.ipu import call_size

    assert call_size([3, 3, 3, 3], 0, 4, 10) == 4
    assert call_size([3, 3, 3, 3], 6, 4, 10) == 4  # ends on the log/eval/save/last update
    assert call_size([3, 3, 3, 3], 8, 4, 10) == 1  # ... which would fall inside
    assert call_size([3, 3, 1, 1], 0, 4, 10) == 1  # the shape changes inside
    assert call_size([3, 3, 3], 0, 4, 10) == 1
    assert call_size([], 0, 1, 10) == 1


def test_ipu_host_call_split_like_poptorch_gives_each_update_its_loss():
    # A host call of two updates, each of 4 rows over replicas x accumulation = 2, cut the
    # way poptorch cuts it (device iteration outermost, then runs of 2 rows): every
    # micro-batch sees its own update's temperature and normaliser, and the micro-batches of
    # an update add up to the contrastive loss of that update's batch in one piece.
    from types import SimpleNamespace

    from w2v_stream.backends.ipu import STEP_OUTPUTS, _IpuStep, host_batch

    config = resolve_config("demo", None, {})
    torch.manual_seed(0)
    objective = PretrainingObjective(build_model(config), feature_grad_mult=1.0).eval()
    updates = [_batch(config, 4, 24_000, seed=s) for s in (1, 2)]
    for b in updates:
        b["sampled_negative_indices"] = b["sampled_negative_indices"].int()  # as loaded
    temperatures = [2.0, 1.9]
    normalisers = [float(b["mask_time_indices"].sum()) for b in updates]
    inputs = host_batch(updates, 2, temperatures, normalisers)
    assert inputs[0].shape == (8, 24_000) and inputs[3].dtype == torch.int32
    step = _IpuStep(objective, SimpleNamespace(identity_loss=lambda x, reduction: x))
    with torch.no_grad():
        for u, batch in enumerate(updates):
            whole = objective(**batch, temperature=torch.tensor(temperatures[u]))
            micro = [[x[r : r + 2] for x in inputs] for r in (4 * u, 4 * u + 2)]
            assert all(
                torch.equal(m[4], torch.full((2,), temperatures[u]))
                and torch.equal(m[5], torch.full((2,), normalisers[u]))
                for m in micro
            )
            parts = [dict(zip(("trained",) + STEP_OUTPUTS, step(*m))) for m in micro]
            assert all(torch.allclose(p["trained"], p["loss"] / normalisers[u]) for p in parts)
            assert torch.allclose(
                sum(p["contrastive_loss"] for p in parts), whole["contrastive_loss"], rtol=1e-4
            )
            assert sum(float(p["num_frames"]) for p in parts) == float(whole["num_frames"])
    with pytest.raises(ValueError, match="one shape"):
        host_batch([updates[0], _batch(config, 4, 16_000, seed=3)], 2, [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="does not split"):
        host_batch(updates[:1], 3, [1.0], [1.0])


@pytest.mark.slow
@CPU_HALF_CONV
def test_ipu_loop_on_simulated_poptorch_runs_device_iterations_and_resumes_exactly(
    shard_dir, tmp_path
):
    # tests/sim_poptorch runs a trainingModel on the CPU the way poptorch documents it, so
    # the trainer's IPU loop runs here: calls of 3 updates where the next 3 batches share a
    # shape and no log or checkpoint falls inside, of 1 otherwise; one executable per (call
    # size, shape), one attached at a time; logs and checkpoints on their steps; and a resume
    # from a checkpoint gives the same losses.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "tests" / "sim_poptorch"), os.environ.get("PYTHONPATH", "")]
        ),
    }

    def ipu_run(out, *extra):
        log = out.parent / f"{out.name}.calls"
        run(
            train_cmd(
                shard_dir,
                out,
                "--max_train_steps",
                12,
                "--backend",
                "ipu",
                "--ipu_replicas",
                2,
                "--ipu_device_iterations",
                3,
                "--logging_steps",
                4,
                "--saving_steps",
                6,
                *extra,
            ),
            env={**env, "SIM_POPTORCH_LOG": str(log)},
        )
        return read_records(log)

    calls = ipu_run(tmp_path / "whole")
    assert sum(c["iterations"] for c in calls) == 12
    assert {c["iterations"] for c in calls} == {1, 3}
    assert all(c["replicas"] == 2 and c["shape"][0] % (2 * c["iterations"]) == 0 for c in calls)
    compiled = [(c["iterations"], tuple(c["shape"])) for c in calls if c["compiled"]]
    assert len(compiled) == len(set(compiled)) <= 2 * 2  # call sizes {1, 3} x 2 buckets
    whole = losses(tmp_path / "whole")
    assert sorted(whole) == [4, 8, 12] and all(np.isfinite(v) for v in whole.values())
    assert (tmp_path / "whole" / "checkpoint-6").is_dir()

    resumed = ipu_run(
        tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "whole" / "checkpoint-6"
    )
    assert sum(c["iterations"] for c in resumed) == 6
    assert losses(tmp_path / "resumed") == {8: whole[8], 12: whole[12]}
    bad = run(
        train_cmd(shard_dir, tmp_path / "o", "--max_train_steps", 1, "--ipu_device_iterations", 2),
        check=False,
    )
    assert bad.returncode == 2 and "--ipu_device_iterations is for --backend ipu" in bad.stderr
