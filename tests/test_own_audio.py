"""Your own audio into shards: a folder tree of every format, fairseq and lhotse manifests,
mixed with LibriSpeech; ids, sources, problems, determinism and a kill mid-run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from test_make_shards import kill_midway, read_all

from w2v_stream import inputs, shards
from w2v_stream.events import AudioFound
from w2v_stream.inputs import hashed_id

from conftest import REPO, SPLIT, folder_bytes, run_tool

TOOL = "tools/make_shards.py"
# (relative path, rate, channels, seconds, soundfile format, subtype): one of each kind.
GOOD = [
    ("a16.flac", 16000, 1, 1.5, "FLAC", "PCM_16"),
    ("sub/b16.wav", 16000, 1, 1.2, "WAV", "PCM_16"),
    ("sub/c44 stereo.wav", 44100, 2, 1.1, "WAV", "PCM_16"),
    ("sub/deeper/d.ogg", 22050, 1, 1.3, "OGG", "VORBIS"),
    ("e.opus", 48000, 1, 1.4, "OGG", "OPUS"),
    ("f.mp3", 44100, 1, 1.6, "MP3", "MPEG_LAYER_III"),
]


def speechlike(rate: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Harmonic bursts with an envelope, different per channel: (frames, channels) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    out = []
    for c in range(channels):
        pitch = 120 + 40 * c + 30 * np.sin(2 * np.pi * 0.7 * t)
        wave = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / rate) / k for k in (1, 2, 3))
        envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)
        out.append(0.2 * wave * envelope + 0.01 * rng.standard_normal(t.size))
    return np.stack(out, axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Every format soundfile writes, plus an unreadable, an empty, hidden and other files and a
    symbolic link back up the tree."""
    root = tmp_path_factory.mktemp("own") / "my audio"
    for number, (relative, rate, channels, seconds, fmt, subtype) in enumerate(GOOD):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        sf.write(
            root / relative,
            speechlike(rate, seconds, channels, number),
            rate,
            format=fmt,
            subtype=subtype,
        )
    (root / "broken.flac").write_bytes(np.random.default_rng(1).bytes(4000))
    (root / "sub" / "empty.wav").write_bytes(b"")
    (root / "notes.txt").write_text("not audio")
    sf.write(root / ".hidden.wav", speechlike(16000, 1.0), 16000)
    (root / ".cache").mkdir()
    sf.write(root / ".cache" / "x.wav", speechlike(16000, 1.0), 16000)
    os.symlink("..", root / "sub" / "deeper" / "up")
    return root


def int16(flac: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(flac), dtype="int16")[0]


def expected_signal(path: Path) -> np.ndarray:
    """The file decoded, mixed to mono and resampled to 16 kHz, without w2v_stream."""
    samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    return mono if rate == 16000 else soxr.resample(mono, rate, 16000, quality="HQ")


def test_folder_of_every_format(tree, tmp_path):
    out = tmp_path / "out"
    proc = run_tool(TOOL, tree, "--output_dir", out, "--num_workers", "2")
    samples = read_all(out)
    assert sorted(samples) == sorted(hashed_id(r) for r, *_ in GOOD)
    for relative, rate, channels, _seconds, fmt, _ in GOOD:
        parts = samples[hashed_id(relative)]
        meta = json.loads(parts["json"])
        path = tree / relative
        assert meta["source"] == str(path) and meta["split"] == "train"
        assert meta["speaker_id"] is None and meta["text"] is None
        assert "source_offset" not in meta
        got = int16(parts["flac"])
        assert got.shape[0] == meta["num_samples"]
        if relative.endswith(".flac"):  # 16 kHz mono FLAC: the file itself
            assert parts["flac"] == path.read_bytes() and meta["converted"] is False
            continue
        assert meta["converted"] and meta["original"] == {
            "format": fmt,
            "sample_rate": rate,
            "channels": channels,
        }
        want = expected_signal(path)
        assert got.shape == want.shape
        if rate == 16000:  # nothing to resample: every sample as the file has it
            assert np.array_equal(got, sf.read(str(path), dtype="int16")[0])
        assert np.abs(got / 32768 - want).max() < 2 / 32768
    index = shards.read_index(out)
    problems = index["problems"]
    unreadable = {p["location"]: p["detail"] for p in problems["unreadable_audio"]["items"]}
    assert unreadable.keys() == {str(tree / "broken.flac"), str(tree / "sub" / "empty.wav")}
    assert "empty" in unreadable[str(tree / "sub" / "empty.wav")]
    assert [p["location"] for p in problems["symlink_loop"]["items"]] == [
        str(tree / "sub" / "deeper" / "up")
    ]
    assert problems["converted"]["count"] == 5 and "no_transcript" not in problems
    assert list(index["splits"]) == ["train"] and index["splits"]["train"]["utterances"] == 6
    assert "skipped: unreadable_audio  2" in proc.stdout


def test_a_folder_walked_in_pieces_gives_the_whole_walk(tree, monkeypatch):
    monkeypatch.setattr(inputs, "FILES_PER_PART", 2)
    source = inputs.AudioFolderSource(tree, "train")
    parts = source.parts()
    assert len(parts) == 3  # two runs of two files at the top, then the folder "sub"
    events = list(source.events())
    assert [e for part in parts for e in source.events(part)] == events
    relative = [Path(e.path).relative_to(tree).parts for e in events if isinstance(e, AudioFound)]
    assert relative == sorted(relative) and len(relative) == len(GOOD) + 2


def test_ids_are_safe_unique_and_stable():
    names = [
        "a.wav",
        "a.flac",
        "a/b.wav",
        "a-b.wav",
        "A B/ç é.wav",
        "x" * 300 + ".wav",
        "../up.wav",
        ".a.wav",
    ]
    ids = [hashed_id(n) for n in names]
    assert len(set(ids)) == len(ids)
    for utt_id in ids:
        shards.check_id(utt_id)
        assert len(utt_id) <= 74  # room for a piece number ("-00012")
    assert hashed_id("sub/deeper/d.ogg") == "sub-deeper-d-" + hashed_id("sub/deeper/d.ogg")[-16:]


def test_deterministic_and_resumable_after_a_kill(tree, tmp_path):
    args = [str(tree), "--samples_per_shard", "1"]
    whole, again = tmp_path / "whole", tmp_path / "again"
    run_tool(TOOL, *args, "--output_dir", whole)
    run_tool(TOOL, *args, "--output_dir", again, "--num_workers", "2")
    assert folder_bytes(whole) == folder_bytes(again) and len(list(whole.glob("*.tar"))) == 6
    resumed = tmp_path / "resumed"
    kill_midway(args, resumed)
    done = len(list(resumed.glob("shard-*.tar")))
    assert 2 <= done < 6 and not (resumed / "index.json").exists()
    result = run_tool(TOOL, *args, "--output_dir", resumed)
    assert f"({6 - done} written, {done} kept)" in result.stdout
    assert folder_bytes(resumed) == folder_bytes(whole)


def test_fairseq_manifest_gives_the_folders_samples(tree, tmp_path):
    listed = [r for r, *_ in GOOD[1:4]]
    manifest = tmp_path / "train.tsv"
    lines = [str(tree)] + [f"{r}\t{sf.info(str(tree / r)).frames}" for r in listed]
    manifest.write_text("\n".join(lines + ["missing.wav\t16000", "no tab here", ""]) + "\n")
    folder, listed_out = tmp_path / "folder", tmp_path / "tsv"
    run_tool(TOOL, tree, "--output_dir", folder)
    run_tool(TOOL, manifest, "--output_dir", listed_out, "--split_name", "train")
    from_folder, from_tsv = read_all(folder), read_all(listed_out)
    assert sorted(from_tsv) == sorted(hashed_id(r) for r in listed)
    assert all(from_tsv[k] == from_folder[k] for k in from_tsv)  # audio and metadata
    problems = shards.read_index(listed_out)["problems"]
    assert problems["unreadable_audio"]["items"][0]["location"] == str(tree / "missing.wav")
    assert problems["bad_manifest_line"]["items"][0]["location"] == f"{manifest}:6"


def test_lhotse_cuts_inside_longer_recordings(tmp_path):
    from lhotse import AudioSource, CutSet, MonoCut, Recording, RecordingSet

    mono, stereo = tmp_path / "long.flac", tmp_path / "talk.wav"
    sf.write(mono, speechlike(16000, 12.0), 16000)
    sf.write(stereo, speechlike(16000, 6.0, channels=2, seed=3), 16000)
    rec_mono, rec_stereo = Recording.from_file(mono), Recording.from_file(stereo)
    remote = Recording(
        id="remote",
        sampling_rate=16000,
        num_samples=16000,
        duration=1.0,
        sources=[AudioSource("url", [0], "https://example.com/a.flac")],
    )
    cuts = [
        MonoCut("first-cut", 1.0, 2.5, 0, recording=rec_mono),
        MonoCut("cut.with/odd:id", 5.25, 3.0, 0, recording=rec_mono),
        MonoCut("right", 2.0, 1.5, 1, recording=rec_stereo),
        MonoCut("far", 0.0, 1.0, 0, recording=remote),
        MonoCut("late", 11.0, 3.0, 0, recording=rec_mono),
    ]
    manifest = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    out = tmp_path / "out"
    run_tool(TOOL, manifest, "--output_dir", out, "--split_name", "dev")
    samples = read_all(out)
    assert sorted(samples) == sorted(["first-cut", hashed_id("cut.with/odd:id"), "right"])
    for cut in cuts[:3]:
        parts = samples[hashed_id(cut.id) if "." in cut.id else cut.id]
        meta = json.loads(parts["json"])
        path = cut.recording.sources[0].source
        start, length = round(cut.start * 16000), round(cut.duration * 16000)
        want = sf.read(path, dtype="int16", always_2d=True, start=start, frames=length)[0][
            :, cut.channel
        ]
        assert np.array_equal(int16(parts["flac"]), want)
        # lhotse's own reading of the cut: the same samples.
        assert np.array_equal(int16(parts["flac"]) / 32768, cut.load_audio()[0])
        assert meta["source"] == path and meta["source_offset"] == start
        assert meta["split"] == "dev" and meta["num_samples"] == length
    problems = shards.read_index(out)["problems"]
    assert problems["unsupported_source"]["items"][0]["location"] == f"{manifest}#far"
    late = problems["unreadable_audio"]["items"][0]
    assert late["location"] == f"{manifest}#late" and "past the end" in late["detail"]
    # A cut longer than --max_segment_seconds: pieces, each where it is in the file.
    cut_up = tmp_path / "cut_up"
    run_tool(TOOL, manifest, "--output_dir", cut_up, "--max_segment_seconds", "2")
    pieces = [p for key, p in sorted(read_all(cut_up).items()) if key.startswith("first-cut-")]
    assert len(pieces) == 2
    file_samples = sf.read(mono, dtype="int16")[0]
    for parts in pieces:
        meta = json.loads(parts["json"])
        offset = meta["source_offset"]
        assert np.array_equal(
            int16(parts["flac"]), file_samples[offset : offset + meta["num_samples"]]
        )
    assert json.loads(pieces[0]["json"])["source_offset"] == 16000
    recordings = tmp_path / "recordings.jsonl"
    RecordingSet.from_recordings([rec_mono]).to_file(recordings)
    whole = tmp_path / "whole"
    run_tool(TOOL, recordings, "--output_dir", whole)
    assert read_all(whole)[rec_mono.id]["flac"] == mono.read_bytes()  # a whole file is copied


def test_lhotse_absent_is_one_line_naming_the_pip_command(tmp_path):
    manifest = tmp_path / "cuts.jsonl"
    manifest.write_text("")
    hide = (
        "import sys; sys.modules['lhotse'] = None; sys.argv[0] = 'make_shards'; "
        "from w2v_stream.make_shards import main; sys.exit(main())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide, str(manifest), "--output_dir", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "pip install lhotse==" in proc.stderr


def test_own_audio_mixed_with_librispeech(tree, corpus, tmp_path):
    out = tmp_path / "out"
    run_tool(
        TOOL,
        corpus / SPLIT,
        tree,
        "--output_dir",
        out,
        "--split_name",
        "mine",
        "--audio_extensions",
        "wav",
        "FLAC",
    )
    index = shards.read_index(out)
    assert index["splits"][SPLIT]["utterances"] == 12
    assert index["splits"]["mine"]["utterances"] == 3  # the two WAVs and the FLAC
    metas = [json.loads(p["json"]) for p in read_all(out).values()]
    assert sum("source" in m for m in metas) == 3  # LibriSpeech metadata is as before


def test_numbered_folders_of_your_own_are_not_taken_for_librispeech(corpus, tmp_path):
    from w2v_stream.librispeech import FolderSource, open_sources

    month = tmp_path / "podcasts" / "2021" / "03"
    month.mkdir(parents=True)
    sf.write(month / "2021-03-episode.wav", speechlike(16000, 1.0), 16000)
    own = open_sources([str(tmp_path / "podcasts")])
    assert [type(s) for s in own] == [inputs.AudioFolderSource]
    assert [type(s) for s in open_sources([str(corpus / SPLIT)])] == [FolderSource]
    assert [type(s) for s in open_sources([str(corpus)])] == [FolderSource]
