"""The streaming loader: shapes from the plan, clean masks, splits, determinism, resume,
remote sources and bad shards."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import re
import shutil
import signal
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

from conftest import REPO

MASK = dict(mask_time_prob=0.65, mask_time_length=10, mask_time_min_masks=2, num_negatives=20)


def make_config(spec, policy="pad", num_buckets=3, **kw) -> StreamConfig:
    shard_list = sources.resolve(str(spec), s3_endpoint_url=kw.get("s3_endpoint_url"))
    plan = buckets.plan_for_shards(
        shard_list.lengths,
        shard_list.sample_rate,
        buckets.DEFAULT_CONV_KERNEL,
        buckets.DEFAULT_CONV_STRIDE,
        policy=policy,
        num_buckets=num_buckets,
        batch_size=2,
        min_seconds=1.0,
        max_seconds=16.0,
    )
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
    keys = (
        "input_values",
        "attention_mask",
        "mask_time_indices",
        "sampled_negative_indices",
        "frame_mask",
        "segment_ids",
    )
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
    for b in batches:  # dummy rows (no audio) carry no mask, no valid frame, no segment
        dummy = ~b["attention_mask"].bool().any(-1)
        assert not b["mask_time_indices"][dummy].any() and not b["frame_mask"][dummy].any()
        ids = b["segment_ids"]
        assert ids.dtype == torch.int32 and ids.shape == b["input_values"].shape
        assert torch.equal(b["attention_mask"], ids > 0) and not ids[dummy].any()
        # Each row numbers its utterances 1..n in order, each starting at a stride multiple.
        for row in ids.numpy():
            starts = np.flatnonzero(np.diff(row, prepend=0) > 0)
            assert (row[starts] == np.arange(1, len(starts) + 1)).all()
            assert (starts % 320 == 0).all()
            assert policy == "pack" or len(starts) <= 1


def test_a_pack_plan_that_does_not_align_to_the_encoders_stride_is_refused(shard_dir):
    config = make_config(shard_dir, "pack")
    unaligned = dataclasses.replace(config.plan, align=1)
    with pytest.raises(ValueError, match="stride is 320"):
        dataclasses.replace(config, plan=unaligned)


def test_splits_are_disjoint_and_complete_with_uneven_and_few_shards():
    plan = buckets.make_plan([32_000, 64_000, 160_000], "pad", 3, batch_size=2)
    uneven = [[32_000] * 7, [64_000] * 2, [160_000, 32_000, 64_000], [64_000] * 11]
    cases = [(uneven, 4, 1), (uneven, 6, 2), (uneven[:2], 5, 3), (uneven, 1, 1)]
    for shard_lengths, streams, passes in cases:
        ep = epochs.plan_epoch(
            shard_lengths,
            plan,
            streams,
            epoch=3,
            seed=1,
            shuffle_samples=400_000,
            round_items=3,
            passes=passes,
        )
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
    plan = buckets.make_plan(
        [n for s in shard_lengths for n in s],
        "pad",
        4,
        batch_size=2,
        min_samples=16_000,
        max_samples=256_000,
    )
    args = dict(num_streams=3, epoch=0, seed=2, shuffle_samples=2_000_000, round_items=40)
    mixed = epochs.plan_epoch(shard_lengths, plan, **args)
    runs = epochs.plan_epoch(shard_lengths, plan, **args, bucket_runs=True)

    def items(ep):
        return sorted((i.shard, i.pos) for s in ep.streams for b in s for r in b.rows for i in r)

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
    runs = [
        take(StreamingLoader(make_config(shard_dir, world_size=2, rank=r), num_workers=2), 12)
        for r in (0, 1)
    ]
    assert [b["input_values"].shape for b in runs[0]] == [b["input_values"].shape for b in runs[1]]
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
    with pytest.raises(ValueError, match="version=1"):
        StreamingLoader(config, num_workers=2, state={**state, "version": 1})


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
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]:
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


def rewrite_shard(path: Path, change) -> None:
    """Write the shard at ``path`` again with ``change(i, key, parts) -> (key, flac, json)``
    applied to its samples (the index keeps their lengths)."""
    from w2v_stream import shards

    with open(path, "rb") as f:
        samples = list(shards.iter_samples(f))
    changed = [change(i, key, parts) for i, (key, parts) in enumerate(samples)]
    lengths = [json.loads(p["json"])["num_samples"] for _, p in samples]
    shards.write_shard(path, iter((k, f, m, n) for (k, f, m), n in zip(changed, lengths)), 16000)


def garbage_flac(i, key, parts):
    return key, b"\x00garbage" * 100, parts["json"]


def test_bad_audio_and_metadata_are_skipped_by_reason_and_good_data_kept(shard_dir, tmp_path):
    from w2v_stream.audio import encode_flac

    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)

    def shard0(i, key, parts):  # garbage FLAC, then a FLAC cut in half
        flac = b"\x00garbage" * 100 if i == 0 else parts["flac"][: len(parts["flac"]) // 2]
        return key, flac, parts["json"]

    def shard2(i, key, parts):  # malformed JSON, then 8 kHz audio of the indexed length
        if i == 0:
            return key, parts["flac"], b"{not json"
        n = json.loads(parts["json"])["num_samples"]
        return key, encode_flac(np.zeros(n, np.float32), 8000), parts["json"]

    rewrite_shard(broken / "shard-000000.tar", shard0)
    rewrite_shard(broken / "shard-000002.tar", shard2)
    clean = StreamingLoader(make_config(shard_dir), num_workers=2, max_epochs=1)
    bad = StreamingLoader(
        make_config(broken), num_workers=2, max_bad_fraction=0.9, min_for_budget=1, max_epochs=1
    )
    clean_batches, bad_batches = list(clean), list(bad)
    # A batch whose every utterance was bad is held back, and counted.
    assert len(clean_batches) == len(bad_batches) + bad.counters.empty_batches
    assert bad.counters.batches == len(bad_batches) and clean.counters.empty_batches == 0
    skipped = bad.counters.skipped
    assert skipped["corrupt_audio"] == 2 and skipped["bad_metadata"] == 1
    assert skipped["wrong_format"] == 1 and sum(skipped.values()) == 4
    # Every good utterance still arrives: only the four bad ones are missing.
    assert clean.counters.utterances - bad.counters.utterances == 4
    for batch in bad_batches:  # skipped rows hold exact zeros and no masked frame
        assert batch["num_utterances"] > 0
        empty = ~batch["attention_mask"].any(dim=1)
        assert not batch["input_values"][empty].any()
        assert not batch["mask_time_indices"][empty].any()
    # Where they came from, and what was wrong, for the budget's message and the checkpoint.
    assert bad.counters.bad_by_shard == {
        str(broken / "shard-000000.tar"): 2,
        str(broken / "shard-000002.tar"): 2,
    }
    pattern = re.compile(re.escape(str(broken)) + r"/shard-00000[02]\.tar: [^ :]+: (\w+): .+")
    reasons = [pattern.fullmatch(e).group(1) for e in bad.counters.bad_examples]
    assert sorted(reasons) == sorted(skipped.elements())
    assert (
        StreamingLoader(make_config(broken), num_workers=2, state=bad.state_dict()).counters
        == bad.counters
    )


def _planned(config: StreamConfig, num_workers: int) -> list[epochs.Batch]:
    """This rank's batches of epoch 0, in the order the loader gives them."""
    plan = config.epoch_plan(0, num_workers)
    sources = [
        epochs.batch_source(config.rank, num_workers, p)
        for p in range(plan.batches_per_stream * max(num_workers, 1))
    ]
    return [plan.streams[s.stream][s.index] for s in sources]


def test_a_batch_of_bad_utterances_only_is_held_back_and_resume_stays_exact(shard_dir, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)
    bad_shards = {1, 4}
    for shard in bad_shards:
        rewrite_shard(broken / f"shard-{shard:06d}.tar", garbage_flac)
    config, clean_config = make_config(broken), make_config(shard_dir)
    planned = _planned(config, 2)
    shards_of = [{i.shard for row in b.rows for i in row} for b in planned]
    all_bad = [bool(s) and s <= bad_shards for s in shards_of]
    untouched = [not (s & bad_shards) for s in shards_of]
    assert any(all_bad) and any(untouched), "the corruption should empty a batch, not all"
    loader = StreamingLoader(
        config, num_workers=2, max_bad_fraction=0.9, min_for_budget=1, max_epochs=1
    )
    got = list(loader)
    clean = list(StreamingLoader(clean_config, num_workers=2, max_epochs=1))
    kept = [p for p in range(len(planned)) if not all_bad[p]]
    assert len(got) == len(kept) and loader.counters.empty_batches == sum(all_bad)
    for batch, p in zip(got, kept):  # the others come at their place, unchanged
        assert batch["bucket"] == planned[p].bucket
        if untouched[p]:
            assert same([batch], [clean[p]])
    # Resume from every state the trainer could have saved: the same batches follow.
    for stop in range(len(got)):
        head = StreamingLoader(config, num_workers=2, max_bad_fraction=0.9, min_for_budget=1)
        take(head, stop + 1)
        rest = list(
            StreamingLoader(
                config,
                num_workers=2,
                max_bad_fraction=0.9,
                min_for_budget=1,
                max_epochs=1,
                state=head.state_dict(),
            )
        )
        assert same(rest, got[stop + 1 :])


def test_the_budget_is_a_rate_from_the_first_utterance_and_names_the_shards(shard_dir, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)
    for path in broken.glob("shard-*.tar"):
        rewrite_shard(path, garbage_flac)
    loader = StreamingLoader(make_config(broken), num_workers=2)  # 1 %, at least 200 seen
    with pytest.raises(ErrorBudgetExceeded) as caught:
        next(iter(loader))  # the first batch's bad utterances are over 1 % of 200
    message = str(caught.value)
    assert loader.counters.batches == 0 and "corrupt_audio" in message
    named = [url for url in loader.counters.bad_by_shard if url in message]
    assert named and all(url.startswith(str(broken)) for url in named)
    assert "tools/make_shards.py --verify" in message
    # One bad utterance in the twelve: within 10 % of at least 20 seen (2), over 4 % (0.8).
    one_bad = tmp_path / "one_bad"
    shutil.copytree(shard_dir, one_bad)
    rewrite_shard(
        one_bad / "shard-000003.tar",
        lambda i, key, parts: (
            garbage_flac(i, key, parts) if i else (key, parts["flac"], parts["json"])
        ),
    )
    within = StreamingLoader(
        make_config(one_bad), num_workers=0, max_bad_fraction=0.1, min_for_budget=20, max_epochs=1
    )
    assert len(list(within)) > 0 and sum(within.counters.skipped.values()) == 1
    over = StreamingLoader(
        make_config(one_bad), num_workers=0, max_bad_fraction=0.04, min_for_budget=20, max_epochs=1
    )
    with pytest.raises(ErrorBudgetExceeded, match=r"shard-000003\.tar"):
        list(over)


@pytest.mark.parametrize("workers", [0, 2])
def test_max_epochs_yields_each_planned_batch_once_then_stops(shard_dir, workers):
    config = make_config(shard_dir, world_size=2, rank=1)
    planned = _planned(config, workers)
    loader = StreamingLoader(config, num_workers=workers, max_epochs=1)
    assert len(planned) == config.epoch_plan(0, workers).batches_per_stream * max(workers, 1)
    got = list(loader)
    assert [int(b["bucket"]) for b in got] == [b.bucket for b in planned]
    rows = [n for b in planned for row in b.rows for n in [len(row)]]
    assert sum(int(b["num_utterances"]) for b in got) == sum(rows)
    assert (loader.epoch, loader.position) == (1, 0) and list(loader) == []
    # Resumed within the epoch, it gives the rest of it.
    head = StreamingLoader(config, num_workers=workers)
    take(head, 3)
    rest = list(StreamingLoader(config, num_workers=workers, max_epochs=1, state=head.state_dict()))
    assert same(rest, got[3:])


def test_kept_worker_batches_are_the_in_process_batches(shard_dir):
    """Workers reuse a few shared buffers: batches the trainer keeps must not change, and
    every element of a reused buffer must be written again (in-process batches are fresh)."""
    config = make_config(shard_dir, "pack")
    assert same(
        take(StreamingLoader(config, num_workers=1), 20),
        take(StreamingLoader(config, num_workers=0), 20),
    )


# A trainer in miniature. Given a signal, its handler asks it to stop: it saves (a second),
# takes one more batch, closes the loader and exits 0. Given "error", it fails after two
# batches with the loader's iteration still open.
TRAINER = """
import signal, sys, time
from w2v_stream import buckets, sources
from w2v_stream.loader import StreamingLoader
from w2v_stream.stream import StreamConfig

shard_list = sources.resolve(sys.argv[1])
plan = buckets.plan_for_shards(shard_list.lengths, shard_list.sample_rate,
                               buckets.DEFAULT_CONV_KERNEL, buckets.DEFAULT_CONV_STRIDE,
                               batch_size=2, min_seconds=1.0, max_seconds=16.0)
stop = []
if sys.argv[2] != "error":
    signal.signal(int(sys.argv[2]), lambda signum, frame: stop.append(signum))
batches = iter(StreamingLoader(StreamConfig(shard_list, plan, passes_per_epoch=1),
                               num_workers=2))
for taken in range(1, 10 ** 6):
    batch = next(batches)
    print("batch", int(batch["bucket"]), flush=True)
    if stop:
        time.sleep(1.0)  # saves a checkpoint
        print("batch", int(next(batches)["bucket"]), flush=True)
        break
    if taken == 5 and sys.argv[2] == "error":
        raise RuntimeError("the trainer fails")
batches.close()
print("closed", flush=True)
"""


def _run_trainer(shard_dir: Path, tmp_path: Path, mode: str) -> subprocess.Popen:
    """The miniature trainer in its own process group (session), started."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    return subprocess.Popen(
        [sys.executable, str(script), str(shard_dir), mode],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _assert_group_gone(pgid: int) -> None:
    """No process of the group (a loader worker) outlives the trainer."""
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "a loader worker outlived the trainer"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_to_the_process_group_reaches_only_the_trainer(shard_dir, tmp_path, signum):
    proc = _run_trainer(shard_dir, tmp_path, str(int(signum)))
    try:
        for _ in range(5):  # the workers are up and handing over batches
            assert proc.stdout.readline().startswith("batch"), proc.stderr.read()
        os.killpg(proc.pid, signum)  # as Ctrl-C, `timeout`, scancel or kill -TERM -PGID
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "closed" and "killed by signal" not in err
    _assert_group_gone(proc.pid)


def test_a_trainer_that_fails_with_the_loader_open_exits_and_its_workers_with_it(
    shard_dir, tmp_path
):
    proc = _run_trainer(shard_dir, tmp_path, "error")
    try:
        out, err = proc.communicate(timeout=60)  # the workers ignore SIGTERM: no hang at exit
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "the trainer fails" in err and out.count("batch") == 5
    _assert_group_gone(proc.pid)
