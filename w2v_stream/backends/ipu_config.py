"""The IPU's pipeline and memory settings: an ``ipu_config.json`` in optimum-graphcore's
``IPUConfig`` format, read without optimum or poptorch, and where each block of the
objective runs.

This module owns the format as this project reads it: the keys it uses (``USED``), the keys
optimum knows that have no effect here (``IGNORED``, each with why), and that any other key
is an error, as optimum raises for unknown arguments. Values have optimum's defaults. It
imports neither optimum nor poptorch, so a file is checked before anything starts, on any
machine.

The blocks are optimum's wav2vec2 pipeline stages in the order the objective calls them
(``block_names``): the feature encoder's conv layers, the positional embedding, each encoder
layer, the hidden projection, the quantizer and the quantizer projection (23 for BASE, 35
for LARGE), so a published ``layers_per_ipu`` means the same thing here. ``layers_per_ipu``
counts blocks per IPU of one replica, with optimum's wildcard rules (``blocks_per_ipu``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

# Keys used here, with optimum's defaults (``layers_per_ipu`` [-1]: spread evenly;
# ``ipus_per_replica`` None: the length of ``layers_per_ipu``).
USED = {
    "ipus_per_replica": None,
    "layers_per_ipu": [-1],
    "matmul_proportion": 0.2,
    "replication_factor": 1,
    "gradient_accumulation_steps": 1,
    "device_iterations": 1,
    "enable_half_partials": True,
    "recompute_checkpoint_every_layer": False,
    "optimizer_state_offchip": False,
    "replicated_tensor_sharding": False,
    "executable_cache_dir": "",
    "auto_loss_scaling": False,
}
# Keys optimum knows that have no effect here, and why; accepted so that published files load.
_EVAL_ON_HOST = "eval runs on the host's weights here, not on the IPU"
_NO_EMBEDDING = "wav2vec2 has no token embedding or output projection to serialize"
IGNORED = {
    **dict.fromkeys(
        (
            "inference_replication_factor",
            "inference_device_iterations",
            "inference_layers_per_ipu",
            "inference_ipus_per_replica",
            "inference_matmul_proportion",
            "inference_embedding_serialization_factor",
            "inference_serialized_embedding_splits_per_ipu",
            "inference_projection_serialization_factor",
            "inference_serialized_projection_splits_per_ipu",
            "inference_parallelize_kwargs",
            "explicit_ir_inference",
            "sharded_execution_for_inference",
            "execute_encoder_on_cpu_for_generation",
        ),
        _EVAL_ON_HOST,
    ),
    **dict.fromkeys(
        (
            "embedding_serialization_factor",
            "serialized_embedding_splits_per_ipu",
            "projection_serialization_factor",
            "serialized_projection_splits_per_ipu",
        ),
        _NO_EMBEDDING,
    ),
    "parallelize_kwargs": "the placement comes from layers_per_ipu alone",
    "output_mode": "the trainer always sums outputs over a host call",
    "seed": "--seed seeds the device",
    "enable_half_first_order_momentum": (
        "deprecated in optimum; the optimizer's types follow --precision"
    ),
    "optimum_version": "provenance",
    "transformers_version": "provenance",
}


class IpuConfigError(ValueError):
    """An ipu_config.json (or a flag that overrides it) that cannot run."""


@dataclasses.dataclass(frozen=True)
class IpuConfig:
    """The used keys of one ``ipu_config.json``, after flags; see ``USED`` for defaults."""

    ipus_per_replica: int = 1
    layers_per_ipu: tuple[int, ...] = (-1,)
    matmul_proportion: tuple[float, ...] = (0.2,)  # one value for every IPU, or one per IPU
    replication_factor: int = 1
    gradient_accumulation_steps: int = 1
    device_iterations: int = 1
    enable_half_partials: bool = True
    recompute_checkpoint_every_layer: bool = False
    optimizer_state_offchip: bool = False
    replicated_tensor_sharding: bool = False
    executable_cache_dir: str = ""  # "": the trainer's default; "disabled": no cache

    @property
    def pipelined(self) -> bool:
        return self.ipus_per_replica > 1

    def memory_proportions(self) -> dict[str, float]:
        """poptorch's ``setAvailableMemoryProportion`` argument: {"IPU0": p, ...}."""
        values = self.matmul_proportion * (
            self.ipus_per_replica if len(self.matmul_proportion) == 1 else 1
        )
        return {f"IPU{i}": float(p) for i, p in enumerate(values)}


class Placed(NamedTuple):
    """One block of the pipeline and the IPU of the replica it runs on."""

    block: str
    ipu: int


# The type and range of each single-valued key.
_SCALARS = {
    "ipus_per_replica": (int, 1),
    "replication_factor": (int, 1),
    "gradient_accumulation_steps": (int, 1),
    "device_iterations": (int, 1),
    "enable_half_partials": (bool,),
    "recompute_checkpoint_every_layer": (bool,),
    "optimizer_state_offchip": (bool,),
    "replicated_tensor_sharding": (bool,),
    "executable_cache_dir": (str,),
}


def _value(name: str, value, kind: type, low: float | None = None, high: float | None = None):
    """``value`` checked as a ``kind`` within [low, high]; bool is not a number here, and an
    integer is a float."""
    kinds = (int, float) if kind is float else kind
    ok = isinstance(value, kinds) and (kind is bool) == isinstance(value, bool)
    if ok and kind is not bool:
        ok = (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[
            kind
        ]
        bounds = " and ".join(
            ([f">= {low:g}"] if low is not None else [])
            + ([f"<= {high:g}"] if high is not None else [])
        )
        raise IpuConfigError(
            f"{name} must be {wanted}{' ' + bounds if bounds else ''}, got {value!r}"
        )
    return value


def _values(name: str, value, kind: type, low: float, high: float | None = None) -> tuple:
    """A number or a non-empty list of numbers, as a tuple."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise IpuConfigError(f"{name} must not be empty")
    return tuple(
        kind(_value(f"{name} {value!r}: each value", item, kind, low, high)) for item in items
    )


def from_dict(values: dict) -> IpuConfig:
    """An ``IpuConfig`` from a parsed ipu_config.json: unknown keys and bad values raise
    ``IpuConfigError`` naming the key."""
    unknown = sorted(set(values) - set(USED) - set(IGNORED))
    if unknown:
        raise IpuConfigError(
            f"unknown keys {unknown}: this trainer reads {sorted(USED)}, "
            f"and accepts without effect the other optimum-graphcore keys "
            f"listed in w2v_stream/backends/ipu_config.py (IGNORED)"
        )
    for name, value in values.items():
        if isinstance(value, dict):
            raise IpuConfigError(
                f"{name}: per-POD values ({sorted(value)}) are not read "
                f"here; give the value for your system"
            )
    v = {**USED, **values}
    if _value("auto_loss_scaling", v["auto_loss_scaling"], bool):
        raise IpuConfigError(
            "auto_loss_scaling: the IPU path uses a fixed loss scale here; set it to false"
        )
    layers = _values("layers_per_ipu", v["layers_per_ipu"], int, -1)
    if v["ipus_per_replica"] is None:
        v["ipus_per_replica"] = len(layers)
    return IpuConfig(
        layers_per_ipu=layers,
        matmul_proportion=_values("matmul_proportion", v["matmul_proportion"], float, 0, 1),
        **{name: _value(name, v[name], *spec) for name, spec in _SCALARS.items()},
    )


def resolve(
    path: str | Path | None,
    *,
    replication_factor: int | None = None,
    gradient_accumulation_steps: int | None = None,
    device_iterations: int | None = None,
    executable_cache_dir: str | None = None,
) -> IpuConfig:
    """The settings of ``--ipu_config_name PATH`` (optimum's defaults without one), with the
    values of flags given explicitly (not None) in place of the file's, checked."""
    values = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise IpuConfigError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(values, dict):
            raise IpuConfigError(f"{path}: expected a JSON object of IPUConfig keys")
    try:
        config = from_dict(values)
    except IpuConfigError as exc:
        raise IpuConfigError(f"{path}: {exc}") from None
    flags = {
        "replication_factor": replication_factor,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "device_iterations": device_iterations,
        "executable_cache_dir": executable_cache_dir,
    }
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    check(config, source=str(path) if path is not None else "the IPU defaults")
    return config


def check(config: IpuConfig, source: str) -> None:
    """The rules that hold whatever the model: lengths agree with ``ipus_per_replica``, and
    pipelined training has gradient accumulation >= 2 x ipus_per_replica - 1 (poptorch's
    number of pipeline stages, forward and backward, that the accumulation must fill)."""
    ipus = config.ipus_per_replica
    if config.layers_per_ipu != (-1,) and len(config.layers_per_ipu) != ipus:
        raise IpuConfigError(
            f"{source}: layers_per_ipu {list(config.layers_per_ipu)} has "
            f"{len(config.layers_per_ipu)} entries for ipus_per_replica "
            f"{ipus}: give one count per IPU (or [-1] to spread evenly)"
        )
    if len(config.matmul_proportion) not in (1, ipus):
        raise IpuConfigError(
            f"{source}: matmul_proportion {list(config.matmul_proportion)} "
            f"needs 1 value or {ipus} (one per IPU of a replica)"
        )
    stages = 2 * ipus - 1
    if config.pipelined and config.gradient_accumulation_steps < stages:
        raise IpuConfigError(
            f"{source}: a {ipus}-IPU pipeline trains in {stages} stages, so gradient "
            f"accumulation must be at least {stages}, got "
            f"{config.gradient_accumulation_steps}: raise gradient_accumulation_steps (or "
            f"--gradient_accumulation_steps)"
        )


def block_names(num_conv_layers: int, num_encoder_layers: int) -> list[str]:
    """optimum's wav2vec2 pipeline stages, in call order."""
    return (
        [f"Conv {i}" for i in range(num_conv_layers)]
        + ["Positional Embedding"]
        + [f"Encoder {i}" for i in range(num_encoder_layers)]
        + ["Project Hidden", "Quantizer", "Project Quantizer"]
    )


def blocks_per_ipu(config: IpuConfig, num_blocks: int) -> list[int]:
    """``layers_per_ipu`` with optimum's wildcards expanded for a model of ``num_blocks``:
    [-1] spreads the blocks evenly over ``ipus_per_replica`` IPUs; -1 among counts shares the
    blocks the counts leave evenly among the wildcards; either way a remainder goes to the
    last wildcard IPU. Without wildcards the counts must add up to ``num_blocks``."""
    counts = list(config.layers_per_ipu)
    if counts == [-1]:
        counts = [-1] * config.ipus_per_replica
    wildcards = [i for i, n in enumerate(counts) if n == -1]
    fixed = sum(n for n in counts if n != -1)
    if not wildcards:
        if fixed != num_blocks:
            raise IpuConfigError(
                f"layers_per_ipu {counts} places {fixed} blocks but the model has "
                f"{num_blocks}: make the counts add up to {num_blocks}, or use -1 for the "
                f"IPUs that take the rest"
            )
        return counts
    left = num_blocks - fixed
    if left < 0:
        raise IpuConfigError(
            f"layers_per_ipu {counts} places {fixed} blocks before its "
            f"wildcards, more than the model's {num_blocks}"
        )
    share, remainder = divmod(left, len(wildcards))
    for i in wildcards:
        counts[i] = share
    counts[wildcards[-1]] += remainder
    return counts


def placement(config: IpuConfig, num_conv_layers: int, num_encoder_layers: int) -> list[Placed]:
    """Every block of the model and its IPU, in call order (IPU ids never decrease)."""
    names = block_names(num_conv_layers, num_encoder_layers)
    try:
        counts = blocks_per_ipu(config, len(names))
    except IpuConfigError as exc:
        raise IpuConfigError(
            f"{exc} (blocks: {num_conv_layers} conv layers, the positional "
            f"embedding, {num_encoder_layers} encoder layers, project hidden, "
            f"quantizer, project quantizer)"
        ) from None
    ipus = [ipu for ipu, n in enumerate(counts) for _ in range(n)]
    return [Placed(name, ipu) for name, ipu in zip(names, ipus)]


def describe(blocks: list[Placed]) -> str:
    """One line per IPU: its first and last block and how many it runs."""
    lines = []
    for ipu in sorted({p.ipu for p in blocks}):
        names = [p.block for p in blocks if p.ipu == ipu]
        span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        lines.append(f"  IPU{ipu}: {span} ({len(names)} blocks)")
    return "\n".join(lines)
