"""Loss forwards for optimizers whose probes are low rank (`probe_graph == "lowrank"`: lozo).

On onnxruntime a `LowRankPopulation` is scored by the rewritten graph
(`edgelearn.backends.ort_lowrank`): where every perturbed tensor is a Gemm operand, both
probes in ONE run on the batch stacked twice (biases perturbed in the graph too); else per
candidate, the small dense part is written into the store (`prepare`) and one run adds
s U V^T inside the graph. Either way the 2-D weights are never touched by the probes.
Where that graph cannot be built (another backend, a weight read by something other than a
MatMul / Gemm, a batch fixed at 1) the evaluator says why
(`lowrank_info`) and falls back to the plain evaluator, which expands the request into dense
candidates (`place`: W + s U V^T written in numpy). The update and the journal do not depend
on which way the losses were computed (edgelearn/optim/lozo.py), so replay is unchanged.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgelearn.bundle import Bundle
from edgelearn.inputs import feeds
from edgelearn.optim import Optimizer, Population
from edgelearn.optim.lozo import LowRankPopulation
from edgelearn.params import ParamStore
from edgelearn.training.evaluators import Forwards, LossEvaluator, StepEvaluator


class LowRankEvaluator(StepEvaluator):
    """Plain forwards, and low-rank populations through the rewritten graph.

    Args:
        plain: the run's plain loss evaluator (single forwards, other populations).
        runner: the `OrtLowRank` session bound to the same arena, or None: no graph (`why`),
            every population goes to `plain` (dense candidates).
        why: why there is no runner.
    """

    def __init__(self, plain: LossEvaluator, runner: Any, why: str | None = None) -> None:
        super().__init__(plain.timers)
        self.plain, self.runner = plain, runner
        self.population_graph = plain.population_graph
        self.cache_info = plain.cache_info  # why no frozen prefix is cached, when asked
        #: whether the low-rank graph scores the probes, and why not
        self.lowrank_info: dict[str, Any] = {"graph": runner is not None, "why": why}

    def forwards(self, x: Any, y: np.ndarray) -> Forwards:
        base = self.plain.forwards(x, y)
        if self.runner is None:
            return base
        loss_fn, runner, timers = self.plain.loss_fn, self.runner, self.timers
        assert loss_fn is not None
        feed = feeds(runner.inputs, x)

        def population(pop: Population) -> list[float]:
            if not isinstance(pop, LowRankPopulation) or pop.prepare is None:
                if base.population is not None:
                    return base.population(pop)
                out = []
                for j in range(pop.size):
                    pop.place(j)
                    out.append(base.evaluate())
                return out
            if runner.stacked:
                return stacked(pop)
            losses = []
            for j in range(pop.size):
                pop.prepare(j)
                t0 = time.perf_counter()
                logits = runner.forward(feed, pop.factors, pop.scales[j])
                timers.forward.append(time.perf_counter() - t0)
                losses.append(loss_fn(logits, y))
            return losses

        def stacked(pop: LowRankPopulation) -> list[float]:
            n = len(y)
            assert not runner.shared or pop.size == 2  # the shared graph stacks two copies
            rows = feed if runner.shared else {
                k: np.concatenate([v] * pop.size) for k, v in feed.items()}
            scale = np.repeat(np.asarray(pop.scales, np.float32), n)
            t0 = time.perf_counter()
            out = runner.forward(rows, pop.factors, scale, pop.dense)
            timers.population.append(time.perf_counter() - t0)
            return [loss_fn(out[j * n : (j + 1) * n], y) for j in range(pop.size)]

        return Forwards(base.evaluate, population)

    def memory_bytes(self, candidates: int | None = None) -> int:
        return self.plain.memory_bytes(candidates)

    def rows_per_call(self, candidates: int) -> int:
        if self.runner is not None and self.runner.stacked:
            return candidates  # the low-rank probes, stacked in one call
        return self.plain.rows_per_call(candidates)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.plain.close()


def lowrank_or_plain(bundle: Bundle, plain: LossEvaluator, store: ParamStore, opt: Optimizer,
                     *, backend: str, threads: int | None) -> StepEvaluator:
    """The low-rank evaluator of `opt` (its `lowrank_info` says whether the graph scores the
    probes, and why not: then populations are expanded into dense candidates)."""
    if plain.model is None:
        return plain  # replay: no forwards
    if backend != "onnxruntime":
        why = f"backend {backend} has no low-rank graph"
    else:
        from edgelearn.backends.ort_lowrank import OrtLowRank
        from edgelearn.backends.ort_lowrank import why_not as graph_why_not

        why = graph_why_not(bundle, store)
        if why is None:
            rank = int(getattr(opt.options, "rank", 1))
            return LowRankEvaluator(plain, OrtLowRank(bundle, store, rank, threads=threads,
                                                      pending=True))
    return LowRankEvaluator(plain, None, why)
