"""ONNX Runtime backend: trainable weights are graph inputs bound once, zero-copy, by IOBinding.

Measured on this project's reference machine (DESIGN.md section 6): binding the arena views
as OrtValues is zero-copy and in-place numpy edits are seen by the live session. Frozen
parameters are baked into the graph as initializers before the session is created, so ORT can
constant-fold and prepack them (a conv net whose convs are frozen keeps its fast conv path).
`SessionOptions.add_initializer` is deliberately not used: its prepacked copies go stale.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn.backends.base import Backend, PopulationScorer
from edgelearn.backends.ort_graph import (
    KeptOutputs,
    baked_model_bytes,
    configure,
    import_ort,
    load_checked_model,
)
from edgelearn.errors import BundleError

#: trainable float32 weights from which the workers stop spinning by default: zo-sgd's passes
#: over the arena run on threads from here (optim.kernels.PARALLEL_MIN)
SPIN_OFF_MIN_TRAINABLE = 1 << 20

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle
    from edgelearn.params import ParamStore


class OrtBackend(Backend):
    """ONNX Runtime session over a bundle's model.onnx (or model_taps.onnx).

    Args:
        bundle: the loaded bundle.
        threads: intra-op threads (None = ORT default, one per core).
        providers: execution providers, e.g. ["CPUExecutionProvider"] (None = CPU).
        strategy: "iobinding", the only one: trainable views bound zero-copy as OrtValues.
        graph: which model file of the bundle to run (files role "onnx" or "onnx_taps").
        outputs: graph outputs to compute (None: all); the others are removed before the
            session is built, so onnxruntime may fuse the nodes behind them.
        spinning: let the intra-op worker threads busy-wait after a run (onnxruntime's
            default). They spin for milliseconds after each run (up to ~16 ms on AMD Zen)
            and hold the cores the numpy work between forwards needs (a ZO step's threaded
            passes over a large arena; benchmarks/bench_zo_cost.py), but a sleeping worker
            costs a small model's forward its wake-up (demo: 0.26 -> 0.34 ms, loaded host).
            None (default): off when at least SPIN_OFF_MIN_TRAINABLE float32 weights train.
    """

    name = "onnxruntime"
    model_role = "onnx"
    taps_role = "onnx_taps"
    strategies = ("iobinding",)
    taps_strategies = ("iobinding",)
    reuses_outputs = True
    live_int8 = True
    supports_population = True

    def __init__(
        self,
        bundle: Bundle,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        strategy: str | None = None,
        graph: str | None = None,
        outputs: Collection[str] | None = None,
        spinning: bool | None = None,
    ) -> None:
        super().__init__(bundle, threads=threads, strategy=strategy, graph=graph,
                         outputs=outputs)
        self.spinning = spinning
        if self.graph not in bundle.files:
            raise BundleError(f"bundle has no {self.graph!r} model (it carries "
                              f"{bundle.formats})")
        self.model_path = bundle.files[self.graph]
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.session: Any = None
        self._io: Any = None
        self._keepalive: list[Any] = []
        self._outputs: KeptOutputs | None = None
        self.bound: list[str] = []

    def _options(self, ort: Any, store: ParamStore) -> Any:
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 4  # failures surface as our one-line errors
        spin = self.spinning
        if spin is None:
            spin = store.n_trainable("float32") < SPIN_OFF_MIN_TRAINABLE
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return configure(so)

    def _session(self, store: ParamStore) -> Any:
        """An InferenceSession over the graph with the store's frozen parameters baked in."""
        ort = import_ort()
        frozen = {n: store[n] for n, s in store.specs.items() if not s.trainable}
        # Always bytes that passed load_checked_model: the runtime never opens a path itself
        # (no external data resolved against the file system, no check-then-swap race).
        if frozen or self.outputs is not None:
            src = baked_model_bytes(self.model_path, frozen, self.outputs)
        else:
            src = load_checked_model(self.model_path).SerializeToString()
        try:
            return ort.InferenceSession(src, sess_options=self._options(ort, store),
                                        providers=self.providers)
        except Exception as e:  # ORT raises its own exception types
            raise BundleError(f"{self.model_path.name}: onnxruntime cannot load it ({e})") \
                from None

    def _bind(self, store: ParamStore) -> None:
        """Build the session (frozen parameters baked) and bind trainable views zero-copy."""
        self.session = self._session(store)
        ort = import_ort()
        graph_inputs = {i.name for i in self.session.get_inputs()}
        data_inputs = {t.name for t in self.bundle.inputs}
        io = self.session.io_binding()
        self._keepalive = []
        self.bound = []
        for name in store.trainable_names:
            if name not in graph_inputs:
                continue  # parameter unused by this graph
            view = store[name]
            ov = ort.OrtValue.ortvalue_from_numpy(view)
            io.bind_ortvalue_input(name, ov)
            self._keepalive.append((view, ov))
            self.bound.append(name)
        missing = graph_inputs - data_inputs - set(self.bound)
        if missing:
            raise BundleError(f"graph inputs {sorted(missing)} are neither data nor parameters")
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._io = io
        self._outputs = KeptOutputs(self.session, io, self._output_names, "the model")

    def _forward(self, inputs: dict[str, np.ndarray], *, reuse_outputs: bool, release: bool
                 ) -> dict[str, np.ndarray]:
        """Bind the inputs and run; with reuse_outputs the outputs are written straight into
        arrays kept from the previous call with the same input shapes; with release the
        session's arena is shrunk after the run (`KeptOutputs.run`)."""
        io = self._io
        for name, arr in inputs.items():
            io.bind_cpu_input(name, np.asarray(arr, order="C"))  # keeps 0-d inputs 0-d
        assert self._outputs is not None  # bound with the session
        return self._outputs.run(tuple((n, np.shape(a)) for n, a in inputs.items()),
                                 keep=reuse_outputs, release=release)

    def _close(self) -> None:
        self._io = self.session = self._outputs = None
        self._keepalive = []
        self.bound = []

    def _population_ready(self, store: ParamStore) -> bool:
        from edgelearn.backends.ort_population import supports_population

        return self.graph == self.model_role and supports_population(self.bundle, store)

    def _population_scorer(self, store: ParamStore, max_population: int) -> PopulationScorer:
        from edgelearn.backends.ort_population import OrtPopulation

        return OrtPopulation(self.bundle, store, threads=self.threads,
                             max_population=max_population)
