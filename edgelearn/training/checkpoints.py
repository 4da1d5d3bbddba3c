"""Checkpoints: the arena at a step plus metadata naming it; a cache of the journal.

`checkpoint.json` is {"step", "records", "optimizer", "sha256", "data"}: step count, journal
records it covers (header included), optimizer state, the arena's digest, and the data
position (a data-set run's batch at step t is `batch_indices(n, batch_size, t, seed)`, so the
next step number *is* the data position). A checkpoint that is missing, corrupt or ahead of
the (possibly truncated) journal is ignored: it only saves replay time.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgelearn.errors import EdgelearnError
from edgelearn.journal import Journal, iter_journal
from edgelearn.optim import Optimizer
from edgelearn.osutil import atomic_write_json
from edgelearn.params import ParamStore
from edgelearn.training.rundir import CKPT, CKPT_META


def write_checkpoint(run_dir: Path, store: ParamStore, opt: Optimizer, records: int) -> None:
    """Atomic checkpoint (arena, then its metadata) covering the first `records` journal records.

    Order matters for crash safety: the arena is renamed into place first; metadata naming it
    (with its digest) second. A crash in between leaves metadata whose digest does not match
    the arena, and resume then ignores the checkpoint.
    """
    store.save(run_dir / CKPT)
    atomic_write_json(run_dir / CKPT_META, {
        "step": opt.t, "records": records, "optimizer": opt.state_dict(),
        "sha256": store.digest(),
        "data": {"next_step": opt.t, "order": "batch_indices(n, batch_size, step, data_seed)"},
    })


def checkpoint_meta(run_dir: Path) -> tuple[dict[str, Any], int] | None:
    """(metadata, journal records after the header it covers) of the checkpoint, if any."""
    meta_path = run_dir / CKPT_META
    if not (meta_path.is_file() and (run_dir / CKPT).is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        k = int(meta["step"])
        pos = int(meta.get("records", k + 1)) - 1  # older checkpoints: step records only
    except (ValueError, KeyError, TypeError, OSError):
        return None  # an unusable checkpoint only costs replay time
    return (meta, pos) if k > 0 and pos > 0 else None


def load_checkpoint(run_dir: Path, store: ParamStore, opt: Optimizer,
                    ckpt: tuple[dict[str, Any], int] | None, last: dict[str, Any]) -> int:
    """Load the checkpoint when it is valid and agrees with the journal.

    Args:
        ckpt: `checkpoint_meta` of the run directory.
        last: the journal record (after the header) the checkpoint says it ends on, {} if
            the journal is shorter.
    Returns how many journal records after the header it covers (0 = none usable; store and
    optimizer are then untouched).
    """
    if ckpt is None:
        return 0
    meta, pos = ckpt
    try:
        k = int(meta["step"])
        if not (last.get("kind") == "step" and last.get("step") == k - 1):
            return 0  # ahead of a truncated journal, or not at a step boundary
        saved = store.copy()
        store.load(run_dir / CKPT)
        if store.digest() != meta["sha256"]:
            store.assign(saved.state())
            return 0
        opt.load_state_dict(meta["optimizer"])
        return pos
    except (ValueError, KeyError, TypeError, OSError, EdgelearnError):
        return 0  # an unusable checkpoint only costs replay time


def journal_body(journal: Journal, start: int = 0, stop: int | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Journal records after the header, [start, stop), streamed from the file."""
    records = iter_journal(journal.path, max_records=len(journal))
    return itertools.islice(records, 1 + start, None if stop is None else 1 + stop)


def survey(journal: Journal, pos: int) -> tuple[int, int, dict[str, Any]]:
    """One streamed pass: (step records, rollback records, body record pos - 1 or {})."""
    steps = rollbacks = 0
    at: dict[str, Any] = {}
    for i, rec in enumerate(journal_body(journal)):
        steps += rec.get("kind") == "step"
        rollbacks += rec.get("kind") == "rollback"
        if i == pos - 1:
            at = rec
    return steps, rollbacks, at
