"""The shared-memory batch ring: slots reused and waited for, copies the trainer owns, the
/dev/shm check."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from w2v_stream.ring import BatchRing, check_shared_memory

# Two buckets: the ring sizes every slot for the larger of each array.
LAYOUTS = [{"input_values": ((4, 500), np.float32), "negatives": ((4, 2, 3), np.int32)},
           {"input_values": ((2, 1000), np.float32), "negatives": ((2, 4, 0), np.int32)}]


def test_worker_slots_are_reused_and_waited_for():
    ring = BatchRing(LAYOUTS, num_workers=1, slots=2)
    writer = ring.writer(0)
    writer.acquire()
    values = writer("input_values", (2, 1000), np.float32)
    values[1, 5] = 2.5
    first = writer.handed_over({"input_values": values, "bucket": 1})
    assert (first.slot, first.shapes, first.info) == (0, {"input_values": (2, 1000)},
                                                      {"bucket": 1})
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
    second = writer.handed_over({"input_values": writer("input_values", (2, 1000),
                                                        np.float32)})
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
