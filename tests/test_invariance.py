"""End to end: real shards → StreamingLoader → PretrainingObjective.encode with the batch's
segment ids, against each utterance decoded from its shard and encoded alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from w2v_stream import buckets, sources
from w2v_stream.loader import StreamingLoader
from w2v_stream.model import PretrainingObjective, build_model, resolve_config
from w2v_stream.shards import check_sample, iter_samples
from w2v_stream.stream import StreamConfig, normalise

STRIDE = int(np.prod(buckets.DEFAULT_CONV_STRIDE))  # 320 samples a frame
FIELD = buckets.frames_to_min_samples(1)  # 400 samples: one frame's receptive field


def make_config(shard_dir, policy: str) -> StreamConfig:
    shard_list = sources.resolve(str(shard_dir))
    plan = buckets.plan_for_shards(
        shard_list.lengths,
        shard_list.sample_rate,
        buckets.DEFAULT_CONV_KERNEL,
        buckets.DEFAULT_CONV_STRIDE,
        policy=policy,
        num_buckets=3,
        batch_size=2,
        min_seconds=2.0,
        max_seconds=30.0,
    )  # pack: rows of two
    return StreamConfig(
        shard_list, plan, shuffle_seconds=30.0, round_items=4, passes_per_epoch=1, num_negatives=20
    )


def shard_audio(config: StreamConfig) -> dict[tuple[int, int], np.ndarray]:
    """(shard, position) → the utterance decoded from its FLAC and normalised."""
    out = {}
    for shard, url in enumerate(config.shards.urls):
        with open(url, "rb") as f:
            for pos, (_, parts) in enumerate(iter_samples(f, url)):
                flac = check_sample(parts, config.shards.lengths[shard][pos])
                audio, rate = soundfile.read(io.BytesIO(flac), dtype="float32")
                assert rate == config.plan.sample_rate
                out[shard, pos] = normalise(audio)
    return out


def frame_segments(objective: PretrainingObjective, batch: dict) -> torch.Tensor:
    """(B, T) the model's segment id of each frame (0: padding, gap or crossing frames)."""
    with torch.no_grad():
        return objective._features(
            batch["input_values"], batch["attention_mask"], batch["segment_ids"]
        ).segments


@pytest.mark.parametrize("policy", ["pad", "crop", "pack"])
def test_each_loader_utterance_has_the_features_it_has_alone(shard_dir, policy):
    config = make_config(shard_dir, policy)
    plan = config.plan
    torch.manual_seed(0)
    objective = PretrainingObjective(
        build_model(resolve_config("demo", None, {})), packed=policy == "pack"
    ).eval()
    audio = shard_audio(config)
    planned = config.epoch_plan(0, 0).streams[0]  # one stream: the loader without workers
    loader = StreamingLoader(config, num_workers=0, max_epochs=1)
    checked = packed_rows = 0
    for batch, plan_batch in zip(loader, planned, strict=True):
        ids = batch["segment_ids"]
        assert ids.dtype == torch.int32
        assert torch.equal(batch["attention_mask"], ids > 0)
        # The loader's frame mask is where the model finds utterance frames.
        assert torch.equal(batch["frame_mask"], frame_segments(objective, batch) > 0)
        with torch.no_grad():
            encoded = objective.encode(batch["input_values"], batch["attention_mask"], ids)
        length = plan.lengths[batch["bucket"]]
        for i, items in enumerate(plan_batch.rows):
            row_ids = ids[i].numpy()
            assert row_ids.max(initial=0) == len(items), "one id per planned utterance"
            packed_rows += len(items) > 1
            for n, item in enumerate(items, start=1):
                where = np.flatnonzero(row_ids == n)
                begin, end = int(where[0]), int(where[-1]) + 1
                assert begin % STRIDE == 0 and len(where) == end - begin
                assert (
                    end - begin == min(item.length, length)
                    if policy != "crop"
                    else end - begin == length
                )
                values = batch["input_values"][i, begin:end]
                if end - begin == item.length:  # not cropped: the shard's utterance itself
                    assert np.array_equal(values.numpy(), audio[item.shard, item.pos])
                with torch.no_grad():
                    alone = objective.encode(
                        values[None], torch.ones(1, end - begin, dtype=torch.bool)
                    )[0]
                frames = (end - begin - FIELD) // STRIDE + 1
                assert alone.shape[0] == frames
                got = encoded[i, begin // STRIDE : begin // STRIDE + frames]
                error = float((got - alone).abs().max())
                assert error <= 1e-4 * float(alone.abs().max()), (policy, i, n, error)
                checked += 1
    assert checked == sum(len(row) for b in planned for row in b.rows) > 0
    if policy == "pack":
        assert packed_rows > 0, "no row held two utterances: nothing packed was checked"
