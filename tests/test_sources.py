"""Finding shards by URL: the loader's index check is the converter's, pipe: templates work
end to end, and every error names the file it is about."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from w2v_stream import shards, sources
from w2v_stream.shards import ShardFormatError
from w2v_stream.sources import SourceError


def _copy(shard_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    return out


def _edit_index(folder: Path, **changes) -> Path:
    path = folder / shards.INDEX_NAME
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format_version": 99}, "version 99, expected"),
        ({"format": "something.else"}, "format 'something.else' version 1, expected"),
    ],
)
def test_loader_refuses_an_index_verify_refuses(shard_dir, tmp_path, change, message):
    from w2v_stream import convert

    folder = _copy(shard_dir, tmp_path)
    path = _edit_index(folder, **change)
    with pytest.raises(ShardFormatError, match=message) as loader:
        sources.resolve(str(folder))
    assert str(loader.value).startswith(f"{path}: ")
    with pytest.raises(ShardFormatError, match=message):
        convert.verify(folder)


def test_index_errors_name_the_index(shard_dir, tmp_path):
    folder = _copy(shard_dir, tmp_path)
    path = folder / shards.INDEX_NAME
    path.write_text("{not json")
    with pytest.raises(ShardFormatError, match=f"^{path}: not valid JSON"):
        sources.resolve(str(folder))
    _edit_index(_copy(shard_dir, tmp_path / "b"), shards=None)
    with pytest.raises(ShardFormatError, match=r"index\.json: 'shards' is missing"):
        sources.resolve(str(tmp_path / "b" / "shards"))
    path.unlink()
    with pytest.raises(SourceError, match=f"^{path}: no index.json"):
        sources.resolve(str(folder))


def test_pipe_template_reads_index_and_shards_through_the_command(shard_dir):
    template = f"pipe:cat {shard_dir}/{{}}"
    with pytest.raises(SourceError, match="refused"):
        sources.resolve(template)
    got = sources.resolve(template, allow_pipe=True)
    local = sources.resolve(str(shard_dir))
    assert got.lengths == local.lengths and got.sample_rate == local.sample_rate
    assert got.urls == tuple(f"pipe:cat {shard_dir}/shard-{i:06d}.tar" for i in range(6))
    with sources.open_url(got.urls[2], allow_pipe=True) as f:
        piped = [(key, parts) for key, parts in shards.iter_samples(f, got.urls[2])]
    with open(shard_dir / "shard-000002.tar", "rb") as f:
        assert piped == list(shards.iter_samples(f))
    assert len(piped) == 2


def test_pipe_template_needs_a_place_for_the_file_name(shard_dir):
    with pytest.raises(SourceError, match=r"with \{\} where a file name goes"):
        sources.resolve(f"pipe:cat {shard_dir}/shard-000000.tar", allow_pipe=True)


def test_failing_pipe_command_is_a_source_error_with_its_stderr(tmp_path):
    url = f"pipe:cat {tmp_path}/{{}}"
    with pytest.raises(SourceError, match=r"exited with status 1: cat: .*No such file") as err:
        sources.resolve(url, allow_pipe=True)
    assert str(err.value).startswith(f"pipe:cat {tmp_path}/index.json: ")
    with pytest.raises(SourceError, match="cannot start 'no-such-command-here'"):
        sources.open_url("pipe:no-such-command-here x", allow_pipe=True)
    failing = (
        f"pipe:{sys.executable} -c \"import sys; sys.stdout.write('x' * 100); "
        f"sys.stderr.write('boom'); sys.exit(3)\""
    )
    with sources.open_url(failing, allow_pipe=True) as f:
        assert f.read(10) == b"x" * 10
        with pytest.raises(SourceError, match="status 3: boom"):
            f.read(1000)


def test_a_pipe_closed_early_ends_its_command(shard_dir):
    url = (
        f"pipe:{sys.executable} -c \"import sys, time; sys.stdout.write('x'); "
        f'sys.stdout.flush(); time.sleep(60)"'
    )
    with sources.open_url(url, allow_pipe=True) as f:
        assert f.read(1) == b"x"
        proc = f._proc
    assert proc.returncode is not None  # killed and reaped, not left running


def test_streaming_loader_reads_pipe_shards_like_local_ones(shard_dir):
    import torch

    from w2v_stream import buckets
    from w2v_stream.loader import StreamingLoader
    from w2v_stream.stream import StreamConfig

    def batches(spec, allow_pipe):
        shard_list = sources.resolve(spec, allow_pipe=allow_pipe)
        lengths = [n for shard in shard_list.lengths for n in shard]
        plan = buckets.make_plan(
            lengths, "pad", 3, batch_size=2, min_samples=16_000, max_samples=16_000 * 16
        )
        config = StreamConfig(
            shard_list,
            plan,
            shuffle_seconds=30.0,
            round_items=4,
            passes_per_epoch=1,
            num_negatives=20,
            allow_pipe=allow_pipe,
        )
        out = []
        for batch in StreamingLoader(config, num_workers=0):
            out.append(batch)
            if len(out) == 3:
                return out

    piped = batches(f"pipe:cat {shard_dir}/{{}}", True)
    local = batches(str(shard_dir), False)
    assert len(piped) == len(local)
    for a, b in zip(piped, local):
        assert torch.equal(a["input_values"], b["input_values"])
        assert torch.equal(a["mask_time_indices"], b["mask_time_indices"])
    assert not any(b["skipped"] for b in piped)


def test_missing_and_truncated_shards_are_named(shard_dir, tmp_path):
    folder = _copy(shard_dir, tmp_path)
    (folder / "shard-000001.tar").unlink()
    with pytest.raises(SourceError, match=r"shard-000001\.tar: No such file"):
        sources.open_url(str(folder / "shard-000001.tar"))
    data = (folder / "shard-000002.tar").read_bytes()
    (folder / "shard-000002.tar").write_bytes(data[:1500])
    with open(folder / "shard-000002.tar", "rb") as f, pytest.raises(
        ShardFormatError, match=r"shard-000002\.tar: truncated"
    ):
        list(shards.iter_samples(f, str(folder / "shard-000002.tar")))
