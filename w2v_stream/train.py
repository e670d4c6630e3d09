"""``python -m w2v_stream.train``: pre-train Wav2Vec2 from streamed shards.

The only module that sees the whole configuration. One loop, numbered sections, no trainer
classes. Flag names follow transformers' speech-pretraining script where the meaning is the
same. Data parallel through torchrun (gloo on CPU, NCCL on CUDA) or ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import buckets, checkpoint, sources
from .backends import resolve_backend
from .loader import StreamingLoader
from .metrics import MetricsLogger, collapse_warning, format_line
from .model import (DEFAULT_FEATURE_GRAD_MULT, PretrainingObjective, build_model,
                    resolve_config)
from .schedule import SCHEDULES, gumbel_temperature, lr_factor
from .stream import StreamConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m w2v_stream.train", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--train_shards", required=True, nargs="+", help="shard folder/URL/pattern (index.json)")
    a("--eval_shards", nargs="+", default=None, help="held-out shards for eval_loss")
    a("--output_dir", required=True, type=Path)
    a("--preset", choices=["demo", "base", "large"], default=None,
      help="model size with fairseq pre-training values")
    a("--model_name_or_path", default=None, help="local folder with config.json (no download)")
    a("--max_train_steps", type=int, required=True, help="optimizer updates: the only stop")
    a("--num_warmup_steps", type=int, default=0)
    a("--learning_rate", type=float, default=5e-4)
    a("--lr_scheduler_type", choices=SCHEDULES, default="linear")
    a("--weight_decay", type=float, default=0.01)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.98)
    a("--adam_epsilon", type=float, default=1e-6)
    a("--max_grad_norm", type=float, default=None, help="clip the gradient norm (off: None)")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--per_device_train_batch_size", type=int, default=8,
      help="rows of the longest bucket; sets the per-batch sample budget")
    a("--max_tokens", type=int, default=None, help="samples per batch (overrides the above)")
    a("--num_buckets", type=int, default=8)
    a("--length_policy", choices=buckets.POLICIES, default="pad")
    a("--max_duration_in_seconds", type=float, default=20.0)
    a("--min_duration_in_seconds", type=float, default=2.0)
    a("--mask_time_prob", type=float, default=None, help="default: the preset's (0.65)")
    a("--mask_time_length", type=int, default=None, help="default: the preset's (10)")
    a("--num_negatives", type=int, default=None, help="default: the preset's (100)")
    a("--max_gumbel_temperature", type=float, default=2.0)
    a("--min_gumbel_temperature", type=float, default=0.5)
    a("--gumbel_temperature_decay", type=float, default=0.999995)
    a("--feature_grad_mult", type=float, default=DEFAULT_FEATURE_GRAD_MULT)
    a("--gradient_checkpointing", action="store_true")
    a("--backend", default="auto", choices=["auto", "cpu", "cuda", "ipu"])
    a("--ipu_replicas", type=int, default=1,
      help="ipu: data-parallel replicas inside one process (poptorch replication)")
    a("--ipu_device_iterations", type=int, default=1,
      help="ipu: optimizer updates per host call when the next ones share a shape (the "
           "learning rate is held for the call)")
    a("--ipu_executable_cache", type=Path, default=None,
      help="ipu: compiled executables, one per shape (default: OUTPUT_DIR/exe_cache)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 on cuda, fp32 on cpu")
    a("--torch_compile_backend", default=None,
      help="torch.compile backend (cuda default: inductor; cpu default: none, eager)")
    a("--logging_steps", type=int, default=10)
    a("--saving_steps", type=int, default=500)
    a("--save_total_limit", type=int, default=None)
    a("--eval_steps", type=int, default=None, help="eval every N updates (default: saving)")
    a("--eval_batches", type=int, default=8)
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    a("--seed", type=int, default=0)
    a("--num_workers", type=int, default=2, help="loader workers per rank")
    a("--shuffle_seconds", type=float, default=600.0, help="audio per shuffle buffer")
    a("--max_bad_fraction", type=float, default=0.01, help="bad-utterance budget")
    a("--max_skipped_updates", type=int, default=10,
      help="stop after this many non-finite updates in a row")
    a("--allow_pipe_urls", action="store_true", help="let pipe: shard URLs run a command")
    a("--s3_endpoint_url", default=None, help="S3-compatible endpoint for s3:// shards")
    a("--no_tensorboard", action="store_true")
    args = p.parse_args(argv)
    problems = []
    if args.preset and args.model_name_or_path:
        problems.append("give --preset or --model_name_or_path, not both")
    if not args.preset and not args.model_name_or_path:
        problems.append("give --preset {demo,base,large} or --model_name_or_path")
    for name in ("max_train_steps", "gradient_accumulation_steps", "per_device_train_batch_size",
                 "num_buckets", "logging_steps", "saving_steps", "eval_batches", "ipu_replicas",
                 "ipu_device_iterations"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if args.num_warmup_steps < 0 or args.num_warmup_steps > args.max_train_steps:
        problems.append("--num_warmup_steps must be within 0..max_train_steps")
    if not 0 < args.min_duration_in_seconds < args.max_duration_in_seconds:
        problems.append("need 0 < --min_duration_in_seconds < --max_duration_in_seconds")
    if args.min_gumbel_temperature <= 0 or args.max_gumbel_temperature < \
            args.min_gumbel_temperature or not 0 < args.gumbel_temperature_decay <= 1:
        problems.append("need 0 < min_gumbel_temperature <= max_gumbel_temperature and "
                        "0 < gumbel_temperature_decay <= 1")
    if args.mask_time_prob is not None and not 0 < args.mask_time_prob < 1:
        problems.append("--mask_time_prob must be in (0, 1)")
    if args.learning_rate <= 0:
        problems.append("--learning_rate must be > 0")
    if args.num_workers < 0:
        problems.append("--num_workers must be >= 0")
    if args.backend == "ipu" and args.precision == "bf16":
        problems.append("--backend ipu trains in fp32 here (IPUs have no bf16)")
    if args.backend == "ipu" and args.gradient_checkpointing:
        problems.append("--gradient_checkpointing is torch's recompute, which poptorch does "
                        "not trace: leave it out with --backend ipu")
    for name in ("ipu_replicas", "ipu_device_iterations"):
        if args.backend != "ipu" and getattr(args, name) != 1:
            problems.append(f"--{name} is for --backend ipu")
    if problems:
        p.error("; ".join(problems))
    return args


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def _all_sum(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


_SUM_KEYS = ("loss", "contrastive_loss", "diversity_loss", "codevector_perplexity",
             "code_perplexity", "num_frames")


def _torch_update(step_module, objective, optimizer, backend, micro: list[dict],
                  temperature: float, lr: float, world: int, max_grad_norm: float | None):
    """Forward and backward over an update's micro-batches, the loss normalised once by the
    masked frames of the whole update on every rank. Returns (global masked frames, sums of
    _SUM_KEYS, gradient norm); the caller steps the optimizer if everything is finite."""
    local_masked = sum(float(b["mask_time_indices"].sum()) for b in micro)
    (global_masked,) = _all_sum([local_masked], backend.device)
    temp = torch.tensor(temperature, device=backend.device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # DDP averages gradients over ranks; scaling by world / global masked frames makes
    # the update the gradient of (sum of losses) / (masked frames of the whole update).
    scale = world / max(global_masked, 1.0)
    sums = [0.0] * len(_SUM_KEYS)
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1 or world == 1
        context = (step_module.no_sync() if not sync and hasattr(step_module, "no_sync")
                   else contextlib.nullcontext())
        with context:
            with backend.autocast():
                out = step_module(**backend.to_device(batch), temperature=temp)
            (out["loss"] * scale).backward()
        sums = [s + float(out[k].detach()) for s, k in zip(sums, _SUM_KEYS)]
    norm = float(torch.nn.utils.clip_grad_norm_(objective.parameters(),
                                                max_grad_norm or float("inf")))
    return global_masked, sums, norm


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on weights of linear and conv layers only: not on biases, norms,
    embeddings of the mask or the codebook."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (param.ndim < 2 or "norm" in name or "bias" in name
                    or "masked_spec_embed" in name or "codevectors" in name)
        (plain if no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def make_stream_config(shard_specs, args, config, rank: int, world: int,
                       plan: buckets.ShapePlan | None = None, split: int = 1,
                       bucket_runs: bool = False) -> StreamConfig:
    """The loader's configuration. ``split`` > 1 (IPU) makes each batch one optimizer update
    of ``split`` micro-batches; ``bucket_runs`` keeps batches of one shape together."""
    shard_list = sources.resolve(shard_specs, args.allow_pipe_urls, args.s3_endpoint_url)
    if plan is None:
        lengths = [n for shard in shard_list.lengths for n in shard]
        rate = shard_list.sample_rate
        plan = buckets.make_plan(
            lengths, args.length_policy, args.num_buckets,
            max_tokens=args.max_tokens * split if args.max_tokens else None,
            batch_size=args.per_device_train_batch_size * split, batch_multiple=split,
            min_samples=int(args.min_duration_in_seconds * rate),
            max_samples=int(args.max_duration_in_seconds * rate), sample_rate=rate,
            conv_kernel=config.conv_kernel, conv_stride=config.conv_stride)
    runs = {}
    if bucket_runs:  # rounds big enough to hold several batches of every bucket
        runs = {"bucket_runs": True,
                "round_items": max(256, 4 * max(plan.batch_sizes) * plan.num_buckets)}
    return StreamConfig(shard_list, plan, seed=args.seed, world_size=world, rank=rank,
                        shuffle_seconds=args.shuffle_seconds, **runs,
                        mask_time_prob=config.mask_time_prob,
                        mask_time_length=config.mask_time_length,
                        mask_time_min_masks=config.mask_time_min_masks,
                        num_negatives=config.num_negatives,
                        conv_kernel=tuple(config.conv_kernel),
                        conv_stride=tuple(config.conv_stride),
                        allow_pipe=args.allow_pipe_urls, s3_endpoint_url=args.s3_endpoint_url)


def evaluate(objective, backend, stream_config, args, temperature) -> float:
    """Loss per masked frame over a fixed set of held-out batches, eval mode."""
    objective.eval()
    loss = masked = 0.0
    loader = StreamingLoader(stream_config, num_workers=0)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == args.eval_batches:
                break
            with backend.autocast():
                out = objective(**backend.to_device(batch), temperature=temperature)
            loss += float(out["loss"])
            masked += float(out["num_masked"])
    objective.train()
    loss, masked = _all_sum([loss, masked], temperature.device)
    return loss / max(masked, 1.0)


def train(args: argparse.Namespace) -> dict:
    # 1. Processes, backend, configuration.
    rank, world = _distributed()
    main = rank == 0
    device_kind = resolve_backend(args.backend)
    from .backends.torch_backend import TorchBackend

    ipu = device_kind == "ipu"
    if ipu:
        from .backends.ipu import IpuBackend, call_size, import_poptorch

        import_poptorch()  # fails first, with how to get the Poplar SDK
        if world > 1:
            raise ValueError("--backend ipu runs as one process: data parallel comes from "
                             "--ipu_replicas (poptorch replication), not torchrun")
        precision = "fp32"
        cache = args.ipu_executable_cache or args.output_dir / "exe_cache"
        backend = IpuBackend(args.ipu_replicas, args.gradient_accumulation_steps,
                             args.ipu_device_iterations, str(cache), args.seed)
        host = TorchBackend("cpu")  # eval runs on the host, on the weights copied back
    else:
        precision = args.precision if args.precision != "auto" else (
            "bf16" if device_kind == "cuda" else "fp32")
        compile_backend = args.torch_compile_backend or (
            "inductor" if device_kind == "cuda" else None)
        backend = host = TorchBackend(device_kind, precision, compile_backend)
    torch.manual_seed(args.seed + rank)
    overrides = {"mask_time_prob": args.mask_time_prob,
                 "mask_time_length": args.mask_time_length, "num_negatives": args.num_negatives}
    config = resolve_config(args.preset, args.model_name_or_path, overrides)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    resolved.update(backend_resolved=device_kind, precision_resolved=precision,
                    world_size=world)
    if main:
        (args.output_dir / "train_config.json").write_text(json.dumps(
            {"args": resolved, "model": config.to_dict()}, indent=1, sort_keys=True,
            default=str))
        print(f"config: {json.dumps(resolved, sort_keys=True, default=str)}", flush=True)

    # 2. Data: the shape plan from index.json, the stream of this rank.
    split = backend.split if ipu else 1
    stream_config = make_stream_config(args.train_shards, args, config, rank, world,
                                       split=split, bucket_runs=ipu)
    plan = stream_config.plan
    if main:
        print(f"shape plan ({plan.policy}): {plan.shapes()}", flush=True)
    eval_config = (make_stream_config(args.eval_shards, args, config, rank, world)
                   if args.eval_shards else None)

    # 3. Model, objective, optimizer; resume.
    model = build_model(config)
    objective = PretrainingObjective(model, args.feature_grad_mult,
                                     args.gradient_checkpointing).to(backend.device)
    objective.train()
    betas = (args.adam_beta1, args.adam_beta2)
    if ipu:
        optimizer = backend.optimizer(_param_groups(model, args.weight_decay),
                                      args.learning_rate, betas, args.adam_epsilon,
                                      args.max_grad_norm)
    else:
        optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay),
                                      lr=args.learning_rate, betas=betas,
                                      eps=args.adam_epsilon)
    update, skipped_in_a_row, skipped_total, loader_state = 0, 0, 0, None
    if args.resume_from_checkpoint:
        path = checkpoint.find(args.output_dir, args.resume_from_checkpoint)
        state = checkpoint.load(path, model, optimizer)
        update, skipped_total = state["update"], state.get("skipped_updates", 0)
        loader_state = state["loader"][str(rank)] if str(rank) in state["loader"] else None
        if loader_state is None:
            raise ValueError(f"{path}: no loader state for rank {rank} (world size changed?)")
        if main:
            print(f"resumed from {path} at update {update}", flush=True)
    loader = StreamingLoader(stream_config, num_workers=args.num_workers,
                             max_bad_fraction=args.max_bad_fraction, state=loader_state,
                             multiprocessing_context="forkserver" if world > 1 else "fork",
                             pin_memory=device_kind == "cuda")
    step_module = objective
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(objective)
    if not ipu:
        step_module = backend.prepare(step_module)
    logger = MetricsLogger(args.output_dir, main, tensorboard=not args.no_tensorboard)
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    def save(at: int) -> None:
        if ipu:
            backend.weights_to_host()  # the optimizer state comes back through state_dict()
        states = [None] * world
        state = loader.state_dict()
        if world > 1:
            dist.all_gather_object(states, state)
        else:
            states = [state]
        if main:
            path = checkpoint.save(args.output_dir, at, model, optimizer, {
                "loader": {str(r): s for r, s in enumerate(states)},
                "skipped_updates": skipped_total, "config": resolved,
                "model_config": config.to_dict()}, args.save_total_limit)
            print(f"saved {path}", flush=True)
        if world > 1:
            dist.barrier()

    # 4. The loop: one optimizer update per iteration, normalised once per update.
    batches = iter(loader)
    interval_start, interval_audio = time.perf_counter(), 0.0
    history = []
    eval_every = args.eval_steps or args.saving_steps
    if eval_config and update == 0:
        t0 = torch.tensor(gumbel_temperature(0, args.max_gumbel_temperature,
                                             args.min_gumbel_temperature,
                                             args.gumbel_temperature_decay))
        eval_loss = evaluate(objective, host, eval_config, args, t0.to(host.device))
        logger.log({"step": 0, "eval_loss": eval_loss})
        if main:
            print(f"step {0:>7d} | eval_loss {eval_loss:.4f}", flush=True)
    while update < args.max_train_steps:
        temp_value = gumbel_temperature(update, args.max_gumbel_temperature,
                                        args.min_gumbel_temperature,
                                        args.gumbel_temperature_decay)
        lr = args.learning_rate * lr_factor(update, args.num_warmup_steps, args.max_train_steps,
                                            args.lr_scheduler_type)
        if ipu:  # one host call: poptorch runs the updates, accumulation and steps on device
            events = [args.logging_steps, args.saving_steps] + ([eval_every] if eval_config
                                                                else [])
            next_event = min([args.max_train_steps] + [(update // n + 1) * n for n in events])
            most = args.ipu_device_iterations
            calls = call_size(loader.upcoming_buckets(most) if most > 1 else [], update, most,
                              next_event)
            group = [next(batches) for _ in range(calls)]
            temperatures = [gumbel_temperature(update + i, args.max_gumbel_temperature,
                                               args.min_gumbel_temperature,
                                               args.gumbel_temperature_decay)
                            for i in range(calls)]
            masked = [max(float(b["mask_time_indices"].sum()), 1.0) for b in group]
            out = backend.update(objective, optimizer, group, temperatures, masked, lr)
            sums = [out[k] for k in _SUM_KEYS]
            global_masked, temp_value = sum(masked), temperatures[-1]
            micro_batches = out["micro_batches"]
            interval_audio += sum(float(b["audio_samples"]) for b in group) / plan.sample_rate
            grad_norm = float("nan")  # stays on the device
            finite = math.isfinite(sums[0])
        else:
            calls = 1
            micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
            global_masked, sums, grad_norm = _torch_update(
                step_module, objective, optimizer, backend, micro, temp_value, lr, world,
                args.max_grad_norm)
            micro_batches = len(micro)
            interval_audio += sum(float(b["audio_samples"]) for b in micro) / plan.sample_rate
            finite = math.isfinite(grad_norm) and math.isfinite(sums[0])
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if finite:
            skipped_in_a_row = 0
        else:
            skipped_in_a_row += 1
            skipped_total += 1
            if main:
                what = ("the IPU has applied it: it cannot be skipped there" if ipu
                        else "update skipped")
                print(f"step {update + calls}: non-finite loss or gradient, {what} "
                      f"({skipped_in_a_row} in a row)", flush=True)
            if skipped_in_a_row >= args.max_skipped_updates:
                raise RuntimeError(f"{skipped_in_a_row} non-finite updates in a row: stopping. "
                                   f"Lower --learning_rate, raise --num_warmup_steps, set "
                                   f"--max_grad_norm, or use --precision fp32")
        update += calls

        # 5. Report, evaluate, save.
        if update % args.logging_steps == 0 or update == args.max_train_steps:
            totals = _all_sum(sums + [float(micro_batches)], host.device)
            n = max(global_masked, 1.0)
            record = {
                "step": update, "loss": totals[0] / n, "contrastive_loss": totals[1] / n,
                "diversity_loss": totals[2] / n,
                "percent_masked": 100.0 * global_masked / max(totals[5], 1.0),
                "prob_perplexity": totals[3] / totals[6], "code_perplexity": totals[4] / totals[6],
                "lr": lr, "temperature": temp_value, "grad_norm": grad_norm,
                "padding_efficiency": loader.counters.padding_efficiency(),
                "audio_seconds_per_second": world * interval_audio / max(
                    time.perf_counter() - interval_start, 1e-9),
                "skipped_updates": skipped_total,
                "skipped_utterances": sum(loader.counters.skipped.values())}
            interval_start, interval_audio = time.perf_counter(), 0.0
            logger.log(record)
            history.append(record)
            if main:
                print(format_line(record), flush=True)
                warning = collapse_warning(record, config.num_codevector_groups)
                if warning:
                    print(f"WARNING: {warning}", flush=True)
        if eval_config and (update % eval_every == 0 or update == args.max_train_steps):
            if ipu:
                backend.weights_to_host()
            eval_loss = evaluate(objective, host, eval_config, args,
                                 torch.tensor(temp_value, device=host.device))
            logger.log({"step": update, "eval_loss": eval_loss})
            history.append({"step": update, "eval_loss": eval_loss})
            if main:
                print(f"step {update:>7d} | eval_loss {eval_loss:.4f}", flush=True)
        if update % args.saving_steps == 0 or update == args.max_train_steps or stop["signal"]:
            save(update)
        if stop["signal"]:
            if main:
                print(f"signal {stop['signal']}: checkpoint saved at update {update}, exiting",
                      flush=True)
            break
    batches.close()  # stops the loader workers now, not at interpreter exit
    if ipu:
        backend.weights_to_host()
        backend.close()
    # Drop DDP's reducer while the process group is alive: freed later, it took the last
    # reference to the gloo group and deadlocked against gloo's thread over the GIL.
    del step_module
    gc.collect()
    logger.close()
    # Data parallel must keep every replica identical: check, and say so.
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    if world > 1:
        low, high = torch.tensor([checksum], dtype=torch.float64), torch.tensor(
            [checksum], dtype=torch.float64)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if float(low) != float(high):
            raise RuntimeError(f"replicas diverged: weight checksums {float(low)!r} .. "
                               f"{float(high)!r}")
        dist.destroy_process_group()
    print(f"rank {rank} finished at update {update}, weights checksum {checksum!r}", flush=True)
    return {"update": update, "history": history}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, RuntimeError, sources.SourceError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
