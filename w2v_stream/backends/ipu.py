"""Graphcore IPU through poptorch: the only module that imports poptorch.

Written against the poptorch 3.x API (Poplar SDK 3.x) and NOT run on IPU hardware here: no
IPU and no Poplar SDK were available while it was written.

One compiled executable per bucket shape (poptorch never recompiles a model: each shape gets
its own ``trainingModel`` over the same weights, and the executable cache makes later runs
load instead of compile). The host batch of each step is split by poptorch across
replication x gradient accumulation x device iterations, so the plan's batch sizes must be
multiples of that product (``make_plan(batch_multiple=...)``). The gumbel temperature and the
loss normaliser are tensor inputs; the learning rate goes through ``setOptimizer``.
"""

from __future__ import annotations

import torch

INSTALL_HINT = ("poptorch is not installed. It ships with Graphcore's Poplar SDK, not PyPI: "
                "install the SDK (https://www.graphcore.ai/downloads), source its enable.sh, "
                "then `pip install $POPLAR_SDK_ENABLED/../poptorch-*.whl` in this environment.")


def import_poptorch():
    try:
        import poptorch
    except ImportError:
        raise RuntimeError(f"--backend ipu: {INSTALL_HINT}") from None
    return poptorch


class _IpuStep(torch.nn.Module):
    """objective + normalisation in one graph; poptorch sums over the split host batch."""

    def __init__(self, objective: torch.nn.Module, poptorch):
        super().__init__()
        self.objective = objective
        self.poptorch = poptorch

    def forward(self, input_values, attention_mask, mask_time_indices,
                sampled_negative_indices, temperature, normaliser):
        # Scalars arrive as one value per row so poptorch can split them with the batch.
        out = self.objective(input_values, attention_mask, mask_time_indices,
                             sampled_negative_indices, temperature[0])
        loss = self.poptorch.identity_loss(out["loss"] / normaliser[0], reduction="sum")
        return loss, out["contrastive_loss"], out["diversity_loss"], out["num_masked"]


class IpuBackend:
    def __init__(self, replication_factor: int = 1, gradient_accumulation: int = 1,
                 device_iterations: int = 1, executable_cache_dir: str = "./exe_cache"):
        self.poptorch = import_poptorch()
        options = self.poptorch.Options()
        options.replicationFactor(replication_factor)
        options.deviceIterations(device_iterations)
        options.Training.gradientAccumulation(gradient_accumulation)
        options.Training.accumulationAndReplicationReductionType(
            self.poptorch.ReductionType.Sum)
        options.outputMode(self.poptorch.OutputMode.Sum)
        options.enableExecutableCaching(executable_cache_dir)
        self.options = options
        self.split = replication_factor * gradient_accumulation * device_iterations
        self.models: dict[tuple[int, ...], object] = {}
        self.current = None

    def optimizer(self, params, lr, betas, eps, weight_decay):
        return self.poptorch.optim.AdamW(params, lr=lr, betas=betas, eps=eps,
                                         weight_decay=weight_decay)

    def step(self, objective, optimizer, batch: dict, temperature: float,
             normaliser: float, lr: float):
        """One optimizer update on the IPU for a host batch of one bucket shape."""
        shape = tuple(batch["input_values"].shape)
        if shape[0] % self.split:
            raise ValueError(f"batch of {shape[0]} rows does not split over replication x "
                             f"accumulation x device iterations = {self.split}")
        if shape not in self.models:
            self.models[shape] = self.poptorch.trainingModel(
                _IpuStep(objective, self.poptorch), options=self.options, optimizer=optimizer)
        model = self.models[shape]
        if self.current is not None and self.current is not model:
            # One executable on the device at a time; the weights travel through the host.
            self.current.copyWeightsToHost()
            self.current.detachFromDevice()
            if model.isCompiled():
                model.attachToDevice()
                model.copyWeightsToDevice()
        self.current = model
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.setOptimizer(optimizer)
        rows = shape[0]
        temp = torch.full((rows,), temperature)
        norm = torch.full((rows,), normaliser)
        return model(batch["input_values"], batch["attention_mask"],
                     batch["mask_time_indices"], batch["sampled_negative_indices"].long(),
                     temp, norm)
