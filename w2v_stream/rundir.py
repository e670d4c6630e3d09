"""The output folder's lock: one trainer per output folder.

``OUTPUT_DIR/.lock`` is held with ``flock`` for the run's life and names its holder
("host pid started-at"). The kernel releases a flock when the process holding it ends, however
it ends, so the file a crashed run leaves behind never blocks the next one. A flock belongs to
the open file, which a forked process (a loader worker) would share and keep locked after its
parent dies: a forked child closes its copy at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"
# Descriptors of the locks this process holds; a forked child closes its copies.
_held: set[int] = set()


def _close_copies_in_child() -> None:
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_copies_in_child)


class OutputDirBusy(RuntimeError):
    """Another live process holds the output folder's lock."""


class OutputDirLock:
    """A held lock on an output folder; ``release()`` or leaving the ``with`` block frees it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # the holder's name goes while the lock is still ours
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        _held.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(output_dir: Path) -> OutputDirLock:
    """Create ``output_dir`` and take its lock; raises ``OutputDirBusy`` naming the holder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").split()
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise OSError(
                err.errno,
                f"{path}: cannot lock it ({err.strerror}); the filesystem "
                f"refuses flock (Lustre needs the 'flock' mount option): "
                f"choose an --output_dir on one that allows it",
            ) from err
        who = (
            f"host {holder[0]} pid {holder[1]}, started {holder[2]}"
            if len(holder) == 3
            else "a process that has not written its name yet"
        )
        raise OutputDirBusy(
            f"{output_dir} is in use by another trainer ({who}); wait for it "
            f"to end, stop it, or choose another --output_dir"
        ) from None
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()} {started}\n".encode(), 0)
    _held.add(fd)
    return OutputDirLock(path, fd)
