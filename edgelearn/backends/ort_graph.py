"""Checked ONNX graphs for onnxruntime: lazy import, external-data refusal, baked initializers.

Shared by the onnxruntime backend and its population scorer (so neither imports the other's
module for them).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.errors import BundleError, EdgelearnError, InputError


def import_ort() -> Any:
    """The onnxruntime module (logging quietened), or EdgelearnError saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdgelearnError(
            "the onnxruntime backend needs onnxruntime: pip install 'edgelearn[onnx]'"
        ) from None
    ort.set_default_logger_severity(4)  # failures surface as our one-line errors
    return ort


_import_ort = import_ort  # the name edgelearn.prepare imports

#: session config entries every edgelearn onnxruntime session sets. disable_quant_qdq: ORT fuses
#: a QDQ group (DequantizeLinear -> Conv/MatMul -> QuantizeLinear) into one int8 kernel only
#: while its scales are constants, so a prepared bundle whose scales are live inputs would run
#: the graph's float DequantizeLinear path while the original (and the baked model) ran the
#: fused kernel, and the two differ: on x64 CPUs without VNNI the fused u8s8 kernels sum
#: u8 x s8 pairs in saturating int16 (measured on this project's AVX2 host: a quantize_static
#: conv 1.05 off on outputs of 4.6; elsewhere requantization rounds differently from
#: QuantizeLinear). With "1" every graph runs as written (the ONNX semantics), whether its
#: scales and weights are constants or inputs, on every CPU. (`session.x64quantprecision`
#: also removes the saturation, but onnxruntime 1.32 then fails to load a QDQ model whose
#: int8 weight feeds two nodes: "Attempt to replace the existing tensor".)
SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


def configure(so: Any) -> Any:
    """Apply `SESSION_CONFIG` to an onnxruntime SessionOptions; returns it."""
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    return so


class KeptOutputs:
    """Runs an IOBinding whose outputs go straight into arrays kept from the previous run with
    the same input shapes (no output allocation or copy on the hot path).

    A bound output keeps its first shape and batch dimensions are symbolic, so outputs are
    re-bound whenever the input shapes change; the returned arrays are valid until the next
    run with the same shapes.

    Args:
        session: the InferenceSession. io: its IOBinding (inputs bound by the caller).
        names: output names, in the order returned. what: the graph, for `run_errors`.
    """

    def __init__(self, session: Any, io: Any, names: list[str], what: str) -> None:
        self.session, self.io, self.names, self.what = session, io, names, what
        self._kept: tuple[Any, dict[str, np.ndarray]] | None = None

    def run(self, key: Any, *, keep: bool = True, release: bool = False
            ) -> dict[str, np.ndarray]:
        """Run once; `key`: the input shapes (outputs kept per key when `keep`); `release`:
        shrink the session's CPU arena after the run, so a one-off forward's activations do
        not stay allocated (onnxruntime keeps its arena's peak otherwise; a [32, 512, 256]
        text encoder's whole-graph check left ~50 MB beside the prefix session's own)."""
        io = self.io
        if keep and not release and self._kept is not None and self._kept[0] == key:
            try:
                self.session.run_with_iobinding(io)
                return dict(self._kept[1])
            except Exception:  # output shapes that depend on input values: re-bind below
                pass
        self._kept = None
        io.clear_binding_outputs()
        for name in self.names:
            io.bind_output(name, "cpu")
        with run_errors(self.what):
            self.session.run_with_iobinding(io, shrink_options() if release else None)
        out = dict(zip(self.names, io.copy_outputs_to_cpu(), strict=False))
        if keep and not release and all(isinstance(a, np.ndarray) and a.dtype.kind in "biuf"
                        and a.flags.c_contiguous and a.size for a in out.values()):
            # the next run with these input shapes writes into these (owned, fresh) arrays
            io.clear_binding_outputs()
            for name, a in out.items():
                io.bind_output(name, "cpu", 0, a.dtype.type, list(a.shape), a.ctypes.data)
            self._kept = (key, out)
        return dict(out)

    def forget(self) -> None:
        """The caller re-bound the outputs itself: the next `run` binds them afresh."""
        self._kept = None


def shrink_options() -> Any:
    """onnxruntime RunOptions that shrink the CPU arena back to its initial size after a run."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


@contextmanager
def run_errors(what: str = "the model") -> Iterator[None]:
    """Turn an onnxruntime failure inside the block into one InputError line (`run_error`)."""
    try:
        yield
    except EdgelearnError:
        raise
    except Exception as e:  # onnxruntime's exception types do not share a base class
        raise run_error(e, what) from None


def run_error(e: Exception, what: str = "the model") -> EdgelearnError:
    """The one-line error for an onnxruntime failure `e` running `what` (hot paths catch it
    themselves: a `with run_errors()` block costs ~2 us a call).

    A run fails on input values the graph cannot take (a token id beyond the vocabulary, a
    length the model cannot reshape); onnxruntime raises its own types, or a bare
    RuntimeError from an io-binding run, with a multi-line status text.
    """
    if isinstance(e, EdgelearnError):
        return e
    text = str(e)
    if "Status Message:" in text:
        text = text.split("Status Message:", 1)[1]
    line = (text.strip().splitlines() or [type(e).__name__])[0][:300]
    return InputError(f"onnxruntime failed running {what} on this input: {line}")


def _external_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """(where, TensorProto) for every tensor of the model that could carry external data.

    Walks initializers, sparse initializers, tensor-valued attributes of every node (Constant
    nodes, ...), subgraphs of control-flow nodes (If/Loop/Scan) and local functions.
    """

    def attrs(nodes: Any, where: str) -> Iterator[tuple[str, Any]]:
        for node in nodes:
            for a in node.attribute:
                w = f"{where} node {node.name or node.op_type!r} attribute {a.name!r}"
                if a.HasField("t"):
                    yield w, a.t
                for t in a.tensors:
                    yield w, t
                sparse = [a.sparse_tensor] if a.HasField("sparse_tensor") else []
                for sp in [*sparse, *a.sparse_tensors]:
                    yield w, sp.values
                    yield w, sp.indices
                if a.HasField("g"):
                    yield from graph(a.g, w)
                for g in a.graphs:
                    yield from graph(g, w)

    def graph(g: Any, where: str) -> Iterator[tuple[str, Any]]:
        for t in g.initializer:
            yield f"{where} initializer {t.name!r}", t
        for sp in g.sparse_initializer:
            yield f"{where} sparse initializer {sp.values.name!r}", sp.values
            yield f"{where} sparse initializer {sp.values.name!r}", sp.indices
        yield from attrs(g.node, where)

    yield from graph(model.graph, "graph")
    for fn in model.functions:
        yield from attrs(fn.node, f"function {fn.name!r}")


def load_checked_model(model_path: os.PathLike | str) -> Any:
    """Parse an .onnx file of a bundle and refuse any tensor stored as external data.

    External data names a file by a path the model chooses (`../../etc/shadow`, an absolute
    path ...): the runtime would read it from outside the bundle. Bundles keep every tensor
    inside model.onnx (the exporter writes no .onnx.data), so any external reference is refused
    before the runtime sees the model.

    Args:
        model_path: the bundle's .onnx file.
    Returns: the onnx ModelProto.
    """
    try:
        import onnx
    except ImportError:
        raise EdgelearnError("loading a bundle's ONNX model needs onnx: "
                             "pip install 'edgelearn[onnx]'") from None
    name = os.path.basename(model_path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError types
        raise BundleError(f"{name}: not a valid ONNX model ({e})") from None
    for where, t in _external_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            raise BundleError(f"{name}: {where} uses external data (location {loc!r}), which "
                              "bundles do not allow")
    return model


def baked_model_bytes(model_path: os.PathLike | str, values: dict[str, np.ndarray],
                      keep_outputs: Collection[str] | None = None) -> bytes:
    """The ONNX model with the graph inputs named in `values` turned into initializers.

    Args:
        model_path: an .onnx file without external data.
        values: parameter name -> array (float32/int8 ...) to bake as a constant.
        keep_outputs: graph outputs to keep (None: all). Dropping outputs nobody reads lets
            onnxruntime fuse the nodes behind them (e.g. Conv+BN+Relu of a frozen layer).
    """
    model = load_checked_model(model_path)
    if keep_outputs is not None:
        have = [o.name for o in model.graph.output]
        absent = sorted(set(keep_outputs) - set(have))
        if absent:
            raise BundleError(f"{Path(model_path).name}: {absent[:4]} are not graph outputs")
        kept = [o for o in model.graph.output if o.name in keep_outputs]
        del model.graph.output[:]
        model.graph.output.extend(kept)
    from onnx import numpy_helper
    keep = [i for i in model.graph.input if i.name not in values]
    baked = [i.name for i in model.graph.input if i.name in values]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name in baked:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(values[name]), name))
    return model.SerializeToString()
