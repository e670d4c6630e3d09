"""``python -m w2v_stream.train``: pre-train Wav2Vec2 from streamed shards.

The only module that sees the whole configuration. One loop, numbered sections, no trainer
classes and no device branch: everything that knows a device is a ``backends.Backend``. Flag
names follow transformers' speech-pretraining script where the meaning is the same. Data
parallel through torchrun (gloo on CPU, NCCL on CUDA) or ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from . import buckets, checkpoint, rundir, sources
from .backends import SUMMED_OUTPUTS, UpdateResult, create_backend
from .backends.ipu_config import IpuConfigError, resolve as resolve_ipu_config
from .loader import StreamingLoader
from .metrics import MetricsLogger, collapse_warning, format_line
from .model import (
    DEFAULT_FEATURE_GRAD_MULT,
    PRESET_TRAINING,
    PretrainingObjective,
    build_model,
    load_pretrained,
    resolve_config,
)
from .ring import RING_SLOTS_EXTRA, slot_bytes
from .schedule import SCHEDULES, gumbel_temperature, lr_factor
from .stream import StreamConfig, batch_arrays


def _number(
    kind: type,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):
    """An argparse type: a finite ``kind`` (int or float) within [low, high], or (low, high)
    where an end is open."""
    bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
    bounds += [f"{'<' if high_open else '<='} {high:g}"] if high is not None else []
    wanted = f"a finite {'integer' if kind is int else 'number'} {' and '.join(bounds)}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT = _number(int, 1)  # how many: at least one
LIMIT = _number(int, 0)  # a limit, an offset or a seed: zero or more
POSITIVE = _number(float, 0, low_open=True)
NONNEGATIVE = _number(float, 0)
PROBABILITY = _number(float, 0, 1, low_open=True, high_open=True)
FRACTION = _number(float, 0, 1)
BETA = _number(float, 0, 1, high_open=True)
DECAY = _number(float, 0, 1, low_open=True)


def _data_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("shards and output").add_argument
    a("--train_shards", required=True, nargs="+", help="shard folder/URL/pattern (index.json)")
    a("--eval_shards", nargs="+", default=None, help="held-out shards for eval_loss")
    a(
        "--output_dir",
        required=True,
        type=Path,
        help="checkpoints, metrics.jsonl, TensorBoard events; one run at a time (locked)",
    )


def _model_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("model").add_argument
    a(
        "--preset",
        choices=["demo", "base", "large"],
        default=None,
        help="model size with fairseq pre-training values",
    )
    a(
        "--model_name_or_path",
        default=None,
        help="local folder with config.json: its architecture, random weights (no download)",
    )
    a(
        "--init_from",
        default=None,
        metavar="PATH_OR_HUB_ID",
        help="continued pre-training: start from these weights (a save_pretrained folder, a "
        "checkpoint-N folder, or a hub id transformers resolves), with fresh optimizer, "
        "schedule and step; the model's config, with pre-training masking",
    )


def _optimizer_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("optimization").add_argument
    a("--max_train_steps", type=COUNT, required=True, help="optimizer updates: the only stop")
    a("--num_warmup_steps", type=LIMIT, default=0, help="linear warmup updates")
    a("--learning_rate", type=POSITIVE, default=5e-4, help="peak learning rate")
    a("--lr_scheduler_type", choices=SCHEDULES, default="linear", help="decay after warmup")
    a(
        "--lr_power",
        type=POSITIVE,
        default=1.0,
        help="polynomial decay's power (1.0: fairseq's and transformers' default)",
    )
    a(
        "--weight_decay",
        type=NONNEGATIVE,
        default=0.01,
        help="AdamW decay of linear and conv weights",
    )
    a("--adam_beta1", type=BETA, default=0.9, help="AdamW's first-moment decay")
    a("--adam_beta2", type=BETA, default=0.98, help="AdamW's second-moment decay (fairseq)")
    a("--adam_epsilon", type=POSITIVE, default=1e-6, help="AdamW's denominator floor")
    a("--max_grad_norm", type=POSITIVE, default=None, help="clip the gradient norm (off: None)")
    a(
        "--gradient_accumulation_steps",
        type=COUNT,
        default=None,
        help="micro-batches per optimizer update (default: 1, or the --ipu_config_name file's)",
    )


def _batch_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("batches: the shape plan").add_argument
    a(
        "--per_device_train_batch_size",
        type=COUNT,
        default=8,
        help="rows of the longest bucket; sets the per-batch sample budget",
    )
    a("--max_tokens", type=COUNT, default=None, help="samples per batch (overrides the above)")
    a("--num_buckets", type=COUNT, default=8, help="batch shapes (pad/crop policies)")
    a(
        "--length_policy",
        choices=buckets.POLICIES,
        default="pad",
        help="how utterances fill a fixed shape",
    )
    a(
        "--max_duration_in_seconds",
        type=POSITIVE,
        default=20.0,
        help="longer utterances are cropped to this",
    )
    a(
        "--min_duration_in_seconds",
        type=POSITIVE,
        default=2.0,
        help="shorter utterances are left out",
    )


def _objective_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("masking, quantizer and loss terms").add_argument
    a("--mask_time_prob", type=PROBABILITY, default=None, help="default: the preset's (0.65)")
    a("--mask_time_length", type=COUNT, default=None, help="default: the preset's (10)")
    a("--num_negatives", type=COUNT, default=None, help="default: the preset's (100)")
    a(
        "--max_gumbel_temperature",
        type=POSITIVE,
        default=2.0,
        help="the quantizer's gumbel temperature at update 0",
    )
    a(
        "--min_gumbel_temperature",
        type=POSITIVE,
        default=None,
        help="default: the preset's (fairseq: 0.5 BASE, 0.1 LARGE), else 0.5",
    )
    a(
        "--gumbel_temperature_decay",
        type=DECAY,
        default=0.999995,
        help="the temperature is max(max * decay**update, min)",
    )
    a(
        "--feature_grad_mult",
        type=NONNEGATIVE,
        default=None,
        help="scales the feature encoder's gradient (fairseq's GradMultiply); default: the "
        f"preset's (0.1 BASE, 1.0 LARGE), else {DEFAULT_FEATURE_GRAD_MULT}",
    )
    a(
        "--feature_penalty_weight",
        type=NONNEGATIVE,
        default=None,
        help="weight of fairseq's feature penalty (mean square of the feature encoder's "
        "output); default: the preset's (10 BASE, 0 LARGE), else 0",
    )
    a(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute encoder layers in the backward pass (less memory, more time)",
    )


def _device_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("device").add_argument
    a(
        "--backend",
        default="auto",
        choices=["auto", "cpu", "cuda", "ipu"],
        help="auto: cuda when a GPU is visible, else cpu",
    )
    a(
        "--ipu_config_name",
        type=Path,
        default=None,
        help="ipu: an ipu_config.json in optimum-graphcore's format (pipeline, memory, "
        "replication, accumulation); the flags below override its values",
    )
    a(
        "--ipu_replicas",
        type=COUNT,
        default=None,
        help="ipu: data-parallel replicas inside one process (poptorch replication; default: "
        "1, or the --ipu_config_name file's replication_factor)",
    )
    a(
        "--ipu_device_iterations",
        type=COUNT,
        default=None,
        help="ipu: optimizer updates per host call when the next ones share a shape (the "
        "learning rate is held for the call; default: 1, or the file's)",
    )
    a(
        "--ipu_executable_cache",
        type=Path,
        default=None,
        help="ipu: compiled executables, one per shape (default: the file's "
        "executable_cache_dir, else OUTPUT_DIR/exe_cache)",
    )
    a(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 on cuda, fp32 on cpu, fp16 on ipu",
    )
    a(
        "--torch_compile_backend",
        default=None,
        help="torch.compile backend (cuda default: inductor; cpu default: none, eager)",
    )


def _run_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("logging, eval, checkpoints, loader and faults").add_argument
    a("--logging_steps", type=COUNT, default=10, help="log every N updates")
    a("--saving_steps", type=COUNT, default=500, help="checkpoint every N updates")
    a(
        "--save_total_limit",
        type=COUNT,
        default=None,
        help="keep the newest N checkpoints (default: all)",
    )
    a("--eval_steps", type=COUNT, default=None, help="eval every N updates (default: saving)")
    a(
        "--eval_batches",
        type=COUNT,
        default=None,
        help="held-out batches per eval (default: the whole held-out set)",
    )
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    a("--seed", type=LIMIT, default=0, help="data order, masks, negatives and weights")
    a("--num_workers", type=LIMIT, default=2, help="loader workers per rank")
    a("--shuffle_seconds", type=NONNEGATIVE, default=600.0, help="audio per shuffle buffer")
    a(
        "--max_bad_fraction",
        type=FRACTION,
        default=0.01,
        help="stop when more utterances than this share are unreadable",
    )
    a(
        "--max_skipped_updates",
        type=COUNT,
        default=10,
        help="stop after this many non-finite updates in a row",
    )
    a("--allow_pipe_urls", action="store_true", help="let pipe: shard URLs run a command")
    a("--s3_endpoint_url", default=None, help="S3-compatible endpoint for s3:// shards")
    a("--no_tensorboard", action="store_true", help="write metrics.jsonl only")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="w2v-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add in (
        _data_flags,
        _model_flags,
        _optimizer_flags,
        _batch_flags,
        _objective_flags,
        _device_flags,
        _run_flags,
    ):
        add(p)
    args = p.parse_args(argv)
    implied = {
        "feature_grad_mult": DEFAULT_FEATURE_GRAD_MULT,
        "feature_penalty_weight": 0.0,
        "min_gumbel_temperature": 0.5,
        **PRESET_TRAINING.get(args.preset, {}),
    }
    for name, value in implied.items():  # what the preset implies, where no flag says
        if getattr(args, name) is None:
            setattr(args, name, value)
    problems = _problems(args) + _resolve_ipu_flags(args)
    if problems:
        p.error("; ".join(problems))
    return args


def _problems(args: argparse.Namespace) -> list[str]:
    """What no single flag's type can check: combinations."""
    problems = []
    if args.init_from and (args.preset or args.model_name_or_path):
        problems.append(
            "--init_from takes the model's own config: leave out --preset and --model_name_or_path"
        )
    elif not args.init_from and bool(args.preset) == bool(args.model_name_or_path):
        problems.append("give --preset {demo,base,large}, --model_name_or_path or --init_from")
    if args.init_from and args.resume_from_checkpoint:
        problems.append(
            "--init_from starts a new run; --resume_from_checkpoint continues one: give one"
        )
    if args.num_warmup_steps > args.max_train_steps:
        problems.append("--num_warmup_steps must be within 0..max_train_steps")
    if args.min_duration_in_seconds >= args.max_duration_in_seconds:
        problems.append("need --min_duration_in_seconds < --max_duration_in_seconds")
    if args.max_gumbel_temperature < args.min_gumbel_temperature:
        problems.append("need --min_gumbel_temperature <= --max_gumbel_temperature")
    if args.backend == "ipu" and args.precision == "bf16":
        problems.append("--backend ipu trains in fp16 or fp32 (IPUs have no bf16)")
    if args.backend != "ipu" and args.precision == "fp16":
        problems.append("--precision fp16 is for --backend ipu (cuda: bf16)")
    if args.backend == "ipu" and args.gradient_checkpointing:
        problems.append(
            "--gradient_checkpointing is torch's recompute, which poptorch does "
            "not trace: leave it out with --backend ipu"
        )
    for name in ("ipu_replicas", "ipu_device_iterations"):
        if args.backend != "ipu" and getattr(args, name) not in (None, 1):
            problems.append(f"--{name} is for --backend ipu")
    if args.backend != "ipu" and args.ipu_config_name:
        problems.append("--ipu_config_name is for --backend ipu")
    return problems


def _resolve_ipu_flags(args: argparse.Namespace) -> list[str]:
    """The IPU's replicas, accumulation, device iterations and cache: the flags given, else
    the --ipu_config_name file's, else 1 (and the default cache); written back into ``args``
    so that train_config.json records what runs. Returns what is wrong with the file."""
    settings = None
    if args.backend == "ipu":
        try:
            settings = resolve_ipu_config(
                args.ipu_config_name,
                replication_factor=args.ipu_replicas,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                device_iterations=args.ipu_device_iterations,
                executable_cache_dir=args.ipu_executable_cache and str(args.ipu_executable_cache),
            )
        except IpuConfigError as exc:
            return [f"--ipu_config_name {exc}" if args.ipu_config_name else str(exc)]
    args.ipu_replicas = settings.replication_factor if settings else 1
    args.gradient_accumulation_steps = (
        settings.gradient_accumulation_steps if settings else args.gradient_accumulation_steps or 1
    )
    args.ipu_device_iterations = settings.device_iterations if settings else 1
    if settings and settings.executable_cache_dir:
        args.ipu_executable_cache = Path(settings.executable_cache_dir)
    return []


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on weights of linear and conv layers only: not on biases, norms,
    embeddings of the mask or the codebook."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (
            param.ndim < 2
            or "norm" in name
            or "bias" in name
            or "masked_spec_embed" in name
            or "codevectors" in name
        )
        (plain if no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def make_stream_config(
    shard_specs,
    args,
    config,
    rank: int,
    world: int,
    split: int = 1,
    bucket_runs: bool = False,
    passes_per_epoch: int = 0,
) -> StreamConfig:
    """The loader's configuration. ``split`` > 1 (IPU) makes each batch one optimizer update
    of ``split`` micro-batches; ``bucket_runs`` keeps batches of one shape together;
    ``passes_per_epoch`` 1 makes an epoch read each utterance once (eval)."""
    shard_list = sources.resolve(shard_specs, args.allow_pipe_urls, args.s3_endpoint_url)
    plan = buckets.plan_for_shards(
        shard_list.lengths,
        shard_list.sample_rate,
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
    runs = {}
    if bucket_runs:  # rounds big enough to hold several batches of every bucket
        runs = {
            "bucket_runs": True,
            "round_items": max(256, 4 * max(plan.batch_sizes) * plan.num_buckets),
        }
    return StreamConfig(
        shard_list,
        plan,
        seed=args.seed,
        world_size=world,
        rank=rank,
        shuffle_seconds=args.shuffle_seconds,
        passes_per_epoch=passes_per_epoch,
        **runs,
        mask_time_prob=config.mask_time_prob,
        mask_time_length=config.mask_time_length,
        mask_time_min_masks=config.mask_time_min_masks,
        num_negatives=config.num_negatives,
        conv_kernel=tuple(config.conv_kernel),
        conv_stride=tuple(config.conv_stride),
        allow_pipe=args.allow_pipe_urls,
        s3_endpoint_url=args.s3_endpoint_url,
    )


def evaluate(
    objective, backend, stream_config, eval_batches: int | None, temperature: float
) -> dict:
    """Loss and its terms per masked frame, and the contrastive accuracy, over one pass of the
    held-out set (or its first ``eval_batches`` batches), eval mode. Unreadable utterances are
    counted and named; an eval that read nothing stops the run."""
    backend.weights_to_host()
    objective.eval()
    terms = ("loss", "contrastive_loss", "diversity_loss", "feature_penalty", "num_correct")
    sums = dict.fromkeys(terms, 0.0)
    masked = 0.0
    # Every bad utterance is counted here, none stops the eval: the whole set is read.
    loader = StreamingLoader(stream_config, num_workers=0, max_bad_fraction=1.0, max_epochs=1)
    for i, batch in enumerate(loader):
        if i == eval_batches:
            break
        out = backend.eval_forward(batch, temperature)
        for name in terms:
            sums[name] += float(out[name])
        masked += float(out["num_masked"])
    objective.train()
    counters = loader.counters
    *totals, masked, read, bad = backend.all_sum(
        [*sums.values(), masked, float(counters.utterances), float(sum(counters.skipped.values()))]
    )
    per_frame = dict(zip(terms, (total / max(masked, 1.0) for total in totals)))
    examples = [e for found in backend.all_gather(counters.bad_examples) for e in found]
    if not read:
        raise RuntimeError(
            f"eval read no utterance from --eval_shards ({int(bad)} "
            f"unreadable, e.g. {'; '.join(examples[:3]) or 'none'}); check them "
            f"with tools/make_shards.py --verify"
        )
    if bad and backend.rank == 0:
        print(
            f"WARNING: eval skipped {int(bad)} unreadable utterances, e.g. "
            f"{'; '.join(examples[:3])}",
            flush=True,
        )
    return {
        "eval_loss": per_frame["loss"],
        "eval_contrastive_loss": per_frame["contrastive_loss"],
        "eval_diversity_loss": per_frame["diversity_loss"],
        "eval_feature_penalty": per_frame["feature_penalty"],
        "eval_accuracy": per_frame["num_correct"],
        "eval_utterances": int(read),
        "eval_bad_utterances": int(bad),
    }


def update_record(
    step: int,
    result: UpdateResult,
    backend,
    lr: float,
    loader,
    audio_per_second: float,
    skipped_updates: int,
    clock: tuple,
) -> dict:
    """The per-update record: losses per masked frame of the update, all ranks summed.
    ``clock`` is (seconds since this process began training, the update it began at, the
    last update)."""
    names = (*SUMMED_OUTPUTS.values(), "micro_batches")
    total = dict(zip(names, backend.all_sum([float(getattr(result, n)) for n in names])))
    (audio,) = backend.all_sum([float(loader.counters.audio_samples)])
    elapsed, first, last = clock
    masked = max(result.masked_frames, 1.0)
    return {
        "step": step,
        "loss": total["loss"] / masked,
        "contrastive_loss": total["contrastive_loss"] / masked,
        "diversity_loss": total["diversity_loss"] / masked,
        "feature_penalty": total["feature_penalty"] / masked,
        "accuracy": total["correct"] / masked,
        "percent_masked": 100.0 * result.masked_frames / max(total["num_frames"], 1.0),
        "prob_perplexity": total["prob_perplexity"] / total["micro_batches"],
        "code_perplexity": total["code_perplexity"] / total["micro_batches"],
        "lr": lr,
        "temperature": result.temperature,
        "grad_norm": math.nan if result.grad_norm is None else result.grad_norm,
        "padding_efficiency": loader.counters.padding_efficiency(),
        "audio_seconds_per_second": audio_per_second,
        "skipped_updates": skipped_updates,
        "skipped_utterances": sum(loader.counters.skipped.values()),
        "empty_batches": loader.counters.empty_batches,
        "audio_hours": audio / loader.config.plan.sample_rate / 3600,
        "elapsed_seconds": elapsed,
        "eta_seconds": elapsed / max(step - first, 1) * (last - step),
    }


def start_run(args, backend, config) -> tuple[rundir.OutputDirLock | None, dict]:
    """Lock OUTPUT_DIR for this run (the main rank holds the lock; every rank learns when it
    is taken) and write the resolved configuration to train_config.json."""
    lock, error = None, None
    if backend.rank == 0:
        try:
            lock = rundir.lock_output_dir(args.output_dir)
        except (rundir.OutputDirBusy, OSError) as exc:
            error = str(exc)
    agree(backend, error)
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    resolved.update(
        backend_resolved=backend.name,
        precision_resolved=backend.precision,
        world_size=backend.world_size,
    )
    if backend.name == "ipu":  # each pipeline block and the IPU of a replica it runs on
        resolved["ipu_placement"] = [list(block) for block in backend.placement]
    folder = Path(args.model_name_or_path or "")
    if (
        backend.rank == 0
        and args.model_name_or_path
        and any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin"))
    ):
        print(
            f"note: --model_name_or_path takes only {folder}'s config.json; its weights are "
            f"not loaded (to start from them, use --init_from {folder})",
            flush=True,
        )
    if backend.rank == 0:
        (args.output_dir / "train_config.json").write_text(
            json.dumps(
                {"args": resolved, "model": config.to_dict()}, indent=1, sort_keys=True, default=str
            )
        )
        print(f"config: {json.dumps(resolved, sort_keys=True, default=str)}", flush=True)
    return lock, resolved


PREFETCH = 2  # batches each loader worker prepares ahead


class UsageError(ValueError):
    """A flag the machine cannot honour (found once the plan and model are known): exit 2."""


def check_memory(stream_config, num_workers: int, model, on_host: bool) -> None:
    """The loader's shared batch buffers against /dev/shm, and those with the model, its
    gradients and AdamW's two moments (fp32) against the free RAM when they live on the host;
    raises UsageError with what to lower."""
    layouts = [batch_arrays(stream_config, k) for k in range(stream_config.plan.num_buckets)]
    slots = PREFETCH + RING_SLOTS_EXTRA
    ring = num_workers * slots * sum(slot_bytes(layouts).values())
    weights = 16 * sum(p.numel() for p in model.parameters()) if on_host else 0
    problems = []
    shm = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else None
    if shm is not None and ring > shm:
        problems.append(
            f"the loader's batch buffers need {ring / 2**30:.2f} GiB of /dev/shm, "
            f"which has {shm / 2**30:.2f} GiB free"
        )
    available = _available_ram()
    if available is not None and ring + weights > available:
        problems.append(
            f"the batch buffers and the model with its gradients and optimizer "
            f"state need {(ring + weights) / 2**30:.2f} GiB of RAM, "
            f"{available / 2**30:.2f} GiB is available"
        )
    if problems:
        raise UsageError(
            "; ".join(problems) + ": lower --per_device_train_batch_size (or "
            "--max_tokens), --max_duration_in_seconds or --num_workers"
        )


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def weights_from(args, config, main: bool):
    """The model of ``--init_from``'s weights; says which weights start fresh."""
    model, fresh = load_pretrained(args.init_from, config)
    if main:
        print(
            f"weights from {args.init_from}; starting fresh: "
            f"{', '.join(fresh) if fresh else 'nothing'}",
            flush=True,
        )
    return model


def agree(backend, error: str | None) -> None:
    """Every rank raises the first rank's error, so no rank waits on one that stopped."""
    errors = [e for e in backend.all_gather(error) if e]
    if errors:
        raise RuntimeError(errors[0])


def open_metrics(args, main: bool, update: int, resumed_from: str | None) -> MetricsLogger:
    """metrics.jsonl and TensorBoard (records after a resumed checkpoint dropped), opened with
    a ``run`` record: where this process's run began, and from what."""
    logger = MetricsLogger(
        args.output_dir,
        main,
        tensorboard=not args.no_tensorboard,
        resume_step=update if resumed_from else None,
    )
    run = {
        "init_from": args.init_from,
        "resumed_from": resumed_from,
        "preset": args.preset,
        "model_name_or_path": args.model_name_or_path,
    }
    logger.log({"step": update, "run": run})
    return logger


def save_checkpoint(args, backend, model, optimizer, loader, at: int, state: dict, config) -> None:
    """``OUTPUT_DIR/checkpoint-AT`` with every rank's loader position and the model's
    configuration beside ``state``, written by the main rank; a save that fails (a non-finite
    weight, a full disk) stops every rank with why."""
    backend.weights_to_host()  # the optimizer state comes back through state_dict()
    states = backend.all_gather(loader.state_dict())
    error = None
    if backend.rank == 0:
        try:
            path = checkpoint.save(
                args.output_dir,
                at,
                model,
                optimizer,
                {
                    "loader": {str(r): s for r, s in enumerate(states)},
                    "model_config": config.to_dict(),
                    **state,
                },
                args.save_total_limit,
            )
            print(f"saved {path}", flush=True)
        except checkpoint.NonFiniteWeights as exc:
            good = checkpoint.list_checkpoints(args.output_dir)
            error = (
                f"{exc}: checkpoint-{at} not written, stopping. The last good checkpoint "
                f"is {good[-1] if good else 'none'}; resume from it with a lower "
                f"--learning_rate, a longer warmup or --max_grad_norm"
            )
        except checkpoint.CheckpointSaveError as exc:
            error = str(exc)
    agree(backend, error)


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 (Slurm's ``--signal`` warning) ask the loop to stop after
    the update in flight, with a checkpoint; a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        # A Ctrl-C reaches a launcher's workers twice (the terminal's, then the launcher's
        # forward): one within a second of the first is the same request.
        if (
            signum == signal.SIGINT
            and self.signum == signal.SIGINT
            and time.monotonic() - self.at > 1.0
        ):
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()

    def __bool__(self) -> bool:
        return self.signum is not None


def backend_for(args, config):
    """The backend of ``--backend``, with the IPU's settings and the model's block counts."""
    return create_backend(
        args.backend,
        precision=args.precision,
        compile_backend=args.torch_compile_backend,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        ipu_replicas=args.ipu_replicas,
        ipu_device_iterations=args.ipu_device_iterations,
        ipu_executable_cache=str(args.ipu_executable_cache or args.output_dir / "exe_cache"),
        ipu_config_name=args.ipu_config_name and str(args.ipu_config_name),
        ipu_conv_layers=len(config.conv_dim),
        ipu_encoder_layers=config.num_hidden_layers,
        seed=args.seed,
    )


def schedule_for(args):
    """(update) -> (learning rate, gumbel temperature): pure functions of the update."""

    def schedule(step: int) -> tuple[float, float]:
        return (
            args.learning_rate
            * lr_factor(
                step,
                args.num_warmup_steps,
                args.max_train_steps,
                args.lr_scheduler_type,
                args.lr_power,
            ),
            gumbel_temperature(
                step,
                args.max_gumbel_temperature,
                args.min_gumbel_temperature,
                args.gumbel_temperature_decay,
            ),
        )

    return schedule


def resume(args, model, optimizer, rank: int) -> tuple[int, int, dict | None, str | None]:
    """(update, skipped updates, this rank's loader state, checkpoint) of
    ``--resume_from_checkpoint``, its weights and optimizer state loaded; a fresh start
    without it."""
    if not args.resume_from_checkpoint:
        return 0, 0, None, None
    path = checkpoint.find(
        args.output_dir,
        args.resume_from_checkpoint,
        warn=lambda text: rank == 0 and print(f"WARNING: {text}", flush=True),
    )
    state = checkpoint.load(path, model, optimizer)
    loader_state = state["loader"].get(str(rank))
    if loader_state is None:
        raise ValueError(f"{path}: no loader state for rank {rank} (world size changed?)")
    if rank == 0:
        print(f"resumed from {path} at update {state['update']}", flush=True)
    return state["update"], state.get("skipped_updates", 0), loader_state, str(path)


class Skips:
    """Non-finite updates: counted the same way on every backend (per optimizer update); a
    run of ``limit`` in a row stops the run."""

    def __init__(self, total: int, limit: int, main: bool):
        self.total, self.in_a_row, self.limit, self.main = total, 0, limit, main

    def count(self, result: UpdateResult, update: int) -> None:
        if result.finite:
            self.in_a_row = 0
            return
        self.in_a_row += result.updates
        self.total += result.updates
        if self.main:
            what = (
                "the IPU has applied it: it cannot be skipped there"
                if result.applied
                else "update skipped"
            )
            print(
                f"step {update}: non-finite loss or gradient, {what} ({self.in_a_row} in a row)",
                flush=True,
            )
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} non-finite updates in a row: stopping. Lower "
                f"--learning_rate, raise --num_warmup_steps, set "
                f"--max_grad_norm, or use --precision fp32"
            )


class Pace:
    """Audio seconds per second since the last log, and the run's elapsed time and ETA."""

    def __init__(self, update: int, last: int, world: int):
        self.began = self.since = time.perf_counter()
        self.first, self.last, self.world, self.audio = update, last, world, 0.0

    def add(self, seconds: float) -> None:
        self.audio += seconds

    def take(self) -> tuple[float, tuple]:
        """(audio s/s since the last take, the clock for ``update_record``)."""
        now = time.perf_counter()
        rate = self.world * self.audio / max(now - self.since, 1e-9)
        self.since, self.audio = now, 0.0
        return rate, (now - self.began, self.first, self.last)


def log_update(logger, record: dict, main: bool, num_groups: int) -> None:
    logger.log(record)
    if main:
        print(format_line(record), flush=True)
        warning = collapse_warning(record, num_groups)
        if warning:
            print(f"WARNING: {warning}", flush=True)


def train(args: argparse.Namespace) -> None:
    # 1. Backend and processes, configuration.
    stop = StopRequest()
    masking = ("mask_time_prob", "mask_time_length", "num_negatives")
    overrides = {name: getattr(args, name) for name in masking}
    config = resolve_config(args.preset, args.model_name_or_path, overrides, args.init_from)
    backend = backend_for(args, config)
    rank, world, main = backend.rank, backend.world_size, backend.rank == 0
    torch.manual_seed(args.seed + rank)
    lock, resolved = start_run(args, backend, config)

    # 2. Data: the shape plan from index.json, the stream of this rank.
    needs = backend.loader_needs
    stream_config = make_stream_config(
        args.train_shards,
        args,
        config,
        rank,
        world,
        split=needs.split,
        bucket_runs=needs.bucket_runs,
    )
    plan = stream_config.plan
    if main:
        print(f"shape plan ({plan.policy}): {plan.shapes()}", flush=True)
    eval_config = (
        make_stream_config(args.eval_shards, args, config, rank, world, passes_per_epoch=1)
        if args.eval_shards
        else None
    )

    # 3. Model, objective, optimizer; resume.
    model = build_model(config) if not args.init_from else weights_from(args, config, main)
    check_memory(stream_config, args.num_workers, model, backend.device.type == "cpu")
    objective = PretrainingObjective(
        model,
        args.feature_grad_mult,
        args.gradient_checkpointing,
        args.feature_penalty_weight,
        packed=args.length_policy == "pack",
    )
    objective.train()
    optimizer = backend.prepare(
        objective,
        _param_groups(model, args.weight_decay),
        args.learning_rate,
        (args.adam_beta1, args.adam_beta2),
        args.adam_epsilon,
        args.max_grad_norm,
    )
    update, skipped, loader_state, resumed_from = resume(args, model, optimizer, rank)
    skips = Skips(skipped, args.max_skipped_updates, main)
    loader = StreamingLoader(
        stream_config,
        num_workers=args.num_workers,
        prefetch_factor=PREFETCH,
        max_bad_fraction=args.max_bad_fraction,
        state=loader_state,
        multiprocessing_context=needs.multiprocessing_context,
        pin_memory=needs.pin_memory,
    )
    logger = open_metrics(args, main, update, resumed_from)
    schedule = schedule_for(args)

    def run_eval(at: int, temperature: float) -> None:
        record = evaluate(objective, backend, eval_config, args.eval_batches, temperature)
        logger.log({"step": at, **record})
        if main:
            print(
                f"step {at:>7d} | eval_loss {record['eval_loss']:.4f} | contrastive "
                f"{record['eval_contrastive_loss']:.4f} | acc {record['eval_accuracy']:.3f} | "
                f"{record['eval_utterances']} utterances",
                flush=True,
            )

    def save(at: int) -> None:
        state = {"skipped_updates": skips.total, "config": resolved}
        save_checkpoint(args, backend, model, optimizer, loader, at, state, config)

    # 4. The loop: one backend update (one optimizer update, or several on the IPU) per turn.
    batches = iter(loader)
    eval_every = args.eval_steps or args.saving_steps
    every = [args.logging_steps, args.saving_steps] + ([eval_every] if eval_config else [])
    pace = Pace(update, args.max_train_steps, world)
    if eval_config and update == 0:
        run_eval(0, schedule(0)[1])
    while update < args.max_train_steps:
        limit = min([args.max_train_steps] + [(update // n + 1) * n for n in every])
        lr = schedule(update)[0]
        result = backend.update(batches, loader.upcoming_buckets, update, limit, schedule)
        pace.add(result.audio_samples / plan.sample_rate)
        update += result.updates
        skips.count(result, update)
        stopping = backend.all_sum([float(bool(stop))])[0] > 0  # every rank stops together

        # 5. Report, evaluate, save.
        last = update == args.max_train_steps
        if update % args.logging_steps == 0 or last:
            audio_rate, clock = pace.take()
            log_update(
                logger,
                update_record(update, result, backend, lr, loader, audio_rate, skips.total, clock),
                main,
                config.num_codevector_groups,
            )
        if eval_config and (update % eval_every == 0 or last):
            run_eval(update, result.temperature)
        if update % args.saving_steps == 0 or last or stopping:
            save(update)
        if stopping:
            if main:
                print(
                    f"signal {stop.signum}: checkpoint saved at update {update}, exiting",
                    flush=True,
                )
            break

    # 6. Teardown: loader workers, then the backend (which checks that replicas agree).
    batches.close()
    logger.close()
    checksum = backend.close()
    if lock:
        lock.release()
    print(f"rank {rank} finished at update {update}, weights checksum {checksum!r}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except UsageError as exc:
        print(f"w2v-train: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as exc:  # each names its file or flag
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train: interrupted twice: stopped without a checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
