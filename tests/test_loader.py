"""The streaming loader: shapes from the plan, clean masks, splits, determinism, resume,
remote sources and bad shards."""

from __future__ import annotations

import dataclasses
import functools
import json
import http.server
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from w2v_stream import buckets, epochs, sources
from w2v_stream.loader import StreamingLoader
from w2v_stream.stream import ErrorBudgetExceeded, StreamConfig

MASK = dict(mask_time_prob=0.65, mask_time_length=10, mask_time_min_masks=2, num_negatives=20)


def make_config(spec, policy="pad", num_buckets=3, **kw) -> StreamConfig:
    shard_list = sources.resolve(str(spec), s3_endpoint_url=kw.get("s3_endpoint_url"))
    lengths = [n for shard in shard_list.lengths for n in shard]
    plan = buckets.make_plan(lengths, policy, num_buckets, batch_size=2, min_samples=16_000,
                             max_samples=16_000 * 16)
    kw.setdefault("passes_per_epoch", 1)  # short epochs: the tests cross their boundaries
    return StreamConfig(shard_list, plan, shuffle_seconds=30.0, round_items=4, **MASK, **kw)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def same(a, b) -> bool:
    keys = ("input_values", "attention_mask", "mask_time_indices", "sampled_negative_indices")
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in keys) and len(a) == len(b)


@pytest.mark.parametrize("policy", ["pad", "crop", "pack"])
def test_shapes_masks_negatives_and_normalisation(shard_dir, policy):
    config = make_config(shard_dir, policy)
    plan = config.plan
    batches = take(StreamingLoader(config, num_workers=2), 30)  # several epochs
    assert {tuple(b["input_values"].shape) for b in batches} <= set(plan.shapes())
    for b in batches:
        k = b["bucket"]
        rows, frames = plan.batch_sizes[k], plan.frames[k]
        assert b["mask_time_indices"].shape == b["frame_mask"].shape == (rows, frames)
        assert b["sampled_negative_indices"].shape == (rows, frames, 20)
        mask, valid = b["mask_time_indices"].numpy(), b["frame_mask"].numpy()
        assert not (mask & ~valid).any(), "mask on padding"
        values, attention = b["input_values"].numpy(), b["attention_mask"].numpy()
        assert (values[attention == 0] == 0).all(), "padding must be exact zeros"
        neg = b["sampled_negative_indices"].numpy()
        for row in range(rows):
            for t in np.flatnonzero(mask[row]):
                targets = neg[row, t] - row * frames
                assert (targets != t).all() and mask[row, targets].all()
            n = int(attention[row].sum())
            if n and policy != "pack":  # one utterance per row: normalised over it alone
                assert abs(values[row, :n].mean()) < 1e-3
                assert 0.95 < values[row, :n].std() < 1.001  # below 1 only for near silence
    assert sum(b["num_utterances"] for b in batches) > 0
    for b in batches:  # dummy rows (no audio) carry no mask and no valid frame
        dummy = ~b["attention_mask"].bool().any(-1)
        assert not b["mask_time_indices"][dummy].any() and not b["frame_mask"][dummy].any()


def test_splits_are_disjoint_and_complete_with_uneven_and_few_shards():
    plan = buckets.make_plan([32_000, 64_000, 160_000], "pad", 3, batch_size=2)
    uneven = [[32_000] * 7, [64_000] * 2, [160_000, 32_000, 64_000], [64_000] * 11]
    cases = [(uneven, 4, 1), (uneven, 6, 2), (uneven[:2], 5, 3), (uneven, 1, 1)]
    for shard_lengths, streams, passes in cases:
        ep = epochs.plan_epoch(shard_lengths, plan, streams, epoch=3, seed=1,
                               shuffle_samples=400_000, round_items=3, passes=passes)
        seen = [(i.shard, i.pos) for s in ep.streams for b in s for r in b.rows for i in r]
        expected = [(s, p) for s, lens in enumerate(shard_lengths) for p in range(len(lens))]
        assert sorted(seen) == sorted(expected * passes), "an utterance lost or read twice"
        counts = {len(s) for s in ep.streams}
        assert len(counts) == 1, "streams must yield the same number of batches"
        for step in zip(*ep.streams):
            assert len({b.bucket for b in step}) == 1, "same shape at the same step"
        for s, stream_batches in enumerate(ep.streams):  # a stream only reads its shards
            for b in stream_batches:
                for row in b.rows:
                    for i in row:
                        shard, j, m = ep.reads[s][i.read]
                        assert i.shard == shard and i.pos % m == j


def test_bucket_runs_keep_each_rounds_buckets_together_with_the_same_data():
    rng = np.random.default_rng(5)
    shard_lengths = [list(rng.integers(16_000, 256_000, 40)) for _ in range(6)]
    plan = buckets.make_plan([n for s in shard_lengths for n in s], "pad", 4, batch_size=2,
                             min_samples=16_000, max_samples=256_000)
    args = dict(num_streams=3, epoch=0, seed=2, shuffle_samples=2_000_000, round_items=40)
    mixed = epochs.plan_epoch(shard_lengths, plan, **args)
    runs = epochs.plan_epoch(shard_lengths, plan, **args, bucket_runs=True)

    def items(ep):
        return sorted((i.shard, i.pos) for s in ep.streams for b in s for r in b.rows
                      for i in r)

    def switches(batches):
        return sum(a.bucket != b.bucket for a, b in zip(batches, batches[1:]))

    assert items(runs) == items(mixed)
    assert runs.batches_per_stream == mixed.batches_per_stream
    for step in zip(*runs.streams):
        assert len({b.bucket for b in step}) == 1, "same shape at the same step"
    per_stream = sum(map(len, shard_lengths)) // 3
    rounds = -(-per_stream // 40) + 2  # the rounds, the final flush, one of slack
    assert switches(runs.streams[0]) <= rounds * plan.num_buckets
    assert switches(runs.streams[0]) < switches(mixed.streams[0]) / 2


def test_ranks_agree_on_shapes_and_differ_in_data(shard_dir):
    runs = [take(StreamingLoader(make_config(shard_dir, world_size=2, rank=r), num_workers=2),
                 12) for r in (0, 1)]
    assert [b["input_values"].shape for b in runs[0]] == [b["input_values"].shape
                                                          for b in runs[1]]
    assert not same(runs[0], runs[1])


def test_deterministic_and_exact_resume_across_epochs(shard_dir):
    config = make_config(shard_dir)
    assert make_config(shard_dir, passes_per_epoch=0).passes(2) == 6  # 16 x 2 streams / 6
    whole = take(StreamingLoader(config, num_workers=2), 25)
    assert same(whole, take(StreamingLoader(config, num_workers=2), 25))
    first = StreamingLoader(config, num_workers=2)
    head = take(first, 11)  # 11 is odd: the restart must rotate the workers' roles
    state = first.state_dict()
    assert state["epoch"] >= 1, "the test should cross an epoch boundary"
    resumed = StreamingLoader(config, num_workers=2, state=state)
    assert same(head + take(resumed, 14), whole)
    with pytest.raises(ValueError, match="same seed"):
        StreamingLoader(make_config(shard_dir, seed=5), num_workers=2, state=state)
    with pytest.warns(UserWarning, match="same order"):  # before PCG64: same data, new masks
        old = StreamingLoader(config, num_workers=2, state={**state, "version": 1})
    lengths = [b["attention_mask"].sum(dim=1).tolist() for b in whole[11:17]]
    assert [b["attention_mask"].sum(dim=1).tolist() for b in take(old, 6)] == lengths


def test_upcoming_buckets_are_known_before_any_audio_is_read(shard_dir):
    # The IPU path sizes its host calls with this; it must name exactly the buckets that
    # come, across epochs, for any worker count and rank, and consume nothing.
    for workers, rank in ((2, 0), (0, 1)):
        config = make_config(shard_dir, bucket_runs=True, world_size=2, rank=rank)
        loader = StreamingLoader(config, num_workers=workers)
        predicted = loader.upcoming_buckets(30)
        assert (loader.epoch, loader.position) == (0, 0) and len(set(predicted)) > 1
        batches, got = iter(loader), []
        for i in range(30):
            if i == 13:
                assert loader.upcoming_buckets(17) == predicted[13:]
            got.append(int(next(batches)["bucket"]))
        batches.close()
        assert got == predicted and loader.epoch >= 1


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_http_stream_equals_local(shard_dir):
    server = _serve(shard_dir)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = take(StreamingLoader(make_config(url), num_workers=2), 8)
        pattern = f"{url}/shard-{{000000..000005}}.tar"
        assert sources.resolve(pattern).urls[-1] == f"{url}/shard-000005.tar"
    finally:
        server.shutdown()
    assert same(remote, take(StreamingLoader(make_config(shard_dir), num_workers=2), 8))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_stream_equals_local(shard_dir, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")]:
        monkeypatch.setenv(name, value)
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.create_bucket(Bucket="speech")
                break
            except Exception:
                time.sleep(0.1)
        for path in shard_dir.iterdir():
            client.upload_file(str(path), "speech", f"ls/{path.name}")
        config = make_config("s3://speech/ls", s3_endpoint_url=endpoint)
        remote = take(StreamingLoader(config, num_workers=2), 8)
    finally:
        server.terminate()
        server.wait()
    assert same(remote, take(StreamingLoader(make_config(shard_dir), num_workers=2), 8))


def test_pipe_urls_need_an_explicit_opt_in(shard_dir):
    with pytest.raises(sources.SourceError, match="refused"):
        sources.open_url(f"pipe:cat {shard_dir}/shard-000000.tar")
    with sources.open_url(f"pipe:cat {shard_dir}/shard-000000.tar", allow_pipe=True) as f:
        assert f.read() == (shard_dir / "shard-000000.tar").read_bytes()


def test_corrupt_shards_are_skipped_counted_and_budgeted(shard_dir, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)
    data = (broken / "shard-000001.tar").read_bytes()
    (broken / "shard-000001.tar").write_bytes(data[:1500])  # truncated mid-sample
    (broken / "shard-000003.tar").unlink()  # gone
    config = make_config(broken)
    loader = StreamingLoader(config, num_workers=2, max_bad_fraction=0.9, min_for_budget=1)
    batches = take(loader, 20)
    assert {tuple(b["input_values"].shape) for b in batches} <= set(config.plan.shapes())
    skipped = loader.counters.skipped
    assert skipped["broken_shard"] > 0 and skipped["unreadable_shard"] > 0
    strict = StreamingLoader(config, num_workers=0, max_bad_fraction=0.01, min_for_budget=1)
    with pytest.raises(ErrorBudgetExceeded, match="over the budget"):
        take(strict, 20)


def _one_epoch(loader) -> list:
    batches = []
    for batch in loader:
        batches.append(batch)
        if loader.epoch == 1:
            return batches


def test_bad_audio_and_metadata_are_skipped_by_reason_and_good_data_kept(shard_dir, tmp_path):
    from w2v_stream import shards
    from w2v_stream.audio import encode_flac

    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)

    def rewrite(name, change):
        with open(broken / name, "rb") as f:
            samples = list(shards.iter_samples(f))
        changed = [change(i, key, parts) for i, (key, parts) in enumerate(samples)]
        lengths = [json.loads(p["json"])["num_samples"] for _, p in samples]
        shards.write_shard(broken / name, iter((k, f, m, n) for (k, f, m), n in
                                               zip(changed, lengths)), 16000)

    def shard0(i, key, parts):  # garbage FLAC, then a FLAC cut in half
        flac = b"\x00garbage" * 100 if i == 0 else parts["flac"][:len(parts["flac"]) // 2]
        return key, flac, parts["json"]

    def shard2(i, key, parts):  # malformed JSON, then 8 kHz audio of the indexed length
        if i == 0:
            return key, parts["flac"], b"{not json"
        n = json.loads(parts["json"])["num_samples"]
        return key, encode_flac(np.zeros(n, np.float32), 8000), parts["json"]

    rewrite("shard-000000.tar", shard0)
    rewrite("shard-000002.tar", shard2)
    clean = StreamingLoader(make_config(shard_dir), num_workers=2)
    bad = StreamingLoader(make_config(broken), num_workers=2, max_bad_fraction=0.9,
                          min_for_budget=1)
    clean_batches, bad_batches = _one_epoch(clean), _one_epoch(bad)
    assert len(clean_batches) == len(bad_batches)
    skipped = bad.counters.skipped
    assert skipped["corrupt_audio"] == 2 and skipped["bad_metadata"] == 1
    assert skipped["wrong_format"] == 1 and sum(skipped.values()) == 4
    # Every good utterance still arrives: only the four bad ones are missing.
    assert clean.counters.utterances - bad.counters.utterances == 4
    for batch in bad_batches:  # skipped rows hold exact zeros and no masked frame
        empty = ~batch["attention_mask"].any(dim=1)
        assert not batch["input_values"][empty].any()
        assert not batch["mask_time_indices"][empty].any()


def test_worker_slots_are_reused_and_waited_for(shard_dir):
    from w2v_stream.loader import BatchRing

    config = make_config(shard_dir)
    ring = BatchRing(config, num_workers=1, slots=2)
    writer = ring.writer(0)
    writer.acquire()
    values = writer("input_values", (2, 1000), np.float32)
    values[1, 5] = 2.5
    first = writer.handed_over({"input_values": values, "bucket": 1})
    assert (first.slot, first.shapes, first.info) == (0, {"input_values": (2, 1000)},
                                                      {"bucket": 1})
    writer.acquire()
    assert writer.slot == 1 and ring.busy.tolist() == [[1, 1]]
    threading.Timer(0.2, lambda: ring.take(first)).start()  # the trainer copies slot 0 out
    began = time.perf_counter()
    writer.acquire()  # waits until then
    assert time.perf_counter() - began >= 0.15 and writer.slot == 0
    writer("input_values", (2, 1000), np.float32)[1, 5] = 7.0  # slot 0 is reused
    taken = ring.take(first)
    assert float(taken["input_values"][1, 5]) == 7.0 and taken["bucket"] == 1
    assert not taken["input_values"].is_shared()  # a copy: the trainer's own
    with pytest.raises(TypeError, match="holds float32"):
        writer("input_values", (2, 1000), np.float64)
    bare = BatchRing(dataclasses.replace(config, num_negatives=0), num_workers=1, slots=1)
    assert bare.view(0, 0, "sampled_negative_indices", (2, 40, 0)).shape == (2, 40, 0)


def test_a_ring_larger_than_shared_memory_is_refused_with_a_message(tmp_path):
    from w2v_stream.loader import _check_shared_memory

    _check_shared_memory(1 << 20, str(tmp_path))
    with pytest.raises(RuntimeError, match="shm-size"):
        _check_shared_memory(1 << 62, str(tmp_path))


def test_kept_worker_batches_are_the_in_process_batches(shard_dir):
    """Workers reuse a few shared buffers: batches the trainer keeps must not change, and
    every element of a reused buffer must be written again (in-process batches are fresh)."""
    config = make_config(shard_dir, "pack")
    assert same(take(StreamingLoader(config, num_workers=1), 20),
                take(StreamingLoader(config, num_workers=0), 20))
