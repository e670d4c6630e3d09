"""A CPU simulation of the part of poptorch's API the trainer's IPU path calls; tests only.

It runs a ``trainingModel`` the way poptorch documents it: a host call's batch is cut into
device iterations (outermost, one optimizer step each), each into replicas x gradient
accumulation micro-batches of consecutive rows; losses are summed (``ReductionType.Sum``) and
outputs come back summed (``OutputMode.Sum``). Weights live in the host model itself, so the
copies to and from the host are no-ops. It lets the trainer's IPU loop (call sizes, executables
per shape, hand-over between them, logs, checkpoints, resume) run in CI; it says nothing about
Poplar itself, which is not available here.

It records what the backend asks of Poplar: the blocks (``BeginBlock`` with their IPU, and
which blocks fired in which order during a forward), recomputation checkpoints, and the
options (execution strategy, memory proportions, partials type, stochastic rounding, optimizer
state location and sharding), and refuses what poptorch refuses: a module in two blocks, a
pipeline whose gradient accumulation is below its 2 x stages - 1. ``optim.AdamW`` takes
poptorch's extra arguments: it divides the gradients by ``loss_scaling`` (the executor scales
the loss by it) and updates in fp32 whatever the weights' type, rounding to nearest where the
IPU rounds stochastically.
"""

from __future__ import annotations

import json
import math
import os

import torch

LOG = os.environ.get("SIM_POPTORCH_LOG")  # one JSON line per host call, for the test
BLOCKS: list[tuple[str, int]] = []  # every BeginBlock's (name, ipu), in declaration order
FIRED: list[tuple[str, int]] = []  # the blocks as their modules are called, in call order
CHECKPOINTS: list[tuple[int, ...]] = []  # the shape of each recomputation checkpoint


class ReductionType:
    Sum = "sum"


class OutputMode:
    Sum = "sum"


class AutoStage:
    SameAsIpu = "SameAsIpu"
    AutoIncrement = "AutoIncrement"


class PipelinedExecution:
    def __init__(self, *args):
        self.args = args

    def describe(self) -> str:
        return f"PipelinedExecution({', '.join(map(str, self.args))})"


class TensorLocationSettings:
    def __init__(self):
        self.settings = {}

    def useOnChipStorage(self, use=True):
        self.settings["onChip"] = bool(use)
        return self

    def useReplicatedTensorSharding(self, use=True):
        self.settings["replicatedTensorSharding"] = bool(use)
        return self


class _TensorLocations:
    def __init__(self):
        self.optimizer = None

    def setOptimizerLocation(self, location: TensorLocationSettings):
        self.optimizer = dict(location.settings)


class _Precision:
    def __init__(self):
        self.partials = "float"
        self.stochastic_rounding = False

    def setPartialsType(self, dtype):
        assert dtype in (torch.float32, torch.half)
        self.partials = "half" if dtype == torch.half else "float"

    def enableStochasticRounding(self, enabled):
        self.stochastic_rounding = bool(enabled)


class _Training:
    def __init__(self):
        self.accumulation = 1

    def gradientAccumulation(self, n):
        self.accumulation = n

    def accumulationAndReplicationReductionType(self, kind):
        assert kind == ReductionType.Sum


class Options:
    def __init__(self):
        self.Training = _Training()
        self.Precision = _Precision()
        self.TensorLocations = _TensorLocations()
        self.replicas = self.iterations = 1
        self.cache = None
        self.strategy = None
        self.memory = None

    def setExecutionStrategy(self, strategy):
        self.strategy = strategy

    def setAvailableMemoryProportion(self, proportions: dict):
        assert all(k.startswith("IPU") and 0 <= v <= 1 for k, v in proportions.items())
        self.memory = dict(proportions)

    def describe(self) -> dict:
        return {
            "strategy": self.strategy and self.strategy.describe(),
            "memory": self.memory,
            "partials": self.Precision.partials,
            "stochastic_rounding": self.Precision.stochastic_rounding,
            "optimizer_location": self.TensorLocations.optimizer,
        }

    def randomSeed(self, seed):
        # Poplar seeds the device's generator; here the draws come from the host process's
        # torch generator, which the trainer's checkpoints carry.
        self.seed = seed

    def replicationFactor(self, n):
        self.replicas = n

    def deviceIterations(self, n):
        self.iterations = n

    def outputMode(self, mode):
        assert mode == OutputMode.Sum

    def enableExecutableCaching(self, path):
        self.cache = path


def identity_loss(x, reduction):
    assert reduction == "sum"
    return x


def BeginBlock(
    layer_to_call: torch.nn.Module, user_id: str | None = None, ipu_id: int | None = None
):
    if any(getattr(h, "block", None) for h in layer_to_call._forward_pre_hooks.values()):
        raise RuntimeError("module has already been assigned to a block.")

    def fired(module, inputs):
        FIRED.append((user_id, ipu_id))

    fired.block = (user_id, ipu_id)
    layer_to_call.register_forward_pre_hook(fired)
    BLOCKS.append((user_id, ipu_id))
    return layer_to_call


def recomputationCheckpoint(*tensors):
    CHECKPOINTS.extend(tuple(t.shape) for t in tensors)
    return tensors[0] if len(tensors) == 1 else tensors


class _AdamW(torch.optim.AdamW):
    """poptorch.optim.AdamW's arguments over an fp32 update (see the module docstring)."""

    def __init__(
        self,
        params,
        lr,
        betas,
        eps,
        weight_decay=0.01,
        loss_scaling=None,
        max_grad_norm=None,
        accum_type=None,
        first_order_momentum_accum_type=None,
        second_order_momentum_accum_type=None,
        bias_correction=None,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        self.max_grad_norm = math.inf if max_grad_norm is None else max_grad_norm
        self.types = [
            str(t)
            for t in (accum_type, first_order_momentum_accum_type, second_order_momentum_accum_type)
        ]

    @torch.no_grad()
    def step(self):
        grads = {
            p: p.grad.float() / self.loss_scaling
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        }
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
        )
        clip = min(1.0, self.max_grad_norm / (float(norm) + 1e-6))
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p not in grads:
                    continue
                grad = grads[p] * clip
                state = self.state[p]
                if not state:
                    state.update(
                        step=torch.tensor(0.0),
                        exp_avg=torch.zeros_like(grad),
                        exp_avg_sq=torch.zeros_like(grad),
                    )
                state["step"] += 1
                step = float(state["step"])
                weight = p.float().mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
                weight.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))
                p.copy_(weight)

    def load_state_dict(self, state_dict):
        # torch casts the state to each weight's type; the update's state stays fp32.
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value):
                    self.state[params[int(index)]][key] = value.float().clone()


class optim:
    AdamW = _AdamW


_attached: list = []


class _Executor:
    def __init__(self, module, options, optimizer):
        self.module, self.options, self.optimizer = module, options, optimizer
        self.shape = None
        _attached.append(self)
        assert len(_attached) == 1, "two executables attached at once"

    def setOptimizer(self, optimizer):
        self.optimizer = optimizer

    def _check_pipeline(self):
        """What poptorch refuses at compilation: pipeline stages (one per IPU) out of order,
        and gradient accumulation below 2 x stages - 1."""
        ipus = [ipu for _, ipu in FIRED]
        assert ipus == sorted(ipus), f"blocks fired out of IPU order: {FIRED}"
        stages = len(set(ipus))
        if isinstance(self.options.strategy, PipelinedExecution) and stages > 1:
            needed = 2 * stages - 1
            assert self.options.Training.accumulation >= needed, (
                f"gradient accumulation {self.options.Training.accumulation} < {needed}"
            )

    def __call__(self, *inputs):
        assert self in _attached
        rows = inputs[0].shape[0]
        new = self.shape is None
        if new:
            self.shape = tuple(inputs[0].shape)  # compiled for this shape and no other
        assert tuple(inputs[0].shape) == self.shape, "a new shape for a compiled executable"
        o = self.options
        per_iteration = rows // o.iterations
        micro = per_iteration // (o.replicas * o.Training.accumulation)
        assert micro * o.replicas * o.Training.accumulation * o.iterations == rows
        scale = getattr(self.optimizer, "loss_scaling", 1.0)
        sums, fired, checkpoints = None, None, None
        for it in range(o.iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(it * per_iteration, (it + 1) * per_iteration, micro):
                FIRED.clear()
                CHECKPOINTS.clear()
                out = self.module(*(x[start : start + micro] for x in inputs))
                self._check_pipeline()
                fired, checkpoints = list(FIRED), len(CHECKPOINTS)
                (out[0] * scale).backward()
                got = [t.detach().double() for t in out]
                sums = got if sums is None else [a + b for a, b in zip(sums, got)]
            self.optimizer.step()
        if LOG:
            weights = {str(p.dtype) for p in self.module.parameters()}
            with open(LOG, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "iterations": o.iterations,
                            "shape": self.shape,
                            "compiled": new,
                            "replicas": o.replicas,
                            "accumulation": o.Training.accumulation,
                            "blocks": BLOCKS,
                            "fired": fired,
                            "checkpoints": checkpoints,
                            "weights": sorted(weights),
                            "loss_scaling": scale,
                            "optimizer_types": getattr(self.optimizer, "types", None),
                            **o.describe(),
                        }
                    )
                    + "\n"
                )
        return tuple(s.float() for s in sums)

    def copyWeightsToHost(self):
        pass

    def detachFromDevice(self):
        _attached.remove(self)

    def attachToDevice(self):
        _attached.append(self)
        assert len(_attached) == 1, "two executables attached at once"

    def destroy(self):
        if self in _attached:
            _attached.remove(self)


def trainingModel(module, options, optimizer):
    return _Executor(module, options, optimizer)
