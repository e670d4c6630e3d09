"""Hardware backends: the only code that knows about devices, processes, precision and
compilers.

Every backend implements ``Backend``: process setup (ranks, the process group), the optimizer,
one optimizer update over its micro-batches, eval forwards, weights back to the host,
collectives over ranks, and teardown. The trainer's loop calls only these, so it has no device
branch. ``torch_backend`` serves CPU (eager, or compiled with any torch.compile backend) and
CUDA (bf16 autocast + torch.compile over the plan's fixed shapes), data parallel through
torchrun or ``accelerate launch``. ``ipu`` wraps poptorch and is imported only when
``--backend ipu`` is asked for. Backends never import data or configuration code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch


@dataclass(frozen=True)
class UpdateResult:
    """What one ``Backend.update`` call did on this rank, summed over its micro-batches."""

    updates: int  # optimizer updates the call ran (several per host call on the IPU)
    masked_frames: float  # masked frames of the call's updates, over all ranks
    loss: float  # the objective's loss, before normalisation by masked frames
    contrastive_loss: float
    diversity_loss: float
    feature_penalty: float  # fairseq's feature penalty, summed like the loss (unweighted)
    correct: float  # masked frames whose positive logit is above every negative's
    prob_perplexity: float  # summed over micro-batches: divide by micro_batches
    code_perplexity: float  # likewise
    num_frames: float  # real frames
    micro_batches: int
    audio_samples: int  # real audio samples read
    temperature: float  # the gumbel temperature of the call's last update
    grad_norm: float | None  # None where it stays on the device
    finite: bool  # loss and (clipped) gradient finite; when not, ``applied`` says what became
    applied: bool  # of the update: the CPU/CUDA path skips it, the IPU has already applied it


# The objective's outputs that add up over an update's micro-batches (and ranks, replicas and
# device iterations), and the UpdateResult field each becomes.
SUMMED_OUTPUTS = {
    "loss": "loss",
    "contrastive_loss": "contrastive_loss",
    "diversity_loss": "diversity_loss",
    "feature_penalty": "feature_penalty",
    "num_correct": "correct",
    "codevector_perplexity": "prob_perplexity",
    "code_perplexity": "code_perplexity",
    "num_frames": "num_frames",
}


def summed_result(sums: dict[str, float], **rest) -> UpdateResult:
    """The UpdateResult of the objective's outputs ``sums`` (keyed as ``SUMMED_OUTPUTS``) and
    the fields only the backend knows (``rest``)."""
    return UpdateResult(**{SUMMED_OUTPUTS[name]: sums[name] for name in SUMMED_OUTPUTS}, **rest)


@dataclass(frozen=True)
class LoaderNeeds:
    """How a backend wants its batches from the loader."""

    split: int  # micro-batches per loader batch: replicas x accumulation on the IPU, else 1
    bucket_runs: bool  # keep batches of one shape together (each shape change costs)
    multiprocessing_context: str  # "forkserver" once a process group's threads run
    pin_memory: bool  # page-locked batches for asynchronous copies to a GPU


# (update) -> (learning rate, gumbel temperature) of that optimizer update.
Schedule = Callable[[int], "tuple[float, float]"]


class Backend(Protocol):
    name: str  # cpu, cuda or ipu
    rank: int
    world_size: int
    device: torch.device  # where the host copy of the weights lives and eval runs
    precision: str
    loader_needs: LoaderNeeds

    def prepare(
        self,
        objective: torch.nn.Module,
        param_groups: list,
        lr: float,
        betas: tuple,
        eps: float,
        max_grad_norm: float | None,
    ) -> Any:
        """Place and wrap the objective; return its optimizer."""

    def update(
        self,
        batches: Iterator[dict],
        upcoming: Callable[[int], list],
        step: int,
        limit: int,
        schedule: Schedule,
    ) -> UpdateResult:
        """Run the next optimizer update(s) from ``batches``: at least one, at most up to
        update ``limit`` (the next log, eval or checkpoint). ``upcoming(n)`` gives the
        buckets of the next n batches without reading them."""

    def eval_forward(self, batch: dict, temperature: float) -> dict:
        """The objective's outputs for one batch, without gradients, on the host weights."""

    def weights_to_host(self) -> None:
        """Bring the host model up to date (before a checkpoint or an eval)."""

    def all_sum(self, values: list) -> list:
        """Element-wise sums over ranks."""

    def all_gather(self, value: Any) -> list:
        """One picklable value from every rank, in rank order."""

    def close(self) -> float:
        """Check that every replica holds the same weights, tear down, and return the
        weights' checksum."""


def resolve_backend(name: str) -> str:
    """``auto`` → cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "ipu"):
        raise ValueError(f"--backend {name!r}: choose auto, cpu, cuda or ipu")
    return name


def create_backend(
    name: str,
    *,
    precision: str = "auto",
    compile_backend: str | None = None,
    gradient_accumulation_steps: int | None = None,
    ipu_replicas: int | None = None,
    ipu_device_iterations: int | None = None,
    ipu_executable_cache: str | None = None,
    ipu_config_name: str | None = None,
    ipu_conv_layers: int = 0,
    ipu_encoder_layers: int = 0,
    seed: int = 0,
) -> Backend:
    """The backend for ``--backend NAME`` (auto, cpu, cuda, ipu), set up and ready.

    The IPU's settings are ``ipu_config_name``'s (optimum's format, or its defaults without
    one) with the ``ipu_*`` and accumulation values given (not None) in their place; its
    blocks are those of a model of ``ipu_conv_layers`` conv and ``ipu_encoder_layers``
    encoder layers."""
    kind = resolve_backend(name)
    if kind == "ipu":
        from . import ipu_config
        from .ipu import IpuBackend

        settings = ipu_config.resolve(
            ipu_config_name,
            replication_factor=ipu_replicas,
            gradient_accumulation_steps=gradient_accumulation_steps,
            device_iterations=ipu_device_iterations,
            executable_cache_dir=ipu_executable_cache,
        )
        try:
            return IpuBackend(settings, ipu_conv_layers, ipu_encoder_layers, seed, precision)
        except ipu_config.IpuConfigError as exc:
            raise ipu_config.IpuConfigError(
                f"{ipu_config_name or 'the IPU defaults'}: {exc}"
            ) from None
    from .torch_backend import TorchBackend

    return TorchBackend(kind, precision, compile_backend, gradient_accumulation_steps or 1)
