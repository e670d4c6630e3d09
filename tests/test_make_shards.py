"""tools/make_shards.py end to end: the LibriSpeech input kinds, bad input, resume,
determinism."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from w2v_stream import audio, shards

from conftest import REPO, SPLIT, folder_bytes, run_tool

TOOL = "tools/make_shards.py"


def read_all(out: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for tar in sorted(out.glob("shard-*.tar")):
        with open(tar, "rb") as f:
            samples.update(shards.iter_samples(f))
    return samples


def test_three_input_kinds_give_identical_shards(corpus, corpus_archive, corpus_parquet, tmp_path):
    outs = {}
    for kind, source in [
        ("folder", corpus / SPLIT),
        ("root", corpus),
        ("archive", corpus_archive),
        ("parquet", corpus_parquet),
    ]:
        outs[kind] = tmp_path / kind
        extra = ["--splits", SPLIT] if kind == "root" else []
        run_tool(TOOL, source, "--output_dir", outs[kind], "--samples_per_shard", "5", *extra)
    reference = {k: v for k, v in folder_bytes(outs["folder"]).items() if k.endswith(".tar")}
    assert len(reference) == 3  # 12 utterances, 5 per shard
    for kind, out in outs.items():
        got = {k: v for k, v in folder_bytes(out).items() if k.endswith(".tar")}
        assert got == reference, f"{kind} shards differ from the folder's"
    # FLAC bytes are the source files, byte for byte; metadata is complete and true.
    samples = read_all(outs["archive"])
    sources = sorted((corpus / SPLIT).rglob("*.flac"))
    assert sorted(samples) == [p.stem for p in sources]
    transcripts = {}
    for trans in (corpus / SPLIT).rglob("*.trans.txt"):
        for line in trans.read_text().splitlines():
            transcripts[line.split(" ")[0]] = line.partition(" ")[2]
    for path in sources:
        parts = samples[path.stem]
        assert parts["flac"] == path.read_bytes()
        meta = json.loads(parts["json"])
        assert meta["num_samples"] == sf.info(str(path)).frames
        assert meta["duration"] == round(meta["num_samples"] / 16000, 6)
        assert meta["text"] == transcripts[path.stem] and meta["split"] == SPLIT
        assert (meta["speaker_id"], meta["chapter_id"]) == tuple(
            int(x) for x in path.stem.split("-")[:2]
        )
        assert meta["converted"] is False and meta["sample_rate"] == 16000
    index = shards.read_index(outs["parquet"])
    assert index["totals"]["utterances"] == 12
    assert [s["num_samples"] for s in index["shards"]] == [
        [json.loads(samples[k]["json"])["num_samples"] for k in sorted(samples)[i : i + 5]]
        for i in range(0, 12, 5)
    ]
    assert sum(index["duration_histogram"]["counts"]) == 12
    assert index["splits"][SPLIT]["utterances"] == 12


def _sine(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def _add_transcript(chapter: Path, utt_id: str, text: str) -> None:
    trans = next(chapter.glob("*.trans.txt"))
    trans.write_text(trans.read_text() + f"{utt_id} {text}\n")


def test_bad_inputs_are_reported_and_good_ones_kept(corpus_copy, tmp_path):
    chapter = sorted(p for p in corpus_copy.glob("*/*") if p.is_dir())[0]
    spk, chap = chapter.parent.name, chapter.name
    good = sorted(p.stem for p in corpus_copy.rglob("*.flac"))
    flac = next(chapter.glob("*.flac")).read_bytes()
    (chapter / f"{spk}-{chap}-0100.flac").write_bytes(flac[: len(flac) // 2])  # truncated
    (chapter / f"{spk}-{chap}-0101.flac").write_bytes(b"")  # empty
    (chapter / f"{spk}-{chap}-0102.flac").write_bytes(os.urandom(5000))  # garbage
    sf.write(chapter / f"{spk}-{chap}-0103.wav", _sine(44100, 2.5, 2), 44100)  # stray stereo WAV
    sf.write(chapter / f"{spk}-{chap}-0104.flac", _sine(8000, 3.0), 8000)  # wrong rate
    sf.write(chapter / f"{spk}-{chap}-0105.flac", _sine(16000, 2.0), 16000)  # no transcript
    sf.write(chapter / "notes.flac", _sine(16000, 1.0), 16000)  # not an utterance name
    streamed = bytearray(audio.encode_flac(_sine(16000, 2.2)))  # no length in STREAMINFO,
    streamed[21] &= 0xF0  # as a streaming encoder writes it: the 36-bit length zeroed
    streamed[22:26] = bytes(4)
    (chapter / f"{spk}-{chap}-0107.flac").write_bytes(bytes(streamed))
    for n in ("0103", "0104", "0107"):
        _add_transcript(chapter, f"{spk}-{chap}-{n}", "CONVERTED ONE")
    _add_transcript(chapter, f"{spk}-{chap}-0106", "TEXT WITHOUT AUDIO")
    out = tmp_path / "out"
    proc = run_tool(TOOL, corpus_copy, "--output_dir", out)
    samples = read_all(out)
    expected = good + [f"{spk}-{chap}-{n}" for n in ("0103", "0104", "0105", "0107")]
    assert sorted(samples) == sorted(expected)
    for utt in good:  # every good utterance is there, untouched
        assert samples[utt]["flac"] == next(corpus_copy.rglob(f"{utt}.flac")).read_bytes()
    for n, rate, channels, seconds in (
        ("0103", 44100, 2, 2.5),
        ("0104", 8000, 1, 3.0),
        ("0107", 16000, 1, 2.2),
    ):
        parts = samples[f"{spk}-{chap}-{n}"]
        meta = json.loads(parts["json"])
        info = audio.probe(parts["flac"], full_decode=True)
        assert info.is_target and info.num_samples == meta["num_samples"] == int(16000 * seconds)
        assert meta["converted"] and meta["original"]["sample_rate"] == rate
        assert meta["original"]["channels"] == channels and meta["text"] == "CONVERTED ONE"
    assert (
        json.loads(samples[f"{spk}-{chap}-0107"]["json"])["original"]["length_in_header"] is False
    )
    assert json.loads(samples[f"{spk}-{chap}-0105"]["json"])["text"] is None
    problems = shards.read_index(out)["problems"]
    assert {k: v["count"] for k, v in problems.items()} == {
        "unreadable_audio": 3,
        "converted": 3,
        "no_transcript": 1,
        "transcript_without_audio": 1,
        "unrecognised_name": 1,
    }
    unreadable = {p["id"]: p["detail"] for p in problems["unreadable_audio"]["items"]}
    assert "empty" in unreadable[f"{spk}-{chap}-0101"]
    assert "truncated" in unreadable[f"{spk}-{chap}-0100"]
    assert problems["transcript_without_audio"]["items"][0]["id"] == f"{spk}-{chap}-0106"
    assert re.search(r"skipped: unreadable_audio\s+3 ", proc.stdout)
    assert "total skipped" in proc.stdout


def test_duration_limits_skip_and_count(corpus, tmp_path):
    out = tmp_path / "out"
    run_tool(
        TOOL,
        corpus / SPLIT,
        "--output_dir",
        out,
        "--min_duration_in_seconds",
        "8",
        "--max_duration_in_seconds",
        "15",
    )
    index = shards.read_index(out)
    lengths = [n / 16000 for s in index["shards"] for n in s["num_samples"]]
    problems = index["problems"]
    short = problems.get("too_short", {}).get("count", 0)
    long = problems.get("too_long", {}).get("count", 0)
    assert all(8 <= x <= 15 for x in lengths)
    assert len(lengths) + short + long == 12 and short + long > 0


def test_broken_archive_keeps_what_came_before(corpus_archive, tmp_path):
    broken = tmp_path / "broken.tar.gz"
    data = corpus_archive.read_bytes()
    broken.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "out"
    proc = run_tool(TOOL, broken, "--output_dir", out)
    index = shards.read_index(out)
    assert index["problems"]["broken_archive"]["count"] == 1
    assert 0 < index["totals"]["utterances"] < 12
    assert "broken_archive" in proc.stdout
    for parts in read_all(out).values():  # what was kept is whole
        assert audio.probe(parts["flac"], full_decode=True).num_samples > 0


def test_plain_tar_gives_the_same_shards(corpus_archive, tmp_path):
    import gzip

    plain = tmp_path / f"{SPLIT}.tar"
    plain.write_bytes(gzip.decompress(corpus_archive.read_bytes()))
    outs = {}
    for name, source in [("gz", corpus_archive), ("tar", plain)]:
        outs[name] = tmp_path / name
        run_tool(TOOL, source, "--output_dir", outs[name], "--samples_per_shard", "5")
    shards_of = {
        k: {f: b for f, b in folder_bytes(v).items() if f.endswith(".tar")} for k, v in outs.items()
    }
    assert len(shards_of["gz"]) == 3 and shards_of["tar"] == shards_of["gz"]


def test_parquet_rows_without_audio_or_with_unsafe_ids(corpus_parquet, tmp_path):
    table = pq.read_table(sorted(corpus_parquet.glob("*.parquet"))[0]).to_pylist()
    table[0]["audio"] = None
    table[1]["id"] = "../../evil"
    path = tmp_path / "validation.clean-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(table), path)
    out = tmp_path / "out"
    run_tool(TOOL, path, "--output_dir", out)
    index = shards.read_index(out)
    assert index["problems"]["missing_audio"]["count"] == 1
    assert index["problems"]["unsafe_id"]["count"] == 1
    assert index["totals"]["utterances"] == len(table) - 2
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert all(".." not in name for name in tar.getnames())


def test_same_output_for_any_worker_count_and_seeded_shuffle(corpus, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_tool(
            TOOL,
            corpus,
            "--output_dir",
            out,
            "--samples_per_shard",
            "4",
            "--num_workers",
            workers,
            "--shuffle",
            "--seed",
            "3",
        )
        outs.append(folder_bytes(out))
    assert outs[0] == outs[1]
    order = [k for s in shards.read_index(tmp_path / "w1")["shards"] for k in [s["file"]]]
    assert order == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    ids = list(read_all(tmp_path / "w1"))
    assert ids != sorted(ids)  # shuffled
    other = tmp_path / "seed4"
    run_tool(
        TOOL, corpus, "--output_dir", other, "--samples_per_shard", "4", "--shuffle", "--seed", "4"
    )
    assert list(read_all(other)) != ids and sorted(read_all(other)) == sorted(ids)


_SLOW_RUN = """
import sys, time
import w2v_stream.convert as convert
real = convert.write_shard
def slow(path, samples, rate):
    def trickle():
        for sample in samples:
            time.sleep(0.15)
            yield sample
    return real(path, trickle(), rate)
convert.write_shard = slow
sys.argv = ["make_shards.py"] + sys.argv[1:]
sys.path.insert(0, "tools")
import make_shards
sys.exit(make_shards.main())
"""


def kill_midway(args: list[str], out: Path, settle: float = 0.0) -> None:
    """Run make_shards ``args`` into ``out`` in a real process, slowed down (_SLOW_RUN), and
    SIGKILL it ``settle`` seconds after its second shard is complete."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, *args, "--output_dir", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(list(out.glob("shard-*.tar"))) < 2 and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(settle)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_is_byte_identical(corpus_archive, tmp_path):
    args = [str(corpus_archive), "--samples_per_shard", "3", "--max_buffer_bytes", "2000000"]
    whole = tmp_path / "whole"
    run_tool(TOOL, *args, "--output_dir", whole)
    resumed = tmp_path / "resumed"
    kill_midway(args, resumed, settle=0.2)  # into the next shard: its .tmp is half written
    done = sorted(p.name for p in resumed.glob("shard-*.tar"))
    assert 2 <= len(done) < 4 and not (resumed / "index.json").exists()
    assert list(resumed.glob("*.tmp")), "the kill should leave a partial shard"
    # A finished shard damaged on disk must be rewritten, not trusted.
    with open(resumed / done[0], "r+b") as f:
        f.seek(700)
        f.write(b"\xff" * 16)
    result = run_tool(TOOL, *args, "--output_dir", resumed)
    assert f"({4 - len(done) + 1} written, {len(done) - 1} kept)" in result.stdout
    assert folder_bytes(resumed) == folder_bytes(whole)
    again = run_tool(TOOL, *args, "--output_dir", resumed)
    assert "(0 written, 4 kept)" in again.stdout and folder_bytes(resumed) == folder_bytes(whole)


def test_verify_finds_damage(corpus, tmp_path):
    out = tmp_path / "out"
    run_tool(TOOL, corpus, "--output_dir", out, "--samples_per_shard", "6")
    ok = run_tool(TOOL, "--verify", "--output_dir", out)
    assert "2 shards, 12 utterances: OK" in ok.stdout
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[3000:3100] = b"\0" * 100  # inside the first FLAC's frames
    shard.write_bytes(bytes(data))
    bad = run_tool(TOOL, "--verify", "--output_dir", out, check=False)
    assert bad.returncode == 1
    assert "shard-000001.tar: sha256 differs" in bad.stdout and "FAILED" in bad.stdout


def test_foreign_shards_are_not_silently_mixed(corpus, tmp_path):
    out = tmp_path / "out"
    run_tool(TOOL, corpus, "--output_dir", out, "--samples_per_shard", "2")
    proc = run_tool(TOOL, corpus, "--output_dir", out, "--samples_per_shard", "6", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    run_tool(TOOL, corpus, "--output_dir", out, "--samples_per_shard", "6", "--overwrite")
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert shards.read_index(out)["totals"]["utterances"] == 12


def test_exit_codes_and_messages(tmp_path, corpus):
    junk = tmp_path / "junk" / "1" / "2"
    junk.mkdir(parents=True)
    (junk / "1-2-0000.flac").write_bytes(b"not audio at all")
    nothing = run_tool(TOOL, tmp_path / "junk", "--output_dir", tmp_path / "o", check=False)
    assert nothing.returncode == 1 and "no usable utterance" in nothing.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = run_tool(TOOL, corpus, "--output_dir", blocker / "out", check=False)
    assert unwritable.returncode == 2 and "not writable" in unwritable.stderr
    missing = run_tool(TOOL, tmp_path / "nope", "--output_dir", tmp_path / "o", check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_flag = run_tool(
        TOOL, corpus, "--output_dir", tmp_path / "o", "--num_workers", "0", check=False
    )
    assert bad_flag.returncode == 2 and "--num_workers must be >= 1" in bad_flag.stderr
    bad_range = run_tool(
        TOOL,
        corpus,
        "--output_dir",
        tmp_path / "o",
        "--min_duration_in_seconds",
        "9",
        "--max_duration_in_seconds",
        "3",
        check=False,
    )
    assert bad_range.returncode == 2 and "min_duration_in_seconds 9.0 >" in bad_range.stderr


def test_a_folder_walked_in_pieces_gives_the_whole_walk(corpus_copy):
    from w2v_stream.librispeech import FolderSource

    (corpus_copy / "README.TXT").write_text("not audio")  # a stray file at the top
    (corpus_copy / "zz-notes.flac").write_bytes(b"")  # and a badly named one
    source = FolderSource(corpus_copy)
    parts = source.parts()
    assert parts[0] == "" and len(parts) == 3  # the top, then the two speakers
    pieces = [e for part in parts for e in source.events(part)]
    assert pieces == list(source.events())
    assert any(getattr(e, "reason", None) == "unrecognised_name" for e in pieces)


def test_first_transcript_line_wins_across_speaker_folders(corpus_copy, tmp_path):
    # Workers make each sample's JSON ahead with the transcript of their own speaker folder;
    # an earlier folder's line for the same utterance must still win, as in one walk.
    first, second = sorted(d for d in corpus_copy.iterdir() if d.is_dir())
    victim = sorted(second.rglob("*.flac"))[0].stem
    trans = sorted(first.rglob("*.trans.txt"))[0]
    trans.write_text(trans.read_text() + f"{victim} FROM THE FIRST FOLDER\n")
    texts = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        run_tool(TOOL, str(corpus_copy), "--output_dir", str(out), "--num_workers", workers)
        texts[workers] = {k: json.loads(v["json"])["text"] for k, v in read_all(out).items()}
    assert texts["1"][victim] == texts["2"][victim] == "FROM THE FIRST FOLDER"
    own = second / victim.split("-")[1] / f"{'-'.join(victim.split('-')[:2])}.trans.txt"
    assert victim in own.read_text()  # its own folder's line was there, and lost
    assert texts["1"] == texts["2"]


def test_archive_members_outside_split_speaker_chapter_are_problems(
    corpus, corpus_archive, tmp_path
):
    flac = sorted((corpus / SPLIT).rglob("*.flac"))[0].read_bytes()
    bad = {
        "../../etc/1-2-0090.flac": "unsafe_member",
        f"/abs/{SPLIT}/1/2/1-2-0091.flac": "unsafe_member",
        f"{SPLIT}/1/../2/1-2-0092.flac": "unsafe_member",
        "LibriSpeech/1/2/1-2-0093.flac": "misplaced_member",
        "1-2-0094.flac": "misplaced_member",
        f"{SPLIT}/x/2/1-2-0095.flac": "misplaced_member",
        "LibriSpeech/1/2/1-2.trans.txt": "misplaced_member",
    }
    archive = tmp_path / f"{SPLIT}.tar.gz"
    with tarfile.open(corpus_archive) as good, tarfile.open(archive, "w:gz") as tar:
        for member in good:
            tar.addfile(member, good.extractfile(member) if member.isfile() else None)
        for name in bad:
            data = b"1-2-0093 TEXT\n" if name.endswith(".txt") else flac
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(archive) as tar:
        assert set(bad) <= set(tar.getnames())  # the names are in the archive as written
    out, clean = tmp_path / "out", tmp_path / "clean"
    proc = run_tool(TOOL, archive, "--output_dir", out, "--samples_per_shard", "5")
    run_tool(TOOL, corpus_archive, "--output_dir", clean, "--samples_per_shard", "5")
    assert {k: v for k, v in folder_bytes(out).items() if k.endswith(".tar")} == {
        k: v for k, v in folder_bytes(clean).items() if k.endswith(".tar")
    }
    index = shards.read_index(out)
    assert list(index["splits"]) == [SPLIT] and index["totals"]["utterances"] == 12
    for reason in ("unsafe_member", "misplaced_member"):
        listed = index["problems"][reason]
        expected = sorted(f"{archive}:{name}" for name, why in bad.items() if why == reason)
        assert listed["count"] == len(expected) and not listed["kept"]
        assert sorted(p["location"] for p in listed["items"]) == expected
    assert re.search(r"skipped: unsafe_member\s+3 ", proc.stdout)
    assert re.search(r"skipped: misplaced_member\s+4 ", proc.stdout)


def test_every_flag_is_checked_before_any_work(corpus, tmp_path):
    out = tmp_path / "o"
    for flags, message in [
        (["--num_workers", "-3"], "--num_workers must be >= 1, got -3"),
        (["--samples_per_shard", "0"], "samples_per_shard must be >= 1, got 0"),
        (["--max_shard_bytes", "-5"], "--max_shard_bytes must be >= 1 (or 0: no limit)"),
        (["--max_buffer_bytes", "0"], "max_buffer_bytes must be >= 1, got 0"),
        (["--min_duration_in_seconds", "-1"], "min_duration_in_seconds must be a finite"),
        (["--max_duration_in_seconds", "inf"], "max_duration_in_seconds must be a finite"),
        (["--max_duration_in_seconds", "nan"], "max_duration_in_seconds must be a finite"),
        (
            ["--min_duration_in_seconds", "3", "--max_duration_in_seconds", "3"],
            "min_duration_in_seconds 3.0 >= max_duration_in_seconds 3.0",
        ),
        (["--max_segment_seconds", "0"], "max_segment_seconds must be a finite number > 0"),
        (["--max_segment_seconds", "inf"], "max_segment_seconds must be a finite number"),
        (
            ["--min_duration_in_seconds", "20", "--max_segment_seconds", "20"],
            "min_duration_in_seconds 20.0 >= max_segment_seconds 20.0",
        ),
    ]:
        proc = run_tool(TOOL, corpus, "--output_dir", out, *flags, check=False)
        assert proc.returncode == 2, flags
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (flags, proc.stderr)
        assert not out.exists()  # refused before any work


def test_too_many_workers_are_capped_at_the_cpu_count(corpus, tmp_path):
    out = tmp_path / "o"
    proc = run_tool(TOOL, corpus, "--output_dir", out, "--num_workers", "100000000000000000000")
    cpus = os.cpu_count()
    assert f"is more than the {cpus} CPUs here; using {cpus}" in proc.stderr
    assert shards.read_index(out)["totals"]["utterances"] == 12


def test_verify_names_missing_truncated_and_mismatched_shards(shard_dir, tmp_path):
    import shutil

    from w2v_stream import convert

    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    (out / "shard-000001.tar").unlink()
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[:1500])
    index = json.loads((out / "index.json").read_text())
    index["shards"][3]["num_samples"][0] += 1
    (out / "index.json").write_text(json.dumps(index))
    errors = convert.verify(out).errors
    assert "shard-000001.tar: missing (listed in index.json)" in errors
    assert any(e.startswith("shard-000002.tar: truncated tar member") for e in errors)
    assert "shard-000002.tar: 0 samples, the index lists 2" in errors
    assert any(e.startswith("shard-000003.tar: sample ") and "index_mismatch" in e for e in errors)
    assert not any(e.startswith(("shard-000000", "shard-000004", "shard-000005")) for e in errors)
