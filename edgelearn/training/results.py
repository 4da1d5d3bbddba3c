"""Typed results of a Session: one step, a run, an evaluation, a replay.

`to_json()` of each gives exactly the keys of the matching CLI `--json` object (`train`,
`eval`, `replay`), so scripts reading the CLI and apps using the API see the same fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any

from edgelearn.params import ParamStore


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as journaled.

    Args:
        step: index of the step (0-based); the run holds step + 1 steps after it.
        loss: loss estimate at the pre-step weights (mean of the finite losses it evaluated).
        accepted: False when the update was rejected (non-finite loss, conservative check).
        evaluations: forwards (loss evaluations) the step used.
        seconds: wall time of the optimizer step (forwards included, journaling excluded).
        record_text: the journal record as written (its JSON text); `record` decodes it.
        lr: the record's learning rate (None where it holds none).
    """

    step: int
    loss: float
    accepted: bool
    evaluations: int
    seconds: float
    record_text: str = field(repr=False)
    lr: float | None = None

    @functools.cached_property
    def record(self) -> dict[str, Any]:
        """The journal record as written (JSON data), decoded on first use (a step that
        nobody reads the record of does not pay for it)."""
        return json.loads(self.record_text)

    def to_json(self) -> dict[str, Any]:
        """{"step", "loss", "accepted", "evaluations", "seconds"}."""
        return {"step": self.step, "loss": self.loss, "accepted": self.accepted,
                "evaluations": self.evaluations, "seconds": self.seconds}


@dataclass(frozen=True)
class RunResult:
    """What `Session.run` did: the `train --json` object.

    Args:
        steps: steps the run holds now (those asked, unless a callback stopped it early);
        resumed_from: steps it held before this call.
        stopped_early: a callback stopped the run early (`Session.request_stop`).
        cache: the frozen-prefix cache report (`StepEvaluator.cache_report`): "enabled",
            "cut" (tensor names), "prefix_nodes", "cached_examples", "bytes", ... or
            {"enabled": False, "reason"}; None when caching was turned off.
        chosen_by: why optimizer "auto" picked `optimizer` (None: named explicitly).
        The other fields are the `train --json` keys (times in ms, memory in MiB).
    """

    steps: int
    resumed_from: int
    rollbacks: int
    loss_first: float | None
    loss_last: float | None
    weights: str
    journal: str
    sha256: str
    optimizer: str
    trainable_params: int
    step_ms_median: float | None
    forward_ms_median: float | None
    peak_rss_mb: float
    batch_size: int
    memory_plan: dict[str, Any] | None
    population_graph: bool
    population_call_ms_median: float | None
    stopped_early: bool = False
    cache: dict[str, Any] | None = None
    chosen_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The `train --json` object (every field but `stopped_early`)."""
        out = dataclasses.asdict(self)
        del out["stopped_early"]
        return out


@dataclass(frozen=True)
class EvalResult:
    """Mean loss (and accuracy for classifiers) over a data set: the `eval --json` object.

    Args:
        loss: mean loss per example.
        accuracy: fraction correct (None for regression bundles).
        n: examples scored.
        seconds: wall time of the evaluation.
        peak_rss_mb: peak resident memory of this process so far (MiB).
    """

    loss: float
    accuracy: float | None
    n: int
    seconds: float
    peak_rss_mb: float

    def to_json(self) -> dict[str, Any]:
        """{"loss", "accuracy", "n", "seconds", "peak_rss_mb"}."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ReplayResult:
    """Weights rebuilt from a journal: the `replay --json` object.

    Args:
        steps: steps replayed.
        sha256: digest of the rebuilt weights (`ParamStore.digest`).
        weights: the file written (None when `replay` was given no `out`).
        store: the rebuilt parameters.
    """

    steps: int
    sha256: str
    weights: str | None
    store: ParamStore = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """{"weights", "sha256", "steps"}."""
        return {"weights": self.weights, "sha256": self.sha256, "steps": self.steps}
