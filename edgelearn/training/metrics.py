"""`metrics.jsonl`: one JSON line per step of a run, and held-out scores every N steps.

Each step line is {"step": steps done (1-based), "loss" (null when not finite), "lr" (null
when the optimizer has none), "seconds" (optimizer step), "forwards" (evaluations so far),
"accepted", "rejected" (counts so far), "rollbacks" (so far)}, plus "eval_loss" and
"eval_accuracy" every `eval_every` steps and at the run's last step when held-out data is
given. A fresh run with held-out data starts with a {"step": 0, "eval_loss", ...} line (the
score before training). `Session.run` ends with {"kind": "end", "step", "step_ms_median",
"forward_ms_median", "peak_rss_mb", "optimizer", "batch_size"}.

Crash safety: lines are appended and flushed one at a time (not fsynced: metrics, not state).
Readers skip a torn or unparsable line. When a run resumes, lines past the step it resumed
from (written after the last durable journal record) are dropped before appending, so the
file never holds a step twice. Held-out scoring reads the weights only and draws nothing
random: training stays bit-identical with and without it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from edgelearn.data import Dataset
from edgelearn.errors import InputError
from edgelearn.osutil import atomic_write_bytes
from edgelearn.training.callbacks import Callback
from edgelearn.training.rundir import METRICS

if TYPE_CHECKING:
    from edgelearn.training.results import RunResult, StepResult
    from edgelearn.training.session import Session

def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a metrics file (torn / unparsable lines skipped; a step written again
    after a resume replaces the lines from that step on)."""
    return _dedup(list(_lines(Path(path))))


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return
    for raw in text.split("\n"):
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # torn by a kill mid-write, or not ours
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            yield line


def _dedup(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lines in file order, a step written again after a resume replacing the lines from
    that step on."""
    out: list[dict[str, Any]] = []
    for line in lines:
        if line.get("kind") != "end":
            while out and out[-1]["step"] >= line["step"] and out[-1].get("kind") != "end":
                out.pop()
        out.append(line)
    return out


def _json_num(v: Any) -> str:
    """A number as JSON (null for None, NaN, infinities and non-numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "null"
    return str(int(v)) if isinstance(v, int) else repr(float(v))  # np.float64 repr is not JSON


def _num(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


class RunMetrics(Callback):
    """Writes `metrics.jsonl` in the session's run directory (see the module docstring).

    Args:
        eval_data: held-out examples scored every `eval_every` steps (None: no scoring).
        eval_every: steps between held-out scores (>= 1).
        eval_batch_size: examples per forward when scoring.
    Attributes `last_eval` ({"step", "loss", "accuracy"} or None) is the latest score.
    """

    def __init__(self, eval_data: Dataset | None = None, *, eval_every: int = 100,
                 eval_batch_size: int = 256) -> None:
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise InputError(f"eval_every must be an integer >= 1, got {eval_every!r}")
        self.eval_data, self.eval_every = eval_data, eval_every
        self.eval_batch_size = eval_batch_size
        self.last_eval: dict[str, Any] | None = None
        self.total: int | None = None
        self._file: TextIO | None = None
        self._counts = {"forwards": 0, "accepted": 0, "rejected": 0}

    # -- hooks ----------------------------------------------------------------------------------
    def on_start(self, session: Session, *, steps: int) -> None:
        self.total = steps
        done = session.steps_done
        self._open(session, done)
        if done == 0 and self.eval_data is not None:
            self._write({"step": 0, **self._score(session, 0)})

    def on_step(self, session: Session, result: StepResult) -> None:
        done = result.step + 1
        if self._file is None:  # Session.step (live feeding): no on_start
            self._open(session, result.step)
        c = self._counts
        c["forwards"] += result.evaluations
        c["accepted" if result.accepted else "rejected"] += 1
        lr = result.lr
        # formatted by hand: json.dumps of the dict costs several times more per step
        text = (f'{{"step": {done}, "loss": {_json_num(result.loss)}, '
                f'"lr": {_json_num(lr)}, "seconds": {result.seconds:.7f}, '
                f'"forwards": {c["forwards"]}, "accepted": {c["accepted"]}, '
                f'"rejected": {c["rejected"]}, "rollbacks": {session.rollbacks}')
        if self.eval_data is not None and (done % self.eval_every == 0 or done == self.total):
            score = self._score(session, done)
            text += f', "eval_loss": {_json_num(score["eval_loss"])}, ' \
                    f'"eval_accuracy": {_json_num(score["eval_accuracy"])}'
        assert self._file is not None
        self._file.write(text + "}\n")
        self._file.flush()

    def on_end(self, session: Session, result: RunResult | None) -> None:
        if result is not None and self._file is not None:
            self._write({"kind": "end", "step": result.steps, "optimizer": result.optimizer,
                         "batch_size": result.batch_size,
                         "step_ms_median": result.step_ms_median,
                         "forward_ms_median": result.forward_ms_median,
                         "peak_rss_mb": result.peak_rss_mb})
        self.close()

    def close(self) -> None:
        """Close the file (reopened, resuming from the run's step, on the next step)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- internals ------------------------------------------------------------------------------
    def _score(self, session: Session, done: int) -> dict[str, Any]:
        assert self.eval_data is not None
        try:
            res = session.evaluate(self.eval_data, batch_size=self.eval_batch_size)
        except InputError as e:  # say which data set does not fit (not the training set)
            raise InputError(f"held-out data: {e}") from None
        self.last_eval = {"step": done, "loss": res.loss, "accuracy": res.accuracy}
        return {"eval_loss": _num(res.loss), "eval_accuracy": res.accuracy}

    def _open(self, session: Session, done: int) -> None:
        """Open the run's file for appending, first dropping lines past step `done`."""
        path = session.run_dir / METRICS
        kept = _dedup([ln for ln in _lines(path) if ln["step"] <= done])
        if path.exists():
            atomic_write_bytes(path, b"".join(json.dumps(ln).encode() + b"\n" for ln in kept))
        last = next((ln for ln in reversed(kept) if "forwards" in ln), None)
        for key in self._counts:
            self._counts[key] = int(last[key]) if last is not None else 0
        self._file = open(path, "a")  # noqa: SIM115  (closed in on_end / close)

    def _write(self, line: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
