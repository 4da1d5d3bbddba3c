"""The files of a run directory, what makes one, and clearing one (`train --restart`).

A run directory holds:
  journal.bin              header record (bundle, optimizer config, trainable set, data order)
                           then one record per step (seeds, projected gradients, lr, eps, the
                           batch's sha256, ...)
  checkpoint.safetensors   arena at some step (a cache: the journal alone rebuilds everything)
  checkpoint.json          {"step", "records", "optimizer", "sha256", "data"} naming that arena
  weights.safetensors      the weights after the last step
  session.json             how to reopen the run: bundle path, training and runtime config
                           (`Session.resume`)
  metrics.jsonl            one JSON line per step (loss, lr, timing, held-out scores), written by
                           the CLI's runs (`training.metrics.RunMetrics`)
  samples.bin              the samples each step was fed, when the app asked for them
                           (`TrainConfig(record_samples=True)`); a journal of its own
  lock                     held (flock) while a process trains in this directory
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgelearn.errors import InputError
from edgelearn.journal import MAGIC, JournalError, iter_journal
from edgelearn.osutil import atomic_write_json, fsync_dir, temp_prefix

JOURNAL = "journal.bin"
CKPT = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"
WEIGHTS = "weights.safetensors"
SESSION = "session.json"
SAMPLES = "samples.bin"
LOCK = "lock"
METRICS = "metrics.jsonl"

#: the files of a run that `clear_run` deletes, metadata first (a kill midway never leaves a
#: checkpoint that a new journal could be mistaken for)
RUN_FILES = (CKPT_META, CKPT, WEIGHTS, SAMPLES, METRICS, SESSION, JOURNAL)


def check_run_dir(run_dir: Path) -> None:
    """Refuse run files that are symlinks: training must not write outside its directory."""
    for name in RUN_FILES:
        if (run_dir / name).is_symlink():
            raise InputError(f"{run_dir / name} is a symlink; run files must be plain files "
                             "inside the run directory")


def clear_run(run_dir: Path) -> list[str]:
    """Delete a run directory's own files so its run starts over (`train --restart`).

    Removes the journal, checkpoint (+ metadata), weights, session record, metrics, recorded
    samples and their leftover temp files; keeps the lock (the caller holds it) and every
    other file.
    A directory holding files but no edgelearn journal is refused (InputError); an empty one
    has nothing to clear.

    Args:
        run_dir: the run directory (its lock must be held).
    Returns: names of the files removed.
    """
    journal = run_dir / JOURNAL
    if not journal.is_file():
        if any(p.name != LOCK for p in run_dir.iterdir()):
            raise InputError(f"{run_dir} is not an edgelearn run directory (no {JOURNAL}); "
                             "--restart only clears run directories")
        return []
    with open(journal, "rb") as f:
        head = f.read(len(MAGIC))
    if not MAGIC.startswith(head):
        raise InputError(f"{journal} is not an edgelearn journal; --restart only clears run "
                         "directories")
    temps = tuple(temp_prefix(name) for name in RUN_FILES)
    names = [n for n in RUN_FILES if (run_dir / n).exists()]
    names += sorted(p.name for p in run_dir.iterdir() if p.name.startswith(temps))
    for name in names:
        (run_dir / name).unlink(missing_ok=True)
    fsync_dir(run_dir)
    return names


def write_session_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write `session.json` (bundle path, configs) atomically."""
    atomic_write_json(run_dir / SESSION, {"version": 1, **record})


def read_session_record(run_dir: Path) -> dict[str, Any]:
    """The `session.json` of a run directory; InputError naming the problem."""
    path = run_dir / SESSION
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{run_dir} has no {SESSION}: not a run directory written by "
                         "edgelearn.Session or `edgelearn train`") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable session record ({e})") from None
    if not isinstance(record, dict) or record.get("version") != 1:
        raise InputError(f"{path}: not an edgelearn session record (version 1)")
    return record


def recorded_train(run_dir: str | Path) -> dict[str, Any] | None:
    """The training config a run directory records (`session.json` "train") when it holds a
    run (a journal); None for a new directory or an unreadable record (resume then names
    any mismatch). Symlinked run files are not followed (`check_run_dir` refuses them)."""
    run_dir = Path(run_dir)
    journal, session = run_dir / JOURNAL, run_dir / SESSION
    if not journal.is_file() or journal.is_symlink() or session.is_symlink():
        return None
    try:
        train = read_session_record(run_dir).get("train")
    except InputError:
        return None
    return train if isinstance(train, dict) else None


def recorded_header(run_dir: str | Path) -> dict[str, Any] | None:
    """The journal header of the run a directory holds (None: no journal, a symlinked one, or
    no readable header first)."""
    journal = Path(run_dir) / JOURNAL
    if not journal.is_file() or journal.is_symlink():
        return None
    try:
        first = next(iter_journal(journal, max_records=1), None)
    except (OSError, JournalError):
        return None
    return first if isinstance(first, dict) and first.get("kind") == "header" else None
