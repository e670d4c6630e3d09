"""CPU and CUDA: device placement, autocast and torch.compile over fixed shapes."""

from __future__ import annotations

import contextlib

import torch


class TorchBackend:
    def __init__(self, device: str, precision: str = "fp32", compile_backend: str | None = None):
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--backend cuda: no CUDA device is visible to torch")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision {precision!r}: choose fp32 or bf16")
        self.device = torch.device(device, torch.cuda.current_device()) if device == "cuda" \
            else torch.device("cpu")
        self.precision = precision
        self.compile_backend = compile_backend

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Compile once per input shape: ``dynamic=False`` makes each plan shape its own graph,
        ``fullgraph=True`` turns any graph break into an error instead of a slow path."""
        if not self.compile_backend:
            return module
        return torch.compile(module, backend=self.compile_backend, dynamic=False,
                             fullgraph=True)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        keys = ("input_values", "attention_mask", "mask_time_indices",
                "sampled_negative_indices")
        out = {k: batch[k].to(self.device, non_blocking=True) for k in keys}
        out["sampled_negative_indices"] = out["sampled_negative_indices"].long()
        return out
