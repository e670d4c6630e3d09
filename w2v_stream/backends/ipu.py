"""Graphcore IPU through poptorch: the only module that imports poptorch.

Written against the poptorch 3.x API (Poplar SDK 3.x) and NOT run on IPU hardware here: no
IPU and no Poplar SDK were available while it was written. The package never imports this
module unless ``--backend ipu`` is asked for.

One compiled executable per bucket shape: poptorch compiles a model for one input shape, so
each shape gets its own ``trainingModel`` over the same weights, and the executable cache
makes later runs load instead of compile. Only one executable is attached at a time; when the
shape changes, the weights and the optimizer state go through the host to the next one (the
loader's ``bucket_runs`` keeps same-shape batches together so this is rare).

One host call is one optimizer update: the host batch (one bucket, rows a multiple of
``replicas x accumulation``) is split by poptorch over replicas and gradient accumulation
(device iterations stay 1, so the learning rate, temperature and loss normaliser of every
update are exact). The gumbel temperature and the normaliser (masked frames of the whole
update) are tensor inputs, one value per row so poptorch can split them with the batch; the
learning rate goes through ``setOptimizer``.
"""

from __future__ import annotations

import inspect

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
    """Objective + normalisation in one graph; poptorch sums over the split host batch."""

    def __init__(self, objective: torch.nn.Module, poptorch):
        super().__init__()
        self.objective = objective
        self.poptorch = poptorch

    def forward(self, input_values, attention_mask, mask_time_indices,
                sampled_negative_indices, temperature, normaliser):
        out = self.objective(input_values, attention_mask, mask_time_indices,
                             sampled_negative_indices, temperature[0])
        loss = self.poptorch.identity_loss(out["loss"] / normaliser[0], reduction="sum")
        return (loss, out["contrastive_loss"], out["diversity_loss"],
                out["codevector_perplexity"], out["code_perplexity"], out["num_frames"])


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


class IpuBackend:
    """Training updates on IPUs; the trainer's loop stays the same for every backend."""

    device = torch.device("cpu")  # where the host keeps weights, and where eval runs

    def __init__(self, replication_factor: int, gradient_accumulation: int,
                 executable_cache_dir: str, seed: int):
        self.poptorch = import_poptorch()
        options = self.poptorch.Options()
        options.randomSeed(seed)  # dropout and gumbel noise drawn on the device
        options.replicationFactor(replication_factor)
        options.deviceIterations(1)
        options.Training.gradientAccumulation(gradient_accumulation)
        options.Training.accumulationAndReplicationReductionType(
            self.poptorch.ReductionType.Sum)
        options.outputMode(self.poptorch.OutputMode.Sum)
        options.enableExecutableCaching(executable_cache_dir)
        self.options = options
        self.split = replication_factor * gradient_accumulation
        self.models: dict[tuple[int, ...], object] = {}
        self.current = None

    def optimizer(self, param_groups, lr: float, betas, eps: float,
                  max_grad_norm: float | None):
        kwargs = {}
        if max_grad_norm:
            accepted = inspect.signature(self.poptorch.optim.AdamW).parameters
            if "max_grad_norm" not in accepted:
                raise ValueError("--max_grad_norm: this poptorch's AdamW cannot clip; leave "
                                 "it unset on the IPU")
            kwargs["max_grad_norm"] = max_grad_norm
        return self.poptorch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, **kwargs)

    def update(self, objective, optimizer, batch: dict, temperature: float,
               normaliser: float, lr: float) -> dict:
        """One optimizer update for a host batch of one bucket shape.

        Returns sums over the update's micro-batches: the loss (before normalisation), its two
        parts, the two perplexities (summed: divide by ``micro_batches``) and valid frames.
        """
        shape = tuple(batch["input_values"].shape)
        rows = shape[0]
        if rows % self.split:
            raise ValueError(f"batch of {rows} rows does not split over replicas x "
                             f"accumulation = {self.split}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        model = self._activate(shape, objective, optimizer)
        model.setOptimizer(optimizer)  # the same object: only the changed lr is sent
        outputs = model(batch["input_values"], batch["attention_mask"],
                        batch["mask_time_indices"],
                        micro_batch_negatives(batch["sampled_negative_indices"], self.split),
                        torch.full((rows,), float(temperature)),
                        torch.full((rows,), float(normaliser)))
        # Outputs come back summed over accumulation (one value per replica): sum the rest.
        loss, contrastive, diversity, prob_ppl, code_ppl, frames = (
            float(torch.as_tensor(x).sum()) for x in outputs)
        return {"loss": loss * normaliser, "contrastive_loss": contrastive,
                "diversity_loss": diversity, "codevector_perplexity": prob_ppl,
                "code_perplexity": code_ppl, "num_frames": frames,
                "micro_batches": self.split}

    def _activate(self, shape: tuple[int, ...], objective, optimizer):
        model = self.models.get(shape)
        if model is not None and model is self.current:
            return model
        if self.current is not None:
            # One executable on the devices at a time: weights and optimizer state go
            # through the host to the next one.
            self.current.copyWeightsToHost()
            state = optimizer.state_dict()  # read back from the executable in use
            self.current.detachFromDevice()
            optimizer.load_state_dict(state)  # the host state the next one starts from
        if model is None:  # compiled (or loaded from the cache) on its first call
            model = self.poptorch.trainingModel(_IpuStep(objective, self.poptorch),
                                                options=self.options, optimizer=optimizer)
            self.models[shape] = model
        else:
            model.setOptimizer(optimizer)
            model.attachToDevice()  # uploads the host weights and optimizer state
        self.current = model
        return model

    def weights_to_host(self) -> None:
        """Bring the host model up to date (before a checkpoint or an eval on the host)."""
        if self.current is not None:
            self.current.copyWeightsToHost()

    def close(self) -> None:
        for model in self.models.values():
            model.destroy()
        self.models, self.current = {}, None
