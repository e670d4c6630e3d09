"""A CPU simulation of the part of poptorch's API the trainer's IPU path calls; tests only.

It runs a ``trainingModel`` the way poptorch documents it: a host call's batch is cut into
device iterations (outermost, one optimizer step each), each into replicas x gradient
accumulation micro-batches of consecutive rows; losses are summed (``ReductionType.Sum``) and
outputs come back summed (``OutputMode.Sum``). Weights live in the host model itself, so the
copies to and from the host are no-ops. It lets the trainer's IPU loop (call sizes, executables
per shape, hand-over between them, logs, checkpoints, resume) run in CI; it says nothing about
Poplar itself, which is not available here.
"""

from __future__ import annotations

import json
import os

import torch

LOG = os.environ.get("SIM_POPTORCH_LOG")  # one JSON line per host call, for the test


class ReductionType:
    Sum = "sum"


class OutputMode:
    Sum = "sum"


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
        self.replicas = self.iterations = 1
        self.cache = None

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


class optim:  # noqa: N801 (poptorch's spelling)
    AdamW = torch.optim.AdamW


_attached: list = []


class _Executor:
    def __init__(self, module, options, optimizer):
        self.module, self.options, self.optimizer = module, options, optimizer
        self.shape = None
        _attached.append(self)
        assert len(_attached) == 1, "two executables attached at once"

    def setOptimizer(self, optimizer):
        self.optimizer = optimizer

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
        sums = None
        for it in range(o.iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(it * per_iteration, (it + 1) * per_iteration, micro):
                out = self.module(*(x[start:start + micro] for x in inputs))
                out[0].backward()
                got = [t.detach().double() for t in out]
                sums = got if sums is None else [a + b for a, b in zip(sums, got)]
            self.optimizer.step()
        if LOG:
            with open(LOG, "a") as f:
                f.write(json.dumps({"iterations": o.iterations, "shape": self.shape,
                                    "compiled": new, "replicas": o.replicas,
                                    "accumulation": o.Training.accumulation}) + "\n")
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
