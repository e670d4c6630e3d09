"""``w2v-plan-buckets`` (also ``python -m w2v_stream.plan_buckets``, ``tools/plan_buckets.py``):
print the shape plan (duration buckets, batch sizes, padding efficiency) for a corpus.

    w2v-plan-buckets shards/train-clean-100 --preset base --num_buckets 8
    w2v-plan-buckets shards/train --preset base --backend ipu \\
        --ipu_config_name recipes/ipu/wav2vec2-base-ipu.json --per_device_train_batch_size 1
    w2v-plan-buckets tests/data/librispeech-dev-clean.num_samples.tsv \\
        --preset base --min_duration_in_seconds 2 --max_duration_in_seconds 20 \\
        --length_policy pack

SOURCE is a shard folder or URL holding index.json, or a text file of `id<TAB>num_samples`
lines. The plan is the trainer's (``buckets.plan_for_shards``) for the same flags and model:
``--preset`` or ``--model_name_or_path`` gives the model's conv stack, which sets the frames
per bucket. Nothing is decoded. The last line is `padding efficiency: X.XXX`: real audio
samples over the samples in the padded batches of one pass, counting partial-batch filler rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import buckets, sources
from .model import PRESETS, resolve_config


def read_lengths(source: str) -> tuple[list[list[int]], int]:
    """Utterance lengths per shard (one list for a text file) and the sample rate."""
    path = Path(source)
    if path.is_file() and not source.endswith(".json"):
        lengths = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    lengths.append(int(line.split("\t")[-1].split()[-1]))
                except ValueError:
                    raise ValueError(
                        f"{source}:{number}: expected id<TAB>num_samples, got {line[:60]!r}"
                    ) from None
        return [lengths], 16_000
    shard_list = sources.resolve(source)
    return [list(shard) for shard in shard_list.lengths], shard_list.sample_rate


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's flags that decide the plan, with its defaults."""
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", choices=sorted(PRESETS), help="the trainer's model preset")
    model.add_argument("--model_name_or_path", help="local folder with config.json")
    p.add_argument("--num_buckets", type=int, default=8, help="batch shapes (pad/crop policies)")
    p.add_argument(
        "--length_policy",
        choices=buckets.POLICIES,
        default="pad",
        help="pad to a bucket, crop to a bucket, or pack into rows of the longest length",
    )
    p.add_argument(
        "--min_duration_in_seconds",
        type=float,
        default=2.0,
        help="shorter utterances are left out",
    )
    p.add_argument(
        "--max_duration_in_seconds",
        type=float,
        default=20.0,
        help="longer utterances are cropped to this",
    )
    p.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=8,
        help="rows of the longest bucket; sets the per-batch sample budget",
    )
    p.add_argument(
        "--max_tokens",
        type=int,
        default=None,
        help="samples per batch (overrides per_device_train_batch_size)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cpu", "cuda", "ipu"],
        help="ipu: each batch is one update of replicas x accumulation micro-batches",
    )
    p.add_argument(
        "--ipu_config_name",
        type=Path,
        default=None,
        help="ipu: optimum-graphcore's ipu_config.json (replicas, accumulation)",
    )
    p.add_argument(
        "--ipu_replicas",
        type=int,
        default=None,
        help="ipu: replicas (default: the ipu_config's, else 1)",
    )
    p.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=None,
        help="ipu: micro-batches per update (default: the ipu_config's, else 1)",
    )


def plan_from_args(args, shard_lengths: list[list[int]], sample_rate: int) -> buckets.ShapePlan:
    config = resolve_config(args.preset, args.model_name_or_path, {})
    split = 1
    if args.backend == "ipu":  # each batch is one update: replicas x accumulation rows apart
        from .backends import ipu_config

        settings = ipu_config.resolve(
            args.ipu_config_name,
            replication_factor=args.ipu_replicas,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
        split = settings.replication_factor * settings.gradient_accumulation_steps
    return buckets.plan_for_shards(
        shard_lengths,
        sample_rate,
        config.conv_kernel,
        config.conv_stride,
        policy=args.length_policy,
        num_buckets=args.num_buckets,
        batch_size=args.per_device_train_batch_size,
        max_tokens=args.max_tokens,
        min_seconds=args.min_duration_in_seconds,
        max_seconds=args.max_duration_in_seconds,
        split=split,
    )


def format_plan(plan: buckets.ShapePlan, stats: dict) -> str:
    rate = plan.sample_rate
    lines = [
        (
            f"policy {plan.policy}: {plan.num_buckets} shape(s), "
            f"{plan.min_samples / rate:.1f}-{plan.max_samples / rate:.1f} s, "
            f"{stats['dropped']} utterances dropped as too short"
        ),
        (
            f"{'bucket':>6} {'padded s':>9} {'frames':>7} {'batch':>6} {'share':>7} "
            f"{'batches':>8} {'efficiency':>10}"
        ),
    ]
    for k in range(plan.num_buckets):
        lines.append(
            f"{k:>6} {plan.lengths[k] / rate:>9.2f} {plan.frames[k]:>7} "
            f"{plan.batch_sizes[k]:>6} {stats['share'][k]:>7.1%} "
            f"{stats['batches'][k]:>8} {stats['bucket_efficiency'][k]:>10.3f}"
        )
    if plan.policy != "pad":
        lines.append(f"audio kept: {stats['audio_kept']:.3f}")
    lines.append(f"padding efficiency: {stats['efficiency']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="w2v-plan-buckets",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="shard folder/URL with index.json, or an id<TAB>num_samples file")
    add_plan_arguments(p)
    args = p.parse_args(argv)
    try:
        shard_lengths, rate = read_lengths(args.source)
        plan = plan_from_args(args, shard_lengths, rate)
    except (ValueError, OSError) as exc:
        print(f"plan_buckets: error: {exc}", file=sys.stderr)
        return 2
    lengths = [n for shard in shard_lengths for n in shard]
    print(format_plan(plan, buckets.padded_efficiency(plan, lengths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
