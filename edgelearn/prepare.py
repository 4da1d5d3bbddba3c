"""Bring your own model: turn an inference ONNX model into a bundle, and bake weights back.

`prepare_onnx` takes an ONNX model that edgelearn did not export and writes a bundle: its
weight tensors (float32 initializers, plus int8/uint8/int32 weights of a quantized form --
QDQ DequantizeLinear, weight-only Cast+Mul, QLinear*, MatMulInteger/ConvInteger, see
`edgelearn.quant_graph` -- recorded with their scale and zero point, the float32 scales
themselves becoming parameters of role "scale" that zo-scale trains) leave the graph,
become graph inputs under the same name (renamed only if the name is not a plain tensor name)
and go to weights.safetensors. Weights held by Constant nodes or by initializers of If/Loop
bodies are lifted too when their name is unique in the model (outer-scope references keep
working). A new linear classifier can be appended on top of an output (`new_head`).

`bake_bundle` is the way back: personalized weights become initializers again in a plain
`inference.onnx` any onnxruntime can load without edgelearn.

Everything in the source model is untrusted: external data files must sit inside the model's
directory (no absolute paths, no `..`, no symlink leaving it) and fit their file; tensor
shapes must be non-negative, bounded and match the data stored; the result must agree with the
original model on the same inputs (parity) before the bundle directory appears.
onnx and onnxruntime are imported lazily: `import edgelearn.prepare` costs only numpy.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn import bundle_writer as writer
from edgelearn.backends.ort_graph import SESSION_CONFIG, configure
from edgelearn.bundle import (
    IO_DTYPES,
    MAX_PARAM_ELEMENTS,
    TASKS,
    Bundle,
    load_bundle,
    param_role,
    select_trainable,
    sha256_file,
)
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.params import ParamSpec, ParamStore, check_name
from edgelearn.parity import ATOL, RTOL, Parity, check_tolerances, compare, worst
from edgelearn.quant_graph import QUANT_DTYPES, quant_info, scale_roles
from edgelearn.quant_graph import graphs as _graphs

BATCH = "batch"
HEAD_OUTPUT = "logits"
INFERENCE_ONNX = "inference.onnx"
MAX_MODEL_BYTES = 2 << 30  # protobuf's own limit; larger models keep weights in external data
MAX_DIMS = 8
_WEIGHT_DTYPES = ("float32",)
#: quantized weights a polystep run can train (others stay frozen): the int8 grid
_TRAINABLE_QUANT = ("int8",)


class ModelError(EdgelearnError, ValueError):
    """A source model (ONNX / TFLite) is invalid, hostile, or uses something not supported."""


def _import(module: str) -> Any:
    """`module` (onnx, onnxruntime), imported lazily, or an error naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgelearnError(f"prepare/bake need {module}: pip install 'edgelearn[onnx]'"
                             ) from None


def _import_onnx() -> Any:
    return _import("onnx")


def _import_ort() -> Any:
    ort = _import("onnxruntime")
    ort.set_default_logger_severity(3)  # its warnings about a source model are noise here
    return ort


# -- reading a model safely --------------------------------------------------------------------
def _np_dtype(onnx: Any, elem_type: int) -> str | None:
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return None


def _stored_elements(onnx: Any, t: Any, itemsize: int) -> int | None:
    """Elements actually stored in a TensorProto (None = external, checked separately)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if t.raw_data:
        return len(t.raw_data) // itemsize if itemsize else 0
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
              "string_data"):
        n = len(getattr(t, f))
        if n:
            return n // 2 if t.data_type in (onnx.TensorProto.COMPLEX64,
                                             onnx.TensorProto.COMPLEX128) else n
    return 0


def _check_tensor(onnx: Any, t: Any, where: str) -> None:
    """Refuse absurd or inconsistent tensor shapes before numpy sees them."""
    dims = list(t.dims)
    if len(dims) > 32 or any(d < 0 for d in dims):
        raise ModelError(f"{where}: tensor {t.name!r} has an invalid shape {dims}")
    numel = 1
    for d in dims:
        numel *= d
    if numel > MAX_PARAM_ELEMENTS:
        raise ModelError(f"{where}: tensor {t.name!r} declares {numel} elements (shape {dims})")
    dtype = _np_dtype(onnx, t.data_type)
    itemsize = np.dtype(dtype).itemsize if dtype and dtype != "object" else 0
    stored = _stored_elements(onnx, t, itemsize)
    if stored is not None and t.data_type != onnx.TensorProto.STRING and stored != numel \
            and itemsize:
        raise ModelError(f"{where}: tensor {t.name!r} has shape {dims} ({numel} elements) but "
                         f"stores {stored}")


def _all_tensors(onnx: Any, model: Any) -> Iterator[Any]:
    for g in _graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                yield from attr.tensors


def _check_external(onnx: Any, model: Any, base: Path) -> None:
    """External data must be plain relative files inside the model directory and fit them."""
    root = base.resolve()
    for t in _all_tensors(onnx, model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        p = Path(loc)
        if not loc or p.is_absolute() or ".." in p.parts or "\\" in loc or ":" in loc:
            raise ModelError(f"tensor {t.name!r}: external data path {loc!r} is not a relative "
                             "path inside the model's directory")
        full = (base / p).resolve()
        if root not in full.parents:
            raise ModelError(f"tensor {t.name!r}: external data {loc!r} resolves outside the "
                             "model's directory")
        if not full.is_file():
            raise ModelError(f"tensor {t.name!r}: external data file {loc!r} does not exist")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else full.stat().st_size - offset
        except ValueError:
            raise ModelError(f"tensor {t.name!r}: bad external data offset/length") from None
        dtype = _np_dtype(onnx, t.data_type)
        numel = int(np.prod(list(t.dims), dtype=np.int64))
        need = numel * (np.dtype(dtype).itemsize if dtype else 0)
        if offset < 0 or length != need or offset + length > full.stat().st_size:
            raise ModelError(f"tensor {t.name!r}: external data {loc!r} (offset {offset}, "
                             f"length {length}) does not hold its {need} bytes")


def load_onnx(path: str | os.PathLike) -> Any:
    """Load and validate an untrusted ONNX model (external data confined to its directory).

    Args:
        path: the .onnx file.
    Returns: the onnx ModelProto with all tensor data in memory.
    """
    onnx = _import_onnx()
    path = Path(path)
    if path.suffix.lower() == ".tflite":
        raise ModelError(
            f"{path.name}: prepare does not support .tflite models yet: making a TFLite model's "
            "constant weight tensors into inputs means rewriting its flatbuffer, which needs "
            "the LiteRT schema tooling edgelearn does not ship; convert the model to ONNX "
            "(e.g. with tf2onnx) and prepare that")
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise ModelError(f"{path.name}: larger than 2 GiB (protobuf limit)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError types
        raise ModelError(f"{path.name}: not a valid ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise ModelError(f"{path.name}: the ONNX graph has no nodes")
    for t in _all_tensors(onnx, model):
        _check_tensor(onnx, t, path.name)
    _check_external(onnx, model, path.parent)
    from onnx.external_data_helper import load_external_data_for_model

    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as e:  # onnx raises several types here
        raise ModelError(f"{path.name}: cannot read external data ({e})") from None
    for vi in [*model.graph.input, *model.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            # -1 is a common (if non-standard) spelling of "dynamic"; anything below is junk.
            if d.HasField("dim_value") and (d.dim_value < -1 or d.dim_value >= 1 << 31):
                raise ModelError(f"{path.name}: {vi.name!r} has an invalid dimension "
                                 f"{d.dim_value}")
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # onnx.checker.ValidationError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path.name}: the ONNX checker rejects it ({first})") from None
    return model


# -- finding the weights -----------------------------------------------------------------------
@dataclass
class Candidate:
    """A weight tensor found in the model: where it lives and what the bundle will call it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    where: str  # "initializer" | "constant" | "subgraph-initializer" | "subgraph-constant"
    quant: dict[str, Any] | None = None
    liftable: bool = True
    reason: str = ""
    bundle_name: str = ""
    consumers: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    def to_json(self) -> dict[str, Any]:
        """The --list form."""
        out: dict[str, Any] = {
            "name": self.bundle_name or self.name, "shape": list(self.shape),
            "dtype": self.dtype, "numel": self.numel,
            "bytes": self.numel * np.dtype(self.dtype).itemsize, "where": self.where,
            "consumers": sorted(set(self.consumers)),
        }
        if self.bundle_name and self.bundle_name != self.name:
            out["source_name"] = self.name
        if self.quant:
            out["quant"] = {k: v for k, v in self.quant.items()
                            if k in ("axis", "op", "role", "of", "scale_param")}
        if not self.liftable:
            out["kept_in_graph"] = self.reason
        return out


def _const_values(onnx: Any, model: Any) -> dict[str, np.ndarray]:
    """name -> value of every initializer and Constant(value=...) output in the model."""
    from onnx import numpy_helper

    vals: dict[str, np.ndarray] = {}
    for g in _graphs(model.graph):
        for t in g.initializer:
            vals.setdefault(t.name, numpy_helper.to_array(t))
        for n in g.node:
            if n.op_type == "Constant" and n.output and n.attribute \
                    and n.attribute[0].name == "value":
                vals.setdefault(n.output[0], numpy_helper.to_array(n.attribute[0].t))
    return vals


def _definitions(model: Any) -> dict[str, int]:
    """How many times each value name is defined anywhere in the model."""
    count: dict[str, int] = {}
    for g in _graphs(model.graph):
        inits = {t.name for t in g.initializer}
        names = [*inits, *(i.name for i in g.input if i.name not in inits)]
        names += [o for n in g.node for o in n.output if o]
        for nm in names:
            count[nm] = count.get(nm, 0) + 1
    return count


def _classify(name: str, val: np.ndarray, where: str, quant: Mapping[str, dict],
              scales: Mapping[str, list[str]]) -> Candidate | None:
    """The Candidate `name` is (a weight, a quantized weight, a quantization scale) or None."""
    dtype = str(val.dtype)
    if name in quant and dtype in QUANT_DTYPES:
        return Candidate(name, tuple(val.shape), dtype, where, quant=dict(quant[name]))
    if name in scales and dtype in _WEIGHT_DTYPES:  # scalar scales too: a role, not a size
        return Candidate(name, tuple(val.shape), dtype, where,
                         quant={"role": "scale", "of": list(scales[name])})
    if dtype in _WEIGHT_DTYPES and val.ndim >= 1 and (
            not where.endswith("constant") or val.size >= 2):
        return Candidate(name, tuple(val.shape), dtype, where)
    return None


def _graph_items(g: Any, consts: Mapping[str, np.ndarray], sub: bool
                 ) -> list[tuple[str, np.ndarray, str]]:
    """(name, value, where) of a graph's initializers and Constant(value=...) outputs."""
    items = [(t.name, consts[t.name], "subgraph-initializer" if sub else "initializer")
             for t in g.initializer]
    for n in g.node:
        if n.op_type == "Constant" and n.output and n.output[0] in consts \
                and n.attribute and n.attribute[0].name == "value":
            items.append((n.output[0], consts[n.output[0]],
                          "subgraph-constant" if sub else "constant"))
    return items


def find_weights(model: Any) -> list[Candidate]:
    """Every tensor prepare can turn into a parameter, and what it does with it.

    Float32 initializers of rank >= 1 and float32 Constant nodes with >= 2 elements are weights;
    int8/uint8/int32 tensors are weights only when a quantized form reads them as its weight
    (`edgelearn.quant_graph`: QDQ, Cast+Mul, QLinear*, *Integer); their float32 scales become
    parameters too (quant role "scale", whatever their size), their zero points stay constants
    in the graph. Weights inside If/Loop bodies are lifted when their name is defined once in
    the whole model.
    """
    onnx = _import_onnx()
    consts = _const_values(onnx, model)
    quant = quant_info(model, consts)
    scales = scale_roles(quant)
    zero_points = {q.get("zero_point_name") for q in quant.values()}
    defs = _definitions(model)
    consumers: dict[str, list[str]] = {}
    for g in _graphs(model.graph):
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n.op_type)
    found: list[Candidate] = []
    seen: set[str] = set()
    for depth, g in enumerate(_graphs(model.graph)):
        for name, val, where in _graph_items(g, consts, depth > 0):
            c = None if name in seen or name in zero_points else \
                _classify(name, val, where, quant, scales)
            if c is None:
                continue
            if depth > 0 and defs.get(name, 0) != 1:
                c.liftable, c.reason = False, "name defined more than once in the model"
            c.consumers = consumers.get(name, [])
            if not c.consumers:
                c.liftable, c.reason = False, "unused by the graph"
            seen.add(name)
            found.append(c)
    _assign_names(found, {i.name for i in model.graph.input} | set(defs))
    _link_scales(found)
    return found


def _link_scales(cands: Sequence[Candidate]) -> None:
    """Point each quantized weight at its scale parameter (bundle names), and back."""
    by_name = {c.name: c for c in cands}
    for c in cands:
        q = c.quant or {}
        s = by_name.get(q.get("scale_name", ""))
        if s is not None and s.liftable and c.dtype != "float32":
            q["scale_param"] = s.bundle_name
        if q.get("role") == "scale":
            q["of"] = [by_name[w].bundle_name if w in by_name else w for w in q["of"]]


def _assign_names(cands: list[Candidate], taken: set[str]) -> None:
    """Bundle names: the source name when it is a plain tensor name, else a sanitized one."""
    used = set(taken)
    for c in cands:
        try:
            c.bundle_name = check_name(c.name)
            continue
        except EdgelearnError:
            pass
        base = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in c.name)
        base = base.strip("._-").replace("..", ".") or "param"
        new, k = base, 1
        while new in used:
            new, k = f"{base}_{k}", k + 1
        used.add(new)
        c.bundle_name = new


def _io_specs(onnx: Any, values: Sequence[Any], what: str) -> list[dict[str, Any]]:
    """Manifest tensor specs from graph inputs/outputs; first symbolic dim becomes "batch"."""
    specs = []
    for vi in values:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise ModelError(f"{what} {vi.name!r} is not a tensor (sequences/maps unsupported)")
        dtype = _np_dtype(onnx, tt.elem_type)
        if dtype not in IO_DTYPES:
            raise ModelError(f"{what} {vi.name!r} has dtype {dtype}; bundles support "
                             f"{', '.join(IO_DTYPES)}")
        check_name(vi.name, what)
        if not tt.HasField("shape"):
            raise ModelError(f"{what} {vi.name!r} has no declared shape")
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif i == 0:
                dims.append(BATCH)
            else:
                dims.append(d.dim_param or f"{vi.name}_dim{i}")
        if len(dims) > MAX_DIMS:
            raise ModelError(f"{what} {vi.name!r} has rank {len(dims)} > {MAX_DIMS}")
        specs.append({"name": vi.name, "shape": dims, "dtype": dtype})
    return specs


# -- rewriting ---------------------------------------------------------------------------------
def _rename(model: Any, old: str, new: str) -> None:
    for g in _graphs(model.graph):
        for n in g.node:
            for i, nm in enumerate(n.input):
                if nm == old:
                    n.input[i] = new
            for i, nm in enumerate(n.output):
                if nm == old:
                    n.output[i] = new
        for coll in (g.initializer, g.input, g.value_info):
            for t in coll:
                if t.name == old:
                    t.name = new


def _lift(onnx: Any, model: Any, cands: Sequence[Candidate],
          consts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Move the chosen weights out of the graph; they become main-graph inputs.

    Returns bundle name -> value.
    """
    names = {c.name for c in cands}
    for g in _graphs(model.graph):
        keep = [t for t in g.initializer if t.name not in names]
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = [n for n in g.node
                 if not (n.op_type == "Constant" and n.output and n.output[0] in names)]
        if len(nodes) != len(g.node):
            del g.node[:]
            g.node.extend(nodes)
    # IR < 4 lists initializers among graph inputs; params are re-added below, and initializers
    # that stay constants must not also be inputs (they would look like data inputs).
    inits = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in names and i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(data)
    values: dict[str, np.ndarray] = {}
    for c in cands:
        if c.bundle_name != c.name:
            _rename(model, c.name, c.bundle_name)
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(c.dtype))
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(c.bundle_name, elem, list(c.shape)))
        values[c.bundle_name] = np.ascontiguousarray(consts[c.name])
    for g in _graphs(model.graph):
        vi = [v for v in g.value_info if v.name not in values]
        del g.value_info[:]
        g.value_info.extend(vi)
    model.ir_version = max(model.ir_version, 4)
    return values


def parse_new_head(text: str) -> tuple[str, int]:
    """Parse `OUTPUT:NUM_CLASSES` (the --new-head flag)."""
    name, _, n = text.rpartition(":")
    try:
        k = int(n)
    except ValueError:
        k = 0
    if not name or k < 2:
        raise InputError(f"--new-head {text!r} must look like OUTPUT:NUM_CLASSES (classes >= 2)")
    return name, k


@dataclass(frozen=True)
class HeadSpec:
    """A new head: on `output`, `classes` logits, pooled by `pool` (`edgelearn.heads.POOLS`)
    with the attention-mask input `mask` for "masked-mean"."""

    output: str
    classes: int
    pool: str = "mean"
    mask: str | None = None
    additive: bool = False  # the mask is added to attention scores (0 = token), not 0/1


def _add_head(onnx: Any, model: Any, head: HeadSpec, feat: int | None, seed: int,
              taken: set[str]) -> dict[str, np.ndarray]:
    """Append pooling (mean over middle axes, or masked) + Gemm: `logits = pool(out) @ W.T + b`.

    Returns the head parameters: head.weight [classes, D] ~ U(-1/sqrt(D), 1/sqrt(D)) from
    `seed` (torch's nn.Linear bound), head.bias zeros.
    """
    from onnx import helper

    from edgelearn.heads import pool_nodes

    output, classes = head.output, head.classes
    outs = {o.name: o for o in model.graph.output}
    if output not in outs:
        raise InputError(f"--new-head: {output!r} is not a model output (outputs: "
                         f"{', '.join(outs)})")
    dims = outs[output].type.tensor_type.shape.dim
    rank = len(dims)
    if rank < 2 or not feat:
        raise InputError(f"--new-head: output {output!r} needs rank >= 2 and a known last "
                         "dimension (the feature size; not found by shape inference either)")
    if head.pool == "masked-mean" and rank != 3:
        raise InputError(f"--pool masked-mean needs a sequence output [batch, tokens, dim]; "
                         f"{output!r} has rank {rank}")
    out_name = HEAD_OUTPUT if HEAD_OUTPUT not in taken else "head.logits"
    clash = {"head.weight", "head.bias", out_name, "head.pooled"} & taken
    if clash:
        raise InputError(f"--new-head: names {sorted(clash)} are already used by the model")
    elem = outs[output].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise InputError(f"--new-head: output {output!r} is not float32")
    src = output
    nodes = []
    if rank > 2:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        nodes, src = pool_nodes(onnx, model, output, rank, head.pool, head.mask, opset,
                                additive=head.additive)
    nodes.append(helper.make_node("Gemm", [src, "head.weight", "head.bias"], [out_name],
                                  transB=1))
    model.graph.node.extend(nodes)
    batch = helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT,
                                          [dims[0].dim_value or BATCH, classes])
    del model.graph.output[:]
    model.graph.output.append(batch)
    for nm, shape in (("head.weight", [classes, feat]), ("head.bias", [classes])):
        model.graph.input.append(helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT,
                                                               shape))
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(feat)
    w = rng.uniform(-bound, bound, size=(classes, feat)).astype(np.float32)
    return {"head.weight": w, "head.bias": np.zeros(classes, np.float32)}


# -- parity ------------------------------------------------------------------------------------
def example_inputs(specs: Sequence[dict[str, Any]], seed: int = 0,
                   batch: int = 2, other: int = 16) -> dict[str, np.ndarray]:
    """Random inputs fitting the specs: floats ~ N(0, 1), ints 0 (names with "mask": 1).

    Symbolic dims: "batch" -> `batch`, every other name -> `other` (same name, same size).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = [d if isinstance(d, int) else (batch if d == BATCH else other)
                 for d in s["shape"]]
        dt = np.dtype(s["dtype"])
        if dt.kind == "f":
            feeds[s["name"]] = rng.standard_normal(shape).astype(dt)
        else:
            fill = 1 if "mask" in s["name"].lower() else 0
            feeds[s["name"]] = np.full(shape, fill, dtype=dt)
    return feeds


def load_example(path: str | os.PathLike, specs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Inputs from a .npz whose keys are the model's input names (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            feeds = {k: np.asarray(z[k], order="C") for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read example inputs ({e})") from None
    want = sorted(s["name"] for s in specs)
    if sorted(feeds) != want:
        raise InputError(f"{path}: example keys {sorted(feeds)} are not the inputs {want}")
    return feeds


def _run(ort: Any, src: Any, feeds: Mapping[str, np.ndarray], what: str, *,
         log_level: int = 3) -> dict[str, Any]:
    def first(e: Exception) -> str:
        text = str(e).strip()
        return (text.splitlines()[0] if text else type(e).__name__)[:300]

    so = configure(ort.SessionOptions())  # the backend's kernels (QDQ as written)
    so.log_severity_level = log_level
    try:
        sess = ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise ModelError(f"onnxruntime cannot load {what} ({first(e)})") from None
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, dict(feeds)), strict=True))
    except Exception as e:  # ORT raises its own exception types
        raise ModelError(f"{what} cannot run on the example inputs ({first(e)}); pass real "
                         "inputs with --example inputs.npz") from None


def _bundle_outputs(path: Path, feeds: Mapping[str, np.ndarray], live: str | None,
                    weights: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    from edgelearn.backends.ort import OrtBackend

    bundle = Bundle(path)
    store = bundle.load_store(trainable=live, weights=weights)
    be = OrtBackend(bundle, threads=1)
    be.bind(store)
    return be.forward(dict(feeds))


def _pool_head(x: np.ndarray, head: Mapping[str, np.ndarray], spec: HeadSpec,
               feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    from edgelearn.heads import pool_reference

    pooled = pool_reference(x, spec.pool, feeds.get(spec.mask) if spec.mask else None,
                            additive=spec.additive)
    return pooled @ head["head.weight"].T.astype(np.float64) + head["head.bias"]


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import edgelearn

    return {"edgelearn": edgelearn.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tool": "edgelearn prepare"}


@dataclass
class _Prepared:
    """A source model rewritten for a bundle, before anything is written.

    Attributes:
        model: the rewritten ModelProto (weights are graph inputs, new head appended).
        values: bundle parameter name -> value, in weight-file order.
        kind: bundle name -> the Candidate a lifted weight came from (head params absent).
        cands: every weight found, kept-in-graph ones included.
        in_specs / out_specs: the bundle's input / output tensor specs.
        feeds / ref: the parity example and the original model's outputs on it (through the
            numpy head when one is added).
        head: the new head, or None.
        batch: what was done to a batch dimension fixed at 1 (None: it was not).
    """

    model: Any
    values: dict[str, np.ndarray]
    kind: dict[str, Candidate]
    cands: list[Candidate]
    in_specs: list[dict[str, Any]]
    out_specs: list[dict[str, Any]]
    feeds: dict[str, np.ndarray]
    ref: dict[str, np.ndarray]
    head: HeadSpec | None
    batch: str | None = None


def _rewrite(onnx: Any, ort: Any, model_path: Path, head: HeadSpec | None, seed: int,
             example: Mapping[str, np.ndarray] | str | os.PathLike | None) -> _Prepared:
    """Load the source model, run it on the example, lift its weights, add the head."""
    model, batch_note = _unpinned(onnx, ort, load_onnx(model_path), seed)
    original = model.SerializeToString()
    cands = find_weights(model)
    lift = [c for c in cands if c.liftable]
    inits = {t.name for t in model.graph.initializer}
    in_specs = _io_specs(onnx, [i for i in model.graph.input if i.name not in inits], "input")
    out_specs = _io_specs(onnx, model.graph.output, "output")
    if not lift and head is None:
        raise ModelError(f"{model_path.name}: no weight tensors found to make trainable")
    feeds = _example_feeds(example, in_specs, seed)
    ref = _run(ort, original, feeds, f"the original {model_path.name}")
    values = _lift(onnx, model, lift, _const_values(onnx, model))
    if head is not None:
        from edgelearn.heads import feature_dim, mask_is_additive

        if head.mask is not None and head.mask not in {s["name"] for s in in_specs}:
            raise InputError(f"--mask {head.mask!r} is not a model input (inputs: "
                             f"{', '.join(s['name'] for s in in_specs)})")
        if head.mask is not None and mask_is_additive(model, head.mask):
            head = dataclasses.replace(head, additive=True)
        taken = set(_definitions(model)) | {i.name for i in model.graph.input}
        feat = feature_dim(onnx, onnx.load_from_string(original), head.output, ref) \
            if head.output in ref else None
        head_values = _add_head(onnx, model, head, feat, seed, taken)
        out_specs = _io_specs(onnx, model.graph.output, "output")
        ref = {out_specs[0]["name"]: _pool_head(ref[head.output], head_values, head, feeds)}
        values.update(head_values)
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # a rewrite bug, not user input, but say what happened
        raise ModelError(f"prepared graph fails the ONNX checker ({e})") from None
    return _Prepared(model, values, {c.bundle_name: c for c in lift}, cands, in_specs,
                     out_specs, feeds, ref, head, batch_note)


def _unpinned(onnx: Any, ort: Any, model: Any, seed: int) -> tuple[Any, str | None]:
    """`heads.unpin_batch` with prepare's runner, example inputs and parity tolerances."""
    from edgelearn.heads import unpin_batch

    def make_feeds(m: Any, batch: int) -> dict[str, np.ndarray]:
        inits = {t.name for t in m.graph.initializer}
        specs = _io_specs(onnx, [i for i in m.graph.input if i.name not in inits], "input")
        return example_inputs(specs, seed, batch=batch)

    def agree(got: dict, ref: dict) -> bool:
        return compare(got, ref, atol=ATOL, rtol=RTOL, where="batch").ok

    return unpin_batch(onnx, model, lambda src, feeds: _run(ort, src, feeds, "the model",
                                                           log_level=4),
                       make_feeds, agree)


def _choose_trainable(p: _Prepared, trainable: str | Sequence[str] | None
                      ) -> tuple[set[str], list[str]]:
    """(trainable names, quantized names the patterns matched but that stay frozen: uint8 and
    int32 ones; int8 weights train with polystep on their grid)."""
    default = "head.*" if p.head is not None else "*"
    roles = {n: param_role(ParamSpec(n, c.shape, c.dtype, False, c.quant))
             for n, c in p.kind.items()}
    chosen = select_trainable(list(p.values), trainable if trainable is not None else default,
                              roles)
    frozen_quant = sorted(n for n in chosen if n in p.kind and p.kind[n].quant
                          and p.kind[n].dtype in QUANT_DTYPES
                          and p.kind[n].dtype not in _TRAINABLE_QUANT)
    chosen -= set(frozen_quant)
    if not chosen:
        raise InputError("--trainable selects only quantized uint8/int32 weights, which stay "
                         "frozen; choose float32 or int8 parameters (see --list)")
    return chosen, frozen_quant


def _prepared_manifest(tmp: Path, p: _Prepared, specs: Sequence[ParamSpec], task: str,
                       model_path: Path, seed: int) -> dict[str, Any]:
    """Write (and return) the manifest of a prepared bundle, without parity yet."""
    params = []
    for s in specs:
        c = p.kind.get(s.name)
        extra: dict[str, Any] = {"kind": c.where if c else "head"}
        if c and c.name != c.bundle_name:
            extra["source_name"] = c.name
        if c and c.quant:
            extra["quant"] = c.quant
        params.append(writer.param_entry(s, **extra))
    source = {"file": model_path.name, "size": model_path.stat().st_size,
              "sha256": sha256_file(model_path)}
    manifest = writer.new_manifest(
        task=task, inputs=p.in_specs, outputs=p.out_specs, params=params,
        files=writer.file_entries(tmp, {"weights": writer.WEIGHTS, "onnx": "model.onnx"}),
        exporter={**_versions(), "source": source})
    if p.head is not None:
        manifest["head"] = {"on": p.head.output, "classes": p.head.classes, "seed": seed,
                            "pool": "mean over middle axes" if p.head.pool == "mean" else
                            f"mean over tokens where {p.head.mask} "
                            + ("> -1 (additive mask)" if p.head.additive else "!= 0")}
    if p.batch is not None:
        manifest["batch"] = p.batch
    writer.write_manifest(tmp, manifest)
    return manifest


def _check_prepared(tmp: Path, p: _Prepared, manifest: dict[str, Any], *, atol: float,
                    rtol: float) -> float:
    """Original vs bundle on the example, then manifest["parity"]; returns max abs error."""
    # Live = the manifest's trainable set (frozen int8 weights stay constants, so ORT keeps its
    # quantized kernels, as on the device); baked = every weight an initializer.
    par = worst([compare(_bundle_outputs(tmp, p.feeds, live), p.ref, atol=atol, rtol=rtol,
                         where=f"bundle, weights {'baked' if live == '' else 'live'}")
                 for live in (None, "")])
    if not par.ok:
        raise ModelError(f"parity check failed: original vs bundle {par.describe()}; no "
                         f"bundle written{_quant_hint(p)}")
    manifest["parity"] = {"onnx": {**par.to_json(),
                                   "reference": "original model" if p.head is None
                                   else "original model + numpy head"}}
    writer.write_manifest(tmp, manifest)
    return par.max_abs_err


def _quant_hint(p: _Prepared) -> str:
    """Why an int8 model may fail parity with its scales as inputs, and what to do."""
    if not any(c.quant and c.quant.get("role") == "scale" for c in p.kind.values()):
        return ""
    # The u8s8 saturation of x64 CPUs without VNNI is ruled out by `configure`; what is left
    # is a kernel that rounds its requantization differently from Quantize/DequantizeLinear.
    return ("; with its scales constant onnxruntime runs this int8 graph on fused integer "
            "kernels, with scales as inputs on float dequantized weights, and the two "
            "differ here: prepare with --trainable '@int8' (scales stay constants)")


def _add_head_taps(tmp: Path, p: _Prepared, manifest: dict[str, Any], *, atol: float,
                   rtol: float) -> None:
    """tpSGD's head-only taps graph found in the prepared graph, or the reason none is there."""
    from edgelearn.graph_taps import add_graph_taps

    why = add_graph_taps(tmp, manifest, feeds=p.feeds, atol=atol, rtol=rtol)
    if why is not None:
        manifest["taps_unsupported"] = f"head only: {why}"
        writer.write_manifest(tmp, manifest)


# -- public API --------------------------------------------------------------------------------
def list_params(model_path: str | os.PathLike) -> dict[str, Any]:
    """What `prepare` would make of a model: inputs, outputs and every weight tensor.

    Unstable (`el.tools.list_params`): the result keys follow `prepare --list --json`.

    Args:
        model_path: the .onnx file.
    Returns: {"model", "inputs", "outputs", "params" (list), "total_params", "total_bytes"}.
    """
    onnx = _import_onnx()
    model = load_onnx(model_path)
    cands = find_weights(model)
    inits = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in inits]
    lifted = [c for c in cands if c.liftable]
    return {
        "model": str(model_path),
        "inputs": _io_specs(onnx, data, "input"),
        "outputs": _io_specs(onnx, model.graph.output, "output"),
        "params": [c.to_json() for c in cands],
        "total_params": sum(c.numel for c in lifted),
        "total_bytes": sum(c.numel * np.dtype(c.dtype).itemsize for c in lifted),
    }


def prepare_onnx(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    trainable: str | Sequence[str] | None = None,
    new_head: str | tuple[str, int] | None = None,
    task: str | None = None,
    seed: int = 0,
    example: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    overwrite: bool = False,
    pool: str = "mean",
    mask: str | None = None,
) -> dict[str, Any]:
    """Turn an inference ONNX model into a bundle; returns the `prepare --json` summary.

    Unstable (`el.tools.prepare`): the signature and result keys may change.

    Args:
        model_path: the .onnx file (external data allowed inside its directory).
        out_dir: bundle directory to create.
        trainable: glob(s) of parameters marked trainable (default: "head.*" with a new head,
            else "*"; "@scale" / "@int8" select quantization scales / int8 weights by role);
            uint8 / int32 quantized weights always stay frozen.
        new_head: "OUTPUT:NUM_CLASSES": append a linear classifier on that output (rank > 2
            outputs are mean-pooled over their middle axes first); the bundle's only output
            is then "logits" ("head.logits" if the model already has a "logits").
        task: "classification" or "regression" (default: classification).
        seed: seed of the new head's initial weights.
        example: model inputs (name -> array, or a .npz path) for the parity check
            (default: random floats / zero ints, see `example_inputs`).
        atol / rtol: per output, |original - bundle| <= atol + rtol * max|original| on the
            example (`edgelearn.parity`).
        overwrite: replace an existing bundle directory.
        pool: how the new head pools a sequence output: "mean" (every position) or
            "masked-mean" (positions where the input `mask` is non-zero: padding excluded).
        mask: the attention-mask input, with pool="masked-mean".
    A model whose batch dimension is fixed at 1 gets a symbolic batch where the graph allows
    (checked against the original run one example at a time; `edgelearn.heads`).
    """
    check_tolerances(atol, rtol)
    onnx = _import_onnx()
    ort = _import_ort()
    model_path = Path(model_path)
    out_dir = Path(out_dir)
    task = task or "classification"
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, not {task!r}")
    head = _head_spec(new_head, pool, mask)
    p = _rewrite(onnx, ort, model_path, head, seed, example)
    chosen, frozen_quant = _choose_trainable(p, trainable)
    specs = [ParamSpec(n, tuple(v.shape), str(v.dtype), n in chosen) for n, v in p.values.items()]
    with writer.staging_dir(out_dir, overwrite=overwrite, hint="pass --overwrite") as tmp:
        onnx.save(p.model, str(tmp / "model.onnx"))
        ParamStore(specs, values=p.values).save(tmp / writer.WEIGHTS)
        manifest = _prepared_manifest(tmp, p, specs, task, model_path, seed)
        err = _check_prepared(tmp, p, manifest, atol=atol, rtol=rtol)
        _add_head_taps(tmp, p, manifest, atol=atol, rtol=rtol)
        writer.publish(tmp, out_dir)
    return {
        "bundle": str(out_dir),
        "params": sum(int(v.size) for v in p.values.values()),
        "trainable_params": sum(int(p.values[n].size) for n in chosen),
        "tensors": len(p.values),
        "frozen_quantized": frozen_quant,
        "kept_in_graph": [c.to_json() for c in p.cands if not c.liftable],
        "inputs": p.in_specs,
        "outputs": p.out_specs,
        "formats": ["onnx"],
        "parity_max_abs_err": err,
        "batch": p.batch,
    }


def _head_spec(new_head: str | tuple[str, int] | None, pool: str, mask: str | None
               ) -> HeadSpec | None:
    """The head asked for by --new-head / --pool / --mask (InputError for a wrong mix)."""
    from edgelearn.heads import POOLS

    if pool not in POOLS:
        raise InputError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if (pool == "masked-mean") != (mask is not None):
        raise InputError("--pool masked-mean and --mask INPUT go together")
    if new_head is None:
        if mask is not None or pool != "mean":
            raise InputError("--pool / --mask shape a new head: pass --new-head too")
        return None
    output, classes = parse_new_head(new_head) if isinstance(new_head, str) else new_head
    return HeadSpec(output, classes, pool, mask)


def _example_feeds(example: Mapping[str, np.ndarray] | str | os.PathLike | None,
                   specs: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """The parity example: given arrays, a .npz file, or random (`example_inputs`)."""
    if isinstance(example, (str, os.PathLike)):
        return load_example(example, specs)
    if example is not None:
        return {k: np.asarray(v, order="C") for k, v in example.items()}
    return example_inputs(specs, seed)


def _write_baked(tmp: Path, bundle: Bundle, store: ParamStore) -> BakedTflite:
    """Write the baked bundle into `tmp`: inference.onnx, the weights, the source bundle's
    other files (TFLite ones personalized or left out) and its manifest."""
    from edgelearn.backends.ort_graph import baked_model_bytes

    (tmp / INFERENCE_ONNX).write_bytes(baked_model_bytes(bundle.files["onnx"], store.state()))
    store.save(tmp / writer.WEIGHTS, metadata={"sha256": store.digest()})
    roles = {"weights": writer.WEIGHTS}
    for role, path in bundle.files.items():
        if role not in ("weights", "inference_onnx"):
            shutil.copyfile(path, tmp / path.name)
            roles[role] = path.name
    roles["inference_onnx"] = INFERENCE_ONNX
    manifest = copy.deepcopy(bundle.manifest)
    manifest["baked"] = {"from_weights_sha256": bundle.manifest["files"]["weights"]["sha256"],
                         "weights_sha256": store.digest(), "inference": [INFERENCE_ONNX]}
    baked_tfl = BakedTflite(tmp, manifest, roles)
    baked_tfl.write_constants(store)
    baked_tfl.save_manifest()
    return baked_tfl


def _check_baked(ort: Any, baked_tfl: BakedTflite, feeds: Mapping[str, np.ndarray], *,
                 atol: float, rtol: float) -> tuple[Parity, dict[str, dict[str, Any]]]:
    """bundle + weights vs inference.onnx (must pass) and vs the TFLite files (left out when
    they fail); records manifest["baked"] parity. Returns (inference.onnx parity, file ->
    parity fields)."""
    tmp, baked = baked_tfl.tmp, baked_tfl.manifest["baked"]
    ref = _bundle_outputs(tmp, feeds, None)
    par = compare(_run(ort, str(tmp / INFERENCE_ONNX), feeds, INFERENCE_ONNX), ref,
                  atol=atol, rtol=rtol)
    if not par.ok:
        raise ModelError(f"bake parity failed: bundle+weights vs {INFERENCE_ONNX} "
                         f"{par.describe()}; nothing written")
    parity = {INFERENCE_ONNX: par.to_json(), **baked_tfl.check(feeds, ref, atol=atol,
                                                               rtol=rtol)}
    baked["parity_max_abs_err"] = par.max_abs_err
    baked["parity"] = parity
    fused = _fused_int8(ort, tmp / INFERENCE_ONNX, feeds, ref, atol=atol, rtol=rtol)
    if fused is not None:
        baked["fused_int8"] = fused
    baked_tfl.save_manifest()
    return par, parity


def _fused_int8(ort: Any, path: Path, feeds: Mapping[str, np.ndarray],
                ref: Mapping[str, np.ndarray], *, atol: float, rtol: float
                ) -> dict[str, Any] | None:
    """How far a plain onnxruntime session (default options: QDQ groups fused into int8
    kernels) is from what was trained, for a graph with QuantizeLinear nodes (None without).

    edgelearn runs every graph with `ort_graph.SESSION_CONFIG` (QDQ as written), so the trained
    numbers are those of inference.onnx under that config; fused kernels requantize with their
    own rounding (and saturate on x64 CPUs without VNNI), so a default session may differ.
    """
    onnx = _import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    if not any(n.op_type == "QuantizeLinear" for g in _graphs(model.graph) for n in g.node):
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, dict(feeds)), strict=True))
    par = compare(got, ref, atol=atol, rtol=rtol, where="onnxruntime default options")
    return {**par.to_json(), "session_config": dict(SESSION_CONFIG),
            "note": "inference.onnx reproduces the trained outputs with this onnxruntime "
                    "session config; with default options (fused int8 kernels) it is off by "
                    "max_abs_err"}


def bake_bundle(
    bundle_path: str | os.PathLike,
    weights: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    example: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write personalized weights back into plain inference models; returns `bake --json`.

    Unstable (`el.tools.bake`): the signature and result keys may change.

    `out_dir` becomes a bundle whose base weights are `weights` (so it can be personalized
    further) and that also holds `inference.onnx`: every parameter an initializer, the inputs
    and outputs of the manifest, loadable by any onnxruntime without edgelearn. A bundle with
    TFLite files gets them personalized too (`BakedTflite`): model_const.tflite carries the
    weights as constants, checked by a plain LiteRT interpreter against onnxruntime; a TFLite
    file that cannot be written or checked is left out, and why is in the result's "skipped"
    (file name -> reason; the CLI prints it on stderr). Nothing unpersonalized is handed out.

    Args:
        bundle_path: the source bundle.
        weights: personalized weights (.safetensors, e.g. a run's weights.safetensors).
        out_dir: directory to create (must differ from the bundle).
        example: inputs for the parity checks (default: random, see `example_inputs`).
        atol / rtol: per output, |bundle+weights - baked model| <= atol + rtol *
            max|bundle+weights| on the example (`edgelearn.parity`).
        overwrite: replace an existing directory.
    Returns: {"bundle", "inference" (format -> path), "weights_sha256", "parity_max_abs_err"
        (inference.onnx), "parity" (file -> edgelearn.parity fields), "skipped"}.
    """
    check_tolerances(atol, rtol)
    ort = _import_ort()
    bundle = load_bundle(bundle_path)
    out_dir = Path(out_dir)
    if out_dir.resolve() == bundle.root:
        raise InputError("bake --out must be a new directory, not the source bundle")
    if "onnx" not in bundle.files:
        raise InputError(f"{bundle.path}: bundle has no ONNX model to bake")
    store = bundle.load_store(weights=weights)
    feeds = _example_feeds(example, [t.to_json() for t in bundle.inputs])
    with writer.staging_dir(out_dir, overwrite=overwrite, hint="pass --overwrite") as tmp:
        baked_tfl = _write_baked(tmp, bundle, store)
        par, parity = _check_baked(ort, baked_tfl, feeds, atol=atol, rtol=rtol)
        writer.publish(tmp, out_dir)
    inference = {"onnx": str(out_dir / INFERENCE_ONNX)}
    if TFLITE_CONST in baked_tfl.manifest["baked"]["inference"]:
        inference["tflite"] = str(out_dir / TFLITE_CONST)
    return {"bundle": str(out_dir), "inference": inference, "weights_sha256": store.digest(),
            "parity_max_abs_err": par.max_abs_err, "parity": parity,
            "skipped": baked_tfl.skipped}


# -- bake: TFLite ------------------------------------------------------------------------------
TFLITE_CONST = "model_const.tflite"
_TFLITE_ROLES = ("tflite", "tflite_const", "tflite_taps")


class BakedTflite:
    """The TFLite files of a bundle being baked: personalized, checked, or left out.

    model_const.tflite holds every parameter as a constant at the offsets in the manifest's
    `tflite.const`: the personalized bytes are written there, so any LiteRT interpreter runs
    the personalized model with no edgelearn. model.tflite and model_taps.tflite take the
    weights as inputs: copied unchanged, they read the baked bundle's weights.safetensors.
    Every kept file is checked against onnxruntime on bundle + weights (`check`).

    Args:
        tmp: the baked bundle directory being written (files already copied into it).
        manifest: its manifest (updated in place: files, tflite sections, baked.inference).
        roles: file role -> file name in `tmp` (updated in place when a file is left out).
    """

    def __init__(self, tmp: Path, manifest: dict[str, Any], roles: dict[str, str]) -> None:
        self.tmp, self.manifest, self.roles = tmp, manifest, roles
        self.skipped: dict[str, str] = {}

    def save_manifest(self) -> None:
        """Write the manifest with the sizes and sha256 of the files kept."""
        self.manifest["files"] = writer.file_entries(self.tmp, self.roles)
        writer.write_manifest(self.tmp, self.manifest)

    def write_constants(self, store: ParamStore) -> None:
        """Write `store` into the constant slots of model_const.tflite (or leave it out)."""
        if "tflite_const" not in self.roles:
            return
        why = _patch_constants(self.tmp / self.roles["tflite_const"],
                               self.manifest.get("tflite", {}).get("const"), store)
        if why:
            self.drop(("tflite_const",), why)
        else:
            self.manifest["baked"]["inference"].append(self.roles["tflite_const"])

    def drop(self, roles: Sequence[str], why: str) -> None:
        """Leave the files of `roles` out of the baked bundle, recording why."""
        for role in roles:
            name = self.roles.pop(role, None)
            if name is None:
                continue
            (self.tmp / name).unlink(missing_ok=True)
            self.skipped[name] = why
            if name in self.manifest["baked"]["inference"]:
                self.manifest["baked"]["inference"].remove(name)
        sec = self.manifest.get("tflite")
        if "tflite" not in self.roles:  # no LiteRT model left: the bundle is ONNX only
            for key in ("tflite", "tflite_taps"):
                self.manifest.pop(key, None)
            self.manifest["tflite_skipped"] = f"left out by bake: {why}"
        elif "tflite_const" not in self.roles and isinstance(sec, dict):
            sec.pop("const", None)  # the device then sets weights as inputs
            sec.setdefault("strategy", {})["choice"] = "inputs"

    def check(self, feeds: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], *,
              atol: float, rtol: float) -> dict[str, dict[str, Any]]:
        """LiteRT vs `ref` (onnxruntime on bundle + weights) for model.tflite and
        model_const.tflite; a file that fails, or cannot run here (no LiteRT installed), is
        left out (model.tflite with every TFLite file). Returns file -> parity fields."""
        out: dict[str, dict[str, Any]] = {}
        for role in ("tflite", "tflite_const"):
            name = self.roles.get(role)
            if name is None:
                continue
            try:
                got = self._outputs(role, feeds)
            except EdgelearnError as e:
                self._drop_role(role, f"could not be checked against onnxruntime ({e})")
                continue
            par = compare(got, ref, atol=atol, rtol=rtol, where=f"LiteRT {name}")
            if par.ok:
                out[name] = par.to_json()
            else:
                self._drop_role(role, f"LiteRT vs onnxruntime parity failed: {par.describe()}")
        return out

    def _outputs(self, role: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if role == "tflite_const":  # as any LiteRT user runs it: its own constants
            return _run_tflite_plain(self.tmp / self.roles[role], self.manifest["tflite"],
                                     feeds)
        from edgelearn.backends.litert import LiteRTBackend

        self.save_manifest()
        b = Bundle(self.tmp)
        dev = LiteRTBackend(b, threads=1, strategy="inputs")  # weights set as inputs
        dev.bind(b.load_store())
        return dev.forward(dict(feeds))

    def _drop_role(self, role: str, why: str) -> None:
        self.drop(_TFLITE_ROLES if role == "tflite" else (role,), why)


def _patch_constants(path: Path, const: Any, store: ParamStore) -> str | None:
    """Write every parameter of `store` into its constant slot of the .tflite at `path`.

    Args:
        path: model_const.tflite (rewritten in place).
        const: the manifest's tflite.const: parameter name -> [byte offset, nbytes].
        store: the personalized weights.
    Returns: None when done, else why the file cannot be personalized (then left unchanged).
    """
    if not isinstance(const, dict):
        return "the manifest has no tflite.const slots to write the weights into"
    missing = sorted(set(store.names) - set(const))
    if missing:
        return f"parameters {missing[:4]} have no constant slot in {path.name}"
    buf = bytearray(path.read_bytes())
    for name, slot in const.items():
        arr = np.ascontiguousarray(store[name]) if name in store else None
        ok = (isinstance(slot, list) and len(slot) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in slot))
        if arr is None or not ok or slot[0] < 0 or arr.nbytes != slot[1] \
                or slot[0] + slot[1] > len(buf):
            return f"the constant slot of {name!r} does not fit {path.name}"
        buf[slot[0] : slot[0] + slot[1]] = arr.tobytes()
    path.write_bytes(bytes(buf))
    return None


def _run_tflite_plain(path: Path, section: Mapping[str, Any],
                      feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a .tflite as a LiteRT user would, no edgelearn patching: its own constants, its
    fixed batch (`section["batch"]`, smaller inputs zero-padded, larger ones chunked)."""
    from edgelearn.backends.litert import import_interpreter

    interpreter, _ = import_interpreter()
    content = path.read_bytes()  # from memory: the interpreter keeps a reference
    try:
        it = interpreter(model_content=content, num_threads=1)
        it.allocate_tensors()
        runner = it.get_signature_runner()
    except (ValueError, RuntimeError) as e:
        raise EdgelearnError(f"LiteRT cannot load {path.name} ({e})") from None
    bsz, n = int(section["batch"]), next(iter(feeds.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in section["outputs"]}
    for start in range(0, max(n, 1), bsz):
        m = min(bsz, n - start)
        args = {}
        for name, arr in feeds.items():
            chunk = np.zeros((bsz, *arr.shape[1:]), arr.dtype)
            chunk[:m] = arr[start : start + m]
            args[section["inputs"][name]] = chunk
        res = runner(**args)
        for k, sig in section["outputs"].items():
            parts[k].append(res[sig][:m])
    return {k: np.concatenate(v) for k, v in parts.items()}
