"""Checkpoints: ``OUTPUT_DIR/checkpoint-<update>/``, written atomically, rotated, no pickles.

Inside: the model through ``save_pretrained`` (safetensors) with the feature-extractor
config, so ``Wav2Vec2ForPreTraining``, ``Wav2Vec2Model`` and
``Wav2Vec2FeatureExtractor.from_pretrained`` load it; ``optimizer.pt`` and ``rng.pt`` (tensors
and plain containers only: loaded with ``weights_only=True``, which refuses arbitrary objects);
``trainer_state.json`` (update counter, loader position, resolved configuration, counters).
A checkpoint is written to ``checkpoint-<update>.tmp`` and renamed when complete, so a kill
during a save never leaves a broken latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Wav2Vec2FeatureExtractor

_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"


def feature_extractor_for(config) -> Wav2Vec2FeatureExtractor:
    """The extractor matching our loader: 16 kHz, zero-mean unit-variance, zero padding."""
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0,
                                    do_normalize=True,
                                    return_attention_mask=config.feat_extract_norm == "layer")


def save(output_dir: Path, update: int, model, optimizer, trainer_state: dict,
         total_limit: int | None = None) -> Path:
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{update}"
    tmp = output_dir / f"checkpoint-{update}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    feature_extractor_for(model.config).save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"update": update, **trainer_state}, indent=1,
                                             sort_keys=True, default=str))
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` leftovers of a killed save are ignored)."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir() and (path / STATE_FILE).exists():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def find(output_dir: Path, which: str) -> Path:
    """``latest`` (in ``output_dir``) or a checkpoint folder's path."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in "
                                    f"{output_dir}")
        return found[-1]
    path = Path(which)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {which}: not a checkpoint folder")
    return path


def load(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG in place; returns the trainer state."""
    path = Path(path)
    model.load_state_dict(load_file(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return json.loads((path / STATE_FILE).read_text())
