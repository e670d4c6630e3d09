"""The output folder's lock against a real second process, alive and then SIGKILLed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from w2v_stream.rundir import OutputDirBusy, lock_output_dir

REPO = Path(__file__).resolve().parents[1]
# Takes the lock, then forks a child as a "fork" DataLoader starts its workers.
HOLD = (
    "import multiprocessing, sys, time\n"
    "from w2v_stream.rundir import lock_output_dir\n"
    "lock = lock_output_dir(sys.argv[1])\n"
    "worker = multiprocessing.get_context('fork').Process(target=time.sleep, args=(600,))\n"
    "worker.start()\n"
    "print(worker.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_second_trainer_is_refused_until_the_first_is_killed(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(OutputDirBusy) as raised:
            lock_output_dir(out)
        message = str(raised.value)
        assert str(out) in message
        assert f"host {socket.gethostname()} pid {holder.pid}, started " in message
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        # The killed holder's file is still there, naming it, and its forked worker still
        # runs; the lock went with the holder.
        assert f" {holder.pid} " in (out / ".lock").read_text()
        os.kill(worker, 0)
        with lock_output_dir(out) as lock:
            assert (out / ".lock").read_text().split()[:2] == [
                socket.gethostname(),
                str(os.getpid()),
            ]
            assert lock.path == out / ".lock"
    finally:
        holder.kill()
        holder.wait()
        os.kill(worker, signal.SIGKILL)


def test_the_lock_is_free_again_after_release_and_one_process_cannot_take_it_twice(tmp_path):
    lock = lock_output_dir(tmp_path / "made" / "here")
    with pytest.raises(OutputDirBusy, match=f"pid {os.getpid()}"):
        lock_output_dir(tmp_path / "made" / "here")
    lock.release()
    lock.release()
    assert (tmp_path / "made" / "here" / ".lock").read_text() == ""
    with lock_output_dir(tmp_path / "made" / "here"):
        pass
    lock_output_dir(tmp_path / "made" / "here").release()
