"""Checkpoints on real files: verified round trips, damaged files refused before the model is
touched, ``latest`` skipping a damaged checkpoint, no non-finite weights saved, rotation, and
a full disk (a real tmpfs) or a refused folder leaving earlier checkpoints intact."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from w2v_stream import checkpoint
from w2v_stream.checkpoint import CheckpointError, CheckpointSaveError, NonFiniteWeights
from w2v_stream.model import build_model, resolve_config

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "codevector_dim": 32,
    "proj_codevector_dim": 32,
}


def tiny_model_and_optimizer(seed: int, stepped: bool = True):
    """A tiny Wav2Vec2ForPreTraining and its AdamW; ``stepped`` gives AdamW its moment tensors
    through one real update."""
    torch.manual_seed(seed)
    model = build_model(resolve_config("demo", None, TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if stepped:
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def snapshot(model, optimizer) -> list[torch.Tensor]:
    tensors = [t.clone() for t in model.state_dict().values()]
    for state in optimizer.state_dict()["state"].values():
        tensors += [t.clone() for t in state.values() if isinstance(t, torch.Tensor)]
    return tensors


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def save(output_dir: Path, update: int, model, optimizer, **kwargs) -> Path:
    return checkpoint.save(
        output_dir, update, model, optimizer, {"loader": {"0": {"position": update}}}, **kwargs
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """checkpoint-3 of a stepped tiny model; tests damage copies of it."""
    model, optimizer = tiny_model_and_optimizer(seed=1)
    path = save(tmp_path_factory.mktemp("saved"), 3, model, optimizer)
    return path, snapshot(model, optimizer)


def test_the_state_file_lists_every_other_file_and_a_load_restores_everything(saved, tmp_path):
    path, expected = saved
    state = json.loads((path / "trainer_state.json").read_text())
    names = {p.name for p in path.iterdir()} - {"trainer_state.json"}
    assert (
        set(state["files"])
        == names
        >= {
            "model.safetensors",
            "config.json",
            "preprocessor_config.json",
            "optimizer.pt",
            "rng.pt",
        }
    )
    for name, entry in state["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    checkpoint.verify(path)
    model, optimizer = tiny_model_and_optimizer(seed=2, stepped=False)
    loaded = checkpoint.load(path, model, optimizer)
    assert loaded["update"] == 3 and loaded["loader"] == {"0": {"position": 3}}
    assert same(snapshot(model, optimizer), expected)


def flip_bytes(file: Path) -> None:
    data = bytearray(file.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the last tensor's data
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)


DAMAGE = {
    "flipped bytes": ("model.safetensors", flip_bytes, "sha256 differs"),
    "truncated": ("model.safetensors", truncate, " bytes, "),
    "deleted": ("optimizer.pt", Path.unlink, "missing"),
    "garbage state": (
        "trainer_state.json",
        lambda f: f.write_bytes(b'{"update": 3, "files": {\x00\xff garbage'),
        "not valid JSON",
    ),
    "no state": ("trainer_state.json", Path.unlink, "incomplete"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_file_before_anything_is_loaded(
    saved, tmp_path, damage
):
    name, spoil, problem = DAMAGE[damage]
    path = Path(shutil.copytree(saved[0], tmp_path / "checkpoint-3"))
    spoil(path / name)
    with pytest.raises(CheckpointError, match=problem) as raised:
        checkpoint.verify(path)
    assert name in str(raised.value)
    model, optimizer = tiny_model_and_optimizer(seed=2)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=problem):
        checkpoint.load(path, model, optimizer)
    assert same(snapshot(model, optimizer), before)


def without_file_list(path: Path) -> None:
    """Make ``path`` look like a checkpoint of the code before the file list."""
    state = json.loads((path / "trainer_state.json").read_text())
    del state["files"]
    (path / "trainer_state.json").write_text(json.dumps(state))


def test_a_checkpoint_without_a_file_list_loads_and_its_weights_are_still_checked(saved, tmp_path):
    path, expected = saved
    old = Path(shutil.copytree(path, tmp_path / "checkpoint-3"))
    without_file_list(old)
    model, optimizer = tiny_model_and_optimizer(seed=2, stepped=False)
    assert checkpoint.load(old, model, optimizer)["update"] == 3
    assert same(snapshot(model, optimizer), expected)

    weights = model.state_dict()
    bad_name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[bad_name] = torch.full_like(weights[bad_name], float("nan"))
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        old / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match=f"non-finite weight {bad_name}"):
        checkpoint.verify(old)
    truncate(old / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or unreadable"):
        checkpoint.verify(old)
    truncate(old / "rng.pt")
    with pytest.raises(CheckpointError, match=r"rng\.pt: unreadable"):
        checkpoint.verify(old)


def test_latest_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=1)
    for update in (2, 4, 6):
        save(tmp_path, update, model, optimizer)
    flip_bytes(tmp_path / "checkpoint-6" / "model.safetensors")
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-8.tmp").mkdir()  # a killed save's leftover
    warnings = []
    assert checkpoint.find(tmp_path, "latest", warn=warnings.append) == tmp_path / "checkpoint-2"
    assert len(warnings) == 2
    assert "checkpoint-6" in warnings[0] and "model.safetensors: sha256 differs" in warnings[0]
    assert "checkpoint-4" in warnings[1] and "incomplete" in warnings[1]
    with pytest.raises(CheckpointError, match="sha256 differs"):
        checkpoint.find(tmp_path, str(tmp_path / "checkpoint-6"))

    truncate(tmp_path / "checkpoint-2" / "rng.pt")
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        checkpoint.find(tmp_path, "latest", warn=warnings.append)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.find(tmp_path / "empty", "latest")


def test_a_model_with_a_non_finite_weight_is_never_saved(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=1)
    save(tmp_path, 1, model, optimizer)
    name, param = list(model.named_parameters())[5]
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteWeights, match=f"weight {name} is not finite"):
        save(tmp_path, 2, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_rotation_keeps_the_newest_and_the_one_just_written_and_clears_partials(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=1, stepped=False)
    for limit in (0, -1):
        with pytest.raises(ValueError, match=f"save_total_limit {limit}"):
            save(tmp_path, 1, model, optimizer, total_limit=limit)
    assert not tmp_path.joinpath("checkpoint-1").exists()
    for update in (1, 2, 3):
        save(tmp_path, update, model, optimizer, total_limit=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    # Resumed from an earlier checkpoint, a run writes a lower number than one on disk.
    save(tmp_path, 1, model, optimizer, total_limit=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    (tmp_path / "checkpoint-5.tmp").mkdir()  # a killed save's partial folder
    (tmp_path / "checkpoint-5.tmp" / "optimizer.pt").write_bytes(b"partial")
    for update in (2, 3):
        save(tmp_path, update, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mounted at tmp_path/disk, 8 MB until ``resize`` shrinks it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(disk)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}); needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def resize(disk: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


@pytest.mark.parametrize("room, failing", [(64 << 10, "model"), (320 << 10, "optimizer.pt")])
def test_a_full_disk_fails_the_save_cleanly_and_keeps_the_earlier_checkpoint(
    small_tmpfs, room, failing
):
    # checkpoint-1 holds an empty AdamW state; checkpoint-2's moments (2 x 194 kB) do not fit.
    model, optimizer = tiny_model_and_optimizer(seed=1, stepped=False)
    save(small_tmpfs, 1, model, optimizer)
    resize(small_tmpfs, shutil.disk_usage(small_tmpfs).used + room)
    model, optimizer = tiny_model_and_optimizer(seed=2)
    with pytest.raises(CheckpointSaveError) as raised:
        save(small_tmpfs, 2, model, optimizer)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert "\n" not in message and "No space left on device" in message
    assert "could not write" in message and failing in message
    assert str(small_tmpfs) in message and "checkpoint-2" in message
    needed = float(message.split("needs about ")[1].split(" kB")[0]) * 1000
    assert needed >= 3 * sum(p.numel() * 4 for p in model.parameters())
    assert " free there" in message
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["checkpoint-1"]
    checkpoint.verify(small_tmpfs / "checkpoint-1")


def test_a_folder_the_trainer_may_not_write_fails_the_save_and_keeps_the_earlier_one():
    # Root ignores permission bits, so the save runs with the effective uid of "nobody"; the
    # real uid stays 0, which lets the test take root back.
    top = Path(tempfile.mkdtemp(prefix="w2v_ckpt_perm_"))
    try:
        top.chmod(0o755)
        out = top / "run"
        model, optimizer = tiny_model_and_optimizer(seed=1)
        save(out, 1, model, optimizer)
        out.chmod(0o555)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            with pytest.raises(CheckpointSaveError) as raised:
                save(out, 2, model, optimizer)
        finally:
            if as_root:
                os.seteuid(0)
        assert raised.value.errno == errno.EACCES
        assert "Permission denied" in str(raised.value) and "checkpoint-2.tmp" in str(raised.value)
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
        checkpoint.verify(out / "checkpoint-1")
    finally:
        shutil.rmtree(top)
