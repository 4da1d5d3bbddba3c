"""onnxruntime session over the low-rank-perturbed graph (edgelearn/lowrank_graph.py).

The bundle's model.onnx with frozen parameters baked (as in `OrtBackend`), rewritten so every
2-D trainable weight W gets the term s (X @ U) V^T; the trainable views are bound zero-copy
(the same arena as the model), U, V and s are fed per run. Where every perturbed tensor is a
Gemm operand the graph is the stacked one (`stacked`): both probes in one run on the batch
stacked twice, the biases perturbed in the graph too; else one run per probe (scalar s), the
caller writing the dense part into the store. No run touches the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn import lowrank_graph
from edgelearn.backends.ort import SPIN_OFF_MIN_TRAINABLE
from edgelearn.backends.ort_graph import (
    KeptOutputs,
    baked_model_bytes,
    configure,
    import_ort,
)
from edgelearn.errors import BundleError

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle
    from edgelearn.params import ParamStore


def lowrank_weights(store: ParamStore) -> dict[str, tuple[int, int]]:
    """Name -> shape of every trainable 2-D float32 tensor (those lozo perturbs low rank)."""
    return {n: store[n].shape for n in store.trainable_names
            if store[n].dtype == np.float32 and store[n].ndim == 2}


def dense_tensors(store: ParamStore) -> dict[str, int]:
    """Name -> size of every other trainable float32 tensor (lozo perturbs them densely)."""
    two_d = lowrank_weights(store)
    return {n: store[n].size for n in store.trainable_names
            if store[n].dtype == np.float32 and n not in two_d}


def _model(bundle: Bundle, frozen: dict[str, np.ndarray]) -> Any:
    import onnx

    return onnx.load_from_string(baked_model_bytes(bundle.files["onnx"], frozen))


def why_not(bundle: Bundle, store: ParamStore) -> str | None:
    """Why the bundle's graph cannot take the low-rank terms (None: `OrtLowRank` works)."""
    if "onnx" not in bundle.files:
        return "the bundle has no model.onnx"
    if any(s.shape and s.shape[0] == 1 for s in bundle.inputs):
        return "the model's batch is fixed at 1"
    if not lowrank_weights(store):
        return "no 2-D weight is trainable"
    return lowrank_graph.why_not(_model(bundle, {}), list(lowrank_weights(store)))


class OrtLowRank:
    """Scores probes theta + s U V^T of the store's weights in one run each.

    Args:
        bundle: the loaded bundle (its model.onnx). store: the arena (trainables bound).
        rank: r. threads: intra-op threads (None: ORT default).
        pending: U and V are fed with 2r columns, [P | U] and [V | V] (`lowrank_graph.rewrite`:
            a pending sum the probes carry unscaled).
    Raises: BundleError when the graph cannot be rewritten (`why_not`) or loaded.
    """

    def __init__(self, bundle: Bundle, store: ParamStore, rank: int, *,
                 threads: int | None = None, pending: bool = False) -> None:
        frozen = {n: store[n] for n, s in store.specs.items() if not s.trainable}
        model = _model(bundle, frozen)
        weights, dense = lowrank_weights(store), dense_tensors(store)
        #: True: both probes in one run on the batch stacked twice (lowrank_graph docstring)
        self.stacked = lowrank_graph.why_not_stacked(model, list(weights), list(dense)) is None
        names = [t.name for t in bundle.inputs]
        #: True: the stacked graph takes the batch once (lowrank_graph.shares_input)
        self.shared = self.stacked and lowrank_graph.shares_input(model, list(weights), names)
        try:
            lowrank_graph.rewrite(model, weights, rank, dense if self.stacked else None,
                                  shared=names if self.shared else (), pending=pending)
        except ValueError as e:
            raise BundleError(f"no low-rank graph: {e}") from None
        self.session = self._session(model.SerializeToString(), store, threads)
        self.inputs = bundle.inputs
        self.output_name = bundle.outputs[0].name
        ort = import_ort()
        io = self.session.io_binding()
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self._keep = []
        for name in store.trainable_names:
            if name in graph_inputs:
                ov = ort.OrtValue.ortvalue_from_numpy(store[name])
                io.bind_ortvalue_input(name, ov)
                self._keep.append((store[name], ov))
        self._io = io
        self._outputs = KeptOutputs(self.session, io, [self.output_name], "the low-rank graph")

    @staticmethod
    def _session(model: bytes, store: ParamStore, threads: int | None) -> Any:
        ort = import_ort()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 4
        if store.n_trainable("float32") >= SPIN_OFF_MIN_TRAINABLE:  # as OrtBackend
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(model, sess_options=configure(so),
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise BundleError(f"onnxruntime cannot load the low-rank graph ({e})") from None

    def forward(self, feed: dict[str, np.ndarray],
                factors: dict[str, tuple[np.ndarray, np.ndarray]], scale: Any,
                dense: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """First output at weights + s U V^T (feed: input name -> array, `inputs.feeds`).

        Args:
            scale: s, a float (scalar graph), or float32 [rows] (stacked: one s per row of
                the feed, whose batch holds the candidates one after the other).
            dense: stacked graph: dense tensor name -> z (the rows' tensor + s z).
        """
        io = self._io
        for name, arr in feed.items():
            io.bind_cpu_input(name, arr)
        for name, (u, v) in factors.items():
            io.bind_cpu_input(lowrank_graph.u_name(name), u)
            io.bind_cpu_input(lowrank_graph.v_name(name), v)
        for name, z in (dense or {}).items():
            io.bind_cpu_input(lowrank_graph.z_name(name), z)
        io.bind_cpu_input(lowrank_graph.SCALE, np.asarray(scale, np.float32))
        key = tuple((n, a.shape) for n, a in feed.items())
        return self._outputs.run(key)[self.output_name]

    def close(self) -> None:
        """Drop the session and the bound views."""
        self.session = self._io = self._outputs = None
        self._keep = []
