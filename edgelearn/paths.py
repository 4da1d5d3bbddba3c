"""Checks of the paths a command writes, made before anything is written.

A command's output must never land on its own inputs, in a bundle directory, on a data file or
in a directory that belongs to something else. Every problem is an InputError whose message
names the path as the user typed it (not its resolved or base name), so the CLI prints one
line and exits 2. `created_dirs` / `remove_if_unused` let the CLI take back a run directory it
created for a command that then failed before writing anything worth keeping.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgelearn.bundle import MANIFEST
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.journal import read_journal
from edgelearn.training.rundir import CKPT, CKPT_META, JOURNAL, LOCK, METRICS, SESSION

#: files only an edgelearn run directory holds (weights.safetensors is in bundles too)
RUN_MARKERS = (JOURNAL, LOCK, CKPT_META, CKPT)

PathLike = str | os.PathLike


def is_bundle_dir(path: PathLike) -> bool:
    """True when `path` is a directory holding a bundle manifest."""
    return (Path(path) / MANIFEST).is_file()


def is_run_dir(path: PathLike) -> bool:
    """True when `path` is a directory holding an edgelearn run (journal, lock or checkpoint)."""
    p = Path(path)
    return p.is_dir() and not is_bundle_dir(p) and any((p / n).is_file() for n in RUN_MARKERS)


def _check_not_input(out: PathLike, inputs: Iterable[PathLike | None], *,
                     holds: bool = False, fix: str = "write the output somewhere else") -> None:
    """Refuse an output that is an input or lies inside one (with `holds`: or contains one);
    `fix` ends the message with what to do instead."""
    o = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        i = Path(given).resolve()
        also = "" if os.fspath(given) == os.fspath(out) else f" ({given})"
        if o == i:
            raise InputError(f"{out} is an input of this command{also}; {fix}")
        if i in o.parents:
            raise InputError(f"{out} lies inside {given}, an input of this command; {fix}")
        if holds and o in i.parents:
            raise InputError(f"{out} holds {given}, an input of this command; {fix}")


def _check_writable_dir(d: Path, out: PathLike) -> None:
    """`d` (where `out` will be created) is a directory this process can create files in.

    Probed by creating and removing an empty temp directory, as the command would next:
    permission bits alone miss read-only and pseudo file systems (/proc) and root.
    """
    if not d.is_dir():
        raise InputError(f"{out}: {d} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgelearn-probe-", dir=d))
    except OSError as e:
        raise InputError(f"{out}: cannot write into {d} ({e.strerror or e})") from None


def _check_creatable(out: PathLike) -> None:
    """The nearest existing ancestor of a path to be created is a writable directory."""
    for parent in Path(out).parents:
        if parent.exists() or parent.is_symlink():
            _check_writable_dir(parent, out)
            return


def _listing(p: Path, limit: int = 3) -> str:
    names = sorted(c.name for c in p.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_run_out(out: PathLike, *, inputs: Iterable[PathLike | None] = ()) -> None:
    """A training run directory: new, empty, or an edgelearn run (to resume).

    Refuses a bundle directory, a file (a data file), any other non-empty directory, a path
    that is or lies inside one of the command's `inputs`, and a path that cannot be created.
    """
    p = Path(out)
    if is_bundle_dir(p):
        raise InputError(f"{out} is a bundle directory; --out names a run directory "
                         "(e.g. runs/u1), and bundles are never written to")
    if (p.exists() or p.is_symlink()) and not p.is_dir():
        raise InputError(f"{out} exists and is not a directory; --out names a run "
                         "directory (e.g. runs/u1), never a data file")
    _check_not_input(out, inputs)
    if p.exists():
        if not (is_run_dir(p) or not any(p.iterdir())):
            raise InputError(f"{out} is a directory that is not an edgelearn run (it holds "
                             f"{_listing(p)}); use a new or empty directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"{out}: run directory is not writable")
        return
    for parent in p.parents:
        if is_bundle_dir(parent):
            raise InputError(f"{out} is inside the bundle directory {parent}; bundles are "
                             "never written to")
    _check_creatable(out)


def check_file_out(out: PathLike, *, inputs: Iterable[PathLike | None] = (),
                   suffix: str = ".safetensors") -> None:
    """A file to write (atomically): its directory exists, it is not a directory or an input,
    not inside a bundle, and an existing file is only replaced when its name ends in `suffix`.
    """
    p = Path(out)
    if p.is_dir():
        raise InputError(f"{out} is a directory; --out names the file to write "
                         f"(e.g. {p / ('out' + suffix)})")
    _check_not_input(out, inputs)
    if (p.exists() or p.is_symlink()) and not p.name.endswith(suffix):
        raise InputError(f"{out} exists and is not a {suffix} file; not overwriting it")
    parent = p.parent
    if not (parent.exists() or parent.is_symlink()):
        raise InputError(f"{out}: directory {parent} does not exist")
    if is_bundle_dir(parent):
        raise InputError(f"{out} is inside the bundle directory {parent}; bundles are never "
                         "written to")
    _check_writable_dir(parent, out)


def check_dir_out(out: PathLike, *, overwrite: bool = False,
                  inputs: Iterable[PathLike | None] = ()) -> None:
    """A bundle directory to create (export / prepare / bake).

    With `overwrite`, an existing directory is replaced only when it is a bundle or empty:
    never an arbitrary directory, and never one that holds an input of the command.
    """
    p = Path(out)
    _check_not_input(out, inputs, holds=overwrite, fix="--out must be a new directory")
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise InputError(f"{out} exists and is not a directory; --out names a bundle "
                             "directory to create")
        if overwrite and not (is_bundle_dir(p) or not any(p.iterdir())):
            raise InputError(f"{out} is not a bundle directory (it holds {_listing(p)}); "
                             "--overwrite only replaces a bundle")
        return  # without --overwrite the command itself refuses an existing directory
    _check_creatable(out)


def check_demo_out(out: PathLike, names: Iterable[str]) -> None:
    """The demo's directory: its run subdirectories `names` must each pass `check_run_out`."""
    p = Path(out)
    if is_bundle_dir(p):
        raise InputError(f"{out} is a bundle directory; bundles are never written to")
    if p.exists() and not p.is_dir():
        raise InputError(f"{out} is a file; --out names the directory for the demo's runs")
    if not p.exists():
        _check_creatable(out)
        return
    for name in names:
        check_run_out(p / name)


def make_dir(out: PathLike) -> Path | None:
    """Create directory `out` (and missing parents); returns the topmost one created, if any.

    Raises InputError naming `out` when it cannot be created (read-only or pseudo file system).
    """
    p = Path(out)
    missing = [d for d in (p, *p.parents) if not (d.exists() or d.is_symlink())]
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create {out}: {e.strerror or e}") from None
    return missing[-1] if missing else None


def _holds_work(d: Path) -> bool:
    """True when a directory tree holds anything worth keeping (more than a lock, a session
    record, metrics and a journal without step records); unreadable journals count as worth
    keeping."""
    for root, _, files in os.walk(d):
        for name in files:
            if name in (LOCK, SESSION, METRICS):  # written with the header: no work yet
                continue
            if name != JOURNAL:
                return True
            try:
                records, _ = read_journal(Path(root) / name, max_records=2)
            except (EdgelearnError, OSError, ValueError):  # unsure: keep it
                return True
            if len(records) > 1:
                return True
    return False


def remove_if_unused(created: Path | None) -> bool:
    """Remove a directory tree this process created when it holds no work; True if removed."""
    if created is None or not created.is_dir() or created.is_symlink() or _holds_work(created):
        return False
    shutil.rmtree(created, ignore_errors=True)
    return True


@contextlib.contextmanager
def created_dirs(out: PathLike | None) -> Iterator[None]:
    """Create `out` for a command; take it back if the command fails before writing work."""
    created = make_dir(out) if out is not None else None
    try:
        yield
    except BaseException:
        remove_if_unused(created)
        raise


def describe_os_error(e: OSError) -> str:
    """One line for an OSError that escaped a command: the path(s) and what went wrong."""
    what = e.strerror or errno.errorcode.get(e.errno or 0) or type(e).__name__
    if e.filename is None:
        return f"{what} ({e})" if str(e) and str(e) != what else what
    where = os.fsdecode(e.filename)
    if e.filename2 is not None:
        where += f" -> {os.fsdecode(e.filename2)}"
    return f"{where}: {what}"


__all__ = ["RUN_MARKERS", "check_demo_out", "check_dir_out", "check_file_out",
           "check_run_out", "created_dirs", "describe_os_error", "is_bundle_dir",
           "is_run_dir", "make_dir", "remove_if_unused"]
