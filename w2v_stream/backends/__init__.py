"""Hardware backends: the only code that knows about devices, precision and compilers.

``torch_backend`` serves CPU (eager, or compiled with any torch.compile backend) and CUDA (bf16
autocast + torch.compile over the plan's fixed shapes). ``ipu`` wraps poptorch and is imported
only when ``--backend ipu`` is asked for. Backends never import data or configuration code.
"""

from __future__ import annotations


def resolve_backend(name: str) -> str:
    """``auto`` → cuda when a GPU is visible, else cpu."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "ipu"):
        raise ValueError(f"--backend {name!r}: choose auto, cpu, cuda or ipu")
    return name
