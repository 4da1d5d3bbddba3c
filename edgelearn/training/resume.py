"""Resume: bring a store and optimizer to the end of a run directory's journal.

Load the newest valid checkpoint, replay the journal records after it (no forwards for
zeroth-order optimizers), continue. Because replay performs the same float operations as
training, an interrupted and resumed run ends bit-identical to an uninterrupted one. Records
are streamed from the file (`iter_journal`), never listed, so memory stays flat however long
the run. A journal header that differs from the session's settings is refused with every
change named (`header_changes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelearn.errors import InputError
from edgelearn.journal import Journal, iter_journal
from edgelearn.optim import Optimizer
from edgelearn.params import ParamStore
from edgelearn.training.checkpoints import checkpoint_meta, journal_body, load_checkpoint, survey
from edgelearn.training.divergence import GuardRule, Snapshot, resume_point
from edgelearn.training.evaluators import StepEvaluator
from edgelearn.training.feeds import BatchSource
from edgelearn.training.header import header_changes
from edgelearn.training.replay import apply_records


@dataclass
class Resumed:
    """Where a resumed run stands.

    Args:
        steps: step records in the journal (= the optimizer's step counter now).
        rollbacks: rollback records in the journal.
        fresh: True when the journal was new (the header was just written).
    """

    steps: int
    rollbacks: int
    fresh: bool


def fewer_steps_error(run_dir: Path, n_steps: int, steps: int) -> InputError:
    """The refusal of a run asked for fewer steps than it holds."""
    return InputError(f"run dir {run_dir} already has {n_steps} steps; --steps {steps} is "
                      f"fewer (pass --steps {n_steps} or more to continue it, or --restart)")


def check_header(journal: Journal, header: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Refuse a journal whose header differs from `header`, naming every change; returns the
    journal's header."""
    old = next(iter_journal(journal.path, max_records=1))
    if old.get("kind") != "header":
        raise InputError(f"{run_dir}: journal does not start with a header")
    if old.get("feed") != header.get("feed"):
        fed = {None: "from a data set (Session.run)", "live": "live samples (Session.step)"}
        raise InputError(f"run dir {run_dir} holds a run fed {fed.get(old.get('feed'), '?')}; "
                         f"it cannot continue with {fed.get(header.get('feed'), '?')} (use "
                         "Session(restart=True), or another run directory)")
    changes = header_changes(old, header)
    if changes:
        raise InputError(f"run dir {run_dir} holds a run with different settings: "
                         f"{', '.join(changes)}; use --restart (Session(restart=True)) to start "
                         "it over, or another run directory (--out)")
    return old


def resume(journal: Journal, header: dict[str, Any], store: ParamStore, opt: Optimizer,
           run_dir: Path, *, rule: GuardRule | None, evaluator: StepEvaluator,
           batches: BatchSource | None, steps: int | None = None) -> Resumed:
    """Write the header of a new journal, or bring store and optimizer to its end.

    Args:
        header: the header this session would write (an existing one must match it).
        rule: the divergence rule (its state is rebuilt too), or None.
        evaluator, batches: how step records are replayed (see `apply_records`).
        steps: the run's requested total; fewer than the journal holds is an InputError.
    """
    if len(journal) == 0:
        journal.append(header)
        journal.sync()
        if rule is not None:
            rule.snap.take(store, opt)
        return Resumed(0, 0, fresh=True)
    old = check_header(journal, header, run_dir)
    if rule is not None:  # the rule the run was journaled with (an older one lacks smoothing)
        rule.journaled_as(old["divergence"])
    ckpt = checkpoint_meta(run_dir)
    n_steps, rollbacks, at_ckpt = survey(journal, ckpt[1] if ckpt else 0)
    if steps is not None and steps < n_steps:
        raise fewer_steps_error(run_dir, n_steps, steps)
    base = None
    if rule is not None:  # rollback target if the checkpoint is no good snapshot
        base = Snapshot()
        base.take(store, opt)
    start = load_checkpoint(run_dir, store, opt, ckpt, at_ckpt)
    if rule is not None and base is not None:
        start = resume_point(rule, journal_body(journal, 0, start), start, store, opt, base)
    apply_records(journal_body(journal, start), store, opt, rule, evaluator, batches)
    if opt.t != n_steps:
        raise InputError(f"{run_dir}: journal step records are not consecutive")
    return Resumed(n_steps, rollbacks, fresh=False)
