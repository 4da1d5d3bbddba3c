"""Divergence rollback: back to the last good weights, with a lower learning rate.

With a policy (`TrainConfig(divergence=DivergencePolicy(...))`, off by default), after each
step the step's loss (mean of its finite recorded losses, recomputed from the journal record
so training, resume and replay decide alike) updates a level, its exponential moving average
(`smoothing`), which is compared with `factor` x the level's running minimum; after
`patience` consecutive steps above it the weights go back to the last good snapshot, the
learning rate is scaled by `lr_scale` (cumulative), and the level and its minimum start
over: the restored weights are judged by the losses they give from then on (restoring the
level and minimum of the snapshot's time instead judged them against a minimum they were
often already above: on the tiny MLP of the resume tests, factor 1.5, patience 3, that rolled
back 1995 times in 6000 steps, the former rule 1994 times, this one 373).

Why a level and not the raw losses: one batch's loss is noisy, so the minimum of thousands of
them is an outlier (HAR, ZO-SGD: a minimum of 0.016 where batches run at 0.1-0.5). Raw losses
then sat above 3x that minimum for 20 steps without any divergence, and, the minimum being
kept across the rollback, the restored weights could never get under it again: the run rolled
back every 20 steps, halving the lr each time (61 rollbacks in 1500 steps, ending at the
initial weights). A journal header without `smoothing` (runs journaled before it existed)
keeps that former rule, so those runs still replay and resume.

Snapshots ("good" points) are taken every `every` steps while no streak is running; they are
also the run's checkpoints. The journal gets
{"kind": "rollback", "step", "to_step", "lr_scale", "sha256"}; replay rebuilds the snapshot on
its way (it passes every good point), so the journal alone still rebuilds the weights. The step
counter is not rewound: a rolled-back run still stops after `steps` optimizer steps, and later
steps draw fresh noise and batches.

`GuardRule` is the rule's state, fed the same records in training, resume and replay;
`DivergenceGuard` is the training side, a callback the session installs when the run has a
policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn.errors import InputError
from edgelearn.journal import Journal
from edgelearn.optim import Optimizer
from edgelearn.params import ParamStore
from edgelearn.training.callbacks import Callback

if TYPE_CHECKING:
    from edgelearn.training.results import StepResult
    from edgelearn.training.session import Session


#: the loss level's default smoothing (`DivergencePolicy.smoothing`)
DEFAULT_SMOOTHING = 0.9


@dataclass(frozen=True)
class DivergencePolicy:
    """When to roll back: loss level above `factor` x its running minimum for `patience` steps.

    Args:
        factor: threshold multiplier (> 1) on the running minimum of step losses.
        patience: consecutive steps above the threshold that trigger a rollback (>= 1).
        lr_scale: learning-rate multiplier applied at each rollback (0 < lr_scale <= 1).
        every: steps between good snapshots / checkpoints (None = the run's checkpoint_every).
        smoothing: weight of the previous level in the loss level's moving average
            (0 <= smoothing < 1; 0: the raw step losses; 0.9: about the last 10 steps).
    """

    factor: float = 3.0
    patience: int = 20
    lr_scale: float = 0.5
    every: int | None = None
    smoothing: float = DEFAULT_SMOOTHING

    def to_json(self, opt: Optimizer, checkpoint_every: int) -> dict[str, Any]:
        """Validated header form (with `every` filled in); InputError naming a bad value."""
        if not opt.supports_lr_scale:
            raise InputError(f"optimizer {opt.name!r} does not support divergence rollback")
        every = checkpoint_every if self.every is None else self.every
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise InputError(f"divergence factor must be > 1, got {self.factor}")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise InputError(f"divergence patience must be an integer >= 1, got {self.patience}")
        if not 0 < self.lr_scale <= 1:
            raise InputError(f"divergence lr_scale must be in (0, 1], got {self.lr_scale}")
        if not (isinstance(every, int) and every >= 1):
            raise InputError(f"snapshot period must be an integer >= 1, got {every}")
        if not _valid_smoothing(self.smoothing):
            raise InputError(f"divergence smoothing must be in [0, 1), got {self.smoothing!r}")
        return {**asdict(self), "factor": float(self.factor),
                "lr_scale": float(self.lr_scale), "every": every,
                "smoothing": float(self.smoothing)}


def _valid_smoothing(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


def _journaled_smoothing(policy: dict[str, Any]) -> float | None:
    """A journal header policy's smoothing (None: absent, the former rule); InputError when
    it is there but no number in [0, 1)."""
    value = policy.get("smoothing")
    if value is not None and not _valid_smoothing(value):
        raise InputError(f"journal header has a malformed divergence smoothing: {value!r}")
    return None if value is None else float(value)


def record_loss(record: dict[str, Any]) -> float:
    """A step's loss from its journal record: mean of the finite losses (as StepInfo.loss)."""
    finite = [float(v) for v in record.get("evals", []) if v is not None]
    return sum(finite) / len(finite) if finite else math.nan


class Snapshot:
    """Trainable slices + optimizer state at a good point (`step` = steps done)."""

    def __init__(self) -> None:
        self.step = -1
        self.flats: dict[str, np.ndarray] = {}
        self.opt_state: dict[str, Any] = {}

    def take(self, store: ParamStore, opt: Optimizer) -> None:
        """Copy the trainable slices and optimizer state (buffers reused across snapshots)."""
        for dt in store.arenas:
            if store.n_trainable(dt):
                src = store.flat(dt)
                if dt in self.flats:
                    np.copyto(self.flats[dt], src)  # reuse: no allocation per snapshot
                else:
                    self.flats[dt] = src.copy()
        self.step = opt.t
        self.opt_state = opt.state_dict()

    def restore(self, store: ParamStore, opt: Optimizer, lr_scale: float | None) -> None:
        """Put the snapshot back; the step counter is kept, lr_scale set (None: as saved)."""
        for dt, a in self.flats.items():
            np.copyto(store.flat(dt), a)
        t = opt.t
        opt.load_state_dict(self.opt_state)
        if lr_scale is not None:
            opt.t, opt.lr_scale = t, lr_scale  # the step counter is never rewound


#: a rollback that would scale the lr below this stops the run with a clear error (the next
#: scales underflow to 0, which no optimizer state may hold); older rules replay as they ran
MIN_LR_SCALE = 1e-300


class GuardRule:
    """Divergence rule state; fed the same journal records in training, resume and replay."""

    def __init__(self, policy: dict[str, Any]) -> None:
        self.factor, self.patience = policy["factor"], policy["patience"]
        self.lr_scale, self.every = policy["lr_scale"], policy["every"]
        #: None: a header from before smoothing (raw losses; the minimum kept on rollback)
        self.smoothing = _journaled_smoothing(policy)
        self.snap = Snapshot()
        self.reset()

    def journaled_as(self, policy: dict[str, Any]) -> None:
        """Follow the policy of the journal being resumed (the same but for a missing
        smoothing: a run journaled before it keeps the former rule)."""
        self.smoothing = _journaled_smoothing(policy)

    def feed_step(self, record: dict[str, Any]) -> str | None:
        """Update on a step record; "rollback" when one is due now, "snapshot" at good points."""
        if self.pending:
            raise InputError(f"journal: step {record.get('step')} follows a due rollback "
                             "(journal written with other settings?)")
        loss = record_loss(record)
        if record.get("accepted", True) and math.isfinite(loss):  # rejected steps: no vote
            level = self._level(loss)
            self.streak = self.streak + 1 if level > self.factor * self.best else 0
            self.best = min(self.best, level)
        if self.streak >= self.patience:
            self.pending = True
            return "rollback"
        if self.streak == 0 and (int(record["step"]) + 1) % self.every == 0:
            return "snapshot"
        return None

    def _level(self, loss: float) -> float:
        """The loss level after a step of loss `loss` (its moving average; legacy: loss)."""
        if self.smoothing is None:
            return loss
        s = self.smoothing
        self.level = loss if self.level is None else s * self.level + (1.0 - s) * loss
        return self.level

    def reset(self) -> None:
        """Forget the losses seen (replay starts over from the base weights)."""
        self.best, self.streak, self.pending = math.inf, 0, False
        self.level: float | None = None

    def rolled_back(self) -> None:
        """A rollback happened: no streak, and (unless legacy) the level and its minimum start
        over, so the restored weights are judged by their own losses."""
        self.pending, self.streak = False, 0
        if self.smoothing is not None:
            self.best, self.level = math.inf, None

    def restore_scaled(self, store: ParamStore, opt: Optimizer) -> float:
        """Roll back to the snapshot with the next lr scale; returns that scale."""
        scale = opt.lr_scale * self.lr_scale
        if self.smoothing is not None and scale < MIN_LR_SCALE:
            raise InputError(f"the loss kept diverging: rollbacks took the learning rate to "
                             f"{scale:.3g} x its setting at step {opt.t}; lower the lr or relax "
                             "the divergence policy (factor, patience)")
        self.snap.restore(store, opt, scale)
        self.rolled_back()
        return scale


def guard_from_header(header: dict[str, Any]) -> GuardRule | None:
    """The rule of a journal header's divergence policy (None: the run has none)."""
    policy = header.get("divergence")
    if policy is None:
        return None
    try:
        return GuardRule(policy)
    except (KeyError, TypeError):
        raise InputError("journal header has a malformed divergence policy") from None


def weights_digest(store: ParamStore, opt: Optimizer) -> str:
    """sha256 of the weights the run is at (a pending update included, `Optimizer.settled`):
    what `replay` of the journal up to that point reports."""
    with opt.settled(store):
        return store.digest()


def apply_rollback(rule: GuardRule | None, store: ParamStore, opt: Optimizer,
                   record: dict[str, Any]) -> None:
    """Replay a rollback record: same restore as training, checked against its digest."""
    if rule is None:
        raise InputError("journal has a rollback record but its run has no divergence policy")
    want_scale = opt.lr_scale * rule.lr_scale
    if not rule.pending or record.get("to_step") != rule.snap.step \
            or record.get("lr_scale") != want_scale or record.get("step") != opt.t:
        raise InputError(f"journal rollback at step {record.get('step')} does not follow from "
                         "the divergence rule (corrupt, or written with other settings)")
    rule.restore_scaled(store, opt)
    if weights_digest(store, opt) != record.get("sha256"):
        raise InputError(f"journal rollback at step {record.get('step')} does not reproduce "
                         "its weights digest")


def rollback(rule: GuardRule, journal: Journal, store: ParamStore, opt: Optimizer) -> None:
    """Training side: restore the last good snapshot, lower lr, journal the event."""
    rec: dict[str, Any] = {"kind": "rollback", "step": opt.t, "to_step": rule.snap.step}
    rec["lr_scale"] = rule.restore_scaled(store, opt)
    rec["sha256"] = weights_digest(store, opt)
    journal.append(rec)
    journal.sync()


def resume_point(rule: GuardRule, body: Iterable[dict[str, Any]], start: int,
                 store: ParamStore, opt: Optimizer, base: Snapshot) -> int:
    """Rebuild the rule's state up to `start` records from the losses alone.

    Args:
        body: the first `start` journal records after the header (streamed).
        base: trainable weights and optimizer state before any record.

    With a divergence policy the checkpoint is always a good snapshot, so it becomes the
    rollback target; if the records say otherwise the checkpoint is dropped and the run is
    replayed from the base weights (start 0, snapshot at step 0).
    """
    event = None
    for rec in body:
        if rec.get("kind") == "rollback":
            rule.rolled_back()
            event = None
        else:
            event = rule.feed_step(rec)
    if start > 0 and event != "snapshot":
        base.restore(store, opt, None)
        rule.reset()
        start = 0
    rule.snap.take(store, opt)
    return start


class DivergenceGuard(Callback):
    """The training side of the rule: after each journaled step, roll back when it is due or
    take a good snapshot (= a checkpoint) at good points.

    Args:
        rule: the run's rule (state rebuilt by resume).
        journal: the run's journal (rollback records go there).
        store, opt: the run's arena and optimizer.
        checkpoint: writes a checkpoint of the current state.
    """

    def __init__(self, rule: GuardRule, journal: Journal, store: ParamStore, opt: Optimizer,
                 checkpoint: Callable[[], None]) -> None:
        self.rule, self.journal, self.store, self.opt = rule, journal, store, opt
        self.checkpoint = checkpoint
        self.rollbacks = 0

    def on_step(self, session: Session, result: StepResult) -> None:
        event = self.rule.feed_step(result.record)
        if event == "rollback":
            rollback(self.rule, self.journal, self.store, self.opt)
            self.rollbacks += 1
        elif event == "snapshot":
            self.rule.snap.take(self.store, self.opt)
            self.checkpoint()

    def finish_pending(self) -> None:
        """A run killed between a step and its rollback: do the rollback now (on resume)."""
        if self.rule.pending:
            rollback(self.rule, self.journal, self.store, self.opt)
            self.rollbacks += 1
