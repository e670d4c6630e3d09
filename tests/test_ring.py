"""The shared-memory batch ring: slots reused and waited for, copies the trainer owns, the
/dev/shm check, a worker that outlives its trainer."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from w2v_stream.ring import BatchRing, check_shared_memory

from conftest import REPO

# Two buckets: the ring sizes every slot for the larger of each array.
LAYOUTS = [
    {"input_values": ((4, 500), np.float32), "negatives": ((4, 2, 3), np.int32)},
    {"input_values": ((2, 1000), np.float32), "negatives": ((2, 4, 0), np.int32)},
]


def test_worker_slots_are_reused_and_waited_for():
    ring = BatchRing(LAYOUTS, num_workers=1, slots=2)
    writer = ring.writer(0)
    writer.acquire()
    values = writer("input_values", (2, 1000), np.float32)
    values[1, 5] = 2.5
    first = writer.handed_over({"input_values": values, "bucket": 1})
    assert (first.slot, first.shapes, first.info) == (0, {"input_values": (2, 1000)}, {"bucket": 1})
    writer.acquire()
    assert writer.slot == 1 and ring.busy.tolist() == [[1, 1]]
    threading.Timer(0.2, lambda: ring.take(first)).start()  # the trainer copies slot 0 out
    began = time.perf_counter()
    writer.acquire()  # waits until then
    assert time.perf_counter() - began >= 0.15 and writer.slot == 0
    writer("input_values", (2, 1000), np.float32)[1, 5] = 7.0  # slot 0 is reused
    taken = ring.take(first)
    assert float(taken["input_values"][1, 5]) == 7.0 and taken["bucket"] == 1
    assert not taken["input_values"].is_shared()  # a copy: the trainer's own
    with pytest.raises(TypeError, match="holds float32"):
        writer("input_values", (2, 1000), np.float64)
    assert ring.view(0, 0, "negatives", (2, 4, 0)).shape == (2, 4, 0)  # an empty array works


def test_a_batch_takes_its_slot_with_its_first_array_and_a_release_frees_it():
    ring = BatchRing(LAYOUTS, num_workers=2, slots=2)
    writer = ring.writer(1)
    assert ring.busy.tolist() == [[0, 0], [0, 0]]
    negatives = writer("negatives", (4, 2, 3), np.int32)  # takes a slot
    negatives[:] = 9
    values = writer("input_values", (4, 500), np.float32)  # ... and stays in it
    values[:] = 1.5
    batch = writer.handed_over({"input_values": values, "negatives": negatives})
    assert (batch.worker, batch.slot) == (1, 0) and ring.busy.tolist() == [[0, 0], [1, 0]]
    second = writer.handed_over({"input_values": writer("input_values", (2, 1000), np.float32)})
    assert second.slot == 1 and ring.busy.tolist() == [[0, 0], [1, 1]]
    ring.release(second)  # given back without a copy
    assert ring.busy.tolist() == [[0, 0], [1, 0]]
    taken = ring.take(batch)
    assert (taken["negatives"] == 9).all() and (taken["input_values"] == 1.5).all()
    assert ring.busy.tolist() == [[0, 0], [0, 0]]


def test_a_ring_larger_than_shared_memory_is_refused_with_a_message(tmp_path):
    check_shared_memory(1 << 20, str(tmp_path))
    with pytest.raises(RuntimeError, match="shm-size"):
        check_shared_memory(1 << 62, str(tmp_path))


ORPHAN = """
import multiprocessing, os, sys, time
import numpy as np
from w2v_stream.ring import BatchRing

LAYOUTS = [{"input_values": ((2, 10), np.float32)}]


def worker(ring):
    writer = ring.writer(0)
    try:
        writer.acquire()  # every slot is busy, and only the trainer, about to go, frees them
    except RuntimeError as exc:
        with open(sys.argv[1], "w") as f:
            f.write(str(exc))


ring = BatchRing(LAYOUTS, num_workers=1, slots=1)
ring.busy[0, 0] = 1
child = multiprocessing.get_context("fork").Process(target=worker, args=(ring,))
child.start()
print(child.pid, flush=True)
time.sleep(0.5)
os._exit(0)  # the trainer dies without a word to its worker
"""


def test_a_worker_waiting_for_a_slot_stops_when_the_trainer_is_gone(tmp_path):
    script, said = tmp_path / "orphan.py", tmp_path / "said.txt"
    script.write_text(ORPHAN)
    with open(tmp_path / "log.txt", "w") as log:  # no pipe for the orphan to hold open
        proc = subprocess.Popen(
            [sys.executable, str(script), str(said)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        assert proc.wait(timeout=60) == 0, (tmp_path / "log.txt").read_text()
        deadline = time.monotonic() + 20
        while not said.exists() or not said.read_text():
            assert time.monotonic() < deadline, "the orphaned worker still waits for a slot"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the orphan stays in the trainer's group
    assert "trainer's process is gone" in said.read_text()
