"""Frozen-prefix caching on the LiteRT backend: the cached evaluator over a split TFLite model.

`cached_or_plain` calls `search_litert` for a LiteRT run: the bundle's TFLite model (the file
the run's backend binds, for its weight strategy) is split on the device
(`edgelearn.backends.litert_split`), and the same `CachedEvaluator` runs it: the same feature
cache keyed per example, the same memory plan, the same bit-identity checks (suffix output ==
the whole model's output on a probe batch, and prefix rows of an example alone or in a pair ==
its rows in the batch, through the fixed-batch padding); a refused cut moves above the tensors
at fault, and a run with no cut trains uncached with the reason in its `cache` report.

tpSGD and the hybrid on LiteRT run model_taps.tflite: `cached_taps_or_plain` calls
`search_litert_taps`, which splits it with the taps a step reads as outputs
(`LiteRTTapsSplitPlanner`) and runs the halves in a `LiteRTCachedTapsEvaluator` (the
`CachedTapsEvaluator` checks: every tap == the whole taps graph's, prefix rows per example).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgelearn.inputs import Inputs
from edgelearn.training.cached_evaluator import CachedEvaluator, first_clean_cut
from edgelearn.training.cached_taps import CachedTapsEvaluator, taps_read
from edgelearn.training.evaluators import LossEvaluator


class LiteRTCachedEvaluator(CachedEvaluator):
    """`CachedEvaluator` whose prefix and suffix are LiteRT interpreters over a LiteRTSplit."""

    per_step_prefix = False  # the per-step prefix is onnxruntime's only (not checked here)

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
    return first_clean_cut(planner, lambda split: LiteRTCachedEvaluator(
        plain, split, model.store, threads=threads, providers=(), capacity=capacity),
        probe, refused, max_cuts)


class LiteRTCachedTapsEvaluator(CachedTapsEvaluator):
    """`CachedTapsEvaluator` whose prefix and suffix are LiteRT interpreters over the halves
    of model_taps.tflite (a LiteRTTapsSplit)."""

    def _runners(self, split: Any, store: Any, threads: int | None,
                 providers: Sequence[str]) -> tuple[Any, Any]:
        from edgelearn.backends.litert_split import PrefixRunner, TapsSuffixRunner

        return PrefixRunner(split, store, threads), TapsSuffixRunner(split, store, threads)

    def cache_report(self) -> dict[str, Any]:
        return {**super().cache_report(), "backend": "litert",
                "strategy": self.split.strategy}


def search_litert_taps(bundle: Any, plain: Any, store: Any, opt: Any, *,
                       probe: Inputs | None, threads: int | None, capacity: int,
                       max_cuts: int, refused: list[dict[str, Any]]
                       ) -> CachedTapsEvaluator | str:
    """The first cut of the bundle's model_taps.tflite (from the automatic one, moving up)
    whose split passes `CachedTapsEvaluator.mismatch` on `probe`, or why none.

    Args:
        bundle: the run's bundle. plain: its plain taps evaluator ("tflite_taps").
        store: the arena the optimizer updates. opt: the taps optimizer (set up).
        probe / threads / capacity / max_cuts / refused: as `search_litert`'s.
    """
    from edgelearn.backends.litert_split import LiteRTTapsSplitPlanner

    in_name = bundle.inputs[0].name
    taps = taps_read(opt, store, in_name)
    planner = LiteRTTapsSplitPlanner(bundle, store, taps=taps)
    found = first_clean_cut(planner, lambda split: LiteRTCachedTapsEvaluator(
        plain, split, store, input_name=in_name, taps=taps, threads=threads, providers=(),
        capacity=capacity), probe, refused, max_cuts)
    if not isinstance(found, str):
        plain.timers.forward.clear()  # the check's forwards are no step's
    return found
