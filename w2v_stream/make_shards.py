"""``w2v-make-shards`` (also ``python -m w2v_stream.make_shards``, ``tools/make_shards.py``):
LibriSpeech (folder, OpenSLR .tar.gz or HF parquet) or your own audio (any folder of audio
files, a fairseq .tsv or lhotse .jsonl manifest) → WebDataset tar shards + index.json.

    w2v-make-shards LibriSpeech/train-clean-100 --output_dir shards/
    w2v-make-shards LibriSpeech --splits train-clean-100 train-clean-360 --output_dir s
    w2v-make-shards train-clean-100.tar.gz --output_dir shards/ --num_workers 8
    w2v-make-shards my_audio/ --max_segment_seconds 20 --output_dir shards/ --num_workers 8
    w2v-make-shards train.tsv cuts.jsonl.gz --split_name train --output_dir shards/
    w2v-make-shards --verify --output_dir shards/

Exit status: 0 done (problems are listed, not fatal), 1 nothing usable or --verify failed,
2 bad arguments or an unwritable output folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import convert
from .inputs import AUDIO_EXTENSIONS
from .librispeech import open_sources
from .progress import Progress
from .shards import ShardFormatError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="w2v-make-shards",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="LibriSpeech split folder or root, OpenSLR .tar.gz, HF parquet "
        "file/folder, any other folder (its audio files, recursively), "
        "fairseq .tsv manifest, or lhotse .jsonl/.jsonl.gz manifest",
    )
    p.add_argument("--output_dir", required=True, type=Path, help="where shards go")
    p.add_argument(
        "--splits",
        nargs="+",
        default=(),
        help="splits to take from a LibriSpeech root, archive or parquet folder",
    )
    p.add_argument(
        "--split_name",
        default=None,
        help="split name for parquet files whose name does not tell it, and for "
        "audio folders and manifests (for those: train when not given)",
    )
    p.add_argument(
        "--audio_extensions",
        nargs="+",
        default=list(AUDIO_EXTENSIONS),
        metavar="EXT",
        help="the files an audio folder's walk takes",
    )
    p.add_argument(
        "--max_segment_seconds",
        type=float,
        default=None,
        help="cut recordings longer than this into pieces of at most this many "
        "seconds, each cut at the quietest moment of its window's last "
        "third; pieces shorter than --min_duration_in_seconds are dropped "
        "(and counted)",
    )
    p.add_argument(
        "--samples_per_shard", type=int, default=None, help="at most this many utterances per shard"
    )
    p.add_argument(
        "--max_shard_bytes",
        type=int,
        default=100_000_000,
        help="at most this many bytes per shard (0: no limit)",
    )
    p.add_argument(
        "--min_duration_in_seconds",
        type=float,
        default=None,
        help="skip (and count) shorter utterances; with --max_segment_seconds, "
        "also the shortest piece a cut may leave",
    )
    p.add_argument(
        "--max_duration_in_seconds",
        type=float,
        default=None,
        help="skip (and count) longer utterances",
    )
    p.add_argument(
        "--shuffle",
        action="store_true",
        help="shuffle which shard each utterance goes to (else: sorted by id)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --shuffle")
    p.add_argument(
        "--num_workers",
        type=int,
        default=1,
        help="processes probing and writing (at most the CPU count); output is "
        "the same for any count",
    )
    p.add_argument(
        "--full_decode",
        action="store_true",
        help="decode every utterance fully while scanning (default: header and "
        "the last frame, which catches truncation)",
    )
    p.add_argument(
        "--max_buffer_bytes",
        type=int,
        default=1 << 30,
        help="audio held in memory at once when re-reading archives/parquet",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete shards in --output_dir that this run would not write",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check an existing --output_dir against its index.json and exit",
    )
    args = p.parse_args(argv)
    if args.num_workers < 1:
        p.error(f"--num_workers must be >= 1, got {args.num_workers}")
    cpus = os.cpu_count() or 1
    if args.num_workers > cpus:
        print(
            f"make_shards: warning: --num_workers {args.num_workers} is more than the "
            f"{cpus} CPUs here; using {cpus}",
            file=sys.stderr,
        )
        args.num_workers = cpus
    if args.max_shard_bytes < 0:
        p.error(f"--max_shard_bytes must be >= 1 (or 0: no limit), got {args.max_shard_bytes}")
    if not args.verify and not args.inputs:
        p.error("give at least one INPUT (or --verify)")
    try:
        args.options = convert.ShardOptions(
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes or None,
            min_duration_in_seconds=args.min_duration_in_seconds,
            max_duration_in_seconds=args.max_duration_in_seconds,
            shuffle=args.shuffle,
            seed=args.seed,
            full_decode=args.full_decode,
            max_segment_seconds=args.max_segment_seconds,
            max_buffer_bytes=args.max_buffer_bytes,
        )
    except ValueError as exc:  # its messages name the options by their flags' names
        p.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verify:
        return run_verify(args)
    try:
        sources = open_sources(
            args.inputs, tuple(args.splits), args.split_name, args.audio_extensions
        )
    except ValueError as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    bars: dict[str, Progress] = {}

    def progress(stage: str, utterances: int, seconds: float, total: int | None = None) -> None:
        if stage not in bars:
            bars[stage] = Progress(stage, total)
        bars[stage].update(utterances, seconds / 3600)

    try:
        summary = convert.convert(
            sources,
            args.output_dir,
            args.options,
            args.num_workers,
            overwrite=args.overwrite,
            progress=progress,
        )
    except convert.NothingUsable as exc:
        print(f"make_shards: {exc}", file=sys.stderr)
        return 1
    except (PermissionError, FileExistsError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    print(convert.format_summary(summary))
    if summary.long_recordings:
        print(
            f"make_shards: warning: {summary.long_recordings} recordings longer than "
            f"{convert.LONG_RECORDING_SECONDS:.0f} s ({summary.long_seconds / 3600:.3f} h) "
            f"are kept whole; the loader uses one window of each per epoch. Pass "
            f"--max_segment_seconds (e.g. 20) to cut them into pieces at pauses.",
            file=sys.stderr,
        )
    return 0


def run_verify(args) -> int:
    try:
        report = convert.verify(args.output_dir, args.num_workers)
    except ShardFormatError as exc:
        print(f"make_shards: {exc}", file=sys.stderr)
        return 1
    for error in report.errors:
        print(f"verify: {error}")
    status = "OK" if not report.errors else f"FAILED ({len(report.errors)} problems)"
    print(f"verify: {report.shards} shards, {report.utterances} utterances: {status}")
    return 0 if not report.errors else 1


if __name__ == "__main__":
    sys.exit(main())
