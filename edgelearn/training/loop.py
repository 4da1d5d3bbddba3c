"""The journaled step: one optimizer step on a batch, its record, checkpoints, callbacks.

A step runs the optimizer with the evaluator's forwards for the batch, appends the batch to
the recorded samples (when the run records them), appends the step record (the optimizer's
record + the batch's identity) to the journal, then lets the divergence guard roll back or take
its snapshot (else a checkpoint every `checkpoint_every` steps), then calls the callbacks.
The identity is the scheme the journal's header names (`header.batch_identity`): a new run's
`batch_digest` comes from per-example digests computed once per run for a data set
(`DatasetFeed.digest`: a step hashes 32 bytes per example, not the batch), or from the live
batch's rows; a resumed older run keeps writing `batch_sha256` over the whole batch.
Crash safety: journal records are appended (length-prefixed, CRC-32) and fsynced per policy
(`fsync_every` records / `fsync_seconds`); checkpoints are written to a temp file, fsynced,
renamed, and the directory fsynced. A step that raised half-way leaves the weights perturbed:
the loop is then broken and writes nothing more (the journal still rebuilds the last step).

Memory stays flat however long the run: records go to disk, the loop keeps only the first
and last loss and fixed rings of timings (`budget.run_memory_bytes` counts what it keeps).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgelearn.data import arrays_sha256, batch_digest
from edgelearn.errors import EdgelearnError
from edgelearn.journal import Journal, iter_journal
from edgelearn.optim import Optimizer
from edgelearn.params import ParamStore
from edgelearn.training.callbacks import Callback
from edgelearn.training.checkpoints import write_checkpoint
from edgelearn.training.divergence import DivergenceGuard
from edgelearn.training.evaluators import StepEvaluator
from edgelearn.training.feeds import BatchSource, SampleLog
from edgelearn.training.header import BATCH_SHA256, batch_identity
from edgelearn.training.interrupt import TrainingInterrupted
from edgelearn.training.results import StepResult
from edgelearn.training.rundir import WEIGHTS
from edgelearn.training.timing import Timers

if TYPE_CHECKING:
    from edgelearn.training.session import Session


class RunLoop:
    """The step machinery of an open run (its journal, samples, guard and callbacks).

    Args:
        owner: the session (handed to callbacks).
        run_dir: the run directory.
        store, opt, evaluator: what a step updates and how its forwards run.
        journal: the run's open journal (header written or resumed).
        samples: the recorded-samples writer, or None.
        callbacks: the session's callbacks (called for every step).
        timers: timing rings. checkpoint_every: steps between checkpoints.
    """

    def __init__(self, owner: Session, run_dir: Path, store: ParamStore, opt: Optimizer,
                 evaluator: StepEvaluator, journal: Journal, samples: SampleLog | None,
                 callbacks: Sequence[Callback], timers: Timers, checkpoint_every: int) -> None:
        self.owner, self.run_dir = owner, run_dir
        self.store, self.opt, self.evaluator = store, opt, evaluator
        self.journal, self.samples = journal, samples
        self.callbacks = list(callbacks)
        self.timers, self.checkpoint_every = timers, checkpoint_every
        self.guard: DivergenceGuard | None = None
        self.loss_first: float | None = None
        self.loss_last: float | None = None
        self.broken: str | None = None
        self.dirty = False  # steps taken since the weights were last written
        self.rollbacks_before = 0  # rollback records the journal held when the run opened
        self._extra: Sequence[Callback] = ()  # the callbacks of the `run` in progress
        header = next(iter_journal(journal.path, max_records=1), {})
        #: the journal's batch identity scheme (an older run keeps its `batch_sha256`)
        self.batch_identity = batch_identity(header)

    @property
    def needs_rows(self) -> bool:
        """True when a step reads its batch's rows itself (recorded samples, or the whole
        batch's sha256 of an older run), besides what the evaluator reads."""
        return self.samples is not None or self.batch_identity == BATCH_SHA256

    def _identity(self, x: np.ndarray, y: np.ndarray, digest: str | None) -> dict[str, str]:
        """The step record's batch identity, in the journal's scheme."""
        if self.batch_identity == BATCH_SHA256:
            return {"batch_sha256": arrays_sha256(x, y)}
        return {"batch_digest": digest if digest is not None else batch_digest(x, y)}

    def step(self, x: np.ndarray, y: np.ndarray, digest: str | None = None) -> StepResult:
        """One journaled step on batch (x, y).

        Args:
            digest: the batch's `batch_digest` when the feed knows it (None: from x and y;
                x may then be None only when the evaluator and `needs_rows` do not read it).
        """
        if self.broken:
            raise EdgelearnError(f"this session cannot step any more: {self.broken}")
        if x is None and (digest is None or self.needs_rows):  # a feed that skipped rows
            raise EdgelearnError("internal error: a step without its batch's rows")
        t, fw = self.opt.t, self.evaluator.forwards(x, y)
        try:
            t0 = time.perf_counter()
            # defer: lozo leaves its weight update pending (settled before any other read)
            info = self.opt.step(self.store, fw.evaluate, fw.population, taps=fw.taps,
                                 outputs=fw.outputs, defer=True)
            seconds = time.perf_counter() - t0
            if self.samples is not None:
                self.samples.append(t, x, y)
            written = self.journal.append_text({"kind": "step", **info.record,
                                                **self._identity(x, y, digest)})
        except BaseException as e:  # weights may be perturbed or ahead of the journal
            self.broken = f"step {t} failed ({type(e).__name__}: {e}); reopen the run to resume"
            raise
        self.timers.step.append(seconds)
        self.dirty = True
        result = StepResult(step=t, loss=info.loss, accepted=info.accepted,
                            evaluations=info.evaluations, seconds=seconds, record_text=written,
                            lr=info.record.get("lr"))
        self.loss_last = info.loss
        if self.loss_first is None:
            self.loss_first = info.loss
        if self.guard is not None:  # its good snapshots are the run's checkpoints
            self.guard.on_step(self.owner, result)
        elif (t + 1) % self.checkpoint_every == 0:
            self.checkpoint()
        for cb in (*self.callbacks, *self._extra):
            cb.on_step(self.owner, result)
        return result

    def run(self, batches: BatchSource, todo: range, extra: Sequence[Callback], *,
            interrupted: Callable[[], bool], stop: Callable[[], bool],
            digests: Callable[[int], str] | None = None) -> bool:
        """Steps `todo` on `batches`, `extra` callbacks after the session's; True when a
        callback stopped it early.

        Args:
            digests: step -> `batch_digest` of its batch (`DatasetFeed.digest`; None: from
                each batch's rows).
        Raises TrainingInterrupted (weights and checkpoint written) once `interrupted()`.
        """
        self._extra = extra
        if self.batch_identity == BATCH_SHA256:
            digests = None  # an older run's records hash the whole batch
        try:
            for t in todo:
                if interrupted():
                    self.interrupt()
                if stop():
                    return True
                self.step(*batches(t), digest=digests(t) if digests is not None else None)
        finally:
            self._extra = ()
        return False

    def interrupt(self) -> None:
        """Ctrl-C: write the weights and a checkpoint, raise TrainingInterrupted."""
        self.save()
        raise TrainingInterrupted(self.opt.t)

    def checkpoint(self) -> None:
        """Make the journal durable, then write a checkpoint of the current state."""
        self.journal.sync()
        write_checkpoint(self.run_dir, self.store, self.opt, len(self.journal))
        for cb in (*self.callbacks, *self._extra):
            cb.on_checkpoint(self.owner, self.opt.t)

    def save(self) -> Path:
        """Make the steps so far durable: journal fsync, a checkpoint, the weights.

        With a divergence policy the checkpoint stays the last good snapshot (it is the
        rollback target); resume replays the journal records after it.
        """
        self.journal.sync()
        if self.guard is None and self.opt.t > 0:
            self.checkpoint()
        return self.write_weights()

    def write_weights(self) -> Path:
        """Write `weights.safetensors` (with its sha256 in the metadata)."""
        if self.broken:
            raise EdgelearnError(f"not writing weights: {self.broken}")
        with self.opt.settled(self.store):  # the run goes on with the same bits
            path = self.store.save(self.run_dir / WEIGHTS,
                                   metadata={"sha256": self.store.digest()})
        self.dirty = False
        return path

    def close(self) -> None:
        """Sync and close the journal and the samples (idempotent)."""
        try:
            self.journal.close()
        finally:
            if self.samples is not None:
                self.samples.close()
