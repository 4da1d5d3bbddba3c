"""Frozen-prefix caching on the LiteRT backend: the cached evaluator over a split TFLite model.

`cached_or_plain` calls `search_litert` for a LiteRT run: the bundle's TFLite model (the file
the run's backend binds, for its weight strategy) is split on the device
(`edgelearn.backends.litert_split`), and the same `CachedEvaluator` runs it: the same feature
cache keyed per example, the same memory plan, the same bit-identity checks (suffix output ==
the whole model's output on a probe batch, and prefix rows of an example alone or in a pair ==
its rows in the batch, through the fixed-batch padding); a refused cut moves above the tensors
at fault, and a run with no cut trains uncached with the reason in its `cache` report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgelearn.inputs import Inputs
from edgelearn.training.cached_evaluator import CachedEvaluator
from edgelearn.training.evaluators import LossEvaluator


class LiteRTCachedEvaluator(CachedEvaluator):
    """`CachedEvaluator` whose prefix and suffix are LiteRT interpreters over a LiteRTSplit."""

    def _runners(self, split: Any, store: Any, threads: int | None,
                 providers: Sequence[str]) -> tuple[Any, Any]:
        from edgelearn.backends.litert_split import PrefixRunner, SuffixRunner

        return PrefixRunner(split, store, threads), SuffixRunner(split, store, threads)

    def cache_report(self) -> dict[str, Any]:
        return {**super().cache_report(), "backend": "litert",
                "strategy": self.split.strategy}


def search_litert(bundle: Any, plain: LossEvaluator, *, probe: Inputs | None,
                  threads: int | None, capacity: int, max_cuts: int,
                  refused: list[dict[str, Any]]) -> CachedEvaluator | str:
    """The first cut of the bundle's TFLite model (from the automatic one, moving up) whose
    split passes `CachedEvaluator.mismatch` on `probe`, or why none.

    Args:
        bundle: the run's bundle. plain: its plain loss evaluator on the litert backend.
        probe: a seeded synthetic batch (None: checked on the first real batch only).
        threads: interpreter threads. capacity: bytes of features kept in memory.
        max_cuts: cuts tried. refused: receives the cuts that failed and why.
    """
    from edgelearn.backends.litert_split import LiteRTSplitPlanner

    model = plain.model
    assert model is not None
    if model.backend.runs_taps:
        return "the LiteRT backend runs the taps graph"
    planner = LiteRTSplitPlanner(bundle, model.store, strategy=model.backend.strategy,
                                 output=model.output_name)
    after: set[str] = set()
    for _ in range(max_cuts):
        split = planner.split(after)
        if isinstance(split, str):
            return split
        ev = LiteRTCachedEvaluator(plain, split, model.store, threads=threads, providers=(),
                                   capacity=capacity)
        ev.refused = refused
        bad = ev.mismatch(probe) if probe is not None else None
        if bad is None:
            ev.prefix_seconds = 0.0
            return ev
        refused.append({"cut": list(split.cut.tensors), "reason": bad[0]})
        after |= bad[1]
    return f"no bit-identical cut in {max_cuts} tries"
