"""Shared fixtures: a small synthetic LibriSpeech made once per session, in three layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from w2v_stream.demo_corpus import make_demo_corpus, write_hf_parquet, write_openslr_archive

REPO = Path(__file__).resolve().parents[1]
# The IPU simulation runs the fp16 model on the CPU, where torch < 2.1 (the Poplar SDK's torch
# 2.0.1) has no float16 convolution; on an IPU the convolutions run on the IPU.
CPU_HALF_CONV = pytest.mark.skipif(
    torch.__version__ < "2.1", reason="torch < 2.1 has no float16 convolution on the CPU"
)
SPLIT = "dev-clean"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """LibriSpeech root with one split: 2 speakers x 2 chapters x 3 utterances."""
    root = tmp_path_factory.mktemp("corpus") / "LibriSpeech"
    make_demo_corpus(
        root, SPLIT, num_speakers=2, chapters_per_speaker=2, utterances_per_chapter=3, seed=7
    )
    return root


@pytest.fixture(scope="session")
def corpus_archive(corpus, tmp_path_factory) -> Path:
    return write_openslr_archive(
        corpus, SPLIT, tmp_path_factory.mktemp("archive") / f"{SPLIT}.tar.gz"
    )


@pytest.fixture(scope="session")
def corpus_parquet(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parquet")
    write_hf_parquet(corpus, SPLIT, out, rows_per_file=5)
    return out


@pytest.fixture(scope="session")
def shard_dir(corpus, tmp_path_factory) -> Path:
    """The corpus as shards of 2 utterances (6 shards), with index.json."""
    from w2v_stream import convert
    from w2v_stream.librispeech import open_sources

    out = tmp_path_factory.mktemp("shards")
    convert.convert(open_sources([str(corpus)]), out, convert.ShardOptions(samples_per_shard=2))
    return out


@pytest.fixture
def corpus_copy(corpus, tmp_path) -> Path:
    """A private, writable copy of the corpus split folder."""
    dest = tmp_path / "LibriSpeech" / SPLIT
    shutil.copytree(corpus / SPLIT, dest)
    return dest


def run_tool(*args, check=True) -> subprocess.CompletedProcess:
    """Run a tools/ script as a user would; returns the finished process."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
