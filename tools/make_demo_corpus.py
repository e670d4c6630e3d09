#!/usr/bin/env python
"""Write a synthetic LibriSpeech split of real (eSpeak NG) speech, offline and seeded.

    python tools/make_demo_corpus.py --output_dir exp/demo/LibriSpeech --split dev-clean
    python tools/make_demo_corpus.py --output_dir corpus --hours 1 --archive corpus.tar.gz

The tree is <output_dir>/<split>/<speaker>/<chapter>/<spk>-<chap>-<utt>.flac plus
<spk>-<chap>.trans.txt; --archive and --parquet_dir also write it as an OpenSLR .tar.gz and in
the Hugging Face librispeech_asr parquet layout.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from w2v_stream.demo_corpus import make_demo_corpus, write_hf_parquet, write_openslr_archive
from w2v_stream.progress import Progress

MEAN_UTTERANCE_SECONDS = 13.0  # of the duration mix in demo_corpus.sample_duration


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output_dir", type=Path, required=True, help="the LibriSpeech root")
    p.add_argument("--split", default="dev-clean")
    p.add_argument("--num_speakers", type=int, default=4)
    p.add_argument("--chapters_per_speaker", type=int, default=2)
    p.add_argument("--utterances_per_chapter", type=int, default=5)
    p.add_argument(
        "--hours",
        type=float,
        default=None,
        help="about this much audio: sets --utterances_per_chapter",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num_workers",
        type=int,
        default=2,
        help="processes speaking; the corpus does not depend on it",
    )
    p.add_argument("--archive", type=Path, default=None, help="also write this .tar.gz")
    p.add_argument("--parquet_dir", type=Path, default=None, help="also write HF parquet here")
    args = p.parse_args(argv)
    for name in ("num_speakers", "chapters_per_speaker", "utterances_per_chapter", "num_workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.hours is not None:
        if args.hours <= 0:
            p.error("--hours must be > 0")
        chapters = args.num_speakers * args.chapters_per_speaker
        args.utterances_per_chapter = math.ceil(
            args.hours * 3600 / MEAN_UTTERANCE_SECONDS / chapters
        )
    total = args.num_speakers * args.chapters_per_speaker * args.utterances_per_chapter
    bar = Progress(f"speaking {args.split}", total)
    paths = make_demo_corpus(
        args.output_dir,
        args.split,
        args.num_speakers,
        args.chapters_per_speaker,
        args.utterances_per_chapter,
        args.seed,
        args.num_workers,
        progress=bar.update,
    )
    bar.close()
    print(f"wrote {len(paths)} utterances under {args.output_dir / args.split}")
    if args.archive:
        write_openslr_archive(args.output_dir, args.split, args.archive)
        print(f"wrote {args.archive}")
    if args.parquet_dir:
        for path in write_hf_parquet(args.output_dir, args.split, args.parquet_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
