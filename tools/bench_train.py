#!/usr/bin/env python
"""Benchmark: training step time per real audio second for each length policy (pad, crop,
pack, segment ids and all) against the HF script's way (random batches padded to the
longest, eager), same model and data, one run.

    python tools/bench_train.py --shards exp/demo/shards/train --steps 30 --preset demo
    python tools/bench_train.py --shards SHARDS --preset base --device cuda --precision bf16 \
        --rows 8 --max_seconds 20 --steps 200      # the GPU comparison (compiled with inductor)

Every contender trains the same model from the same initial weights on the same utterances
with the same per-batch row budget; each runs forward + backward + AdamW. Each ``--policies``
entry: StreamingLoader with that length policy (8 buckets for pad and crop) and
PretrainingObjective with the batch's segment ids, through the trainer's backend
(``--compile``: none on the CPU, inductor on CUDA). "HF way": utterances in shuffled order,
batches of ``--rows`` padded to the longest, transformers' ``_compute_mask_indices`` and
``_sample_negative_indices``, ``Wav2Vec2ForPreTraining.forward``, eager. The contenders take
steps in turn (round robin), so a machine whose speed drifts slows them alike. Reported:
seconds of compute per second of real audio (lower is better) and real audio seconds per
second, after 3 warm-up steps each; steps that compiled a new graph are not timed, and the
number of compiled graphs is reported.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import soundfile as sf
import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    _compute_mask_indices,
    _sample_negative_indices,
)

from w2v_stream import buckets, shards as shard_format, sources
from w2v_stream.backends.torch_backend import TorchBackend
from w2v_stream.loader import StreamingLoader
from w2v_stream.model import PretrainingObjective, build_model, resolve_config
from w2v_stream.stream import StreamConfig, normalise

WARMUP = 3


def hf_batches(shard_list, rows: int, max_samples: int, config, seed: int):
    audio = []
    for url in shard_list.urls:
        with open(url, "rb") as f:
            for _, parts in shard_format.iter_samples(f):
                samples = sf.read(io.BytesIO(parts["flac"]), dtype="float32")[0]
                if samples.shape[0] >= 32_000:
                    audio.append(samples[:max_samples])
    rng = np.random.default_rng(seed)
    model = build_model(config)
    while True:
        order = rng.permutation(len(audio))
        for start in range(0, len(order) - rows + 1, rows):
            chosen = [audio[i] for i in order[start : start + rows]]
            longest = max(a.shape[0] for a in chosen)
            values = np.zeros((rows, longest), np.float32)
            attention = np.zeros((rows, longest), np.int64)
            for r, a in enumerate(chosen):
                values[r, : a.shape[0]] = normalise(a)
                attention[r, : a.shape[0]] = 1
            frames = int(model._get_feat_extract_output_lengths(longest))
            sub = torch.zeros(rows, frames, dtype=torch.long)
            for r, a in enumerate(chosen):
                sub[r, : int(model._get_feat_extract_output_lengths(a.shape[0]))] = 1
            mask = _compute_mask_indices(
                (rows, frames), config.mask_time_prob, config.mask_time_length, sub, 2
            )
            neg = _sample_negative_indices((rows, frames), config.num_negatives, mask)
            yield (
                {
                    "input_values": torch.from_numpy(values),
                    "attention_mask": torch.from_numpy(attention),
                    "mask_time_indices": torch.from_numpy(mask),
                    "sampled_negative_indices": torch.from_numpy(neg).long(),
                },
                sum(a.shape[0] for a in chosen),
            )


@dataclass
class Contender:
    """One way of training, with what its timed steps have added up."""

    label: str
    batches: Iterator[tuple[dict, int]]  # (batch, real audio samples in it)
    step: Callable[[dict], None]
    ran: int = 0
    timed: int = 0
    graphs: int = 0  # graphs compiled during its steps
    compute: float = 0.0  # seconds over timed steps
    audio: float = 0.0  # real audio seconds over timed steps


def timed_step(contender: Contender, sync) -> None:
    """Run one step of ``contender``; time it unless it is a warm-up step or compiled a new
    graph."""
    from torch._dynamo.utils import counters

    batch, real = next(contender.batches)
    graphs = counters["stats"]["unique_graphs"]
    sync()
    start = time.perf_counter()
    contender.step(batch)
    sync()
    contender.ran += 1
    compiled = counters["stats"]["unique_graphs"] - graphs
    contender.graphs += compiled
    if contender.ran > WARMUP and not compiled:
        contender.compute += time.perf_counter() - start
        contender.audio += real / 16_000
        contender.timed += 1


def ours(policy: str, config, shard_list, args) -> Contender:
    """The trainer's own update (forward, backward, clip, step) on ``policy`` batches."""
    plan = buckets.plan_for_shards(
        shard_list.lengths,
        shard_list.sample_rate,
        config.conv_kernel,
        config.conv_stride,
        policy=policy,
        num_buckets=8,
        batch_size=args.rows,
        min_seconds=2.0,
        max_seconds=args.max_seconds,
    )
    torch.manual_seed(0)
    backend = TorchBackend(args.device, args.precision, args.compile)
    model = build_model(config).train().to(backend.device)
    backend.prepare(
        PretrainingObjective(model).train(),
        [{"params": list(model.parameters())}],
        1e-4,
        (0.9, 0.98),
        1e-6,
        None,
    )
    loader = StreamingLoader(StreamConfig(shard_list, plan), num_workers=0)

    def step(batch):
        backend.update(iter([batch]), None, 0, 1, lambda update: (1e-4, 2.0))

    print(f"{policy} plan (rows, samples): {plan.shapes()}")
    label = f"w2v_stream `{policy}` ({plan.num_buckets} shapes), objective with segment ids"
    return Contender(label, ((b, b["audio_samples"]) for b in loader), step)


def hf_way(config, shard_list, args, autocast) -> Contender:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(config).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.set_gumbel_temperature(2.0)

    def step(batch):
        with autocast():
            out = model(**{k: v.to(device) for k, v in batch.items()})
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return Contender(
        "HF script: random batches padded to the longest, eager HF forward",
        hf_batches(shard_list, args.rows, int(args.max_seconds * 16_000), config, 0),
        step,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    p.add_argument("--preset", default="demo")
    p.add_argument(
        "--policies",
        nargs="+",
        choices=buckets.POLICIES,
        default=["pad"],
        help="length policies to run as contenders, beside the HF way",
    )
    p.add_argument("--rows", type=int, default=4, help="rows of the longest bucket / HF batch")
    p.add_argument("--max_seconds", type=float, default=16.0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument(
        "--compile",
        default=None,
        help="torch.compile backend for ours (default: none on cpu, inductor on cuda)",
    )
    args = p.parse_args()

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    config = resolve_config(args.preset, None, {"layerdrop": 0.0})
    shard_list = sources.resolve(args.shards)
    contenders = {policy: ours(policy, config, shard_list, args) for policy in args.policies}
    backend = TorchBackend(args.device, args.precision, args.compile)
    contenders["hf"] = hf_way(config, shard_list, args, backend.autocast)
    while any(c.timed < args.steps for c in contenders.values()):
        for contender in contenders.values():
            if contender.timed < args.steps:
                timed_step(contender, sync)
    compiled_with = backend.compile_backend or "nothing: eager"
    print(
        f"model {args.preset} on {args.device} ({args.precision}, ours compiled with "
        f"{compiled_with}), {args.steps} timed steps each after {WARMUP} warm-up, round "
        f"robin, {torch.get_num_threads()} threads; graphs compiled: "
        + ", ".join(f"{name} {c.graphs}" for name, c in contenders.items())
    )
    print("| way | audio s trained | compute s | compute s per audio s | audio s per s | vs HF |")
    print("|---|---|---|---|---|---|")
    hf = contenders["hf"].compute / contenders["hf"].audio
    for contender in contenders.values():
        per_audio = contender.compute / contender.audio
        print(
            f"| {contender.label} | {contender.audio:.0f} | {contender.compute:.1f} | "
            f"{per_audio:.4f} | {contender.audio / contender.compute:.0f} | "
            f"{hf / per_audio:.2f}x |"
        )


if __name__ == "__main__":
    main()
