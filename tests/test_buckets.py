"""The shape plan: frame formula, optimal boundaries, batch sizes, efficiency."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
from transformers import Wav2Vec2Config
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2Model

from w2v_stream import buckets


def dev_clean_lengths():
    # Real LibriSpeech dev-clean lengths (CC BY 4.0), kept with the tests so a clean clone
    # anywhere runs them.
    path = Path(__file__).parent / "data" / "librispeech-dev-clean.num_samples.tsv"
    return [int(line.split()[1]) for line in path.read_text().splitlines()]


def test_frames_match_transformers():
    model = Wav2Vec2Model(
        Wav2Vec2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            conv_dim=(8,) * 7,
        )
    )
    for n in (400, 401, 719, 720, 16000, 249_600, 320_000):
        expected = int(model._get_feat_extract_output_lengths(n))
        assert buckets.frames_for_samples(n) == expected == (n - 400) // 320 + 1
        assert buckets.frames_for_samples(buckets.frames_to_min_samples(expected)) == expected


def _padded(tops, lengths, tokens):
    """Samples in the batches of one pass: each bucket's count rounded up to whole batches."""
    tops = sorted(tops)
    counts = {t: 0 for t in tops}
    for n in lengths:
        counts[min(t for t in tops if t >= n)] += 1
    return sum(-(-c // (tokens // t)) * (tokens // t) * t for t, c in counts.items())


def test_pad_boundaries_are_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    lengths = (rng.integers(10, 60, size=300) * 320).tolist()
    grid = sorted(set(lengths))
    tokens = 8 * max(grid)
    for k in (2, 3):
        plan = buckets.make_plan(lengths, "pad", num_buckets=k, batch_size=8)
        best = min(
            _padded(list(c) + [max(grid)], lengths, tokens)
            for c in itertools.combinations(grid[:-1], k - 1)
        )
        assert _padded(plan.lengths, lengths, tokens) == best


def test_bucket_rules_and_flat_memory():
    lengths = dev_clean_lengths()
    plan = buckets.make_plan(
        lengths, "pad", 8, batch_size=8, min_samples=32_000, max_samples=320_000
    )
    assert plan.lengths[-1] == 320_000 and len(plan.lengths) == 8
    budget = 8 * 320_000
    for rows, length in plan.shapes():
        assert rows * length <= budget and (rows + 1) * length > budget
    assert plan.bucket_for(31_999) is None
    assert plan.bucket_for(10**7) == 7  # over-long: cropped into the last bucket
    assert plan.lengths[plan.bucket_for(100_000)] >= 100_000
    crop = buckets.make_plan(lengths, "crop", 8, min_samples=32_000, max_samples=320_000)
    k = crop.bucket_for(100_000)
    assert crop.lengths[k] <= 100_000 < (crop.lengths[k + 1] if k + 1 < 8 else 10**9)
    assert buckets.ShapePlan.from_json(plan.to_json()) == plan


def test_efficiency_on_dev_clean():
    lengths = dev_clean_lengths()
    common = dict(batch_size=8, min_samples=32_000, max_samples=320_000)
    pad8 = buckets.padded_efficiency(buckets.make_plan(lengths, "pad", 8, **common), lengths)
    pad16 = buckets.padded_efficiency(buckets.make_plan(lengths, "pad", 16, **common), lengths)
    pack = buckets.padded_efficiency(buckets.make_plan(lengths, "pack", 1, **common), lengths)
    assert 0.85 < pad8["efficiency"] < pad16["efficiency"] < 0.95
    assert pack["efficiency"] >= 0.98 and pack["audio_kept"] == 1.0
    assert pad8["dropped"] == sum(n < 32_000 for n in lengths)


def test_packed_utterances_start_at_multiples_of_the_stride_and_fit_their_rows():
    lengths = dev_clean_lengths()
    plan = buckets.make_plan(
        lengths, "pack", 1, batch_size=8, min_samples=32_000, max_samples=320_000
    )
    assert plan.align == 320  # the default conv stack's total stride
    assert buckets.ShapePlan.from_json(plan.to_json()) == plan
    pad = buckets.make_plan(lengths, "pad", 8, min_samples=32_000, max_samples=320_000)
    assert pad.align == 1 and "align" not in pad.to_json()  # pad and crop plans never pack
    row_length = plan.lengths[0]
    kept = [min(n, row_length) for n in lengths if n >= 32_000]
    rows = buckets.pack_rows(kept, row_length, plan.align)
    assert sorted(i for row in rows for i in row) == list(range(len(kept)))
    gaps = 0
    for row in rows:
        offset = 0
        for i in row:  # in the order they sit in the row
            start = -(-offset // plan.align) * plan.align
            gaps += start - offset
            offset = start + kept[i]
        assert offset <= row_length
    # The gaps cost under 0.1 % of the rows' samples on real dev-clean lengths.
    assert 0 < gaps < 0.001 * len(rows) * row_length
    unaligned = buckets.padded_efficiency(dataclasses.replace(plan, align=1), lengths)
    aligned = buckets.padded_efficiency(plan, lengths)
    assert aligned["efficiency"] >= unaligned["efficiency"] - 0.001


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="length policy"):
        buckets.make_plan([16000], "bucket")
    with pytest.raises(ValueError, match="nothing to plan"):
        buckets.make_plan([1000], "pad", min_samples=16000)


def test_plan_for_shards_is_the_plan_for_all_lengths_with_the_models_conv_stack():
    lengths = dev_clean_lengths()
    shard_lengths = [lengths[i : i + 300] for i in range(0, len(lengths), 300)]
    kernel, stride = (10, 3, 3, 3, 2), (5, 2, 2, 2, 2)  # a shorter stack: more frames
    plan = buckets.plan_for_shards(
        shard_lengths,
        16_000,
        kernel,
        stride,
        num_buckets=4,
        batch_size=6,
        min_seconds=1.5,
        max_seconds=15.0,
    )
    assert plan == buckets.make_plan(
        lengths,
        "pad",
        4,
        batch_size=6,
        min_samples=24_000,
        max_samples=240_000,
        conv_kernel=kernel,
        conv_stride=stride,
    )
    assert plan.frames == tuple(buckets.frames_for_samples(n, kernel, stride) for n in plan.lengths)
    assert plan.frames[-1] > buckets.frames_for_samples(240_000)
    # An IPU batch is one update of split micro-batches: split times the sample budget, each
    # batch size a multiple of split.
    for budget in (None, 400_000):
        host = buckets.plan_for_shards(
            shard_lengths, 16_000, kernel, stride, num_buckets=4, max_tokens=budget, split=6
        )
        assert host == buckets.make_plan(
            lengths,
            "pad",
            4,
            batch_size=48,
            max_tokens=budget and 6 * budget,
            batch_multiple=6,
            min_samples=32_000,
            max_samples=320_000,
            conv_kernel=kernel,
            conv_stride=stride,
        )
        assert all(
            rows % 6 == 0 and rows * n <= 6 * (budget or 8 * 320_000) for rows, n in host.shapes()
        )


def test_plan_buckets_prints_the_trainers_plan_for_the_model(tmp_path):
    from w2v_stream.model import resolve_config

    from conftest import run_tool

    tsv = Path(__file__).parent / "data" / "librispeech-dev-clean.num_samples.tsv"
    flags = ["--num_buckets", "4", "--per_device_train_batch_size", "2"]
    base = run_tool("tools/plan_buckets.py", tsv, "--preset", "base", *flags).stdout
    lengths = dev_clean_lengths()
    plan = buckets.plan_for_shards(
        [lengths],
        16_000,
        buckets.DEFAULT_CONV_KERNEL,
        buckets.DEFAULT_CONV_STRIDE,
        num_buckets=4,
        batch_size=2,
    )
    rows = [line.split() for line in base.splitlines()[2:6]]
    assert [(int(r[2]), int(r[3])) for r in rows] == list(zip(plan.frames, plan.batch_sizes))
    assert base.splitlines()[-1].startswith("padding efficiency: 0.")
    # A model folder with its own conv stack: its frames, as the trainer would plan them.
    config = resolve_config("demo", None, {})
    config.conv_kernel, config.conv_stride, config.conv_dim = [10, 3, 3], [5, 2, 2], [32] * 3
    config.num_feat_extract_layers = 3
    config.save_pretrained(tmp_path)
    own = run_tool("tools/plan_buckets.py", tsv, "--model_name_or_path", tmp_path, *flags).stdout
    frames = [int(line.split()[2]) for line in own.splitlines()[2:6]]
    assert frames == [
        buckets.frames_for_samples(n, (10, 3, 3), (5, 2, 2)) for n in plan.lengths[: len(frames)]
    ] and frames != list(plan.frames)
    ipu = run_tool(
        "tools/plan_buckets.py",
        tsv,
        "--preset",
        "base",
        *flags,
        "--backend",
        "ipu",
        "--ipu_replicas",
        "2",
        "--gradient_accumulation_steps",
        "3",
    ).stdout
    host = buckets.plan_for_shards(
        [lengths],
        16_000,
        buckets.DEFAULT_CONV_KERNEL,
        buckets.DEFAULT_CONV_STRIDE,
        num_buckets=4,
        batch_size=2,
        split=6,
    )
    assert [int(line.split()[3]) for line in ipu.splitlines()[2:6]] == list(host.batch_sizes)
    refused = run_tool("tools/plan_buckets.py", tsv, *flags, check=False)
    assert refused.returncode == 2 and "--preset" in refused.stderr
