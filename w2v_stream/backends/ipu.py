"""Graphcore IPU through poptorch: the only module that imports poptorch.

Written against the poptorch 3.x API (Poplar SDK 3.x). Its host side runs in the tests against
``tests/sim_poptorch``; it has not run on IPU hardware or under Poplar's compiler. The package
never imports this module unless ``--backend ipu`` is asked for.

Pipelining and memory come from an ``ipu_config.IpuConfig`` (``--ipu_config_name``, optimum's
format). Each block of ``ipu_config.block_names`` starts with ``poptorch.BeginBlock`` on the
module the objective really calls for it (``pipeline_modules``: the quantizer's block starts
at ``quantizer.weight_proj``, which the objective calls, not at the quantizer), on the IPU
``ipu_config.placement`` gives it. The poptorch calls that carry the configuration:

- ``poptorch.BeginBlock(module, name, ipu)`` per block, and
  ``options.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.SameAsIpu))``
  when a replica spans several IPUs (one pipeline stage per IPU; poptorch then turns on its
  pipeline recomputation, which ``poptorch.recomputationCheckpoint`` on each encoder layer's
  output limits when ``recompute_checkpoint_every_layer`` is set);
- ``options.setAvailableMemoryProportion({"IPU0": p, ...})`` from ``matmul_proportion``;
- ``options.TensorLocations.setOptimizerLocation(poptorch.TensorLocationSettings()
  .useOnChipStorage(not optimizer_state_offchip).useReplicatedTensorSharding(rts))``, sharding
  only with more than one replica (as optimum does);
- ``options.Precision.setPartialsType(torch.half)`` for ``enable_half_partials``;
- in fp16 (``--precision fp16``, the IPU's default): the objective in half precision
  (``objective.half()``, as optimum halves its pipelined model) with its loss in fp32 where the
  objective computes it, ``options.Precision.enableStochasticRounding(True)``, and
  ``poptorch.optim.AdamW(..., loss_scaling=LOSS_SCALING, accum_type=torch.half,
  first_order_momentum_accum_type=torch.half, second_order_momentum_accum_type=torch.float)``
  (optimum's IPUTrainer types in fp16). The host copy of the weights, which checkpoints save
  and eval runs on, is then half as well.

One compiled executable per bucket shape and call size: poptorch compiles a model for one input
shape and one number of device iterations, so each pair gets its own ``trainingModel`` over the
same weights (at most two per bucket: ``d`` = D and ``d`` = 1), and the executable cache makes
later runs load instead of compile. Only one executable is attached at a time; when the shape
changes, the weights and the optimizer state go through the host to the next one (the loader's
``bucket_runs`` keeps same-shape batches together so this is rare).

One host call runs ``d`` optimizer updates (``d`` is ``device_iterations`` or 1): the host
batch is ``d`` loader batches of one bucket stacked, each a multiple of ``replicas x
accumulation`` rows, and poptorch splits it over device iterations (one update each, the
outermost split), replicas and gradient accumulation. The trainer takes ``d`` > 1 only when the
loader's next ``d`` batches share a bucket and no log, eval, checkpoint or the last step falls
inside the call (``call_size``); otherwise 1. The gumbel temperature and the loss normaliser
(masked frames of the whole update) are tensor inputs, one value per row, so each update of a
call gets its own; the learning rate goes through ``setOptimizer`` and is held for the ``d``
updates of a call (the value of its first update), as poptorch cannot change it inside one.
"""

from __future__ import annotations

import inspect
import math
import os

import torch

from . import SUMMED_OUTPUTS, LoaderNeeds, UpdateResult, summed_result
from .ipu_config import IpuConfig, describe, placement

# fp16's loss scale. Each micro-batch's loss is divided by the masked frames of its whole
# update (tens of thousands for BASE's 128 utterances of up to 15.6 s per update), so its
# gradients are that many times smaller than those of optimum's unnormalised per-micro-batch
# loss, which trains in fp16 with a scale of 1; 2**15 brings them back to that range.
LOSS_SCALING = 2.0**15

INSTALL_HINT = (
    "poptorch is not installed. It ships with Graphcore's Poplar SDK, not PyPI: "
    "install the SDK (https://www.graphcore.ai/downloads), source its enable.sh, "
    "then `pip install $POPLAR_SDK_ENABLED/../poptorch-*.whl` in this environment."
)


def import_poptorch():
    try:
        import poptorch
    except ImportError:
        raise RuntimeError(f"--backend ipu: {INSTALL_HINT}") from None
    return poptorch


class _IpuStep(torch.nn.Module):
    """Objective + normalisation in one graph; poptorch sums over the split host batch."""

    def __init__(self, objective: torch.nn.Module, poptorch):
        super().__init__()
        self.objective = objective
        self.poptorch = poptorch

    def forward(
        self,
        input_values,
        attention_mask,
        mask_time_indices,
        sampled_negative_indices,
        temperature,
        normaliser,
        segment_ids,
    ):
        out = self.objective(
            input_values,
            attention_mask,
            mask_time_indices,
            sampled_negative_indices,
            temperature[0],
            segment_ids,
        )
        loss = self.poptorch.identity_loss(out["loss"] / normaliser[0], reduction="sum")
        return (loss,) + tuple(out[name].detach() for name in STEP_OUTPUTS)


# The objective's outputs a host call returns (summed), after the loss it trains on.
STEP_OUTPUTS = tuple(SUMMED_OUTPUTS)


def micro_batch_negatives(negatives: torch.Tensor, split: int) -> torch.Tensor:
    """(B, T, K) negative indices into the host batch's B*T frames → indices into each
    micro-batch's own frames, int32.

    poptorch cuts the host batch into ``split`` runs of B / split consecutive rows and runs
    each as its own micro-batch, where the model flattens only that micro-batch's frames.
    Negatives stay within their row, so only the row offset changes.
    """
    rows, frames = negatives.shape[:2]
    micro = rows // split
    first_row = torch.arange(rows) // micro * micro  # the first host row of each row's run
    return (negatives.long() - (first_row * frames).view(rows, 1, 1)).int()


def host_batch(
    batches: list[dict],
    split: int,
    temperatures: list[float],
    normalisers: list[float],
    input_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """The inputs of one host call: ``len(batches)`` updates' loader batches stacked in order
    (poptorch gives each device iteration the next block of rows), the audio in the model's
    ``input_dtype``, negatives moved into each micro-batch's own frames, and one temperature
    and normaliser value per row; segment ids where the loader gives them, else one utterance
    per row."""
    shapes = {tuple(b["input_values"].shape) for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"one host call takes one shape, got {sorted(shapes)}")
    rows = next(iter(shapes))[0]
    if rows % split:
        raise ValueError(
            f"batch of {rows} rows does not split over replicas x accumulation = {split}"
        )

    def per_row(values):
        return torch.cat([torch.full((rows,), float(v)) for v in values])

    return (
        torch.cat([b["input_values"] for b in batches]).to(input_dtype),
        torch.cat([b["attention_mask"] for b in batches]),
        torch.cat([b["mask_time_indices"] for b in batches]),
        torch.cat([micro_batch_negatives(b["sampled_negative_indices"], split) for b in batches]),
        per_row(temperatures),
        per_row(normalisers),
        torch.cat(
            [
                b["segment_ids"] if "segment_ids" in b else b["attention_mask"].to(torch.int32)
                for b in batches
            ]
        ),
    )


def call_size(upcoming: list[int], update: int, device_iterations: int, next_event: int) -> int:
    """Updates in the next host call: all ``device_iterations`` when the next that many
    batches (their buckets in ``upcoming``) share a shape and the call ends at or before
    ``next_event`` (the next log, eval, checkpoint or the last update); else 1."""
    d = device_iterations
    if d > 1 and len(upcoming) >= d and len(set(upcoming[:d])) == 1 and update + d <= next_event:
        return d
    return 1


# UpdateResult fields that add up over host calls.
_SUMMED = ("updates", "masked_frames", *SUMMED_OUTPUTS.values(), "micro_batches", "audio_samples")


def pipeline_modules(objective: torch.nn.Module) -> list[torch.nn.Module]:
    """The module that starts each block of ``ipu_config.block_names``, where
    ``PretrainingObjective`` calls it: ops after a block's module run in that block until the
    next block's module is called."""
    model = objective.model
    encoder = model.wav2vec2.encoder
    # A conv layer's conv: the objective calls it directly where it normalises the output
    # per utterance (the first layer's group norm), and through the layer elsewhere.
    return [
        *(layer.conv for layer in model.wav2vec2.feature_extractor.conv_layers),
        encoder.pos_conv_embed,
        *encoder.layers,
        model.project_hid,
        model.quantizer.weight_proj,
        model.project_q,
    ]


class IpuBackend:
    """Training updates on IPUs, one process; eval runs on the host's copy of the weights."""

    name = "ipu"
    rank, world_size = 0, 1  # data parallel is poptorch replication inside this process
    device = torch.device("cpu")  # where the host keeps weights, and where eval runs

    def __init__(
        self,
        settings: IpuConfig,
        num_conv_layers: int,
        num_encoder_layers: int,
        seed: int,
        precision: str = "auto",
    ):
        self.poptorch = import_poptorch()  # fails first, with how to get the Poplar SDK
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "--backend ipu runs as one process: data parallel comes from "
                "--ipu_replicas (poptorch replication), not torchrun"
            )
        if precision not in ("auto", "fp16", "fp32"):
            raise ValueError(f"--precision {precision!r}: choose fp16 or fp32 on the IPU")
        self.precision = "fp16" if precision == "auto" else precision
        self.dtype = torch.half if self.precision == "fp16" else torch.float32
        self.settings, self.seed = settings, seed
        self.placement = placement(settings, num_conv_layers, num_encoder_layers)
        print(
            f"IPU placement ({settings.ipus_per_replica} IPUs per replica, "
            f"{settings.replication_factor} replicas):\n{describe(self.placement)}",
            flush=True,
        )
        self.device_iterations = settings.device_iterations
        self.split = settings.replication_factor * settings.gradient_accumulation_steps
        self.loader_needs = LoaderNeeds(
            split=self.split, bucket_runs=True, multiprocessing_context="fork", pin_memory=False
        )
        self.models: dict[tuple[int, ...], object] = {}
        self.current = None
        self.objective = self.optimizer = None

    def _options(self, device_iterations: int):
        poptorch, settings = self.poptorch, self.settings
        options = poptorch.Options()
        options.randomSeed(self.seed)  # dropout and gumbel noise drawn on the device
        options.replicationFactor(settings.replication_factor)
        options.deviceIterations(device_iterations)
        options.Training.gradientAccumulation(settings.gradient_accumulation_steps)
        options.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Sum)
        options.outputMode(poptorch.OutputMode.Sum)
        if settings.executable_cache_dir != "disabled":
            options.enableExecutableCaching(settings.executable_cache_dir)
        if settings.pipelined:
            options.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.SameAsIpu))
        options.setAvailableMemoryProportion(settings.memory_proportions())
        options.TensorLocations.setOptimizerLocation(
            poptorch.TensorLocationSettings()
            .useOnChipStorage(not settings.optimizer_state_offchip)
            .useReplicatedTensorSharding(
                settings.replicated_tensor_sharding and settings.replication_factor > 1
            )
        )
        if settings.enable_half_partials:
            options.Precision.setPartialsType(torch.half)
        if self.precision == "fp16":
            options.Precision.enableStochasticRounding(True)
        return options

    def prepare(self, objective, param_groups, lr, betas, eps, max_grad_norm):
        modules = pipeline_modules(objective)
        if len(modules) != len(self.placement):
            raise ValueError(
                f"the objective has {len(modules)} pipeline blocks, the placement "
                f"{len(self.placement)}: build the backend for this model"
            )
        if self.settings.pipelined:
            for module, (block, ipu) in zip(modules, self.placement):
                self.poptorch.BeginBlock(module, block, ipu)
        if self.settings.recompute_checkpoint_every_layer:
            for layer in objective.model.wav2vec2.encoder.layers:
                layer.register_forward_hook(self._checkpoint_output)
        kwargs = {}
        if max_grad_norm:
            accepted = inspect.signature(self.poptorch.optim.AdamW).parameters
            if "max_grad_norm" not in accepted:
                raise ValueError(
                    "--max_grad_norm: this poptorch's AdamW cannot clip; leave it unset on the IPU"
                )
            kwargs["max_grad_norm"] = max_grad_norm
        if self.precision == "fp16":
            kwargs.update(
                loss_scaling=LOSS_SCALING,
                accum_type=torch.half,
                first_order_momentum_accum_type=torch.half,
                second_order_momentum_accum_type=torch.float32,
            )
        self.objective = objective.to(self.dtype)
        self.optimizer = self.poptorch.optim.AdamW(
            param_groups, lr=lr, betas=betas, eps=eps, **kwargs
        )
        return self.optimizer

    def _checkpoint_output(self, module, inputs, output):
        """Forward hook: an encoder layer's output is kept, not recomputed, in the backward
        pass (a tensor, or a tuple whose tensors are)."""
        if isinstance(output, torch.Tensor):
            return self.poptorch.recomputationCheckpoint(output)
        return tuple(
            self.poptorch.recomputationCheckpoint(x) if isinstance(x, torch.Tensor) else x
            for x in output
        )

    def update(self, batches, upcoming, step, limit, schedule) -> UpdateResult:
        """``d`` optimizer updates in one host call (``call_size``); the learning rate of the
        first holds for the call, each update gets its own temperature and normaliser. When
        the loader held back a batch (every utterance in it bad), the next batches can differ
        in shape from what the plan said: they then run one update per call."""
        d = call_size(
            upcoming(self.device_iterations) if self.device_iterations > 1 else [],
            step,
            self.device_iterations,
            limit,
        )
        group = [next(batches) for _ in range(d)]
        if len({tuple(b["input_values"].shape) for b in group}) == 1:
            return self._call(group, step, schedule)
        results = [self._call([b], step + i, schedule) for i, b in enumerate(group)]
        sums = {name: sum(getattr(r, name) for r in results) for name in _SUMMED}
        return UpdateResult(
            **sums,
            temperature=results[-1].temperature,
            grad_norm=None,
            finite=all(r.finite for r in results),
            applied=True,
        )

    def _call(self, group: list[dict], step: int, schedule) -> UpdateResult:
        d = len(group)
        lr = schedule(step)[0]
        temperatures = [schedule(step + i)[1] for i in range(d)]
        normalisers = [max(float(b["mask_time_indices"].sum()), 1.0) for b in group]
        inputs = host_batch(group, self.split, temperatures, normalisers, self.dtype)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        model = self._activate((d,) + tuple(inputs[0].shape))
        model.setOptimizer(self.optimizer)  # the same object: only the changed lr is sent
        # Outputs come back summed over iterations and accumulation (one per replica).
        sums = dict(
            zip(STEP_OUTPUTS, (float(torch.as_tensor(x).sum()) for x in model(*inputs)[1:]))
        )
        return summed_result(
            sums,
            updates=d,
            masked_frames=sum(normalisers),
            micro_batches=self.split * d,
            audio_samples=sum(int(b["audio_samples"]) for b in group),
            temperature=temperatures[-1],
            grad_norm=None,
            finite=math.isfinite(sums["loss"]),
            applied=True,
        )

    def eval_forward(self, batch: dict, temperature: float) -> dict:
        with torch.no_grad():
            return self.objective(
                batch["input_values"].to(self.dtype),
                batch["attention_mask"],
                batch["mask_time_indices"],
                batch["sampled_negative_indices"].long(),
                torch.tensor(temperature),
                batch.get("segment_ids"),
            )

    def all_sum(self, values: list) -> list:
        return [float(v) for v in values]

    def all_gather(self, value) -> list:
        return [value]

    def _activate(self, key: tuple[int, ...]):
        """The executable for ``(updates per call,) + host input shape``, on the devices."""
        model = self.models.get(key)
        if model is not None and model is self.current:
            return model
        if self.current is not None:
            # One executable on the devices at a time: weights and optimizer state go
            # through the host to the next one.
            self.current.copyWeightsToHost()
            state = self.optimizer.state_dict()  # read back from the executable in use
            self.current.detachFromDevice()
            self.optimizer.load_state_dict(state)  # the host state the next one starts from
        if model is None:  # compiled (or loaded from the cache) on its first call
            model = self.poptorch.trainingModel(
                _IpuStep(self.objective, self.poptorch),
                options=self._options(key[0]),
                optimizer=self.optimizer,
            )
            self.models[key] = model
        else:
            model.setOptimizer(self.optimizer)
            model.attachToDevice()  # uploads the host weights and optimizer state
        self.current = model
        return model

    def weights_to_host(self) -> None:
        """Bring the host model up to date (before a checkpoint or an eval on the host)."""
        if self.current is not None:
            self.current.copyWeightsToHost()

    def close(self) -> float:
        self.weights_to_host()
        for model in self.models.values():
            model.destroy()
        self.models, self.current = {}, None
        return sum(float(p.detach().double().sum()) for p in self.objective.parameters())
