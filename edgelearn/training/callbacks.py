"""Callbacks: hooks a Session calls around its steps (progress, metrics, early stop, ...).

Override the hooks you need; each receives the session. `on_step` and `on_checkpoint` run for
every step (`Session.step` and `Session.run`); `on_start` / `on_end` bracket a `Session.run`
call (`on_end` gets None when the run ended by an exception or Ctrl-C). A callback stops a run
early with `session.request_stop(reason)`; the run then ends at that step boundary like a
finished one (weights written, journal complete), so it resumes and replays as any other.
Callbacks must not change the weights: that would break replay.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from edgelearn.errors import InputError

if TYPE_CHECKING:
    from edgelearn.training.results import RunResult, StepResult
    from edgelearn.training.session import Session


class Callback:
    """Base class: every hook does nothing."""

    def on_start(self, session: Session, *, steps: int) -> None:
        """Before the first step of `Session.run` (steps: the run's total)."""

    def on_step(self, session: Session, result: StepResult) -> None:
        """After each step is journaled."""

    def on_checkpoint(self, session: Session, step: int) -> None:
        """After a checkpoint covering `step` steps is written."""

    def on_end(self, session: Session, result: RunResult | None) -> None:
        """After `Session.run` (None when it ended by an exception or Ctrl-C)."""


class ProgressBar(Callback):
    """Progress a person can read: label, steps, steps/s, ETA, loss, held-out accuracy.

    On a terminal the line is redrawn in place (`\\r`, at most 5x/s); on a stream that is not
    a terminal (a log file, CI) a plain line is written every `interval` seconds and at the
    end. The loss shown is the mean of the finite losses since the last draw (single-batch
    losses are noisy).

    Args:
        stream: where to draw (default stderr).
        label: what the run is (default: the optimizer's name).
        metrics: a `RunMetrics` whose latest held-out score is shown (None: none shown).
        interval: seconds between plain lines when `stream` is not a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, label: str | None = None,
                 metrics: Any = None, interval: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.label, self.metrics, self.interval = label, metrics, interval
        self.total, self.last, self.start, self.first = 0, 0.0, 0.0, 0
        self._losses: list[float] = []
        self._open = False  # a terminal line is drawn and not yet ended

    def on_start(self, session: Session, *, steps: int) -> None:
        self.total, self.last, self.start = steps, 0.0, time.monotonic()
        self.first, self._losses = session.steps_done, []
        if self.label is None:
            self.label = session.optimizer.name

    def on_step(self, session: Session, result: StepResult) -> None:
        if math.isfinite(result.loss):
            self._losses.append(result.loss)
        done, now = result.step + 1, time.monotonic()
        tty = _isatty(self.stream)
        gap = 0.2 if tty else self.interval
        if now - self.last < gap and (done < self.total or not self.total):
            return
        if not self.start:  # Session.step (no on_start): rate from the first step seen
            self.start, self.first = now, result.step
        self.last = now
        text = self._line(done, now, tty)
        self._losses = []
        if tty:
            self.stream.write("\r" + text + "\033[K")
            self._open = True
            if done >= self.total:
                self.stream.write("\n")
                self._open = False
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _line(self, done: int, now: float, tty: bool) -> str:
        """One progress line (with a bar on a terminal; no total or ETA when fed live)."""
        rate = (done - self.first) / max(now - self.start, 1e-9)
        parts = [self.label or "train"]
        total = max(self.total, done)
        if tty and self.total:
            fill = int(20 * done / total)
            parts.append(f"[{'#' * fill}{'.' * (20 - fill)}]")
        parts.append(f"{done}/{total}" if self.total else f"{done} steps")
        parts.append(f"{rate:.1f} steps/s")
        if self.total and done < total and rate > 0:
            parts.append(f"ETA {_duration((total - done) / rate)}")
        elif self.total and done >= total:
            parts.append(f"in {_duration(now - self.start)}")
        return " ".join(parts + self._scores())

    def _scores(self) -> list[str]:
        """Mean loss since the last draw, and the latest held-out score."""
        parts = []
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.4f}")
        score = getattr(self.metrics, "last_eval", None)
        if score and score.get("accuracy") is not None:
            parts.append(f"held-out acc {score['accuracy']:.3f} (step {score['step']})")
        elif score:
            parts.append(f"held-out loss {score['loss']:.4f} (step {score['step']})")
        return parts

    def on_end(self, session: Session, result: RunResult | None) -> None:
        if self._open:  # a bar left unfinished (Ctrl-C, early stop): end its line
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def _duration(seconds: float) -> str:
    """12s, 3m04s, 1h02m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class MetricsLog(Callback):
    """Appends one JSON line per step ({"step", "loss", "accepted", "evaluations",
    "seconds"}) to a file the app names (flushed per line; not fsynced: metrics, not state).

    Args:
        path: the file (created or appended to).
        every: write every this many steps.
    """

    def __init__(self, path: str | os.PathLike, *, every: int = 1) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise InputError(f"MetricsLog every must be an integer >= 1, got {every!r}")
        self.path, self.every = path, every
        self._file: TextIO | None = None

    def on_step(self, session: Session, result: StepResult) -> None:
        if (result.step + 1) % self.every:
            return
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115  (closed in on_end / close)
        loss = result.loss if math.isfinite(result.loss) else None
        self._file.write(json.dumps({**result.to_json(), "loss": loss}) + "\n")
        self._file.flush()

    def on_end(self, session: Session, result: RunResult | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (reopened on the next step)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class EarlyStopping(Callback):
    """Stop a run when the loss has not improved for `patience` steps.

    Forward-only steps are noisy, so the loss compared is the mean over the last `window`
    steps (finite losses of accepted steps only).

    Args:
        patience: steps without an improvement of at least `min_delta` before stopping.
        min_delta: smallest decrease of the windowed loss that counts as an improvement.
        window: steps averaged.
    """

    def __init__(self, *, patience: int = 100, min_delta: float = 0.0, window: int = 20) -> None:
        if not (isinstance(patience, int) and patience >= 1):
            raise InputError(f"EarlyStopping patience must be an integer >= 1, got {patience!r}")
        if not (isinstance(window, int) and window >= 1):
            raise InputError(f"EarlyStopping window must be an integer >= 1, got {window!r}")
        self.patience, self.min_delta, self.window = patience, float(min_delta), window
        self.best = math.inf
        self.since_best = 0
        self._recent: list[float] = []

    def on_step(self, session: Session, result: StepResult) -> None:
        if not (result.accepted and math.isfinite(result.loss)):
            return
        self._recent = [*self._recent, result.loss][-self.window:]
        if len(self._recent) < self.window:
            return
        mean = sum(self._recent) / len(self._recent)
        if mean < self.best - self.min_delta:
            self.best, self.since_best = mean, 0
            return
        self.since_best += 1
        if self.since_best >= self.patience:
            session.request_stop(f"no improvement for {self.patience} steps "
                                 f"(best windowed loss {self.best:.4g})")
