"""Long recordings cut into pieces at pauses: limits, cuts inside pauses, nothing lost."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_make_shards import read_all
from test_own_audio import speechlike

from w2v_stream import segment, shards
from w2v_stream.demo_corpus import write_openslr_archive
from w2v_stream.inputs import hashed_id

from conftest import SPLIT, run_tool

TOOL = "tools/make_shards.py"
RATE = 16000


def bursts_with_pauses(seconds: float, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Speech-like bursts (0.6-3.5 s) between pauses of faint noise (0.25-0.9 s): the
    samples and each pause's (start, stop)."""
    rng = np.random.default_rng(seed)
    pieces, pauses, length = [], [], 0
    while length < seconds * RATE:
        burst = speechlike(RATE, rng.uniform(0.6, 3.5), seed=int(rng.integers(1 << 30)))[:, 0]
        pause = 0.002 * rng.standard_normal(int(rng.uniform(0.25, 0.9) * RATE))
        pieces += [burst, pause.astype(np.float32)]
        pauses.append((length + burst.size, length + burst.size + pause.size))
        length += burst.size + pause.size
    return np.concatenate(pieces)[: int(seconds * RATE)], pauses


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> tuple[Path, list[tuple[int, int]]]:
    """Three minutes of bursts and pauses, a 16-bit FLAC in a folder of its own."""
    samples, pauses = bursts_with_pauses(180.0)
    path = tmp_path_factory.mktemp("long") / "talks" / "three minutes.flac"
    path.parent.mkdir()
    sf.write(path, samples, RATE, subtype="PCM_16")
    return path, pauses


def test_pieces_are_cut_in_pauses_and_lose_nothing(recording, tmp_path):
    path, pauses = recording
    out = tmp_path / "out"
    run_tool(
        TOOL,
        path.parent,
        "--output_dir",
        out,
        "--max_segment_seconds",
        "20",
        "--min_duration_in_seconds",
        "2",
    )
    pieces = [(json.loads(p["json"]), p["flac"]) for _, p in sorted(read_all(out).items())]
    decoded = sf.read(str(path), dtype="int16")[0]
    base = hashed_id("three minutes.flac")
    assert [m["id"] for m, _ in pieces] == [f"{base}-{n:05d}" for n in range(len(pieces))]
    offsets = [m["source_offset"] for m, _ in pieces]
    lengths = [m["num_samples"] for m, _ in pieces]
    assert all(2 * RATE <= n <= 20 * RATE for n in lengths)
    assert sum(lengths) >= 0.95 * decoded.size
    for cut in offsets[1:]:
        assert any(start < cut < stop for start, stop in pauses), f"cut at {cut / RATE:.2f} s"
    # Laid end to end, the pieces are the recording, sample for sample.
    assert offsets == list(np.cumsum([0] + lengths[:-1])) and sum(lengths) == decoded.size
    joined = np.concatenate([sf.read(io.BytesIO(flac), dtype="int16")[0] for _, flac in pieces])
    assert np.array_equal(joined, decoded)
    assert all(m["source"] == str(path) and m["converted"] for m, _ in pieces)
    index = shards.read_index(out)
    assert index["problems"]["segmented"]["count"] == 1
    assert index["totals"]["hours_dropped"] == 0 and index["totals"]["utterances"] == len(pieces)
    assert index["options"]["max_segment_seconds"] == 20
    verified = run_tool(TOOL, "--verify", "--output_dir", out)
    assert f"{len(pieces)} utterances: OK" in verified.stdout


def test_long_recordings_kept_whole_are_warned_about(recording, tmp_path):
    path, _ = recording
    proc = run_tool(TOOL, path.parent, "--output_dir", tmp_path / "out")
    assert "1 recordings longer than 30 s (0.050 h) are kept whole" in proc.stderr
    assert "--max_segment_seconds" in proc.stderr
    assert shards.read_index(tmp_path / "out")["totals"]["utterances"] == 1


def test_a_piece_too_short_is_dropped_and_counted():
    samples = speechlike(RATE, 21.0)[:, 0]  # no pieces of 8 to 10 s make 21 s
    rule = segment.Rule(max_samples=10 * RATE, min_samples=8 * RATE)
    pieces = segment.cut(samples, rule)
    spans = sorted(pieces.kept + pieces.dropped)
    assert spans[0].start == 0 and spans[-1].stop == samples.size
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    assert all(rule.min_samples <= s.stop - s.start <= rule.max_samples for s in pieces.kept)
    assert len(pieces.dropped) == 1
    assert pieces.dropped[0].stop - pieces.dropped[0].start < rule.min_samples
    # Where the rest leaves room, cuts keep the last piece long enough rather than drop it.
    for total in (19.0, 25.0, 29.5):
        roomy = segment.cut(speechlike(RATE, total)[:, 0], rule)
        assert not roomy.dropped and all(
            8 * RATE <= s.stop - s.start <= 10 * RATE for s in roomy.kept
        )


def test_dropped_pieces_are_reported_in_hours(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    sf.write(folder / "long.wav", speechlike(RATE, 21.0), RATE)
    out = tmp_path / "out"
    run_tool(
        TOOL,
        folder,
        "--output_dir",
        out,
        "--max_segment_seconds",
        "10",
        "--min_duration_in_seconds",
        "8",
    )
    index = shards.read_index(out)
    dropped = index["problems"]["short_piece"]
    assert dropped["count"] == 1 and not dropped["kept"] and dropped["hours"] > 0
    assert index["totals"]["hours_dropped"] == dropped["hours"]
    assert index["totals"]["hours"] + dropped["hours"] == pytest.approx(21 / 3600, abs=2e-4)


def test_librispeech_long_utterance_pieces_from_folder_and_archive(corpus_copy, tmp_path):
    chapter = sorted(p for p in corpus_copy.glob("*/*") if p.is_dir())[0]
    sf.write(
        chapter / f"{chapter.parent.name}-{chapter.name}-0100.wav",
        speechlike(44100, 50.0, channels=2),
        44100,
    )
    archive = write_openslr_archive(corpus_copy.parent, SPLIT, tmp_path / f"{SPLIT}.tar.gz")
    outs = []
    for name, source in (("folder", corpus_copy), ("archive", archive)):
        outs.append(tmp_path / name)
        run_tool(
            TOOL,
            source,
            "--output_dir",
            outs[-1],
            "--max_segment_seconds",
            "20",
            "--samples_per_shard",
            "3",
            "--max_buffer_bytes",
            "100000",
        )
    from_folder, from_archive = read_all(outs[0]), read_all(outs[1])
    assert from_folder.keys() == from_archive.keys()
    for key, parts in from_folder.items():  # the same, but where each came from
        assert parts["flac"] == from_archive[key]["flac"]
        meta, other = json.loads(parts["json"]), json.loads(from_archive[key]["json"])
        sources = meta.pop("source", None), other.pop("source", None)
        assert meta == other
        member = f"{chapter.relative_to(corpus_copy)}/{key[:-6]}.wav"
        assert sources == (
            (str(corpus_copy / member), f"{archive}:LibriSpeech/{SPLIT}/{member}")
            if "source_offset" in meta
            else (None, None)
        )
    metas = [json.loads(p["json"]) for p in from_folder.values()]
    pieces = [m for m in metas if "source_offset" in m]
    assert len(pieces) == 3 and sum(m["num_samples"] for m in pieces) == 50 * RATE
    assert all(m["speaker_id"] == int(chapter.parent.name) for m in pieces)


def test_shuffled_pieces_stay_together_in_order(recording, tmp_path):
    path, _ = recording
    folder = tmp_path / "talks"
    folder.mkdir()
    (folder / path.name).symlink_to(path)
    sf.write(folder / "short.wav", speechlike(RATE, 3.0), RATE)
    out = tmp_path / "out"
    run_tool(
        TOOL,
        folder,
        "--output_dir",
        out,
        "--max_segment_seconds",
        "20",
        "--shuffle",
        "--seed",
        "1",
        "--samples_per_shard",
        "4",
    )
    ids = list(read_all(out))
    base = hashed_id("three minutes.flac")
    pieces = [i for i in ids if i.startswith(base)]
    assert len(pieces) > 4 and pieces == sorted(pieces)
    first = ids.index(pieces[0])
    assert ids[first : first + len(pieces)] == pieces
