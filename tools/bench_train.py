#!/usr/bin/env python
"""Benchmark: training step time per real audio second, bucketed static batches against the
HF script's way (random batches padded to the longest, eager), same model and data, one run.

    python tools/bench_train.py --shards exp/demo/shards/train --steps 30 --preset demo
    python tools/bench_train.py --shards SHARDS --preset base --device cuda --precision bf16 \
        --rows 8 --max_seconds 20 --steps 200      # the GPU comparison (compiled with inductor)

Both sides train the same model from the same initial weights on the same utterances with the
same per-batch row count; both run forward + backward + AdamW. "ours": StreamingLoader (pad,
8 buckets) and PretrainingObjective, through the trainer's backend (``--compile``: none on the
CPU, inductor on CUDA). "HF way": utterances in shuffled order, batches of ``--rows`` padded to
the longest, transformers' ``_compute_mask_indices`` and ``_sample_negative_indices``,
``Wav2Vec2ForPreTraining.forward``, eager. Reported: seconds of compute per second of real audio
(lower is better) and real audio seconds per second, after 3 warm-up steps; steps that compiled
a new graph are not timed, and the number of compiled graphs is reported.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import soundfile as sf
import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import (_compute_mask_indices,
                                                            _sample_negative_indices)

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
            chosen = [audio[i] for i in order[start:start + rows]]
            longest = max(a.shape[0] for a in chosen)
            values = np.zeros((rows, longest), np.float32)
            attention = np.zeros((rows, longest), np.int64)
            for r, a in enumerate(chosen):
                values[r, :a.shape[0]] = normalise(a)
                attention[r, :a.shape[0]] = 1
            frames = int(model._get_feat_extract_output_lengths(longest))
            sub = torch.zeros(rows, frames, dtype=torch.long)
            for r, a in enumerate(chosen):
                sub[r, :int(model._get_feat_extract_output_lengths(a.shape[0]))] = 1
            mask = _compute_mask_indices((rows, frames), config.mask_time_prob,
                                         config.mask_time_length, sub, 2)
            neg = _sample_negative_indices((rows, frames), config.num_negatives, mask)
            yield ({"input_values": torch.from_numpy(values),
                    "attention_mask": torch.from_numpy(attention),
                    "mask_time_indices": torch.from_numpy(mask),
                    "sampled_negative_indices": torch.from_numpy(neg).long()},
                   sum(a.shape[0] for a in chosen))


def timed(steps, batches, step_fn, sync) -> tuple[float, float]:
    """Compute seconds and real audio seconds over ``steps`` timed steps: warm-up steps and
    steps that compiled a new graph are run but not timed."""
    from torch._dynamo.utils import counters

    compute = audio = 0.0
    done = ran = 0
    while done < steps:
        batch, real = next(batches)
        graphs = counters["stats"]["unique_graphs"]
        sync()
        start = time.perf_counter()
        step_fn(batch)
        sync()
        ran += 1
        if ran > WARMUP and counters["stats"]["unique_graphs"] == graphs:
            compute += time.perf_counter() - start
            audio += real / 16_000
            done += 1
    return compute, audio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--preset", default="demo")
    p.add_argument("--rows", type=int, default=4, help="rows of the longest bucket / HF batch")
    p.add_argument("--max_seconds", type=float, default=16.0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", default=None,
                   help="torch.compile backend for ours (default: none on cpu, inductor on cuda)")
    args = p.parse_args()
    from torch._dynamo.utils import counters

    backend = TorchBackend(args.device, args.precision, args.compile)
    compile_backend = backend.compile_backend
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    config = resolve_config(args.preset, None, {"layerdrop": 0.0})
    shard_list = sources.resolve(args.shards)
    max_samples = int(args.max_seconds * 16_000)
    plan = buckets.plan_for_shards(shard_list.lengths, shard_list.sample_rate,
                                   config.conv_kernel, config.conv_stride, policy="pad",
                                   num_buckets=8, batch_size=args.rows, min_seconds=2.0,
                                   max_seconds=args.max_seconds)
    results = {}
    graphs = 0
    for name in ("ours", "hf"):
        torch.manual_seed(0)
        model = build_model(config).train().to(backend.device)
        if name == "ours":  # the trainer's own update: forward, backward, clip, step
            backend.prepare(PretrainingObjective(model).train(),
                            [{"params": list(model.parameters())}], 1e-4, (0.9, 0.98), 1e-6,
                            None)
            loader = StreamingLoader(StreamConfig(shard_list, plan), num_workers=0)
            batches = ((b, b["audio_samples"]) for b in loader)

            def step(batch):
                backend.update(iter([batch]), None, 0, 1, lambda update: (1e-4, 2.0))
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            batches = hf_batches(shard_list, args.rows, max_samples, config, 0)
            model.set_gumbel_temperature(2.0)

            def step(batch):
                with backend.autocast():
                    out = model(**{k: v.to(backend.device) for k, v in batch.items()})
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        torch._dynamo.reset()
        counters.clear()
        results[name] = timed(args.steps, batches, step, sync)
        if name == "ours":
            graphs = counters["stats"]["unique_graphs"]
    print(f"model {args.preset} on {args.device} ({args.precision}, ours compiled with "
          f"{compile_backend or 'nothing: eager'}), {args.steps} timed steps each after "
          f"{WARMUP} warm-up, {torch.get_num_threads()} threads; plan {plan.shapes()}; "
          f"graphs compiled for ours: {graphs} (plan shapes: {plan.num_buckets})")
    print("| way | audio s trained | compute s | compute s per audio s | audio s per s |")
    print("|---|---|---|---|---|")
    labels = {"ours": "w2v_stream: 8 static pad buckets, PretrainingObjective",
              "hf": "HF script: random batches padded to the longest, eager HF forward"}
    for name, (compute, audio) in results.items():
        print(f"| {labels[name]} | {audio:.0f} | {compute:.1f} | {compute / audio:.4f} | "
              f"{audio / compute:.0f} |")
    ratio = (results["hf"][0] / results["hf"][1]) / (results["ours"][0] / results["ours"][1])
    print(f"speed-up per real audio second: {ratio:.2f}x")


if __name__ == "__main__":
    main()
