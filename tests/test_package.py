"""The package as pip builds it: a wheel with every subpackage and the console scripts, run from
outside the checkout."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = ("w2v-make-shards", "w2v-plan-buckets", "w2v-train", "w2v-report")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from the checkout, installed (without its dependencies, which this
    environment has) into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            *"-m pip wheel --no-deps --no-build-isolation -q -w".split(),
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(out.glob("w2v_stream-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "w2v_stream/backends/ipu.py" in names and "w2v_stream/backends/ipu_config.py" in names
    target = out / "site"
    subprocess.run(
        [sys.executable, *"-m pip install --no-deps -q --target".split(), str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def outside(installed: Path, cmd: list, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(installed),
        "PATH": os.pathsep.join([str(installed / "bin"), os.environ["PATH"]]),
    }
    return subprocess.run(
        [str(c) for c in cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_console_script_runs_from_the_wheel(installed, script, tmp_path):
    proc = outside(installed, [installed / "bin" / script, "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script}"), proc.stderr


def test_a_tiny_training_run_from_the_installed_wheel(installed, shard_dir, tmp_path):
    where = outside(
        installed, [sys.executable, "-c", "import w2v_stream; print(w2v_stream.__file__)"], tmp_path
    )
    assert where.stdout.startswith(str(installed)), where.stdout
    proc = outside(
        installed,
        [
            installed / "bin" / "w2v-train",
            "--train_shards",
            shard_dir,
            "--output_dir",
            tmp_path / "run",
            "--preset",
            "demo",
            "--max_train_steps",
            2,
            "--num_warmup_steps",
            0,
            "--per_device_train_batch_size",
            2,
            "--max_duration_in_seconds",
            4,
            "--min_duration_in_seconds",
            1,
            "--num_workers",
            0,
            "--no_tensorboard",
            "--saving_steps",
            2,
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").exists()
    report = outside(installed, [installed / "bin" / "w2v-report", tmp_path / "run"], tmp_path)
    assert report.returncode == 0 and (tmp_path / "run" / "report.png").exists()


@pytest.mark.parametrize("module", ["train", "make_shards", "plan_buckets", "report"])
def test_every_flag_of_every_command_says_what_it_does(module, monkeypatch):
    """The README leaves flags to --help, so each one has help text."""

    class Parsed(Exception):
        pass

    def capture(parser, args=None, namespace=None):
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    command = importlib.import_module(f"w2v_stream.{module}")
    with pytest.raises(Parsed) as parsed:
        getattr(command, "parse_args", command.main)([])
    actions = parsed.value.args[0]._actions
    assert len(actions) > 2
    assert [a.option_strings or a.dest for a in actions if not a.help] == []
