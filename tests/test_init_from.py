"""Continued pre-training: --init_from loads released weights (a save_pretrained folder, a
fine-tuned Wav2Vec2ForCTC), with fresh optimizer, schedule and step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import run, train_cmd
from transformers import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining

from w2v_stream.model import build_model, resolve_config

from conftest import read_records

# FAST's preset goes: --init_from brings its own config.
FLAGS = (
    "--max_train_steps",
    1,
    "--num_warmup_steps",
    0,
    "--learning_rate",
    1e-9,
    "--saving_steps",
    1,
    "--logging_steps",
    1,
)


def init_cmd(shards, out, init, *extra):
    cmd = train_cmd(shards, out, *FLAGS, "--init_from", init, *extra)
    at = cmd.index("--preset")
    return cmd[:at] + cmd[at + 2 :]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A pre-trained model as save_pretrained writes it (fine-tuning masking in its config,
    as released configs have)."""
    folder = tmp_path_factory.mktemp("released")
    torch.manual_seed(123)
    model = build_model(resolve_config("demo", None, {"mask_time_prob": 0.05}))
    model.save_pretrained(folder, safe_serialization=True)  # 4.x writes a .bin without it
    return folder


def test_init_from_a_saved_model_keeps_its_weights_and_its_eval_loss(shard_dir, released, tmp_path):
    from w2v_stream.backends.torch_backend import TorchBackend
    from w2v_stream.model import PretrainingObjective
    from w2v_stream.train import evaluate, make_stream_config, parse_args

    out = tmp_path / "run"
    proc = run(init_cmd(shard_dir, out, released, "--eval_shards", shard_dir))
    assert "starting fresh: nothing" in proc.stdout
    given = load_file(released / "model.safetensors")
    trained = load_file(out / "checkpoint-1" / "model.safetensors")
    assert given.keys() == trained.keys()
    for name, tensor in given.items():
        assert (trained[name] - tensor).abs().max() <= 1e-6, name
    records = read_records(out / "metrics.jsonl")
    assert records[0]["run"]["init_from"] == str(released)
    step0 = next(r for r in records if "eval_loss" in r and r["step"] == 0)
    config = json.loads((out / "train_config.json").read_text())["model"]
    assert config["mask_time_prob"] == 0.65  # pre-training masking, not the release's 0.05
    # The given model, loaded by transformers alone, on the same held-out batches.
    args = parse_args([str(a) for a in init_cmd(shard_dir, out, released)[3:]])
    model = Wav2Vec2ForPreTraining.from_pretrained(released)
    model.config.mask_time_prob = 0.65
    stream = make_stream_config([str(shard_dir)], args, model.config, 0, 1, passes_per_epoch=1)
    objective = PretrainingObjective(model, args.feature_grad_mult)
    backend = TorchBackend("cpu")
    backend.prepare(
        objective, [{"params": list(model.parameters())}], 1e-9, (0.9, 0.98), 1e-6, None
    )
    expected = evaluate(objective, backend, stream, None, 2.0)["eval_loss"]
    assert step0["eval_loss"] == pytest.approx(expected, rel=1e-6)


def test_init_from_a_fine_tuned_ctc_model_loads_the_encoder_and_starts_fresh_heads(
    shard_dir, tmp_path
):
    ctc = tmp_path / "ctc"
    torch.manual_seed(5)
    config = resolve_config("demo", None, {})
    config.vocab_size = 32
    Wav2Vec2ForCTC(config).save_pretrained(ctc, safe_serialization=True)
    out = tmp_path / "run"
    proc = run(init_cmd(shard_dir, out, ctc))
    fresh = proc.stdout.split("starting fresh: ")[1].splitlines()[0]
    assert {"quantizer.codevectors", "project_q.weight", "project_hid.weight"} <= set(
        fresh.split(", ")
    ), fresh
    given = load_file(ctc / "model.safetensors")
    trained = load_file(out / "checkpoint-1" / "model.safetensors")
    encoder = [name for name in given if name.startswith("wav2vec2.")]
    assert len(encoder) > 20
    for name in encoder:
        assert (trained[name] - given[name]).abs().max() <= 1e-6, name


@pytest.mark.parametrize(
    "extra,reason",
    [
        (("--preset", "demo"), "leave out --preset"),
        (("--model_name_or_path", "x"), "leave out --preset and --model_name_or_path"),
        (("--resume_from_checkpoint", "latest"), "give one"),
    ],
)
def test_init_from_with_a_config_or_a_resume_exits_2(released, tmp_path, extra, reason):
    proc = run(init_cmd("shards", tmp_path / "o", released, *extra), check=False)
    assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_model_name_or_path_on_a_folder_with_weights_points_at_init_from(
    shard_dir, released, tmp_path
):
    cmd = init_cmd(shard_dir, tmp_path / "o", released)
    at = cmd.index("--init_from")
    cmd[at] = "--model_name_or_path"
    proc = run(cmd)
    assert f"use --init_from {released}" in proc.stdout
