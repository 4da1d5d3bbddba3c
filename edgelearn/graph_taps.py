"""Head taps from the ONNX graph itself: tpSGD's exact head update on any bundle.

tpSGD's output-layer update (`edgelearn.optim.tpsgd`, "Learning with Local Gradients at the
Edge", 2022: the output layer trains on the true loss) needs only the head's input h and the
logits z = h W^T + b: dL/dW = (dL/dz)^T h and dL/db = sum(dL/dz), exact, whatever computed h.
So a bundle whose backbone tpSGD cannot split into layers (attention, an exporter's fused
ops, a prepared third-party model) still gets a taps graph: model.onnx with h exposed as one
more graph output, and a single "layers" record for the head. No torch is needed: the head is
found in the graph (`find_head`): the linear layer producing the first graph output,

    Gemm(h, W, [b])  (alpha = beta = 1, transA = 0; transB = 1: W [out, in], 0: W [in, out])
    Add(MatMul(h, W), b)  or  MatMul(h, W)       (W [in, out], the MatMul layout)

where W (and b) are bundle parameters used by no other node (a tied weight's update would not
be exact). The graph is checked before it is kept (`add_graph_taps`): the taps graph's logits
equal model.onnx's, and h W^T + b recomputed in numpy from the tapped h equals the logits
(scale-aware parity, `edgelearn.parity`), which proves the layout and the bias read. A graph
that fails is left out, the reason in the manifest's "taps_unsupported".

onnx and onnxruntime are imported lazily (device code: numpy at module level).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn import bundle_writer as writer
from edgelearn.errors import EdgelearnError
from edgelearn.parity import ATOL, RTOL, compare, worst

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle
    from edgelearn.layers import Layer

TAPS_FILE = "model_taps.onnx"


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _linear(node: Any, producers: Mapping[str, Any]) -> tuple[str, str, str | None, str] | str:
    """(h, W, b or None, weight layout) of the linear node making the output, or why not."""
    if node.op_type == "Gemm":
        at = _attrs(node)
        if at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0 or at.get("transA", 0):
            return "the output Gemm has alpha/beta != 1 or transA"
        b = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return node.input[0], node.input[1], b, "out_in" if at.get("transB", 0) else "in_out"
    if node.op_type == "MatMul":
        return node.input[0], node.input[1], None, "in_out"
    if node.op_type == "Add":
        for m, b in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            mm = producers.get(m)
            if mm is not None and mm.op_type == "MatMul":
                return mm.input[0], mm.input[1], b, "in_out"
    return f"the output comes from a {node.op_type} node, not Gemm / MatMul(+Add)"


def find_head(model: Any, params: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | str:
    """The "layers" record of the linear head producing the graph's first output, or why not.

    Args:
        model: the bundle's ModelProto (weights are graph inputs named like the parameters).
        params: float32 bundle parameter name -> shape.
    Returns: the head record (kind linear, head, input = h, preact = the output) or a reason.
    """
    graph = model.graph
    out = graph.output[0].name
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(out)
    if node is None:
        return f"output {out!r} is not computed by a node"
    found = _linear(node, producers)
    if isinstance(found, str):
        return found
    h, w, b, layout = found
    if w not in params or len(params[w]) != 2:
        return f"the head weight {w!r} is not a 2-d float32 parameter of the bundle"
    width = params[w][0] if layout == "out_in" else params[w][1]
    if b is not None and (b not in params or int(np.prod(params[b])) != width):
        return f"the head bias {b!r} is not a parameter of {width} values"
    uses = [i for n in graph.node for i in n.input]
    shared = [p for p in (w, b) if p is not None and uses.count(p) != 1]
    if shared:
        return f"head parameters {shared} are also used elsewhere (tied weights)"
    name = w.rsplit(".", 1)[0] if "." in w else w
    return {"name": name, "head": True, "kind": "linear", "activation": "none",
            "params": {"weight": w, **({"bias": b} if b is not None else {})},
            "input": h, "preact": out, "output": None, "weight_layout": layout}


def head_layers(bundle: Bundle) -> list[Layer]:
    """The bundle's layer records; without a head record among them, the linear head
    `find_head` finds in its model.onnx (none when it finds none, or onnx is not installed).

    Args:
        bundle: a loaded bundle (manifest, parameters and files).
    """
    from edgelearn.layers import parse_layers

    names = {p.name for p in bundle.params}
    layers = parse_layers(bundle.manifest, names)
    if any(lr.head for lr in layers) or "onnx" not in bundle.files:
        return layers
    try:
        import onnx
    except ImportError:  # device installs may carry onnxruntime alone
        return layers
    try:
        model = onnx.load(str(bundle.files["onnx"]), load_external_data=False)
    except Exception:  # protobuf's DecodeError and kin: no head is read here; the runtime
        return layers  # reports a graph it cannot load when the run loads it
    record = find_head(model, {p.name: tuple(p.shape) for p in bundle.params
                               if p.dtype == "float32"})
    return layers if isinstance(record, str) else parse_layers({"layers": [record]}, names)


def _taps_model(model: Any, record: Mapping[str, Any]) -> Any:
    """model.onnx with the head input added as a graph output (unless it is a graph input)."""
    import onnx
    from onnx import helper

    taps = copy.deepcopy(model)
    h = record["input"]
    if h not in {i.name for i in taps.graph.input} | {o.name for o in taps.graph.output}:
        taps.graph.output.append(helper.make_tensor_value_info(h, onnx.TensorProto.FLOAT, None))
    return taps


def _check(bundle_dir: Path, record: Mapping[str, Any], feeds: Mapping[str, np.ndarray], *,
           atol: float, rtol: float) -> str | None:
    """None when the taps graph reproduces the model's logits and the head's algebra."""
    from edgelearn.backends.ort import OrtBackend
    from edgelearn.bundle import Bundle

    bundle = Bundle(bundle_dir)
    store = bundle.load_store()
    outs = []
    for graph in ("onnx", "onnx_taps"):
        be = OrtBackend(bundle, threads=1, graph=graph)
        be.bind(store)
        outs.append(be.forward(dict(feeds)))
    model, taps = outs
    z, h = record["preact"], record["input"]
    hv = feeds[h] if h in feeds else taps[h]
    if taps[z].ndim != 2 or hv.ndim != 2:
        return (f"the head maps {hv.shape} to {taps[z].shape}; tpsgd's head needs "
                "[N, in] -> [N, classes]")
    w = np.asarray(store[record["params"]["weight"]], np.float64)
    w = w if record["weight_layout"] == "out_in" else w.T
    ref = hv.astype(np.float64) @ w.T
    if "bias" in record["params"]:
        ref = ref + np.asarray(store[record["params"]["bias"]], np.float64).reshape(-1)
    par = worst([compare({z: taps[z]}, {z: model[z]}, atol=atol, rtol=rtol,
                         where="taps graph vs model.onnx"),
                 compare({z: taps[z]}, {z: ref}, atol=atol, rtol=rtol,
                         where="logits vs numpy head on the tapped input")], atol=atol, rtol=rtol)
    return None if par.ok else f"head taps parity failed: {par.describe()}"


def add_graph_taps(bundle_dir: str | Path, manifest: dict[str, Any], *,
                   feeds: Mapping[str, np.ndarray] | None = None, atol: float = ATOL,
                   rtol: float = RTOL) -> str | None:
    """Give a bundle being written a head-only taps graph found in its model.onnx.

    On success model_taps.onnx is written, manifest "files"/"layers"/"taps_from" are set and
    the manifest is rewritten; otherwise nothing is added and the reason is returned (the
    caller records it, e.g. in "taps_unsupported").

    Args:
        bundle_dir: the bundle directory being written (model.onnx, weights and manifest in).
        manifest: its manifest (updated in place).
        feeds: example inputs for the check (default: `edgelearn.prepare.example_inputs`).
        atol / rtol: parity tolerance (`edgelearn.parity`).
    Returns: None, or why no taps graph was added.
    """
    import onnx

    from edgelearn.prepare import example_inputs

    bundle_dir = Path(bundle_dir)
    params = {p["name"]: tuple(p["shape"]) for p in manifest["params"]
              if p.get("dtype") == "float32"}
    model = onnx.load(str(bundle_dir / "model.onnx"))  # written by this process
    record = find_head(model, params)
    if isinstance(record, str):
        return record
    onnx.save(_taps_model(model, record), str(bundle_dir / TAPS_FILE))
    before = {k: copy.deepcopy(manifest.get(k)) for k in ("files", "layers")}
    writer.add_file(manifest, bundle_dir, "onnx_taps", TAPS_FILE)
    manifest["layers"] = [record]
    writer.write_manifest(bundle_dir, manifest)
    try:
        why = _check(bundle_dir, record, feeds or example_inputs(manifest["inputs"]),
                     atol=atol, rtol=rtol)
    except EdgelearnError as e:
        why = f"head taps graph does not run ({e})"
    if why is None:
        manifest["taps_from"] = "taps found in the ONNX graph: head only"
        writer.write_manifest(bundle_dir, manifest)
        return None
    (bundle_dir / TAPS_FILE).unlink()
    for k, v in before.items():
        if v is None:
            manifest.pop(k, None)
        else:
            manifest[k] = v
    writer.write_manifest(bundle_dir, manifest)
    return why
