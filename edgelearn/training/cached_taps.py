"""Taps forwards on cached frozen-prefix features: tpSGD and the hybrid run the suffix only.

A tpSGD step (`edgelearn.optim.tpsgd`) reads one forward of the bundle's taps graph
(model_taps.onnx: the logits plus each trainable layer's taps); the hybrid
(`edgelearn.optim.hybrid`) reads 2q of them. When every trainable weight sits after a cut,
the taps graph splits there like the loss graph (`edgelearn.prefix_cache`, with the taps a
step reads as the split's outputs, logits first): the prefix runs once per example into the
same `FeatureCache` (keys, memory plan, spill file and recompute as `CachedEvaluator`'s), and
every taps forward is one suffix forward. A tap above the cut (a head's input, the only
hidden tap of a head-only step) is itself a cut tensor: it comes from the cached features,
not from the suffix. On LiteRT the same evaluator runs the halves of model_taps.tflite, split
on the device (`edgelearn.training.litert_cached.LiteRTCachedTapsEvaluator`).

Bit-identity with the uncached taps forwards is checked as for the loss graph: on a seeded
probe batch at setup and on the first real batch, every tap of the split graphs must equal
the whole taps graph's, and the prefix rows of an example computed alone or in a pair must
equal those of the batch; a cut that fails moves above the tensors at fault (up to
`MAX_CUTS` tries), and a failure on the first real batch falls back to the uncached taps
forwards for the rest of the session, the reason in the `cache` report. Replay re-runs the
taps forwards through the same evaluator, cached or not: the floats are the same.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgelearn import graph_update
from edgelearn.errors import InputError
from edgelearn.inputs import Inputs, has_batch_axis
from edgelearn.optim import Optimizer
from edgelearn.optim.tpsgd import TPSGDOptions
from edgelearn.params import ParamStore
from edgelearn.prefix_cache import DEFAULT_CAPACITY, Split, SplitPlanner
from edgelearn.training.cached_evaluator import (
    MAX_CUTS,
    CachedEvaluator,
    SuffixRunner,
    first_clean_cut,
    probe_batch,
)
from edgelearn.training.evaluators import Batch, Forwards, StepEvaluator, TapsEvaluator
from edgelearn.training.head_runner import HeadRunner, head_runner
from edgelearn.training.header import optimizer_record

#: what onnxruntime runs a taps graph on (`make_backend` without providers: as the plain run)
TAPS_PROVIDERS = ("CPUExecutionProvider",)


class CachedTapsEvaluator(CachedEvaluator):
    """Taps forwards on cached prefix features (see the module docstring).

    Args:
        plain: the uncached taps evaluator (checks, and the fallback).
        split: the taps graph's split (outputs: `taps`). store: the trainable arena.
        input_name: the model input's name (a single-input batch's feed).
        taps: the taps a step reads, logits first (the whole taps graph's outputs).
        threads / providers / capacity: as `CachedEvaluator`'s.
    """

    replay_needs_data = True
    per_step_prefix = False  # its checks are the taps graph's own (`mismatch`)

    def __init__(self, plain: TapsEvaluator, split: Split, store: Any, *, input_name: str,
                 taps: Sequence[str], threads: int | None, providers: Sequence[str],
                 capacity: int) -> None:
        super().__init__(plain, split, store, threads=threads, providers=providers,
                         capacity=capacity)
        self.taps_plain = plain
        self.input_name = input_name
        self.taps = tuple(taps)
        #: taps that are cut tensors: read from the cached features
        self.from_cut = tuple(t for t in taps if t in split.cut.tensors)
        #: the suffix with tpSGD's head update appended in form 1 (`edgelearn.graph_update`),
        #: its constant feeds (lr) and the targets' dtype; None: form 2 or the numpy update
        self.head_runner: SuffixRunner | None = None
        #: form 2 of the head update graph, every array bound once (`head_runner`)
        self.head_step: HeadRunner | None = None
        self.head_feeds: dict[str, np.ndarray] = {}
        self.head_y = np.int64
        self.head_update: dict[str, Any] = {"mode": "numpy"}
        self._y_buf: dict[tuple[int, ...], np.ndarray] = {}

    def _feed(self, x: Inputs) -> dict[str, np.ndarray]:
        return dict(x) if isinstance(x, dict) else {self.input_name: x}

    def reads_rows(self) -> bool:
        # form 2 of the head update reads the cut tensors and targets only; the other taps
        # forwards return the model input(s) as a tap (layer 0 reads them)
        return self.head_step is None

    def _split_taps(self, x: Inputs, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The taps of batch `x` from its cut tensors `feeds` (passthrough inputs included):
        one suffix forward, the taps above the cut, and the model input(s) (layer 0 reads
        them), as the plain taps evaluator returns them."""
        out = self.suffix.run_all(feeds)
        out.update({t: feeds[t] for t in self.from_cut})
        out.update(self._feed(x))
        return out

    def forwards(self, x: np.ndarray, y: np.ndarray) -> Forwards:
        base = self.taps_plain.forwards(x, y)
        plain_taps = base.taps
        if self.disabled is not None or plain_taps is None:
            return base
        held: list[dict[str, np.ndarray]] = []

        def taps() -> tuple[dict[str, np.ndarray], np.ndarray]:
            if not held:  # one lookup per step: the hybrid's 2q forwards share it
                held.append(self._feeds(x))
                if not self.checked:
                    self._check(x, held[0])
            if self.disabled is not None:
                return plain_taps()
            t0 = time.perf_counter()
            if self.head_step is not None:  # form 2: the taps are the logits only
                out = self.head_step.run(held[0], y)
            elif self.head_runner is not None:
                out = self._head_taps(x, y, held[0])
            else:
                out = self._split_taps(x, held[0])
            self.timers.forward.append(time.perf_counter() - t0)
            return out, y

        return Forwards(base.evaluate, None, taps)

    def _head_taps(self, x: Inputs, y: np.ndarray, feeds: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
        """`_split_taps` from the suffix with the head update appended: the taps plus the
        loss and the updated head weights (`edgelearn.graph_update` names)."""
        assert self.head_runner is not None
        yy = np.asarray(y)
        yy = yy.reshape(len(yy), -1) if self.head_y == np.float32 else yy  # mse: [N, k]
        # one targets array per shape, filled in place: the runner binds it once
        buf = self._y_buf.get(yy.shape)
        if buf is None:
            buf = self._y_buf[yy.shape] = np.empty(yy.shape, self.head_y)
        np.copyto(buf, yy, casting="unsafe")
        out = self.head_runner.run_all({**feeds, graph_update.Y: buf, **self.head_feeds})
        out.update({t: feeds[t] for t in self.from_cut})
        out.update(self._feed(x))
        return out

    def mismatch(self, x: Inputs, feeds: dict[str, np.ndarray] | None = None
                 ) -> tuple[str, set[str]] | None:
        """Why the split taps graphs would change a step's floats on batch `x` (and the cut
        tensors at fault), or None: every tap must equal the whole taps graph's, and the
        prefix rows must not depend on the batch (`rows_mismatch`).

        Args:
            x: a batch of >= 3 examples. feeds: its prefix outputs (computed when None).
        """
        feeds = dict(feeds) if feeds is not None else self.run_prefix(x)
        for name in self.split.cut.passthrough:
            feeds[name] = x[name] if isinstance(x, dict) else x
        whole = self.taps_plain.one_off_taps(x)
        split = self._split_taps(x, feeds)
        bad = [t for t in self.taps if not np.array_equal(whole[t], split[t])]
        if bad:
            diff = max(float(np.max(np.abs(whole[t].astype(np.float64) - split[t])))
                       for t in bad)
            at_cut = {t for t in bad if t in self.split.cut.tensors}
            return (f"the split taps graphs' {bad[:4]} differ from the whole taps graph's "
                    f"(max |diff| {diff:.3g}): the runtime fuses nodes across the cut",
                    at_cut or set(self.split.cut.tensors))
        return self.rows_mismatch(x, feeds)

    def check_targets(self, y: np.ndarray) -> None:
        self.taps_plain.check_targets(y)

    def header_keys(self) -> dict[str, Any]:
        return self.taps_plain.header_keys()

    def replay(self, opt: Optimizer, store: ParamStore, record: dict[str, Any],
               batch: Batch | None) -> None:
        if batch is None:  # the plain evaluator says what is missing
            self.taps_plain.replay(opt, store, record, batch)
            return
        opt.replay(store, optimizer_record(record), taps=self.forwards(*batch).taps)

    def cache_report(self) -> dict[str, Any]:
        return {**super().cache_report(), "graph": self.taps_plain.graph,
                "taps_cached": list(self.from_cut), "head_update": dict(self.head_update)}


def taps_read(opt: Optimizer, store: ParamStore, input_name: str) -> list[str]:
    """The taps a step of `opt` (set up on the bundle's layers) reads, logits first: the
    outputs the plain taps evaluator keeps (`edgelearn.layers.needed_taps`)."""
    from edgelearn.layers import needed_taps

    layers = getattr(opt, "layers", [])  # set up by make_evaluator (tpsgd, hybrid)
    need = needed_taps(layers, set(store.trainable_names)) - {input_name}
    logits = layers[-1].preact
    return [logits, *sorted(need - {logits})]


def cached_taps_or_plain(bundle: Any, plain: TapsEvaluator, store: ParamStore,
                         opt: Optimizer, *, backend: str, threads: int | None,
                         capacity: int | None) -> StepEvaluator:
    """A CachedTapsEvaluator over `plain` where the bundle's taps graph splits
    bit-identically, else `plain` with the reason in its `cache_report()`.

    Args:
        bundle: the run's bundle. plain: its taps evaluator (`opt` set up on its layers).
        store: the arena the optimizer updates. opt: the taps optimizer.
        backend: the run's backend name. threads: runtime threads.
        capacity: bytes of features kept in memory (None: DEFAULT_CAPACITY).
    """
    why = _why_not(bundle, plain, backend)
    refused: list[dict[str, Any]] = []
    if why is None:
        try:
            search = _search if backend == "onnxruntime" else _litert_search
            found = search(bundle, plain, store, opt, threads=threads,
                           capacity=DEFAULT_CAPACITY if capacity is None else capacity,
                           refused=refused)
        except Exception as e:  # onnx and onnxruntime raise their own types; a run that
            # cannot split trains uncached, with the same results
            found = f"prefix caching could not be set up ({type(e).__name__}: {e})"
        if not isinstance(found, str):
            attach_head_update(found, opt, store, threads=threads, backend=backend)
            return found
        why = found
    if _head_mode(opt) == "graph":
        raise InputError(f"tpsgd head_update='graph' runs on cached frozen-prefix features "
                         f"only, and this run cannot cache them: {why}")
    plain.cache_info = {"enabled": False, "reason": why, "graph": plain.graph}
    if refused:
        plain.cache_info["refused_cuts"] = refused
    return plain


def refuse_uncached(opt: Optimizer) -> None:
    """InputError when `opt` asks for tpSGD's graph head update without the prefix cache (it
    runs on cached features only; "auto" takes the numpy update there)."""
    if _head_mode(opt) == "graph":
        raise InputError("tpsgd head_update='graph' runs on cached frozen-prefix features, "
                         "and the prefix cache is off (RuntimeConfig(prefix_cache=False) / "
                         "train --no-cache): turn it on, or use head_update='numpy' or 'auto'")


def _head_mode(opt: Optimizer) -> str:
    return str(getattr(getattr(opt, "options", None), "head_update", "numpy"))


def attach_head_update(ev: CachedTapsEvaluator, opt: Optimizer, store: ParamStore, *,
                       threads: int | None, backend: str = "onnxruntime") -> None:
    """Give `ev` the suffix with tpSGD's head update appended when `opt` asks for it
    (head_update "graph": InputError with the reason if it cannot; "auto": the numpy update,
    the reason in `ev.head_update`)."""
    mode = _head_mode(opt)
    if mode == "numpy" or backend != "onnxruntime":
        if mode == "graph":
            raise InputError("tpsgd head_update='graph' runs on onnxruntime only")
        if mode == "auto":
            ev.head_update = {"mode": "numpy", "reason": f"the {backend} backend"}
        return
    options = opt.options
    assert isinstance(options, TPSGDOptions)  # only tpsgd has head_update other than numpy
    layers = getattr(opt, "layers", [])
    trainable = list(store.trainable_names)
    why = graph_update.why_not(layers, trainable, [i.name for i in ev.suffix.session.get_inputs()])
    loss, version = options.head_loss, options.head_graph
    if why is None:
        try:
            model = graph_update.build(ev.split.suffix, layers[-1], trainable, loss, version)
            runner = SuffixRunner(dataclasses.replace(ev.split, suffix=model), store,
                                  threads, TAPS_PROVIDERS)
            if version == 1:
                ev.head_runner = runner
            else:
                ev.head_step = head_runner(runner, layers[-1], trainable, store, loss=loss,
                                           lr=options.lr)
        except Exception as e:  # onnx and onnxruntime raise their own types
            why = f"the head update graph could not be built ({type(e).__name__}: {e})"
    if why is not None:
        if mode == "graph":
            raise InputError(f"tpsgd head_update='graph' cannot run here: {why}")
        ev.head_update = {"mode": "numpy", "reason": why}
        return
    ev.head_feeds = {graph_update.LR: np.asarray(options.lr, np.float32)}
    ev.head_y = np.int64 if loss == "cross-entropy" else np.float32
    ev.head_update = {"mode": "graph", "graph": version}


def _search(bundle: Any, plain: TapsEvaluator, store: ParamStore, opt: Optimizer, *,
            threads: int | None, capacity: int, refused: list[dict[str, Any]]
            ) -> CachedTapsEvaluator | str:
    """The first cut of the taps graph (from the automatic one, moving up) that passes
    `mismatch` on a probe batch, or why none; `refused` receives the cuts that failed."""
    in_name = bundle.inputs[0].name
    taps = taps_read(opt, store, in_name)
    frozen = {n: store[n] for n, s in store.specs.items() if not s.trainable}
    planner = SplitPlanner(bundle.files[plain.graph], frozen, store.trainable_names,
                           [t.name for t in bundle.inputs], taps)
    found = first_clean_cut(planner, lambda split: CachedTapsEvaluator(
        plain, split, store, input_name=in_name, taps=taps, threads=threads,
        providers=TAPS_PROVIDERS, capacity=capacity), probe_batch(bundle), refused)
    if not isinstance(found, str):
        plain.timers.forward.clear()  # the check's forwards are no step's
    return found


def _litert_search(bundle: Any, plain: TapsEvaluator, store: ParamStore, opt: Optimizer, *,
                   threads: int | None, capacity: int, refused: list[dict[str, Any]]
                   ) -> CachedTapsEvaluator | str:
    """`_search` on the LiteRT backend: model_taps.tflite split on the device
    (`edgelearn.training.litert_cached.search_litert_taps`)."""
    from edgelearn.training.litert_cached import search_litert_taps

    return search_litert_taps(bundle, plain, store, opt, probe=probe_batch(bundle),
                              threads=threads, capacity=capacity, max_cuts=MAX_CUTS,
                              refused=refused)


def _why_not(bundle: Any, plain: TapsEvaluator, backend: str) -> str | None:
    """Why this taps run cannot cache a prefix (None: it may try)."""
    if (backend, plain.graph) not in (("onnxruntime", "onnx_taps"), ("litert", "tflite_taps")):
        return (f"prefix caching of taps forwards runs on onnxruntime's model_taps.onnx and "
                f"litert's model_taps.tflite only (this run: {backend}, {plain.graph})")
    if not all(has_batch_axis(s) for s in bundle.inputs):
        return "prefix caching needs every model input to have a batch axis"
    return None


def taps_cache_plan(bundle: Any, *, trainable: str | Sequence[str] | None = None,
                    backend: str = "onnxruntime") -> dict[str, Any]:
    """The cut a tpsgd run (or a hybrid run: same taps graph) of `bundle` would cache its
    taps forwards at, checked as `train` checks it; {"enabled": False, "reason"} otherwise.

    Args:
        bundle: a loaded bundle with model_taps.onnx. trainable: glob(s) (None: manifest's).
        backend: "onnxruntime" (model_taps.onnx) or "litert" (model_taps.tflite).
    """
    from edgelearn.errors import EdgelearnError
    from edgelearn.optim import make_optimizer
    from edgelearn.training.evaluators import make_evaluator

    try:
        store = bundle.load_store(trainable=trainable)
        ev = make_evaluator(bundle, store, make_optimizer("tpsgd"), backend=backend,
                            threads=1, prefix_cache=True, cache_bytes=0)
    except EdgelearnError as e:
        return {"enabled": False, "reason": str(e)}
    report = ev.cache_report() or {}
    ev.close()
    keep = ("enabled", "reason", "graph", "cut", "passthrough", "prefix_nodes",
            "suffix_nodes", "row_bytes", "taps_cached", "refused_cuts", "backend", "strategy")
    return {k: report[k] for k in keep if k in report}
