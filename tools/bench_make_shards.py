#!/usr/bin/env python
"""Benchmark: shard conversion throughput against the raw-copy limit, in one run.

    python tools/bench_make_shards.py --hours 1 --work_dir exp/bench_shards

Makes (once, cached) a synthetic LibriSpeech split of at least --hours of audio, the same
files as a plain folder of your own audio (not a LibriSpeech layout) and as a plain folder of
16 kHz WAV, then times: the raw-copy limit (read each FLAC, write one tar with Python's
tarfile, no checks), the same copy into tars of the shards' size (one big file can be erratic
in a VM's page cache next to the same bytes in 10 MB files), the copy split over two
processes (how far the machine itself scales), and make_shards' conversion from the
LibriSpeech folder with 1 and 2 workers, from the .tar.gz, from the plain FLAC folder (byte
copies, as the LibriSpeech folder) and from the WAV folder (every file encoded to FLAC) with
1 and 2 workers. Prints a Markdown table: audio hours converted per minute of wall time, per
worker, audio seconds per second per worker, % of each limit, and the CPU seconds all
processes spent per audio hour (what the work costs, apart from how the machine runs it in
parallel).
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import resource
import shutil
import tarfile
import time
from pathlib import Path

import soundfile as sf

from w2v_stream import convert
from w2v_stream.demo_corpus import make_demo_corpus, write_openslr_archive
from w2v_stream.librispeech import open_sources

SPLIT = "train-clean-100"
# 10 MB shards: 8 for the 1-hour corpus, as LibriSpeech 960 h makes ~600 of the default 100 MB.
SHARD_BYTES = 10_000_000


def ensure_corpus(work: Path, hours: float) -> Path:
    root = work / "LibriSpeech"
    done = work / f".corpus-{hours}.done"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        per_chapter = math.ceil(hours * 3600 / 13.0 / 16)  # 8 speakers x 2 chapters
        make_demo_corpus(
            root,
            SPLIT,
            num_speakers=8,
            chapters_per_speaker=2,
            utterances_per_chapter=per_chapter,
            seed=0,
            num_workers=2,
        )
        write_openslr_archive(root, SPLIT, work / f"{SPLIT}.tar.gz")
        done.touch()
    return root / SPLIT


def ensure_plain_folders(work: Path, split_dir: Path) -> tuple[Path, Path]:
    """The split's FLAC files (hard links) in ``plain_flac/<speaker>-<chapter>/``, not a
    LibriSpeech layout, and decoded to 16 kHz 16-bit WAV files in ``plain_wav/``."""
    flac_dir, wav_dir = work / "plain_flac", work / "plain_wav"
    done = work / f".plain-{split_dir.stat().st_mtime_ns}.done"
    if not done.exists():
        for folder in (flac_dir, wav_dir):
            shutil.rmtree(folder, ignore_errors=True)
        for path in sorted(split_dir.rglob("*.flac")):
            group = f"{path.parent.parent.name}-{path.parent.name}"
            (flac_dir / group).mkdir(parents=True, exist_ok=True)
            (wav_dir / group).mkdir(parents=True, exist_ok=True)
            os.link(path, flac_dir / group / path.name)
            samples, rate = sf.read(str(path), dtype="int16")
            sf.write(wav_dir / group / f"{path.stem}.wav", samples, rate, subtype="PCM_16")
        done.touch()
    return flac_dir, wav_dir


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have ended."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def raw_copy(files: list[Path], out: Path) -> tuple[float, float]:
    os.sync()  # what an earlier run wrote is flushed before, not during, the timing
    cpu, start = cpu_seconds(), time.perf_counter()
    _copy_untimed(files, out)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    out.unlink()
    return wall, cpu


def raw_copy_sharded(files: list[Path], work: Path) -> tuple[float, float]:
    """The raw copy into consecutive tars of at most SHARD_BYTES of FLAC each."""
    groups: list[list[Path]] = [[]]
    size = 0
    for path in files:
        if groups[-1] and size + path.stat().st_size > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += path.stat().st_size
    outs = [work / f"raw-{i:06d}.tar" for i in range(len(groups))]
    os.sync()
    cpu, start = cpu_seconds(), time.perf_counter()
    for group, out in zip(groups, outs):
        _copy_untimed(group, out)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    for out in outs:
        out.unlink()
    return wall, cpu


def raw_copy_split(files: list[Path], work: Path, processes: int) -> tuple[float, float]:
    """The raw copy split over ``processes`` (every n-th file each, one tar each): how far
    this machine's reading and writing scale before any of our work is added. The CPU
    seconds include starting and ending the processes; the wall time does not."""
    os.sync()
    jobs = [(files[i::processes], work / f"raw-{i}.tar") for i in range(processes)]
    cpu = cpu_seconds()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        start = time.perf_counter()
        pool.starmap(_copy_untimed, jobs)
        wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    for _, out in jobs:
        out.unlink()
    return wall, cpu


def _copy_untimed(files: list[Path], out: Path) -> None:
    with tarfile.open(out, "w") as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def timed_convert(inputs: list[str], out: Path, workers: int) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of all processes, audio seconds converted."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    cpu, start = cpu_seconds(), time.perf_counter()
    options = convert.ShardOptions(max_shard_bytes=SHARD_BYTES)
    summary = convert.convert(open_sources(inputs), out, options, workers)
    return time.perf_counter() - start, cpu_seconds() - cpu, summary.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--work_dir", type=Path, default=Path("exp/bench_shards"))
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    args = p.parse_args()
    split_dir = ensure_corpus(args.work_dir, args.hours)
    files = sorted(split_dir.rglob("*.flac"))
    for path in files:  # warm the page cache so every contender reads from memory
        path.read_bytes()
    flac_dir, wav_dir = ensure_plain_folders(args.work_dir, split_dir)
    for path in wav_dir.rglob("*.wav"):
        path.read_bytes()
    out = args.work_dir / "out"
    contenders = [
        ("make_shards, folder", [str(split_dir)], 1),
        ("make_shards, folder", [str(split_dir)], 2),
        ("make_shards, .tar.gz", [str(args.work_dir / f"{SPLIT}.tar.gz")], 1),
        ("make_shards, plain FLAC folder", [str(flac_dir)], 1),
        ("make_shards, WAV folder → FLAC", [str(wav_dir)], 1),
        ("make_shards, WAV folder → FLAC", [str(wav_dir)], 2),
    ]
    # (wall, cpu) of each repeat; a row shows its best wall time and the least CPU time.
    runs: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(contenders))}
    raws, raws_sharded, raws_split = [], [], []
    audio_hours = None
    for _ in range(args.repeats):  # round robin: slow spells of the machine hit every row
        raws.append(raw_copy(files, args.work_dir / "raw.tar"))
        raws_sharded.append(raw_copy_sharded(files, args.work_dir))
        raws_split.append(raw_copy_split(files, args.work_dir, 2))
        for i, (_, inputs, workers) in enumerate(contenders):
            wall, cpu, seconds = timed_convert(inputs, out, workers)
            runs[i].append((wall, cpu))
            audio_hours = seconds / 3600

    def best(timings: list[tuple[float, float]]) -> tuple[float, float]:
        return min(w for w, _ in timings), min(c for _, c in timings)

    best_raw, raw_cpu = best(raws)
    rows = [(label, workers, *best(runs[i])) for i, (label, _, workers) in enumerate(contenders)]
    shutil.rmtree(out, ignore_errors=True)
    size = sum(f.stat().st_size for f in files) / 1e6
    print(
        f"corpus: {len(files)} utterances, {audio_hours:.2f} h, {size:.0f} MB FLAC; "
        f"{os.cpu_count()} cores; best of {args.repeats}"
    )
    print(
        "| run | workers | wall s | audio h/min | h/min per worker | audio s/s per worker | "
        "% of raw-copy limit (one tar) | % of raw copy into 10 MB tars | CPU s per audio h |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    raw_rate = audio_hours / (best_raw / 60)
    sharded, sharded_cpu = best(raws_sharded)
    sharded_rate = audio_hours / (sharded / 60)
    split, split_cpu = best(raws_split)
    table = [
        ("raw copy (read FLAC, tarfile, one tar)", 1, best_raw, raw_cpu),
        ("raw copy into 10 MB tars", 1, sharded, sharded_cpu),
        ("raw copy split over 2 processes", 2, split, split_cpu),
        *rows,
    ]
    for label, workers, wall, cpu in table:
        rate = audio_hours / (wall / 60)
        print(
            f"| {label} | {workers} | {wall:.2f} | {rate:.0f} | {rate / workers:.0f} | "
            f"{rate / workers * 60:.0f} | {100 * rate / workers / raw_rate:.0f} % | "
            f"{100 * rate / workers / sharded_rate:.0f} % | {cpu / audio_hours:.3f} |"
        )
    print(
        f"2-way scaling: raw copy {best_raw / split:.2f}x, make_shards "
        f"{rows[0][2] / rows[1][2]:.2f}x, WAV → FLAC {rows[4][2] / rows[5][2]:.2f}x; CPU of "
        f"2 workers / 1 worker: {rows[1][3] / rows[0][3]:.2f}"
    )


if __name__ == "__main__":
    main()
