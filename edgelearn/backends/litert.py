"""LiteRT (TFLite) backend: `ai_edge_litert` interpreter, or `tflite_runtime` on numpy<2 devices.

Two ways for trainable weights to reach the interpreter without reloading from disk, both
measured (benchmarks/bench_litert.py; README "LiteRT backend"):
  "inputs"   model.tflite takes every parameter as an input. Frozen ones are set once at
             bind, trainable ones copied in with set_tensor before each forward. Always
             correct, but XNNPACK does not take ops whose weights are inputs, so those run on
             the slower builtin kernels.
  "rebuild"  model_const.tflite holds every parameter as a constant at a recorded, aligned
             offset. The backend keeps a private in-memory copy of it, patches the trainable
             weight bytes from the arena when they changed, and re-creates the XNNPACK
             interpreter from that memory (XNNPACK packs constants at creation, so patching a
             live interpreter would be silently ignored; a model loaded by path is a read-only
             mmap). Recreation costs ~0.1-1 ms; the forward then runs at baked XNNPACK speed.
int8 bundles work the same way: quantized weights are int8 inputs / constants (set or patched
straight from the int8 arena) dequantized in-graph with their float32 `.scale` parameters.
The bundle's manifest names the strategy the exporter measured fastest for that model; an
explicit `strategy=` overrides it. TFLite graphs from litert-torch have a fixed batch: smaller
batches are zero-padded, larger ones run in chunks (models are per-example in eval mode), and
every output is cut back to the real rows.
Frozen-prefix caching splits the file a run binds into two in-memory models on the device
(`edgelearn.backends.litert_split`), run with `run_padded` like this backend.
`graph="tflite_taps"` runs model_taps.tflite instead (tpSGD: the model output plus every layer
tap in one call, named by the manifest's "tflite_taps" section), with the "inputs" strategy.
"""

from __future__ import annotations

import ctypes
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn.backends.base import Backend
from edgelearn.errors import BundleError, EdgelearnError

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle
    from edgelearn.params import ParamStore

STRATEGIES = ("inputs", "rebuild")


def import_interpreter() -> tuple[Any, Any]:
    """(Interpreter class, OpResolverType enum or None) from ai_edge_litert or tflite_runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # numpy<2, older devices
        except ImportError:
            raise EdgelearnError(
                "the litert backend needs ai-edge-litert (or tflite-runtime on numpy<2): "
                "pip install 'edgelearn[litert]'"
            ) from None
        try:
            from tflite_runtime.interpreter import OpResolverType
        except ImportError:
            OpResolverType = None
        return Interpreter, OpResolverType
    return Interpreter, OpResolverType


class LiteRTBackend(Backend):
    """TFLite interpreter over a bundle's model.tflite / model_const.tflite.

    Args:
        bundle: the loaded bundle (must carry the "tflite" format).
        threads: interpreter threads (None = 1 thread per LiteRT's default).
        strategy: "inputs" or "rebuild" (None = the manifest's measured choice).
        graph: "tflite" (the model) or "tflite_taps" (tpSGD's taps graph; "inputs" only).
        outputs: outputs forward() returns (None: all the graph's, in manifest order).
    """

    name = "litert"
    model_role = "tflite"
    taps_role = "tflite_taps"
    strategies = STRATEGIES
    taps_strategies = ("inputs",)  # the exporter writes no constant-weight taps graph
    reuses_outputs = False  # get_tensor copies; chunked batches are concatenated anyway
    live_int8 = True
    supports_population = False

    def __init__(self, bundle: Bundle, *, threads: int | None = None,
                 strategy: str | None = None, graph: str | None = None,
                 outputs: Collection[str] | None = None) -> None:
        super().__init__(bundle, threads=threads, strategy=strategy, graph=graph,
                         outputs=outputs)
        self.section = _section(bundle, self.graph)
        if strategy is None and not self.runs_taps:  # the exporter's measured choice
            self.strategy = self.section.get("strategy", {}).get("choice", "rebuild")
            if self.strategy not in STRATEGIES:
                raise BundleError(f"manifest.json: unknown litert strategy {self.strategy!r}; "
                                  f"choose {STRATEGIES}")
        if self.strategy == "rebuild" and "tflite_const" not in bundle.files:
            raise BundleError("bundle has no model_const.tflite for the rebuild strategy")
        self.batch = int(self.section["batch"])
        self.interpreter: Any = None
        self.rebuilds = 0

    # -- setup ---------------------------------------------------------------------------------
    def _interp(self, **src: Any) -> Any:
        Interpreter, _ = import_interpreter()
        try:
            it = Interpreter(**src, num_threads=self.threads)
            it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"LiteRT cannot load the bundle's TFLite model ({e})") from None
        return it

    def _index(self, it: Any) -> tuple[dict[str, int], dict[str, int]]:
        sig = it.get_signature_runner()
        ins = {n: d["index"] for n, d in sig.get_input_details().items()}
        outs = {n: d["index"] for n, d in sig.get_output_details().items()}
        return ins, outs

    def _map(self, key: str, sig: dict[str, int]) -> dict[str, int]:
        """Manifest section[key] (bundle name -> signature name) as bundle name -> tensor index."""
        names = self.section.get(key)
        if not isinstance(names, dict) or not all(isinstance(s, str) and s in sig
                                                  for s in names.values()):
            raise BundleError(f"manifest.json: {self.graph}.{key} names tensors the TFLite "
                              "model's signature does not have")
        return {n: sig[s] for n, s in names.items()}

    def _bind(self, store: ParamStore) -> None:
        """Create the interpreter with the store's weights (see the module doc for how)."""
        self.interpreter = None
        bind = self._bind_inputs if self.strategy == "inputs" else self._bind_rebuild
        it = bind(store)
        ins, outs = self._index(it)
        data_idx = self._map("inputs", ins)
        if sorted(data_idx) != sorted(t.name for t in self.bundle.inputs):
            raise BundleError(f"manifest.json: {self.graph}.inputs do not match the model inputs")
        out_idx = self._map("outputs", outs)
        if self.outputs is not None:
            absent = sorted(self.outputs - set(out_idx))
            if absent:
                raise BundleError(f"manifest.json: {absent[:4]} are not outputs of the "
                                  f"{self.graph} graph")
            out_idx = {n: i for n, i in out_idx.items() if n in self.outputs}
        self.interpreter, self._data_idx, self._out_idx = it, data_idx, out_idx
        self._output_names = list(out_idx)

    def _bind_inputs(self, store: ParamStore) -> Any:
        """The "inputs" interpreter: every parameter a model input, frozen ones set once."""
        it = self._interp(model_path=str(self.bundle.files[self.graph]))
        param_idx = self._map("params", self._index(it)[0])
        unknown = sorted(set(param_idx) - set(store.names))
        if unknown:
            raise BundleError(f"manifest.json: {self.graph}.params names {unknown[:4]}, "
                              "which are not bundle parameters")
        for name, idx in param_idx.items():  # frozen ones once, trainable per call
            it.set_tensor(idx, np.ascontiguousarray(store[name]))
        self._live: list[tuple[np.ndarray, Any]] = [
            (store[n], param_idx[n]) for n in store.trainable_names if n in param_idx]
        return it

    def _bind_rebuild(self, store: ParamStore) -> Any:
        """The "rebuild" interpreter over a private copy of model_const.tflite, patched."""
        # A private, never-shared bytes object: the interpreter reads constants from it,
        # and we patch weight bytes in place before re-creating the interpreter.
        self._model = self.bundle.files["tflite_const"].read_bytes()
        self._base = np.frombuffer(self._model, np.uint8).ctypes.data
        self._slots: dict[str, np.ndarray] = {}
        for name, (off, nbytes) in self.section["const"].items():
            view = store[name]
            if view.nbytes != nbytes or off < 0 or off + nbytes > len(self._model):
                raise BundleError(f"tflite const slot of {name!r} does not fit the model")
            self._slots[name] = np.frombuffer(self._model, view.dtype, view.size, off)
            self._patch(name, view)
        self._live = [(store[n], n) for n in store.trainable_names if n in self._slots]
        return self._interp(model_content=self._model)

    def _patch(self, name: str, view: np.ndarray) -> None:
        off = int(self.section["const"][name][0])
        src = np.ascontiguousarray(view)  # float32, or int8 for a quantized weight
        ctypes.memmove(self._base + off, src.ctypes.data, src.nbytes)

    def _sync(self) -> None:
        """Make the interpreter see the store's current trainable weights."""
        if self.strategy == "inputs":
            it = self.interpreter
            for view, idx in self._live:
                it.set_tensor(idx, view)
            return
        changed = False
        for view, name in self._live:
            if not np.array_equal(self._slots[name], view.reshape(-1)):
                self._patch(name, view)
                changed = True
        if changed:
            self.interpreter = None  # drop the old interpreter before its constants change
            self.interpreter = self._interp(model_content=self._model)
            self.rebuilds += 1

    # -- run -----------------------------------------------------------------------------------
    def _forward(self, inputs: dict[str, np.ndarray], *, reuse_outputs: bool, release: bool
                 ) -> dict[str, np.ndarray]:
        """Run on `inputs` (any batch size: padded / chunked to the graph's fixed batch; the
        interpreter's tensors are allocated once for that batch, so release changes nothing)."""
        self._sync()
        feeds = {self._data_idx[name]: arr for name, arr in inputs.items()}
        return run_padded(self.interpreter, self.batch, feeds, self._out_idx)

    def _close(self) -> None:
        self.interpreter = None
        self._live = []
        self._slots = {}
        self._model = b""


def run_padded(it: Any, batch: int, feeds: dict[int, np.ndarray], outs: dict[str, int]
               ) -> dict[str, np.ndarray]:
    """Run interpreter `it` of fixed batch `batch` on `feeds` of any batch size: smaller
    batches zero-padded, larger ones in chunks, every output cut back to the real rows.

    Args:
        it: an allocated interpreter. batch: its fixed batch.
        feeds: input tensor index -> [n, ...] array (the same n for all).
        outs: name -> output tensor index.
    Returns: name -> [n, ...] output array.
    """
    n = next(iter(feeds.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in outs}
    for start in range(0, max(n, 1), batch):
        m = min(batch, n - start)
        for idx, arr in feeds.items():
            chunk = arr[start : start + m]
            if m < batch:
                pad = np.zeros((batch, *arr.shape[1:]), arr.dtype)
                pad[:m] = chunk
                chunk = pad
            it.set_tensor(idx, np.ascontiguousarray(chunk))
        it.invoke()
        for name, idx in outs.items():
            parts[name].append(it.get_tensor(idx)[:m])  # get_tensor copies
    return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}


def _section(bundle: Bundle, graph: str) -> dict[str, Any]:
    """The manifest section describing `graph` ("tflite" or "tflite_taps"), checked present."""
    sec = bundle.manifest.get("tflite")
    if "tflite" not in bundle.files or not isinstance(sec, dict):
        why = bundle.manifest.get("tflite_skipped")
        raise BundleError("bundle has no TFLite model" + (f" ({why})" if why else
                          "; export it with formats=('onnx', 'tflite')"))
    if graph == "tflite_taps":
        sec = bundle.manifest.get("tflite_taps")
        if "tflite_taps" not in bundle.files or not isinstance(sec, dict):
            why = bundle.manifest.get("tflite_taps_skipped", "exported without taps, or "
                                      "by an edgelearn without TFLite taps graphs")
            raise BundleError(f"bundle has no TFLite taps graph ({why})")
    return sec
