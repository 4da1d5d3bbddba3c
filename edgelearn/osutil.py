"""Operating-system helpers in one place: durable writes and this process's memory figures.

Durability: a file is written next to its destination under a temp name, fsynced, renamed over
the destination (atomic on POSIX) and its directory fsynced, so a crash leaves either the old
file or the new one, never a torn mix. Temp names are `.NAME.tmp-PID`; a killed writer's
leftovers match `temp_prefix(NAME)` (run directories clear them on `--restart`).

Memory: resident set size from /proc/self/status (Linux), with getrusage as the fallback.
Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's contents to stable storage (the file must exist)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_prefix(name: str) -> str:
    """Prefix of the temp files `atomic_path` writes for destination file name `name`."""
    return f".{name}.tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it, rename it over `path` and fsync
    the directory. On error the temp file is removed and `path` is untouched.

    Args:
        path: destination file.
    """
    path = Path(path)
    tmp = path.with_name(f"{temp_prefix(path.name)}{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON (sorted keys) to `path` atomically and durably."""
    atomic_write_bytes(path, json.dumps(obj, sort_keys=True).encode())


def default_file_mode() -> int:
    """The mode a new file gets from this process's umask (0o666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def proc_status_mb(key: str) -> float | None:
    """A memory figure of this process from /proc/self/status in MiB ("VmRSS", "VmHWM", ...),
    or None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Reads VmHWM from /proc (Linux): unlike getrusage's ru_maxrss it is not inherited from the
    parent across fork+exec, so a CLI run started by a big process reports its own peak.
    """
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now (MiB); the peak where /proc is missing."""
    rss = proc_status_mb("VmRSS")
    return peak_rss_mb() if rss is None else rss


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "current_rss_mb",
           "default_file_mode", "fsync_dir", "fsync_path", "peak_rss_mb", "proc_status_mb",
           "temp_prefix"]
