"""How a step's forwards run: the one place that decides it (`make_evaluator`).

An optimizer's `step(store, evaluate, evaluate_population)` never sees a backend; the
evaluator built here hands it the right callables for a batch:
  - plain: evaluate() is the loss of one forward of the bundle's model on the batch;
  - population: evaluate_population(pop) scores K candidates in one runtime call with the
    bundle's population graph (onnxruntime, when it batches the trainable set);
  - lowrank (optimizers with `probe_graph == "lowrank"`: lozo): its low-rank probes scored by
    a rewritten graph that adds s U V^T itself (training/lowrank_evaluator.py), where no
    frozen prefix is cached (a cached suffix scores them as dense candidates);
  - taps (optimizers with `needs == "taps"`: tpSGD, and the hybrid, whose losses come from
    the taps forwards' logits): evaluate() is ONE forward of the taps graph (model_taps.onnx,
    or model_taps.tflite on LiteRT) returning (taps, targets);
  - outputs (optimizers with `needs == "outputs"`: zo-gn): plain or cached, and outputs(pop)
    gives the model outputs of K candidates (one population-graph call where there is one).
The same evaluator replays journal records: a plain optimizer's replay needs no forwards and
no data; a taps optimizer re-runs the step's taps forward on its batch (`replay_needs_data`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelearn.bundle import Bundle
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.inputs import Inputs
from edgelearn.model import Model
from edgelearn.optim import Optimizer, Population
from edgelearn.params import ParamStore
from edgelearn.training.header import optimizer_record
from edgelearn.training.timing import Timers

LossFn = Callable[[np.ndarray, np.ndarray], float]
Batch = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Forwards:
    """What `Optimizer.step` is handed for one batch.

    Args:
        evaluate: () -> the loss at the store's current weights.
        population: pop -> K losses in one call, or None (populations then expand into K
            evaluate() calls).
        taps: () -> (taps, y) of one taps-graph forward (optimizers that read `taps=`), or None.
        outputs: pop -> (first model output of every candidate [K, batch, ...], y, the loss
            function) (optimizers that read `outputs=`), or None.
    """

    evaluate: Callable[[], Any]
    population: Callable[[Population], list[float]] | None
    taps: Callable[[], Any] | None = None
    outputs: Callable[[Population], tuple[np.ndarray, Any, LossFn]] | None = None


class StepEvaluator:
    """Runs the forwards of an optimizer's steps on batches (see the module docstring).

    Args:
        timers: rings that receive forward / population-call durations.
    """

    #: True when replaying a record re-runs forwards on the step's batch (so needs the data)
    replay_needs_data: bool = False
    #: True when populations are scored by the population graph
    population_graph: bool = False
    #: why frozen-prefix caching is off for this run (`cache_report`), when it was asked for
    cache_info: dict[str, Any] | None = None

    def __init__(self, timers: Timers) -> None:
        self.timers = timers

    def forwards(self, x: np.ndarray, y: np.ndarray) -> Forwards:
        """The callables a step on batch (x, y) uses."""
        raise NotImplementedError

    def check_targets(self, y: np.ndarray) -> None:
        """Raise InputError unless the optimizer can use targets like `y` (before journaling)."""

    def header_keys(self) -> dict[str, Any]:
        """What the journal header must pin for replays to run these forwards again."""
        return {}

    def memory_bytes(self, candidates: int | None = None) -> int:
        """Bytes of buffers this evaluator allocates besides the model's (for memory plans),
        for an optimizer whose populations have `candidates` candidates (None: the most)."""
        return 0

    def rows_per_call(self, candidates: int) -> int:
        """Forwards one runtime call runs for a population of `candidates` (their activations
        are live together; 1: candidates run one at a time)."""
        return 1

    def cache_report(self) -> dict[str, Any] | None:
        """The frozen-prefix cache's `cache` report (None: caching was not asked for)."""
        return self.cache_info

    def close(self) -> None:
        """Release what the evaluator holds besides the model (a cache's spill file)."""

    def replay(self, opt: Optimizer, store: ParamStore, record: dict[str, Any],
               batch: Batch | None) -> None:
        """Apply a journaled step record with the same float operations as training.

        Args:
            batch: the step's (x, y); only used when `replay_needs_data`.
        """
        opt.replay(store, optimizer_record(record), defer=True)  # as the run loop stepped


class LossEvaluator(StepEvaluator):
    """Plain loss forwards, with the population graph when the bundle has a usable one.

    Args:
        model: the bound model (None: replay only, no forwards possible).
        loss_fn: loss(outputs, targets) -> float.
        population: the population scorer (`OrtPopulation`) or None.
    """

    def __init__(self, model: Model | None, loss_fn: LossFn | None, population: Any,
                 timers: Timers) -> None:
        super().__init__(timers)
        self.model, self.loss_fn, self.pop_eval = model, loss_fn, population
        self.population_graph = population is not None

    def forwards(self, x: np.ndarray, y: np.ndarray) -> Forwards:
        model, loss_fn, timers = self.model, self.loss_fn, self.timers
        if model is None or loss_fn is None:
            raise EdgelearnError("this evaluator replays only: it has no model to run")

        def evaluate() -> float:
            t0 = time.perf_counter()
            out = model.predict(x)
            timers.forward.append(time.perf_counter() - t0)
            return loss_fn(out, y)

        def evaluate_population(pop: Population) -> list[float]:
            t0 = time.perf_counter()
            losses = self.pop_eval.losses(pop, x, y, loss_fn)
            timers.population.append(time.perf_counter() - t0)
            return losses

        def outputs(pop: Population) -> tuple[np.ndarray, Any, LossFn]:
            t0 = time.perf_counter()
            if self.pop_eval is not None and pop.fill is not None:
                out = self.pop_eval.forward(pop, x)
            else:
                out = placed_outputs(pop, lambda: model.predict(x))
            timers.population.append(time.perf_counter() - t0)
            return out, y, loss_fn

        return Forwards(evaluate, evaluate_population if self.pop_eval is not None else None,
                        outputs=outputs)

    def memory_bytes(self, candidates: int | None = None) -> int:
        return self.pop_eval.memory_bytes(candidates) if self.pop_eval is not None else 0

    def rows_per_call(self, candidates: int) -> int:
        if self.pop_eval is None:
            return 1
        return max(1, min(candidates, self.pop_eval.max_population))


def placed_outputs(pop: Population, run: Callable[[], np.ndarray]) -> np.ndarray:
    """[K, ...]: the output of run() with each candidate of `pop` placed in turn (copied: a
    runtime may write its next output into the same buffer)."""
    rows = []
    for j in range(pop.size):
        pop.place(j)
        rows.append(np.array(run()))
    return np.stack(rows)


class TapsEvaluator(StepEvaluator):
    """One taps-graph forward per step, bound to the same arena as the model.

    On onnxruntime the tap arrays are the backend's reused output buffers (no copy of the
    activations), valid until the next forward.

    Args:
        run: inputs -> every tap array of one taps-graph forward.
        input_name: the model input's name (added to the taps: layer 0 reads it).
        check: targets -> None, raising InputError for targets the head loss cannot use.
        graph: the bundle file role of the taps graph ("onnx_taps" or "tflite_taps").
    """

    replay_needs_data = True

    def __init__(self, run: Callable[..., dict[str, np.ndarray]],
                 input_name: str, check: Callable[[np.ndarray], None], graph: str,
                 timers: Timers) -> None:
        super().__init__(timers)
        self._run, self._input_name, self._check = run, input_name, check
        self.graph = graph

    def one_off_taps(self, x: Inputs) -> dict[str, np.ndarray]:
        """The taps of one forward on batch `x` in arrays of their own, the runtime's working
        memory given back after it (a check beside another session, not a step: nothing of
        the whole graph's activations stays allocated).

        Args:
            x: the model input (a dict of them for a multi-input model).
        """
        feed = x if isinstance(x, dict) else {self._input_name: x}
        out = self._run(feed, reuse_outputs=False, release=True)
        out.update(feed)
        return out

    def forwards(self, x: np.ndarray, y: np.ndarray) -> Forwards:
        def taps() -> tuple[dict[str, np.ndarray], np.ndarray]:
            t0 = time.perf_counter()
            # a multi-input model's batch is a dict (its head-only taps read no input)
            feed = x if isinstance(x, dict) else {self._input_name: x}
            out = self._run(feed)
            self.timers.forward.append(time.perf_counter() - t0)
            out.update(feed)
            return out, y

        def no_loss() -> float:
            raise EdgelearnError("a taps evaluator scores no loss: the step reads taps=")

        return Forwards(no_loss, None, taps)

    def check_targets(self, y: np.ndarray) -> None:
        self._check(y)

    def header_keys(self) -> dict[str, Any]:
        # replay must re-run the same runtime: LiteRT's float results differ from ORT's
        return {"taps_backend": "litert"} if self.graph == "tflite_taps" else {}

    def replay(self, opt: Optimizer, store: ParamStore, record: dict[str, Any],
               batch: Batch | None) -> None:
        if batch is None:
            raise InputError(f"{opt.name} journals replay by re-running the steps on the run's "
                             "data: pass --data")
        opt.replay(store, optimizer_record(record), taps=self.forwards(*batch).taps)


def make_evaluator(bundle: Bundle, store: ParamStore, opt: Optimizer, *, backend: str,
                   threads: int | None = None, model: Model | None = None,
                   loss_fn: LossFn | None = None, population: bool = True,
                   timers: Timers | None = None, prefix_cache: bool = False,
                   cache_bytes: int | None = None) -> StepEvaluator:
    """The evaluator of `opt`'s steps on `bundle` (the only place that tells taps apart).

    Args:
        store: the arena the optimizer updates (taps graphs bind to it too).
        opt: the optimizer (a taps optimizer is set up here with the bundle's layer records).
        backend: runtime backend name of the run.
        threads: runtime threads.
        model: the run's bound model (None: an evaluator that only replays).
        loss_fn: the objective (with `model`).
        population: use the bundle's population graph when it batches the trainable set.
        timers: rings for forward / population timings (a fresh set when None).
        prefix_cache: train on cached frozen-prefix features where the graph splits
            (`edgelearn.training.cached_evaluator`; taps optimizers:
            `edgelearn.training.cached_taps`; bit-identical; onnxruntime and litert).
        cache_bytes: memory for cached features (None: the cache's default bound).
    Raises: InputError when the bundle or backend cannot run the optimizer's forwards.
    """
    timers = timers if timers is not None else Timers()
    if opt.needs == "taps":
        taps = _taps_evaluator(bundle, store, opt, backend=backend, threads=threads,
                               timers=timers)
        from edgelearn.training.cached_taps import cached_taps_or_plain, refuse_uncached

        if not prefix_cache:
            refuse_uncached(opt)  # before anything of the run is written
            return taps

        return cached_taps_or_plain(bundle, taps, store, opt, backend=backend, threads=threads,
                                    capacity=cache_bytes)
    if opt.reads_head:  # zo-readout: the head's geometry (a record, else the ONNX graph)
        from edgelearn.graph_taps import head_layers

        opt.setup(store, layers=head_layers(bundle), output=bundle.outputs[0].name)
    pop_eval = None
    if model is not None and population and model.backend.can_score_population():
        pop_eval = model.backend.population_scorer()  # K candidates per runtime call
    plain = LossEvaluator(model, loss_fn, pop_eval, timers)
    found: StepEvaluator = plain
    if prefix_cache:
        from edgelearn.training.cached_evaluator import cached_or_plain

        found = cached_or_plain(bundle, plain, backend=backend, threads=threads,
                                capacity=cache_bytes, population=population)
    if opt.probe_graph == "lowrank" and found is plain:  # lozo: probes inside the graph
        from edgelearn.training.lowrank_evaluator import lowrank_or_plain

        return lowrank_or_plain(bundle, plain, store, opt, backend=backend, threads=threads)
    return found


def _taps_graph(bundle: Bundle, opt: Optimizer, backend: str) -> str:
    """The bundle file role of the taps graph `backend` runs; InputError saying why not."""
    if "onnx_taps" not in bundle.files:
        why = bundle.manifest.get("taps_unsupported", "exported without taps")
        raise InputError(f"{opt.name} needs a bundle with layer taps; this one has none ({why})")
    from edgelearn.backends import backend_class

    graph = backend_class(backend).taps_role
    if graph is None:
        raise InputError(f"{opt.name} has no taps graph for backend {backend!r}")
    if graph not in bundle.files:
        why = bundle.manifest.get("tflite_taps_skipped") or bundle.manifest.get(
            "tflite_skipped", "exported without formats tflite, or before TFLite taps graphs")
        raise InputError(f"{opt.name} on {backend} needs the bundle's model_taps.tflite; this "
                         f"one has none ({why}): use --backend onnxruntime or re-export")
    return graph


def _taps_evaluator(bundle: Bundle, store: ParamStore, opt: Optimizer, *, backend: str,
                    threads: int | None, timers: Timers) -> TapsEvaluator:
    """Set up a taps optimizer on the bundle's layers and bind its taps graph to `store`."""
    from edgelearn.layers import needed_taps, parse_layers

    graph = _taps_graph(bundle, opt, backend)
    layers = parse_layers(bundle.manifest, {p.name for p in bundle.params})
    opt.setup(store, layers=layers)
    out_shape = bundle.outputs[0].shape[1:]
    fixed = all(isinstance(d, int) for d in out_shape)

    def check(y: np.ndarray) -> None:
        if fixed:
            opt.check_targets(y, out_shape)

    in_name = bundle.inputs[0].name
    need = needed_taps(layers, set(store.trainable_names)) - {in_name}
    return TapsEvaluator(_taps_runner(bundle, store, graph, need, backend=backend,
                                      threads=threads), in_name, check, graph, timers)


def _taps_runner(bundle: Bundle, store: ParamStore, graph: str, need: set[str], *,
                 backend: str, threads: int | None
                 ) -> Callable[..., dict[str, np.ndarray]]:
    """inputs -> the taps a step reads, from the taps graph bound to `store` (in the
    backend's reused output buffers; `reuse_outputs=False, release=True` for a one-off)."""
    from edgelearn.backends import make_backend

    # only the taps a step reads: a frozen layer's taps are dropped from the graph, so
    # onnxruntime may fuse that layer (Conv+BN+Relu) as in the plain graph; backends refuse
    # names that are not graph outputs
    be = make_backend(backend, bundle, threads=threads, graph=graph, outputs=need)
    be.bind(store)
    return functools.partial(be.forward, reuse_outputs=True)
