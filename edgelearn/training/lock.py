"""The run lock: one process trains in a run directory at a time (flock on `run_dir/lock`).

A second trainer fails fast with EdgelearnError instead of interleaving journal records. The
lock is released when the holder closes it or dies (the kernel drops flocks of a dead process),
so a SIGKILLed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from edgelearn.errors import EdgelearnError
from edgelearn.training.rundir import LOCK


class RunLock:
    """An exclusive, non-blocking lock on a run directory, held until `release()`.

    Args:
        run_dir: the run directory (must exist); the lock file is created in it.
    Raises: EdgelearnError when another process holds the lock.
    """

    def __init__(self, run_dir: Path) -> None:
        import fcntl  # POSIX only: imported where used

        self.run_dir = run_dir
        self._fd: int | None = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise EdgelearnError(f"{run_dir} is in use by another edgelearn process") from None

    @property
    def held(self) -> bool:
        """True until `release()`."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the `with` block."""
    lock = RunLock(run_dir)
    try:
        yield
    finally:
        lock.release()
