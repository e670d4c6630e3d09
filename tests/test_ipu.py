"""The IPU path's pipelining and memory settings: ipu_config.json in optimum-graphcore's
format, the placement of the objective's blocks, the poptorch options and fp16, checked on the
CPU against tests/sim_poptorch, and the real training command pipelined under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from w2v_stream.backends import create_backend, ipu_config
from w2v_stream.backends.ipu_config import IpuConfig, IpuConfigError
from w2v_stream.masking import compute_mask, sample_negatives
from w2v_stream.model import PretrainingObjective, build_model, resolve_config

from conftest import CPU_HALF_CONV, REPO, read_records

SIM = REPO / "tests" / "sim_poptorch"
FAST = (
    "--preset demo --per_device_train_batch_size 2 "
    "--max_duration_in_seconds 4 --min_duration_in_seconds 1 "
    "--num_buckets 2 --num_workers 1 --learning_rate 1e-3 "
    "--num_warmup_steps 2 --no_tensorboard"
).split()

# Graphcore's BASE pipeline: [6, 5, 5, 7] over optimum's 23 wav2vec2 blocks.
GRAPHCORE_BASE = (
    [[f"Conv {i}", 0] for i in range(6)]
    + [["Conv 6", 1], ["Positional Embedding", 1]]
    + [[f"Encoder {i}", 1] for i in range(3)]
    + [[f"Encoder {i}", 2] for i in range(3, 8)]
    + [[f"Encoder {i}", 3] for i in range(8, 12)]
    + [["Project Hidden", 3], ["Quantizer", 3], ["Project Quantizer", 3]]
)


def write_config(path: Path, **values) -> Path:
    path.write_text(json.dumps(values))
    return path


def train_cmd(shards, out, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "w2v_stream.train",
        "--train_shards",
        str(shards),
        "--output_dir",
        str(out),
        "--backend",
        "ipu",
        *FAST,
        *map(str, extra),
    ]


def run_sim(cmd, log: Path | None = None) -> subprocess.CompletedProcess:
    """The command with tests/sim_poptorch importable as poptorch."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SIM), os.environ.get("PYTHONPATH", "")]),
    }
    if log:
        env["SIM_POPTORCH_LOG"] = str(log)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture
def poptorch(monkeypatch):
    """tests/sim_poptorch as ``poptorch`` for this test only (other tests check its absence)."""
    monkeypatch.syspath_prepend(str(SIM))
    monkeypatch.delitem(sys.modules, "poptorch", raising=False)
    import poptorch as sim

    sim.BLOCKS.clear()
    yield sim
    sys.modules.pop("poptorch", None)


def _batch(config, rows, samples, seed):
    rs = np.random.default_rng(seed)
    frames = int(build_model(config)._get_feat_extract_output_lengths(samples))
    segments = [[(0, frames)]] * (rows - 1) + [[(0, frames // 2)]]
    mask = compute_mask(segments, frames, 0.65, 10, 2, rs)
    attention = torch.ones(rows, samples, dtype=torch.bool)
    attention[-1, samples // 2 :] = False
    return {
        "input_values": torch.randn(rows, samples) * attention,
        "attention_mask": attention,
        "mask_time_indices": torch.from_numpy(mask),
        "sampled_negative_indices": torch.from_numpy(
            sample_negatives(mask, segments, config.num_negatives, rs)
        ).long(),
    }


def test_graphcore_base_config_gives_graphcores_placement():
    base = ipu_config.resolve(REPO / "recipes" / "ipu" / "wav2vec2-base-ipu.json")
    assert (base.ipus_per_replica, base.layers_per_ipu) == (4, (6, 5, 5, 7))
    assert base.memory_proportions() == {"IPU0": 0.2, "IPU1": 1.0, "IPU2": 1.0, "IPU3": 1.0}
    assert base.gradient_accumulation_steps == 32 and base.replication_factor == 4
    assert [list(p) for p in ipu_config.placement(base, 7, 12)] == GRAPHCORE_BASE
    large = ipu_config.resolve(REPO / "recipes" / "ipu" / "wav2vec2-large-ipu.json")
    placed = ipu_config.placement(large, 7, 24)
    assert len(placed) == 35 and placed[-1] == ("Project Quantizer", 7)
    assert large.replication_factor * large.ipus_per_replica == 16  # a POD16


@pytest.mark.parametrize(
    "layers,ipus,blocks,expected",
    [
        ([-1], 1, 9, [9]),
        ([-1], 4, 8, [2, 2, 2, 2]),
        ([-1], 2, 7, [3, 4]),  # the remainder goes to the last IPU
        ([2, -1], 2, 6, [2, 4]),
        ([-1, 2], 2, 6, [4, 2]),
        ([-1, 2, -1, 2], 4, 7, [1, 2, 2, 2]),
        ([-1, -1, 0], 3, 5, [2, 3, 0]),
        ([1, 2], 2, 3, [1, 2]),
    ],
)
def test_layers_per_ipu_wildcards_follow_optimum(layers, ipus, blocks, expected):
    config = IpuConfig(ipus_per_replica=ipus, layers_per_ipu=tuple(layers))
    assert ipu_config.blocks_per_ipu(config, blocks) == expected


def test_layer_counts_that_do_not_fit_the_model_say_so():
    for layers, blocks, wanted in [
        ((1, 2), 2, "places 3 blocks but the model has 2"),
        ((1, 2), 4, "places 3 blocks but the model has 4"),
        ((5, -1), 3, "places 5 blocks before its wildcards"),
    ]:
        with pytest.raises(IpuConfigError, match=wanted):
            ipu_config.blocks_per_ipu(
                IpuConfig(ipus_per_replica=2, layers_per_ipu=layers, gradient_accumulation_steps=3),
                blocks,
            )


@pytest.mark.parametrize(
    "values,wanted",
    [
        (
            {
                "layers_per_ipu": [6, 5, 5, 7],
                "gradient_accumulation_steps": 32,
                "pod_type": "pod16",
            },
            r"unknown keys \['pod_type'\]",
        ),
        (
            {"ipus_per_replica": 4, "layers_per_ipu": [6, 5, 12], "gradient_accumulation_steps": 7},
            r"layers_per_ipu \[6, 5, 12\] has 3 entries for ipus_per_replica 4",
        ),
        (
            {
                "layers_per_ipu": [6, 5, 5, 7],
                "matmul_proportion": [0.2, 1.0],
                "gradient_accumulation_steps": 7,
            },
            "matmul_proportion .* needs 1 value or 4",
        ),
        (
            {"layers_per_ipu": [6, 5, 5, 7], "gradient_accumulation_steps": 6},
            "gradient accumulation must be at least 7, got 6",
        ),
        ({"layers_per_ipu": [6, -2]}, r"each value must be an integer >= -1, got -2"),
        ({"matmul_proportion": 1.5}, "must be a number >= 0 and <= 1"),
        ({"replication_factor": True}, "replication_factor must be an integer >= 1"),
        ({"enable_half_partials": 1}, "enable_half_partials must be true or false"),
        ({"replication_factor": {"pod16": 4, "default": 1}}, "per-POD values"),
        ({"auto_loss_scaling": True}, "fixed loss scale"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path, values, wanted):
    with pytest.raises(IpuConfigError, match=wanted):
        ipu_config.resolve(write_config(tmp_path / "ipu_config.json", **values))


def test_known_optimum_keys_load_and_flags_override_the_file(tmp_path):
    path = write_config(
        tmp_path / "ipu_config.json",
        layers_per_ipu=[6, 5, 5, 7],
        gradient_accumulation_steps=32,
        replication_factor=4,
        device_iterations=2,
        executable_cache_dir="./cache",
        seed=3,
        inference_device_iterations=4,
        output_mode="final",
        embedding_serialization_factor=1,
        enable_half_first_order_momentum=True,
    )
    config = ipu_config.resolve(path)
    assert (
        config.ipus_per_replica,
        config.replication_factor,
        config.device_iterations,
        config.executable_cache_dir,
    ) == (4, 4, 2, "./cache")
    flags = ipu_config.resolve(
        path,
        replication_factor=1,
        gradient_accumulation_steps=7,
        device_iterations=1,
        executable_cache_dir="/x",
    )
    assert (
        flags.replication_factor,
        flags.gradient_accumulation_steps,
        flags.device_iterations,
        flags.executable_cache_dir,
    ) == (1, 7, 1, "/x")
    with pytest.raises(IpuConfigError, match="at least 7, got 4"):
        ipu_config.resolve(path, gradient_accumulation_steps=4)  # a flag is checked too


@CPU_HALF_CONV
def test_every_block_fires_in_pipeline_order_in_a_real_forward(poptorch, tmp_path):
    # The demo model's 13 blocks over 3 IPUs. Every block's module is one the objective
    # really calls (the quantizer's block starts at quantizer.weight_proj), in IPU order.
    config = resolve_config("demo", None, {})
    path = write_config(
        tmp_path / "ipu_config.json",
        layers_per_ipu=[7, -1, 3],
        matmul_proportion=[0.1, 0.5, 0.6],
        gradient_accumulation_steps=5,
        recompute_checkpoint_every_layer=True,
        replication_factor=2,
        replicated_tensor_sharding=True,
        optimizer_state_offchip=True,
    )
    backend = create_backend(
        "ipu",
        ipu_config_name=str(path),
        ipu_executable_cache="/c",
        ipu_conv_layers=7,
        ipu_encoder_layers=2,
    )
    assert backend.precision == "fp16" and backend.loader_needs.split == 10
    placed = [tuple(p) for p in backend.placement]
    assert [ipu for _, ipu in placed] == [0] * 7 + [1] * 3 + [2] * 3
    objective = PretrainingObjective(build_model(config)).train()
    optimizer = backend.prepare(
        objective, [{"params": list(objective.parameters())}], 1e-3, (0.9, 0.98), 1e-6, None
    )
    assert placed == poptorch.BLOCKS
    assert {p.dtype for p in objective.parameters()} == {torch.half}
    assert optimizer.loss_scaling == 2.0**15

    poptorch.FIRED.clear()
    poptorch.CHECKPOINTS.clear()
    batch = _batch(config, 2, 16_000, seed=0)
    out = objective(
        batch["input_values"].half(),
        batch["attention_mask"],
        batch["mask_time_indices"],
        batch["sampled_negative_indices"],
        torch.tensor(2.0),
    )
    assert placed == poptorch.FIRED  # each block once, in call order
    assert len(poptorch.CHECKPOINTS) == config.num_hidden_layers
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    objective.eval()  # eval runs on the host's half weights, fp32 audio cast on the way in
    assert torch.isfinite(backend.eval_forward(batch, 1.0)["loss"])

    options = backend._options(1).describe()
    assert options == {
        "strategy": "PipelinedExecution(SameAsIpu)",
        "memory": {"IPU0": 0.1, "IPU1": 0.5, "IPU2": 0.6},
        "partials": "half",
        "stochastic_rounding": True,
        "optimizer_location": {"onChip": False, "replicatedTensorSharding": True},
    }


def test_a_block_on_the_quantizer_module_would_never_fire(poptorch):
    # Why the quantizer's block is on weight_proj: the objective never calls the quantizer.
    config = resolve_config("demo", None, {})
    objective = PretrainingObjective(build_model(config)).train()
    poptorch.BeginBlock(objective.model.quantizer, "Quantizer", 1)
    poptorch.FIRED.clear()
    batch = _batch(config, 2, 16_000, seed=0)
    objective(**batch, temperature=torch.tensor(2.0))
    assert poptorch.FIRED == []
    with pytest.raises(RuntimeError, match="already been assigned"):
        poptorch.BeginBlock(objective.model.quantizer, "Again", 1)


def test_one_ipu_in_fp32_sets_no_pipeline(poptorch):
    backend = create_backend(
        "ipu", precision="fp32", ipu_executable_cache="/c", ipu_conv_layers=7, ipu_encoder_layers=2
    )
    assert backend.precision == "fp32" and all(p.ipu == 0 for p in backend.placement)
    config = resolve_config("demo", None, {})
    objective = PretrainingObjective(build_model(config))
    optimizer = backend.prepare(
        objective, [{"params": list(objective.parameters())}], 1e-3, (0.9, 0.98), 1e-6, None
    )
    assert poptorch.BLOCKS == [] and optimizer.loss_scaling == 1.0
    assert {p.dtype for p in objective.parameters()} == {torch.float32}
    options = backend._options(1).describe()
    assert options["strategy"] is None and options["stochastic_rounding"] is False
    assert options["optimizer_location"] == {"onChip": True, "replicatedTensorSharding": False}


def test_bad_ipu_settings_fail_through_the_real_command_before_any_work(shard_dir, tmp_path):
    base = REPO / "recipes" / "ipu" / "wav2vec2-base-ipu.json"
    unknown = write_config(tmp_path / "unknown.json", layers_per_ipu=[-1], pipeline=True)
    cases = [
        (["--ipu_config_name", unknown], 2, "unknown keys ['pipeline']"),
        (
            ["--ipu_config_name", base, "--gradient_accumulation_steps", 4],
            2,
            "gradient accumulation must be at least 7, got 4",
        ),
        (["--ipu_config_name", base, "--precision", "bf16"], 2, "IPUs have no bf16"),
        # BASE's 23 blocks against the demo model's 13: found before data, model or compile.
        (["--ipu_config_name", base], 1, "places 23 blocks but the model has 13"),
    ]
    for i, (extra, code, wanted) in enumerate(cases):
        out = tmp_path / f"out{i}"
        proc = run_sim(train_cmd(shard_dir, out, "--max_train_steps", 2, *extra))
        assert proc.returncode == code and wanted in proc.stderr, proc.stderr[-2000:]
        assert not (out / "train_config.json").exists()
    for extra, wanted in [
        (["--ipu_config_name", base], "--ipu_config_name is for --backend ipu"),
        (["--precision", "fp16"], "--precision fp16 is for --backend ipu"),
    ]:
        cmd = train_cmd(shard_dir, tmp_path / "cpu", "--max_train_steps", 2, *extra)
        cmd[cmd.index("--backend") + 1] = "cpu"
        proc = run_sim(cmd)
        assert proc.returncode == 2 and wanted in proc.stderr


@pytest.mark.slow
@CPU_HALF_CONV
def test_pipelined_training_under_the_simulation_resumes_exactly(shard_dir, tmp_path):
    # The real command, pipelined over 2 IPUs in fp16: the file's placement, options and
    # recomputation reach poptorch, a flag overrides the file's replication, the placement is
    # printed and written to train_config.json, and a resume gives the same losses.
    path = write_config(
        tmp_path / "ipu_config.json",
        ipus_per_replica=2,
        layers_per_ipu=[-1, 4],
        matmul_proportion=[0.3, 0.6],
        gradient_accumulation_steps=3,
        recompute_checkpoint_every_layer=True,
        replicated_tensor_sharding=True,
        device_iterations=2,
        inference_device_iterations=4,
    )

    def ipu_run(out, *extra):
        log = out.parent / f"{out.name}.calls"
        proc = run_sim(
            train_cmd(
                shard_dir,
                out,
                "--max_train_steps",
                6,
                "--logging_steps",
                3,
                "--saving_steps",
                3,
                "--ipu_config_name",
                path,
                "--ipu_replicas",
                2,
                *extra,
            ),
            log,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc, read_records(log)

    proc, calls = ipu_run(tmp_path / "whole")
    placed = [
        [name, 0]
        for name in [f"Conv {i}" for i in range(7)] + ["Positional Embedding", "Encoder 0"]
    ] + [[name, 1] for name in ["Encoder 1", "Project Hidden", "Quantizer", "Project Quantizer"]]
    assert "IPU placement (2 IPUs per replica, 2 replicas)" in proc.stdout
    saved = json.loads((tmp_path / "whole" / "train_config.json").read_text())["args"]
    assert saved["ipu_placement"] == placed and saved["precision_resolved"] == "fp16"
    assert (
        saved["ipu_replicas"],
        saved["gradient_accumulation_steps"],
        saved["ipu_device_iterations"],
    ) == (2, 3, 2)
    assert sum(c["iterations"] for c in calls) == 6 and {c["iterations"] for c in calls} <= {1, 2}
    for call in calls:
        assert call["replicas"] == 2 and call["accumulation"] == 3
        assert [list(b) for b in call["blocks"]] == placed
        assert [list(b) for b in call["fired"]] == placed
        assert call["checkpoints"] == 2 and call["weights"] == ["torch.float16"]
        assert call["strategy"] == "PipelinedExecution(SameAsIpu)"
        assert call["memory"] == {"IPU0": 0.3, "IPU1": 0.6} and call["partials"] == "half"
        assert call["stochastic_rounding"] and call["loss_scaling"] == 2.0**15
        assert call["optimizer_location"] == {"onChip": True, "replicatedTensorSharding": True}
    records = read_records(tmp_path / "whole" / "metrics.jsonl")
    whole = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(whole) == [3, 6] and all(np.isfinite(v) for v in whole.values())

    _, resumed_calls = ipu_run(
        tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "whole" / "checkpoint-3"
    )
    assert sum(c["iterations"] for c in resumed_calls) == 3
    records = read_records(tmp_path / "resumed" / "metrics.jsonl")
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == {6: whole[6]}
