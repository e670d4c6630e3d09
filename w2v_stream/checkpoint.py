"""Checkpoints: ``OUTPUT_DIR/checkpoint-<update>/``, verified, written atomically, rotated, no
pickles.

Inside: the model through ``save_pretrained`` (safetensors) with the feature-extractor
config, so ``Wav2Vec2ForPreTraining``, ``Wav2Vec2Model`` and
``Wav2Vec2FeatureExtractor.from_pretrained`` load it; ``optimizer.pt`` and ``rng.pt`` (tensors
and plain containers only: loaded with ``weights_only=True``, which refuses arbitrary objects);
``trainer_state.json`` (update counter, loader position, resolved configuration, counters, and
under ``"files"`` each other file's size and sha256).

``trainer_state.json`` is written last, into ``checkpoint-<update>.tmp``, which is renamed when
complete: a folder without it is incomplete, and a kill during a save never leaves a broken
latest checkpoint. A weight that is not finite is never saved. Loading checks every listed
file's size and sha256 and that every weight is finite before it touches the model or the
optimizer; a checkpoint without ``"files"`` (an older trainer's) is checked for its files'
presence, readable safetensors, optimizer and RNG files, and finite weights.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import Wav2Vec2FeatureExtractor

_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
# What a checkpoint without a file list must hold besides trainer_state.json.
_REQUIRED = ("model.safetensors", OPTIMIZER_FILE, RNG_FILE)


class CheckpointError(ValueError):
    """A checkpoint is incomplete or damaged; the message names the file and what is wrong."""


class NonFiniteWeights(CheckpointError):
    """The model holds a NaN or infinite weight, so it is not saved."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, I/O error, no permission); its partial
    folder is removed and earlier checkpoints are untouched. ``errno`` is the operating
    system's error number when one is known."""

    def __str__(self) -> str:
        return self.strerror


@dataclass
class VerifiedCheckpoint:
    """What ``verify`` read: the trainer state and the model's weights, all checked."""

    state: dict
    weights: dict[str, torch.Tensor]


def feature_extractor_for(config) -> Wav2Vec2FeatureExtractor:
    """The extractor matching our loader: 16 kHz, zero-mean unit-variance, zero padding."""
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=config.feat_extract_norm == "layer",
    )


def save(
    output_dir: Path,
    update: int,
    model,
    optimizer,
    trainer_state: dict,
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<update>`` and keep the newest ``total_limit`` checkpoints (None: all);
    the partial folders of killed saves go. Only the holder of the output folder's lock saves.

    Raises ``NonFiniteWeights`` (nothing written) when a weight is NaN or infinite, and
    ``CheckpointSaveError`` when the disk refuses a write.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(
            f"save_total_limit {total_limit}: keep at least 1 checkpoint (or give none to keep all)"
        )
    weights = model.state_dict()
    bad = _first_non_finite(weights)
    if bad is not None:
        raise NonFiniteWeights(
            f"checkpoint-{update} not saved: weight {bad} is not finite (NaN or infinite)"
        )
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{update}"
    tmp = output_dir / f"checkpoint-{update}.tmp"
    writing = f"folder {tmp.name}"
    try:
        for partial in output_dir.glob("checkpoint-*.tmp"):  # what killed saves left
            shutil.rmtree(partial, ignore_errors=True)
        tmp.mkdir(parents=True)
        writing = "the model (model.safetensors, config.json)"
        model.save_pretrained(tmp, safe_serialization=True)
        writing = "preprocessor_config.json"
        feature_extractor_for(model.config).save_pretrained(tmp)
        writing = OPTIMIZER_FILE
        _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        writing = RNG_FILE
        _torch_save({"torch": torch.get_rng_state()}, tmp / RNG_FILE)
        writing = STATE_FILE
        files = {p.name: _describe(p) for p in sorted(tmp.iterdir())}
        (tmp / STATE_FILE).write_text(
            json.dumps(
                {"update": update, **trainer_state, "files": files},
                indent=1,
                sort_keys=True,
                default=str,
            )
        )
        writing = f"folder {final.name}"
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(output_dir)
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(
            err,
            writing,
            update,
            output_dir,
            _tensor_bytes(weights) + _tensor_bytes(optimizer.state_dict()),
        ) from err
    _rotate(output_dir, final, total_limit)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` leftovers of a killed save are ignored)."""
    return [p for p in _numbered(output_dir) if (p / STATE_FILE).exists()]


def find(output_dir: Path, which: str, warn: Callable[[str], None] | None = None) -> Path:
    """``latest`` (the newest checkpoint in ``output_dir`` that passes ``verify``; each newer one
    that fails is passed to ``warn``, by default printed on stderr) or a checkpoint folder's
    path, which must pass ``verify``."""
    warn = warn or _print_warning
    if which != "latest":
        path = Path(which)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {which}: not a checkpoint folder")
        verify(path)
        return path
    found = _numbered(output_dir)
    if not found:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
    for path in reversed(found):
        try:
            verify(path)
        except CheckpointError as err:
            warn(f"skipping {path.name}: {err}")
            continue
        return path
    raise CheckpointError(
        f"--resume_from_checkpoint latest: none of the {len(found)} "
        f"checkpoints in {output_dir} is usable (the warnings say what is wrong "
        f"with each); start again without --resume_from_checkpoint"
    )


def verify(path: Path) -> None:
    """Check a checkpoint's files without loading it into a model; raises ``CheckpointError``."""
    _verified(Path(path))


def load(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG in place, after checking every file; returns the
    trainer state. Raises ``CheckpointError`` with the model and optimizer untouched."""
    path = Path(path)
    checked = _verified(path)
    optimizer_state = _torch_load(path / OPTIMIZER_FILE)
    rng_state = _torch_load(path / RNG_FILE)
    model.load_state_dict(checked.weights)
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng_state["torch"])
    return checked.state


def _verified(path: Path) -> VerifiedCheckpoint:
    state = _read_state(path)
    for name in _REQUIRED:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
    if "files" not in state:  # an older trainer's checkpoint: no sizes or hashes to compare
        for name in (OPTIMIZER_FILE, RNG_FILE):
            _torch_load(path / name, mmap=True)  # maps the tensors, reads the structure
    elif not isinstance(state["files"], dict):
        raise CheckpointError(f"{path / STATE_FILE}: 'files' is not a mapping of file names")
    else:
        for name, expected in sorted(state["files"].items()):
            _check_file(path / name, expected)
    return VerifiedCheckpoint(state, _read_weights(path))


def _read_state(path: Path) -> dict:
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing, so the checkpoint is incomplete")
    try:
        state = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("update"), int):
        raise CheckpointError(f"{file}: not a trainer state (no integer 'update')")
    return state


def _check_file(file: Path, expected) -> None:
    if not (
        isinstance(expected, dict)
        and isinstance(expected.get("bytes"), int)
        and isinstance(expected.get("sha256"), str)
    ):
        raise CheckpointError(
            f"{file.parent / STATE_FILE}: entry for {file.name} has no 'bytes' and 'sha256'"
        )
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{file}: {size} bytes, {expected['bytes']} expected")
    if _sha256(file) != expected["sha256"]:
        raise CheckpointError(
            f"{file}: sha256 differs from the one in {STATE_FILE} "
            f"(the file changed after it was saved)"
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors' tensors, all finite (save_pretrained shards only beyond 50 GB)."""
    file = path / "model.safetensors"
    try:
        weights = load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: truncated or unreadable safetensors ({err})") from err
    bad = _first_non_finite(weights)
    if bad is not None:
        raise CheckpointError(f"{file}: non-finite weight {bad} (NaN or infinite)")
    return weights


# torch < 2.1 (the Poplar SDK's torch 2.0.1) cannot map a file: it reads the whole file instead.
_CAN_MAP = "mmap" in inspect.signature(torch.load).parameters


def _torch_load(file: Path, mmap: bool = False):
    try:
        return torch.load(file, weights_only=True, **({"mmap": mmap} if _CAN_MAP else {}))
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err


def _torch_save(obj, file: Path) -> None:
    # Through a Python file object, the OSError of a failed write (ENOSPC) stays in the chain
    # of torch's "[enforce fail at inline_container.cc] unexpected pos".
    with open(file, "wb") as f:
        torch.save(obj, f)


def _first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor in nested dicts and lists (a state dict's size on disk, nearly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _save_error(
    err: BaseException, writing: str, update: int, output_dir: Path, needed: int
) -> CheckpointSaveError:
    code = _errno(err)
    reason = os.strerror(code) if code is not None else str(err).splitlines()[0]
    free = shutil.disk_usage(next(p for p in (output_dir, *output_dir.parents) if p.exists())).free
    return CheckpointSaveError(
        code,
        f"could not write {writing} of checkpoint-{update} in {output_dir}: {reason}; the "
        f"checkpoint needs about {_human(needed)}, {_human(free)} free there; free space "
        f"or fix the folder's permissions, then resume from the last checkpoint",
    )


def _errno(err: BaseException) -> int | None:
    """The operating system's error number behind a failed write: an OSError in the exception
    chain (torch's writer) or, in the text, safetensors' "(os error N)" ("Os { code: N" from
    0.5.3, requirements-ipu.txt's)."""
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause.errno
        cause = cause.__cause__ or cause.__context__
    match = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(err))
    return int(match.group(1) or match.group(2)) if match else None


def _human(n: float) -> str:
    if n < 1000:
        return f"{n} bytes"
    units = ("kB", "MB", "GB", "TB")
    power = min(int(math.log10(n) // 3), len(units))
    return f"{n / 1000**power:.1f} {units[power - 1]}"


def _rotate(output_dir: Path, keep: Path, total_limit: int | None) -> None:
    """Remove the oldest checkpoints beyond ``total_limit``, never ``keep`` (just written)."""
    if total_limit is None:
        return
    others = [p for p in list_checkpoints(output_dir) if p != keep]
    for old in others[: max(0, len(others) - (total_limit - 1))]:
        shutil.rmtree(old)


def _numbered(output_dir: Path) -> list[Path]:
    """``checkpoint-<n>`` folders, complete or not, by update number."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def _describe(file: Path) -> dict:
    return {"bytes": file.stat().st_size, "sha256": _sha256(file)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _print_warning(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
