"""Test shorthand over the public API: one call trains (or resumes) a run, one call replays.

`train(bundle, data, run_dir, steps=..., **settings)` opens an `el.Session` with the
settings split into TrainConfig (optimizer zo-sgd unless named) and RuntimeConfig (runtime
defaults: onnxruntime, no device profile, so results do not depend on the machine), runs it
to `steps` and returns the
`train --json` object; `replay_journal` returns (store, steps) of `el.replay`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import edgelearn as el

RUNTIME_KEYS = ("backend", "threads", "providers", "memory_budget_mb", "backend_options",
                "prefix_cache")


class OnStep(el.Callback):
    """Calls fn(step, loss) after every step."""

    def __init__(self, fn: Callable[[int, float], None]) -> None:
        self.fn = fn

    def on_step(self, session: el.Session, result: el.StepResult) -> None:
        self.fn(result.step, result.loss)


def runtime(**settings: Any) -> el.RuntimeConfig:
    """A RuntimeConfig with the old `train()` defaults (onnxruntime, no profile)."""
    return el.RuntimeConfig(**{"backend": "onnxruntime", "device": None, **settings})


def train(bundle: el.Bundle, data: el.Dataset, run_dir: str | os.PathLike, *,
          steps: int = 100, restart: bool = False,
          on_step: Callable[[int, float], None] | None = None,
          callbacks: Sequence[el.Callback] = (), **settings: Any) -> dict[str, Any]:
    """Train (or resume) `run_dir` to `steps` steps; the `train --json` object."""
    rt = runtime(**{k: settings.pop(k) for k in RUNTIME_KEYS
                    if settings.get(k) is not None})
    cbs = [*callbacks, *([OnStep(on_step)] if on_step is not None else [])]
    # zo-sgd unless named: the tests were written when it was TrainConfig's default
    config = el.TrainConfig(**{"optimizer": "zo-sgd", **settings})
    with el.Session(bundle, run_dir, config, rt, restart=restart) as s:
        return s.run(data, steps, callbacks=cbs).to_json()


def taps_evaluate(bundle: el.Bundle, store: el.ParamStore, data: el.Dataset, opt: Any, *,
                  batch_size: int, seed: int, step: int = 0, backend: str = "onnxruntime",
                  threads: int | None = None) -> Callable[[], Any]:
    """The taps evaluate() a training step `step` of a taps optimizer runs (its batch)."""
    from edgelearn.training.evaluators import make_evaluator

    evaluator = make_evaluator(bundle, store, opt, backend=backend, threads=threads)
    evaluator.check_targets(data.y)
    return evaluator.forwards(*data.batch_at(step, batch_size, seed)).taps


def replay_journal(bundle: el.Bundle, journal: str | os.PathLike,
                   data: el.Dataset | None = None) -> tuple[el.ParamStore, int]:
    """(store, steps replayed) of a journal."""
    res = el.replay(bundle, journal, data=data)
    return res.store, res.steps
