"""Population evaluation with onnxruntime: K candidate weight sets scored in one call.

Uses the bundle's population graph (`model_pop.onnx`, see export/population.py): trainable
parameters are inputs [K, *shape], frozen ones are baked as initializers (as in `OrtBackend`).
An optimizer's `Population.fill` writes a chunk of candidates' trainable slices into a
[max_population, n] buffer; each parameter's [chunk, *shape] block is cut from it and fed
with the data batch, one runtime call per chunk (memory: 2 x 4 x max_population x n bytes).
A chunk holds at most ROWS_MAX_BYTES of candidate rows: a large trainable slice is scored a
few candidates per call (17 candidates of a 64 MiB slice would take 2.2 GB with the runtime's
copy), where one call's batching gains little (its forwards cost more than the call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn.backends.base import PopulationScorer
from edgelearn.backends.ort_graph import (
    baked_model_bytes,
    configure,
    import_ort,
    load_checked_model,
    run_error,
)
from edgelearn.backends.ort_pop_loss import LOSS_OUTPUT, LabelFeeds, add_ce_tail
from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.losses import cross_entropy

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle
    from edgelearn.optim.base import Population
    from edgelearn.params import ParamStore

POP_ROLE = "onnx_population"
#: candidate rows one runtime call takes at most (bytes; at least one candidate)
ROWS_MAX_BYTES = 64 << 20


def _with_ce_tail(src: bytes) -> tuple[bytes, int | None]:
    """The population model bytes with the cross-entropy tail when it fits, and its class
    count (None: the model unchanged)."""
    import onnx

    model = onnx.load_from_string(src)
    classes = add_ce_tail(model)
    return (model.SerializeToString(), classes) if classes else (src, None)


def supports_population(bundle: Bundle, store: ParamStore) -> bool:
    """True when the bundle has a population graph batching exactly the store's trainables."""
    pop = bundle.manifest.get("population") or {}
    return POP_ROLE in bundle.files and pop.get("params") == store.trainable_names \
        and store.n_trainable("int8") == 0


class OrtPopulation(PopulationScorer):
    """Scores populations of candidates on a batch with the population graph.

    Args:
        bundle: bundle with files.onnx_population.
        store: the ParamStore the optimizer works on (frozen values are baked once).
        threads: intra-op threads (None = ORT default).
        max_population: candidates per runtime call (larger populations are split); fewer
            when their rows would take more than ROWS_MAX_BYTES.
    """

    def __init__(self, bundle: Bundle, store: ParamStore, *, threads: int | None = None,
                 max_population: int = 64) -> None:
        if max_population < 1:
            raise InputError(f"max_population must be >= 1, got {max_population}")
        if not supports_population(bundle, store):
            raise BundleError("the bundle's population graph does not batch the trainable set")
        ort = import_ort()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 4  # failures surface as our one-line errors
        configure(so)
        frozen = {n: store[n] for n, s in store.specs.items() if not s.trainable}
        path = bundle.files[POP_ROLE]
        # bytes that passed load_checked_model, as in OrtBackend: ORT never opens a path
        src = baked_model_bytes(path, frozen) if frozen else \
            load_checked_model(path).SerializeToString()
        src, classes = _with_ce_tail(src)
        try:
            self.session: Any = ort.InferenceSession(src, sess_options=so,
                                                     providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise BundleError(f"{path.name}: onnxruntime cannot load it ({e})") from None
        self.store = store
        self.input_name = bundle.inputs[0].name
        self.output_name = bundle.outputs[0].name
        self.max_population = max(1, min(max_population,
                                         ROWS_MAX_BYTES // (4 * max(1, store.n_trainable()))))
        self._output_names = [self.output_name]
        self._rows: np.ndarray | None = None
        self._out: dict[str, np.ndarray] = {}  # {"float32": rows}, what `fill` writes into
        self._feeds: dict[int, dict[str, Any]] = {}
        # the cross-entropy tail's label inputs (None: the graph has no tail)
        self._labels = LabelFeeds(classes) if classes else None

    @property
    def loss_in_graph(self) -> bool:
        """Whether cross-entropy on class labels is computed by the graph's tail."""
        return self._labels is not None

    def forward(self, pop: Population, x: np.ndarray) -> np.ndarray:
        """First output of every candidate: [K, batch, ...] (chunks of max_population)."""
        return self._scored(pop, x, self._output_names, None)

    def losses(self, pop: Population, x: np.ndarray, y: np.ndarray,
               loss_fn: Callable[[np.ndarray, np.ndarray], float]) -> list[float]:
        """loss_fn(output, y) of every candidate; cross-entropy on class labels comes from
        the graph's tail in the same call (edgelearn/backends/ort_pop_loss.py)."""
        extra = self._labels.feeds(y, len(x)) if self._labels is not None and \
            loss_fn is cross_entropy else None
        if extra is None:
            return super().losses(pop, x, y, loss_fn)
        return self._scored(pop, x, [LOSS_OUTPUT], extra).tolist()

    def _scored(self, pop: Population, x: np.ndarray, outputs: list[str],
                extra: dict[str, np.ndarray] | None) -> np.ndarray:
        """The first of `outputs` for every candidate of `pop` (chunks of max_population)."""
        if self.session is None:
            raise EdgelearnError("the population scorer is closed")
        if pop.fill is None:
            raise BundleError("this population request cannot fill candidate rows")
        if self._rows is None:
            self._rows = np.empty((self.max_population, self.store.n_trainable("float32")),
                                  np.float32)
            self._out = {"float32": self._rows}
        if pop.size <= self.max_population:  # the common case: one call, no concatenate
            pop.fill(self._out, 0, pop.size)
            return self._run(x, pop.size, outputs, extra)
        outs = []
        for a in range(0, pop.size, self.max_population):
            b = min(a + self.max_population, pop.size)
            pop.fill(self._out, a, b)
            outs.append(self._run(x, b - a, outputs, extra))
        return np.concatenate(outs)

    def _run(self, x: np.ndarray, k: int, outputs: list[str],
             extra: dict[str, np.ndarray] | None) -> np.ndarray:
        """The first of `outputs` for the k candidates in the rows buffer on batch x (one
        call); `extra`: further feeds (the loss tail's labels)."""
        feeds = self._param_feeds(k)
        feeds[self.input_name] = x
        if extra:
            feeds.update(extra)
        try:
            return self.session.run(outputs, feeds)[0]
        except Exception as e:  # onnxruntime's exception types do not share a base class
            raise run_error(e, "the population graph") from None
        finally:
            for name in (self.input_name, *(extra or ())):  # no batch is kept alive
                feeds.pop(name, None)

    def _param_feeds(self, k: int) -> dict[str, np.ndarray]:
        """Parameter name -> its [k, *shape] block of the rows buffer (views, kept per k:
        onnxruntime reads strided arrays, so no per-call copy or reshape on our side)."""
        feeds = self._feeds.get(k)
        if feeds is None:
            rows = self._rows
            assert rows is not None
            feeds = {name: rows[:k, s:e].reshape(k, *self.store[name].shape)
                     for name, s, e in self.store.segments("float32")}
            if all(np.shares_memory(v, rows) for v in feeds.values()):  # views: reusable
                self._feeds[k] = feeds
        return feeds

    def memory_bytes(self, candidates: int | None = None) -> int:
        """Bytes of the candidate rows written (+ one copy of them as per-parameter inputs;
        the buffer's unwritten rows take no memory)."""
        rows = self.max_population if candidates is None else \
            (min(candidates, self.max_population) if candidates > 1 else 0)
        return 2 * 4 * rows * self.store.n_trainable("float32")

    def close(self) -> None:
        """Drop the session and the candidate rows."""
        self.session = None
        self._rows = None
        self._out, self._feeds = {}, {}
