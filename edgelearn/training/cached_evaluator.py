"""Loss forwards on cached frozen-prefix features: the suffix graph only, per probe.

`make_evaluator` hands a plain loss evaluator to `cached_or_plain`, which splits the bundle's
ONNX graph at its cut (`edgelearn.prefix_cache`) and, where a split exists, returns a
`CachedEvaluator`: each step looks its batch's examples up in a `FeatureCache` (by data-set
index when `Session.run` feeds it, by a sha256 of each example's bytes for live samples),
runs the prefix on the misses only, and every evaluate() of the step is one suffix forward.
A population (zo-sgd's 2q probe points) is one call of a K-candidate suffix graph
(`edgelearn.training.cached_population`: the suffix's trainable-dependent nodes copied per
candidate, each output checked equal to a single forward on the first population of each batch
size), so a head-only zo-sgd step is one runtime call.

Bit-identity with the uncached run is checked, not assumed: on the first batch the suffix
output must equal the whole graph's output exactly, and the prefix's rows computed alone must
equal the rows computed in the batch (a runtime whose kernels fuse across the cut, or whose
results depend on the batch composition, fails this). On failure the evaluator falls back to
the plain forwards for the rest of the session and says why in its report, except where only
the rows fail (a transformer's, whose kernels sum other batch sizes in another order): the
split of a whole batch still gives the whole graph's floats, so the prefix runs once a step
on the step's batch, features kept for that step only (`per_step`; onnxruntime), and every
forward of the step is a suffix forward (a ZO step of K + 2 forwards on a frozen body: one
body forward, not K + 2). Journals do not record whether a run was cached: replay and resume
do not care.

Each runtime splits its own graph, so cached features are the run's own floats: onnxruntime
splits the ONNX graph here; a LiteRT run splits the bundle's TFLite flatbuffer on the device
(`edgelearn.training.litert_cached`, same checks, same cache). The taps forwards of tpSGD
and the hybrid cache the same way (`CachedTapsEvaluator` in `edgelearn.training.cached_taps`,
a subclass of `CachedEvaluator`; on LiteRT over model_taps.tflite).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.backends.ort_graph import KeptOutputs, run_errors
from edgelearn.data import Dataset, batch_indices, data_sha256
from edgelearn.errors import EdgelearnError
from edgelearn.inputs import Inputs, has_batch_axis, n_rows, take
from edgelearn.prefix_cache import (
    DEFAULT_CAPACITY,
    FeatureCache,
    Split,
    SplitPlanner,
    example_keys,
)
from edgelearn.training.evaluators import (
    Forwards,
    LossEvaluator,
    StepEvaluator,
    placed_outputs,
)

Batch = tuple[np.ndarray, np.ndarray]
#: cuts tried before caching gives up (each refused one moves the cut up)
MAX_CUTS = 4


def _session(model: bytes, threads: int | None, providers: Sequence[str]) -> Any:
    """An onnxruntime session with the plain backend's options (same kernels, same floats)."""
    from edgelearn.backends.ort_graph import configure, import_ort

    ort = import_ort()
    so = configure(ort.SessionOptions())
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # failures surface as our one-line errors
    return ort.InferenceSession(model, sess_options=so, providers=list(providers))


class SuffixRunner:
    """The suffix graph with the store's trainable views bound zero-copy (IOBinding).

    Args:
        split: the Split. store: the arena the optimizer updates in place.
        threads / providers: as the run's onnxruntime backend.
    """

    def __init__(self, split: Split, store: Any, threads: int | None,
                 providers: Sequence[str]) -> None:
        from edgelearn.backends.ort_graph import import_ort

        ort = import_ort()
        self.session = _session(split.suffix, threads, providers)
        self.io = self.session.io_binding()
        self._keep = []
        for name in split.trainable:
            view = store[name]
            ov = ort.OrtValue.ortvalue_from_numpy(view)
            self.io.bind_ortvalue_input(name, ov)
            self._keep.append((view, ov))
        self.output = self.session.get_outputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        #: input name -> the array last bound to it
        self._bound: dict[str, np.ndarray] = {}
        self._outputs = KeptOutputs(self.session, self.io, self.outputs, "the cached suffix")

    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the suffix graph (a taps suffix: the logits and the layer taps).

        The outputs are arrays kept from the previous call with the same input shapes,
        written in place (valid until the next call, as the plain taps forward's); an input
        array bound by the previous call (the same contiguous object) is not bound again.
        """
        io, bound = self.io, self._bound
        for name, arr in feeds.items():
            if bound.get(name) is not arr or not arr.flags.c_contiguous:
                io.bind_cpu_input(name, np.ascontiguousarray(arr))
                bound[name] = arr
        return self._outputs.run(tuple((n, a.shape) for n, a in feeds.items()))

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The model output for the cut tensors (and passthrough inputs) in `feeds`."""
        io = self.io
        for name, arr in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
            self._bound[name] = arr
        self._outputs.forget()  # run_all's kept outputs are no longer bound
        io.clear_binding_outputs()
        io.bind_output(self.output, "cpu")
        with run_errors("the cached suffix"):
            self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]


class CachedEvaluator(StepEvaluator):
    """Loss forwards on cached prefix features (see the module docstring).

    Args:
        plain: the uncached evaluator (first-batch check, and the fallback; a
            `CachedTapsEvaluator` passes its taps evaluator).
        split: the bundle's split. store: the trainable arena.
        threads / providers: the run's onnxruntime settings.
        capacity: bytes of features kept in memory.
    """

    def __init__(self, plain: LossEvaluator | Any, split: Split, store: Any, *,
                 threads: int | None, providers: Sequence[str], capacity: int) -> None:
        super().__init__(plain.timers)
        self.plain, self.split = plain, split
        self.prefix, self.suffix = self._runners(split, store, threads, providers)
        self.cache = FeatureCache(split.cut, capacity)
        self.disabled: str | None = None
        #: why features are not cached across steps, the prefix running once a step instead
        #: (None: they are cached)
        self.per_step: str | None = None
        self.checked = False
        self.prefix_seconds = 0.0
        #: cuts tried before this one and why the check refused them
        self.refused: list[dict[str, Any]] = []
        #: the batch `indexed_batches` made last: (x, its keys, the data set's arena slot per
        #: example (-1: not known to be in memory), its data-set indices)
        self._indexed: tuple[Any, list[Hashable], np.ndarray, np.ndarray] | None = None
        self._slot_of: dict[str, np.ndarray] = {}  # data sha256 -> slot per example
        self._rows: dict[int, dict[str, np.ndarray]] = {}  # batch size -> feature arrays
        #: the single data input's name (a multi-input model's batches are dicts)
        self.input_name = getattr(getattr(plain, "model", None), "input_name", None)
        #: K-candidate suffix graphs per K (`edgelearn.training.cached_population`), why
        #: populations are not scored in one call (None: they are), batch sizes checked
        self.candidates: dict[int, Any] = {}
        self.population_off: str | None = "not set up (onnxruntime runs only)"
        self._pop_store: Any = None
        self._threads = threads
        self._pop_checked: set[int] = set()

    def _runners(self, split: Any, store: Any, threads: int | None,
                 providers: Sequence[str]) -> tuple[Any, Any]:
        """(prefix, suffix) runners of `split`: `prefix.run(names, feed)` -> the cut tensors,
        `suffix.run(feeds)` -> the output (onnxruntime here; `LiteRTCachedEvaluator`)."""
        return (_session(split.prefix, threads, providers),
                SuffixRunner(split, store, threads, providers))

    # -- feeds -----------------------------------------------------------------------------
    def indexed_batches(self, data: Dataset, batch_size: int, seed: int, *,
                        rows: bool = True) -> Callable[[int], tuple[Any, np.ndarray]]:
        """`Session.run`'s batch source, telling this evaluator each batch's data-set indices
        (keys without hashing every example; the data set is hashed once).

        Args:
            rows: False when the caller reads no rows of the batches itself (the loop's
                `needs_rows`): a batch whose examples are all cached then comes as
                (None, y), its rows never copied out of the data set, when nothing of this
                evaluator reads them (`reads_rows`, no passthrough input, the cut checked and
                not refused); otherwise x is the batch's rows.
        """
        token = data_sha256(data)
        lean = not rows and not self.reads_rows() and not self.split.cut.passthrough
        cache = self.cache

        if token not in self._slot_of:
            if len(self._slot_of) >= 4:  # a few data sets per session
                self._slot_of.clear()
            self._slot_of[token] = np.full(len(data), -1, np.intp)
        slot_of = self._slot_of[token]

        def batch(step: int) -> tuple[Any, np.ndarray]:
            idx = batch_indices(len(data), batch_size, step, seed)  # = Dataset.batch_at
            keys = [(token, i) for i in idx.tolist()]
            # a step whose keys all hit reads no row of x (FeatureCache.features)
            skip = lean and self.checked and self.disabled is None and \
                self.per_step is None and all(
                k in cache.slots or k in cache.spilled for k in keys)
            x = None if skip else take(data.x, idx)
            self._indexed = (x, keys, slot_of, idx)
            return x, data.y[idx]

        return batch

    def reads_rows(self) -> bool:
        """Whether a step on cached features reads its batch's rows (the loss forwards do
        not; a subclass whose forwards do says so)."""
        return type(self).forwards is not CachedEvaluator.forwards

    def spill_to(self, run_dir: Path) -> None:
        """Spill features that do not fit in memory to a file in the run directory."""
        self.cache.spill_dir = Path(run_dir)

    def _keys(self, x: np.ndarray) -> list[Hashable]:
        if self._indexed is not None and self._indexed[0] is x:
            return self._indexed[1]
        return list(example_keys(x))

    # -- forwards --------------------------------------------------------------------------
    def run_prefix(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The cut tensors of batch `x` from the prefix graph (uncached)."""
        t0 = time.perf_counter()
        names = list(self.split.cut.tensors)
        feed = x if isinstance(x, dict) else {self.input_name: x}
        with run_errors("the frozen prefix"):
            outs = self.prefix.run(names, feed)
        self.prefix_seconds += time.perf_counter() - t0
        return dict(zip(names, outs, strict=True))

    def _feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The suffix feeds of batch `x`: its cut tensors (written into arrays kept per batch
        size: valid until the next lookup, and bound to the suffix once) and passthrough
        inputs."""
        if self.per_step is not None:  # this step's batch through the prefix, kept for it
            feeds = self.run_prefix(x)
            for name in self.split.cut.passthrough:
                feeds[name] = x[name] if isinstance(x, dict) else x
            return feeds
        keys = self._keys(x)
        out = self._rows.get(len(keys))
        if out is None:
            if len(self._rows) >= 4:  # a few batch sizes (run batches, live samples)
                self._rows.clear()
            out = self._rows[len(keys)] = {t: np.empty((len(keys), *s), d) for t, (s, d)
                                           in self.split.cut.row_shapes.items()}
        ix = self._indexed if self._indexed is not None and self._indexed[0] is x else None
        # a `Session.run` batch whose examples are all in memory: one gather of their slots
        # (no per-key dict lookups); else the cache's lookup, then their slots are known
        slots = ix[2][ix[3]] if ix is not None else None
        if slots is not None and slots.min() >= 0:
            feeds = dict(self.cache.gather(slots, out))
        else:
            feeds = dict(self.cache.features(keys, x, self.run_prefix, out=out))
            if ix is not None:
                get = self.cache.slots.get
                ix[2][ix[3]] = [get(k, -1) for k in keys]
        for name in self.split.cut.passthrough:
            feeds[name] = x[name] if isinstance(x, dict) else x
        return feeds

    def forwards(self, x: np.ndarray, y: np.ndarray) -> Forwards:
        if self.disabled is not None:
            return self.plain.forwards(x, y)
        loss_fn, timers, held = self.plain.loss_fn, self.timers, []
        if loss_fn is None:
            raise EdgelearnError("this evaluator replays only: it has no model to run")

        def feeds() -> dict[str, np.ndarray]:
            if not held:  # the step's lookup is timed as part of the step
                # the first batch's whole-graph output for the check, before the prefix runs:
                # its activations are given back, not held beside the prefix session's
                whole = self.plain_output(x) if not self.checked and self.per_step_prefix \
                    else None
                held.append(self._feeds(x))
                if not self.checked:
                    self._check(x, held[0], whole)
            return held[0]

        def evaluate() -> float:
            cut = feeds()
            if self.disabled is not None:
                return self.plain.forwards(x, y).evaluate()
            t0 = time.perf_counter()
            out = self.suffix.run(cut)
            timers.forward.append(time.perf_counter() - t0)
            return loss_fn(out, y)

        def evaluate_population(pop: Any) -> list[float]:
            cut = feeds()
            if (self.disabled is not None or pop.fill is None
                    or not self.candidate_runners(pop.size)):
                out = []  # one forward per candidate, as the optimizer would expand it
                for j in range(pop.size):
                    pop.place(j)
                    out.append(evaluate())
                return out
            t0 = time.perf_counter()
            losses = self._population_losses(pop, cut, y, loss_fn)
            timers.population.append(time.perf_counter() - t0)
            return losses

        def outputs(pop: Any) -> tuple[np.ndarray, Any, Any]:
            cut = feeds()
            if self.disabled is not None:
                return self.plain.forwards(x, y).outputs(pop)
            t0 = time.perf_counter()
            out = placed_outputs(pop, lambda: self.suffix.run(cut))  # a suffix run each
            timers.population.append(time.perf_counter() - t0)
            return out, y, loss_fn

        return Forwards(evaluate, evaluate_population if self.population_off is None else None,
                        outputs=outputs)

    def enable_population(self, store: Any) -> None:
        """Score populations (zo-sgd's probe points) in one runtime call from now on, where
        the suffix allows it (`edgelearn.training.cached_population`)."""
        from edgelearn.training.cached_population import population_supported

        self._pop_store = store
        self.population_off = population_supported(self.split, store)

    def _population_losses(self, pop: Any, cut: dict[str, np.ndarray], y: np.ndarray,
                           loss_fn: Any) -> list[float]:
        """loss_fn of every candidate of `pop` from K-candidate suffix calls; on the first
        population of a batch size each candidate also runs alone, its loss is the one used
        and the outputs must be equal (else populations expand from now on)."""
        from edgelearn.training.cached_population import MAX_CANDIDATES

        n, losses = len(y), []
        for lo in range(0, pop.size, MAX_CANDIDATES):
            hi = min(lo + MAX_CANDIDATES, pop.size)
            runner = self.candidates[hi - lo]
            pop.fill({"float32": runner.rows}, lo, hi)
            outs = runner.outputs(cut)
            if n in self._pop_checked:
                losses.extend(loss_fn(o, y) for o in outs)
                continue
            alone = []
            for j in range(lo, hi):
                pop.place(j)
                alone.append(self.suffix.run(cut))
            if not all(np.array_equal(a, b) for a, b in zip(outs, alone, strict=True)):
                self.population_off = ("the K-candidate suffix graph's outputs differ from "
                                       "single suffix forwards")
            losses.extend(loss_fn(o, y) for o in alone)
        if self.population_off is None:
            self._pop_checked.add(n)
        return losses

    def candidate_runners(self, size: int) -> bool:
        """Make the K-candidate graphs a population of `size` runs on (chunks of
        MAX_CANDIDATES); False when populations are not scored in one call (the reason in
        `population_off`)."""
        from edgelearn.training.cached_population import MAX_CANDIDATES, CandidateRunner

        providers = self.suffix.session.get_providers()
        for k in {min(size, MAX_CANDIDATES), size % MAX_CANDIDATES or MAX_CANDIDATES}:
            if self.population_off is not None:
                break
            if k not in self.candidates:
                try:
                    self.candidates[k] = CandidateRunner(
                        lambda split: SuffixRunner(split, self._pop_store, self._threads,
                                                   providers),
                        self.split, self._pop_store, self.suffix.output, k)
                except Exception as e:  # onnx and onnxruntime raise their own types
                    self.population_off = (f"the K-candidate suffix graph could not be built "
                                           f"({type(e).__name__}: {e})")
        return self.population_off is None

    def _check(self, x: np.ndarray, feeds: dict[str, np.ndarray],
               whole: np.ndarray | None = None) -> None:
        """First real batch: the same checks as at setup (`mismatch`); on failure the prefix
        runs once a step where only the rows failed (`per_step_prefix`), else fall back.
        `whole`: the whole graph's output on x (`plain_output`; None: computed here)."""
        self.checked = True
        if not self.per_step_prefix:  # the subclass's own checks: pass or fall back
            bad = self.mismatch(x, feeds)
            if bad is not None:
                self.disabled = bad[0]
            return
        bad = self.batch_mismatch(x, feeds, whole)
        if bad is not None:
            self.disabled = bad[0]
        elif (rows := self.rows_mismatch(x, feeds)) is not None:
            self.per_step = rows[0]

    #: whether a split whose prefix rows depend on the batch runs its prefix once a step
    #: (the module docstring) rather than falling back to the plain forwards
    per_step_prefix = True

    def mismatch(self, x: np.ndarray, feeds: dict[str, np.ndarray] | None = None
                 ) -> tuple[str, set[str]] | None:
        """Why the split would change the floats on batch `x` (and the cut tensors at fault),
        or None: the suffix must reproduce the whole graph's output exactly
        (`batch_mismatch`), and the prefix rows of an example computed alone or in a pair
        must equal those of the batch (`rows_mismatch`).

        Args:
            x: a batch of >= 3 examples. feeds: its prefix outputs (computed when None).
        """
        feeds = dict(feeds) if feeds is not None else self.run_prefix(x)
        return self.batch_mismatch(x, feeds) or self.rows_mismatch(x, feeds)

    def plain_output(self, x: Inputs) -> np.ndarray:
        """The whole graph's output on batch `x`, its runtime memory given back after (a
        one-off forward: the run's own forwards are the split graphs')."""
        model = self.plain.model
        assert model is not None
        return model.predict(x, release=True)

    def batch_mismatch(self, x: np.ndarray, feeds: dict[str, np.ndarray],
                       whole: np.ndarray | None = None) -> tuple[str, set[str]] | None:
        """Why the suffix on batch `x`'s prefix outputs `feeds` would not give the whole
        graph's output (`whole`: computed when None) exactly, or None."""
        feeds = dict(feeds)
        for name in self.split.cut.passthrough:
            feeds[name] = x[name] if isinstance(x, dict) else x
        if whole is None:
            whole = self.plain_output(x)
        split = self.suffix.run(feeds)
        if not np.array_equal(whole, split):
            diff = float(np.max(np.abs(whole.astype(np.float64) - split)))
            return (f"the split graphs' output differs from the whole graph's (max |diff| "
                    f"{diff:.3g}): the runtime fuses nodes across the cut",
                    set(self.split.cut.tensors))
        return None

    def rows_mismatch(self, x: Inputs, feeds: dict[str, np.ndarray]
                      ) -> tuple[str, set[str]] | None:
        """Why the prefix rows of batch `x` (`feeds`, its prefix outputs) would differ when
        computed alone or in a pair (a cached example was computed in another batch), or None.
        """
        bad: set[str] = set()
        n = n_rows(x)  # len() of a multi-input batch (a dict) counts its inputs
        for lo, hi in ((0, 1), (n - 1, n), (1, 3)):
            part = self.run_prefix(take(x, slice(lo, hi)))
            bad |= {t for t in part if not np.array_equal(part[t], feeds[t][lo:hi])}
        if bad:
            return (f"the prefix's rows of {sorted(bad)} depend on the batch they are in "
                    "(the runtime's kernels for other batch sizes sum in another order)", bad)
        return None

    # -- reports ---------------------------------------------------------------------------
    def memory_bytes(self, candidates: int | None = None) -> int:
        # 0: the cache takes only what the memory plan leaves (`fit_cache`), so the plan and
        # its batch size are the uncached run's, and so are the results
        return 0

    def fit_cache(self, capacity: int) -> None:
        """Bound the features kept in memory to `capacity` bytes from now on (what the run's
        memory plan leaves); the rest spills or is recomputed."""
        self.cache.max_rows = max(capacity, 0) // self.cache.row

    def cache_report(self) -> dict[str, Any]:
        rep: dict[str, Any] = {"enabled": self.disabled is None, **self.split.cut.to_json(),
                               **self.cache.report(),
                               "prefix_ms_total": round(1e3 * self.prefix_seconds, 3),
                               "refused_cuts": self.refused}
        if self._pop_store is not None:  # how populations (zo-sgd's probes) are scored
            rep["population"] = ({"one_call": True} if self.population_off is None else
                                 {"one_call": False, "reason": self.population_off})
        if self.disabled is not None:
            rep["reason"] = self.disabled
        if self.per_step is not None:  # not cached, yet split: the prefix once a step
            rep["enabled"], rep["prefix"] = False, "per step"
            rep["reason"] = f"{self.per_step}; the prefix runs once a step on its batch"
        return rep

    def close(self) -> None:
        self.cache.close()


def cached_or_plain(bundle: Any, plain: LossEvaluator, *, backend: str,
                    threads: int | None, capacity: int | None,
                    population: bool = True) -> StepEvaluator:
    """A CachedEvaluator over `plain` where the bundle splits bit-identically, else `plain`
    with the reason in its `cache_report()`.

    The automatic cut is checked on a seeded synthetic batch (`CachedEvaluator.mismatch`);
    a refused cut moves above the tensors at fault (e.g. a ReduceMean whose onnxruntime
    kernel sums a batch of one in another order), up to MAX_CUTS tries.

    Args:
        bundle: the run's bundle. plain: its plain loss evaluator (bound model).
        backend: the run's backend name. threads: runtime threads.
        capacity: bytes of features kept in memory (None: DEFAULT_CAPACITY).
        population: score populations in one call of a K-candidate suffix graph where it
            builds (onnxruntime; False: one suffix forward per candidate, as asked for runs
            without the population graph).
    """
    why = _why_not(bundle, plain, backend)
    refused: list[dict[str, Any]] = []
    if why is None:
        search = _search if backend == "onnxruntime" else _litert_search
        try:
            found = search(bundle, plain, threads=threads, capacity=capacity,
                           refused=refused)
            if population and backend == "onnxruntime" and not isinstance(found, str):
                found.enable_population(plain.model.store)
        except Exception as e:  # onnx and onnxruntime raise their own types; a run that
            # cannot split trains uncached, with the same results
            found = f"prefix caching could not be set up ({type(e).__name__}: {e})"
        if not isinstance(found, str):
            return found
        why = found
    plain.cache_info = {"enabled": False, "reason": why}
    if refused:
        plain.cache_info["refused_cuts"] = refused
    return plain


def first_clean_cut(planner: Any, make: Callable[[Any], CachedEvaluator], probe: Inputs | None,
                    refused: list[dict[str, Any]], max_cuts: int = MAX_CUTS
                    ) -> CachedEvaluator | str:
    """The evaluator of the first split (from the automatic cut, moving up past the tensors
    each refusal names) that passes `mismatch` on `probe`, or why none.

    Args:
        planner: `split(after: set[str]) -> split | str` (an ONNX or a TFLite planner).
        make: the cached evaluator of one split.
        probe: a seeded synthetic batch (None: checked on the first real batch only).
        refused: receives the cuts that failed and why. max_cuts: cuts tried.
    """
    after: set[str] = set()
    for _ in range(max_cuts):
        split = planner.split(after)
        if isinstance(split, str):
            return split
        ev = make(split)
        ev.refused = refused
        bad = ev.mismatch(probe) if probe is not None else None
        if bad is None:
            ev.prefix_seconds = 0.0
            return ev
        refused.append({"cut": list(split.cut.tensors), "reason": bad[0]})
        after |= bad[1]
    return f"no bit-identical cut in {max_cuts} tries"


def _search(bundle: Any, plain: LossEvaluator, *, threads: int | None, capacity: int | None,
            refused: list[dict[str, Any]]) -> CachedEvaluator | str:
    """The first cut of the ONNX graph that passes `mismatch` on a probe batch, or why
    none; `refused` receives the cuts that failed."""
    model = plain.model
    assert model is not None
    store = model.store
    frozen = {n: store[n] for n, s in store.specs.items() if not s.trainable}
    providers = getattr(model.backend, "providers", None) or ["CPUExecutionProvider"]
    planner = SplitPlanner(bundle.files["onnx"], frozen, store.trainable_names,
                           [t.name for t in bundle.inputs], model.output_name)
    found = first_clean_cut(planner, lambda split: CachedEvaluator(
        plain, split, store, threads=threads, providers=providers,
        capacity=DEFAULT_CAPACITY if capacity is None else capacity),
        probe_batch(bundle), refused)
    return found


def _litert_search(bundle: Any, plain: LossEvaluator, *, threads: int | None,
                   capacity: int | None, refused: list[dict[str, Any]]) -> Any:
    """`_search` on the LiteRT backend (the TFLite model split on device)."""
    from edgelearn.training.litert_cached import search_litert

    return search_litert(bundle, plain, probe=probe_batch(bundle), threads=threads,
                         capacity=DEFAULT_CAPACITY if capacity is None else capacity,
                         max_cuts=MAX_CUTS, refused=refused)


def probe_batch(bundle: Any) -> Inputs | None:
    """A seeded batch of 5 synthetic examples of the model input(s) (None: symbolic dims);
    a dict name -> array for a multi-input model."""
    rng = np.random.default_rng(0)
    out = {}
    for spec in bundle.inputs:
        if not all(isinstance(d, int) for d in spec.shape[1:]):
            return None
        shape = (5, *spec.shape[1:])
        if np.dtype(spec.dtype).kind in "iu":
            out[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out if len(out) > 1 else next(iter(out.values()))


def _why_not(bundle: Any, plain: LossEvaluator, backend: str) -> str | None:
    """Why this run cannot cache a prefix (None: it may try)."""
    if backend not in ("onnxruntime", "litert"):
        return (f"prefix caching runs on onnxruntime and litert only, not {backend} (each "
                "splits its own graph, so cached features are the run's own floats)")
    if plain.model is None or plain.loss_fn is None:
        return "no model to run (replay only)"
    if plain.population_graph:
        return ("the population graph scores K candidates per call; caching would change "
                "its floats (pass population=False to cache instead)")
    if not all(has_batch_axis(s) for s in bundle.inputs):
        return "prefix caching needs every model input to have a batch axis"
    return None


def cache_plan(bundle: Any, *, trainable: str | Sequence[str] | None = None,
               backend: str = "onnxruntime") -> dict[str, Any]:
    """The cut a run of `bundle` would cache at (what `info` reports), checked as `train`
    checks it; {"enabled": False, "reason"} where it would not cache. A bundle with a taps
    graph adds "taps": the same for tpsgd / hybrid runs (`cached_taps.taps_cache_plan`).

    Args:
        bundle: a loaded bundle. trainable: glob(s) of trained parameters (None: manifest's).
        backend: "onnxruntime" or "litert" (its TFLite model, the manifest's strategy).
    """
    from edgelearn.losses import default_loss, get_loss
    from edgelearn.model import Model
    from edgelearn.training.timing import Timers

    role = "tflite" if backend == "litert" else "onnx"
    if role not in bundle.files:
        return {"enabled": False, "reason": f"the bundle has no model.{role}"}
    try:
        model = Model(bundle, backend=backend, trainable=trainable, threads=1)
        plain = LossEvaluator(model, get_loss(default_loss(bundle.task)), None, Timers())
        ev = cached_or_plain(bundle, plain, backend=backend, threads=1, capacity=0)
    except EdgelearnError as e:
        return {"enabled": False, "reason": str(e)}
    report = ev.cache_report() or {}
    ev.close()
    keep = ("enabled", "reason", "cut", "passthrough", "prefix_nodes", "suffix_nodes",
            "row_bytes", "refused_cuts", "backend", "strategy")
    plan = {k: report[k] for k in keep if k in report}
    if f"{role}_taps" in bundle.files and "onnx_taps" in bundle.files:  # tpsgd / hybrid
        from edgelearn.training.cached_taps import taps_cache_plan

        plan["taps"] = taps_cache_plan(bundle, trainable=trainable, backend=backend)
    return plan
