"""CPU and CUDA: processes and ranks, device placement, autocast, torch.compile over fixed
shapes, DistributedDataParallel, and the optimizer update."""

from __future__ import annotations

import contextlib
import gc
import math
import os

import torch
import torch.distributed as dist

from . import SUMMED_OUTPUTS, LoaderNeeds, UpdateResult, summed_result

_BATCH_KEYS = (
    "input_values",
    "attention_mask",
    "mask_time_indices",
    "sampled_negative_indices",
    "segment_ids",
)


def init_processes() -> tuple[int, int]:
    """(rank, world size): joins the process group that torchrun or ``accelerate launch``
    describe in the environment (NCCL with a GPU, gloo without), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


class TorchBackend:
    def __init__(
        self,
        device: str,
        precision: str = "auto",
        compile_backend: str | None = None,
        gradient_accumulation_steps: int = 1,
    ):
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--backend cuda: no CUDA device is visible to torch")
        if precision == "auto":  # bf16 autocast where the hardware has it fast
            precision = "bf16" if device == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision {precision!r}: choose fp32 or bf16 on {device}")
        self.name = device
        self.rank, self.world_size = init_processes()
        self.device = (
            torch.device(device, torch.cuda.current_device())
            if device == "cuda"
            else torch.device("cpu")
        )
        self.precision = precision
        # Eager on the CPU, where compiling costs more than it saves on small models.
        self.compile_backend = compile_backend or ("inductor" if device == "cuda" else None)
        self.accumulation = gradient_accumulation_steps
        self.loader_needs = LoaderNeeds(
            split=1,
            bucket_runs=False,
            # Forking a process that runs a process group's threads can deadlock at exit.
            multiprocessing_context="forkserver" if self.world_size > 1 else "fork",
            pin_memory=device == "cuda",
        )
        self.objective = self.step_module = self.optimizer = None
        self.max_grad_norm = None

    def prepare(self, objective, param_groups, lr, betas, eps, max_grad_norm):
        self.objective = objective.to(self.device)
        module = objective
        if self.world_size > 1:
            module = torch.nn.parallel.DistributedDataParallel(objective)
        if self.compile_backend:
            # dynamic=False: each plan shape is its own graph; fullgraph=True: a graph break
            # is an error, not a slow path.
            module = torch.compile(
                module, backend=self.compile_backend, dynamic=False, fullgraph=True
            )
        self.step_module = module
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)
        return self.optimizer

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        out = {k: batch[k].to(self.device, non_blocking=True) for k in _BATCH_KEYS}
        out["sampled_negative_indices"] = out["sampled_negative_indices"].long()
        return out

    def update(self, batches, upcoming, step, limit, schedule) -> UpdateResult:
        """One optimizer update over ``gradient_accumulation_steps`` micro-batches, the loss
        normalised once by the masked frames of the whole update on every rank; skipped (no
        optimizer step) when the loss or the clipped gradient is not finite."""
        micro = [next(batches) for _ in range(self.accumulation)]
        lr, temperature = schedule(step)
        local_masked = sum(float(b["mask_time_indices"].sum()) for b in micro)
        (masked,) = self.all_sum([local_masked])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        temp = torch.tensor(temperature, device=self.device)
        # DDP averages gradients over ranks; scaling by world / global masked frames makes
        # the update the gradient of (sum of losses) / (masked frames of the whole update).
        scale = self.world_size / max(masked, 1.0)
        sums = dict.fromkeys(SUMMED_OUTPUTS, 0.0)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            context = (
                self.step_module.no_sync()
                if not last and self.world_size > 1
                else contextlib.nullcontext()
            )
            with context:
                with self.autocast():
                    out = self.step_module(**self.to_device(batch), temperature=temp)
                (out["loss"] * scale).backward()
            for key in sums:
                sums[key] += float(out[key].detach())
        norm = float(
            torch.nn.utils.clip_grad_norm_(
                self.objective.parameters(), self.max_grad_norm or float("inf")
            )
        )
        finite = math.isfinite(norm) and math.isfinite(sums["loss"])
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return summed_result(
            sums,
            updates=1,
            masked_frames=masked,
            micro_batches=len(micro),
            audio_samples=sum(int(b["audio_samples"]) for b in micro),
            temperature=temperature,
            grad_norm=norm,
            finite=finite,
            applied=finite,
        )

    def eval_forward(self, batch: dict, temperature: float) -> dict:
        with torch.no_grad(), self.autocast():
            return self.objective(
                **self.to_device(batch), temperature=torch.tensor(temperature, device=self.device)
            )

    def weights_to_host(self) -> None:
        pass  # the weights are the host model's own

    def all_sum(self, values: list) -> list:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(tensor)
        return tensor.tolist()

    def all_gather(self, value) -> list:
        if not dist.is_initialized():
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def close(self) -> float:
        # Drop DDP's reducer while the process group is alive: freed later, it took the last
        # reference to the gloo group and deadlocked against gloo's thread over the GIL.
        self.step_module = None
        gc.collect()
        checksum = sum(float(p.detach().double().sum()) for p in self.objective.parameters())
        if dist.is_initialized():
            sums = self.all_gather(checksum)
            low, high = min(sums), max(sums)
            dist.destroy_process_group()
            if low != high:
                raise RuntimeError(f"replicas diverged: weight checksums {low!r} .. {high!r}")
        return checksum
