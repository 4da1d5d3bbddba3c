"""Heads on third-party models (`prepare --new-head`): feature size, pooling, batch axis.

- `feature_dim`: the feature size of the output a head goes on, when the model declares it
  symbolic (`[batch, <name>]`): onnx shape inference with data propagation, else the size the
  output really has on the parity example.
- `pool_nodes` / `pool_reference`: mean-pooling of a sequence output [B, T, D] in the graph,
  plain (over every middle axis) or masked (`masked-mean`: only positions whose mask input is
  non-zero count, so padding tokens do not change the embedding; an additive mask, one the
  model only adds to attention scores (0 = token, a large negative = padding), counts
  positions > -1), and the same in numpy for the parity check.
- `unpin_batch`: a model whose batch dimension is fixed at 1 gets a symbolic batch (input and
  output dims, and Reshape shape constants that pin the 1) when the rewritten graph agrees with
  the original run one example at a time; otherwise the model stays as it is and edgelearn
  runs larger batches one example at a time (`Model.predict`).
onnx and onnxruntime are passed in by the caller (imported lazily there).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

POOLS = ("mean", "masked-mean")
MASK_EPS = 1e-6  # an all-padding row pools to 0 instead of 0/0


def feature_dim(onnx: Any, model: Any, output: str, ref: Mapping[str, np.ndarray]) -> int | None:
    """The last dimension of `output`: declared, inferred (data propagation), or observed.

    Args:
        model: the source ModelProto. output: the output's name.
        ref: the source model's outputs on the parity example (the observed fallback).
    """
    outs = {o.name: o for o in model.graph.output}
    dims = outs[output].type.tensor_type.shape.dim
    if dims and dims[-1].dim_value > 0:
        return int(dims[-1].dim_value)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        for o in inferred.graph.output:
            if o.name == output and o.type.tensor_type.shape.dim:
                d = o.type.tensor_type.shape.dim[-1]
                if d.dim_value > 0:
                    return int(d.dim_value)
    except Exception:  # shape inference raises its own types on odd graphs; fall back
        pass
    seen = ref.get(output)
    return int(seen.shape[-1]) if seen is not None and seen.ndim >= 2 else None


def mask_is_additive(model: Any, mask: str) -> bool:
    """True when the model only adds `mask` to something (an additive attention mask)."""
    users = [n for n in model.graph.node if mask in n.input]
    return bool(users) and all(n.op_type == "Add" for n in users)


def _axes_input(onnx: Any, model: Any, name: str, axes: list[int]) -> str:
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), name))
    return name


def _reduce(onnx: Any, model: Any, op: str, src: str, out: str, axes: list[int],
            opset: int) -> Any:
    """A Reduce*/Unsqueeze node with `axes` as an input or attribute, as the opset wants."""
    helper = onnx.helper
    as_input = opset >= (18 if op == "ReduceMean" else 13)
    if op == "Unsqueeze":
        if as_input:
            return helper.make_node(op, [src, _axes_input(onnx, model, out + "_axes", axes)],
                                    [out])
        return helper.make_node(op, [src], [out], axes=axes)
    if as_input:
        return helper.make_node(op, [src, _axes_input(onnx, model, out + "_axes", axes)], [out],
                                keepdims=0)
    return helper.make_node(op, [src], [out], axes=axes, keepdims=0)


def pool_nodes(onnx: Any, model: Any, output: str, rank: int, pool: str, mask: str | None,
               opset: int, *, additive: bool = False) -> tuple[list[Any], str]:
    """Nodes pooling `output` [B, ..., D] to [B, D]; returns (nodes, pooled tensor name).

    Args:
        pool: "mean" (over every middle axis) or "masked-mean" (rank 3 [B, T, D]; `mask` is a
            model input of any dtype whose values flatten to [B, T], non-zero = a real token;
            with `additive`, values > -1 are real tokens).
    """
    helper = onnx.helper
    if pool == "mean":
        return [_reduce(onnx, model, "ReduceMean", output, "head.pooled",
                        list(range(1, rank - 1)), opset)], "head.pooled"
    f = onnx.TensorProto.FLOAT
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array(MASK_EPS, np.float32), "head.mask_eps"))
    if additive:
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(np.array(-1.0, np.float32), "head.mask_floor"))
        nodes = [helper.make_node("Cast", [mask], ["head.mask_raw"], to=f),
                 helper.make_node("Greater", ["head.mask_raw", "head.mask_floor"],
                                  ["head.mask_keep"]),
                 helper.make_node("Cast", ["head.mask_keep"], ["head.mask_f"], to=f)]
    else:
        nodes = [helper.make_node("Cast", [mask], ["head.mask_f"], to=f)]
    nodes += [
        helper.make_node("Flatten", ["head.mask_f"], ["head.mask_2d"], axis=1),
        _reduce(onnx, model, "Unsqueeze", "head.mask_2d", "head.mask_3d", [2], opset),
        helper.make_node("Mul", [output, "head.mask_3d"], ["head.masked"]),
        _reduce(onnx, model, "ReduceSum", "head.masked", "head.summed", [1], opset),
        _reduce(onnx, model, "ReduceSum", "head.mask_3d", "head.count", [1], opset),
        helper.make_node("Max", ["head.count", "head.mask_eps"], ["head.count_safe"]),
        helper.make_node("Div", ["head.summed", "head.count_safe"], ["head.pooled"]),
    ]
    return nodes, "head.pooled"


def pool_reference(x: np.ndarray, pool: str, mask: np.ndarray | None, *,
                   additive: bool = False) -> np.ndarray:
    """numpy twin of `pool_nodes` in float64: [B, ..., D] -> [B, D]."""
    x = x.astype(np.float64)
    if pool == "mean":
        return x.mean(axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x
    m = np.asarray(mask, dtype=np.float64).reshape(len(x), -1)
    if additive:
        m = (m > -1.0).astype(np.float64)
    count = np.maximum(m.sum(axis=1, keepdims=True), np.float32(MASK_EPS))
    return (x * m[:, :, None]).sum(axis=1) / count


def _pinned(vi: Any) -> bool:
    dims = vi.type.tensor_type.shape.dim
    return bool(dims) and dims[0].dim_value == 1


def _static_shapes(onnx: Any, model: Any) -> dict[str, list[int]]:
    """Tensor name -> its fully known shape in the batch-1 model (onnx shape inference)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference raises its own types on odd graphs
        return {}
    out = {}
    for vi in inferred.graph.value_info:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            out[vi.name] = dims
    return out


def _unpin_reshapes(onnx: Any, model: Any, static: Mapping[str, list[int]]) -> int:
    """Point Reshape nodes whose shape constant starts with 1 at a copy starting with -1
    (another -1 in it becomes the size shape inference gives it); returns how many."""
    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        shape = onnx.numpy_helper.to_array(consts[node.input[1]])
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if shape.ndim != 1 or not len(shape) or shape[0] != 1:
            continue
        new = shape.copy()
        if (shape[1:] == -1).any():  # -1 must infer the batch: pin the other to its size
            known = static.get(node.output[0])
            if known is None or len(known) != len(shape) or allowzero:
                continue
            new[1:] = known[1:]
        new[0] = -1
        name = f"{node.input[1]}__batch{changed}"
        model.graph.initializer.append(onnx.numpy_helper.from_array(new, name))
        node.input[1] = name
        changed += 1
    return changed


def unpin_batch(onnx: Any, model: Any, run: Callable[[bytes, dict[str, np.ndarray]], dict],
                make_feeds: Callable[[Any, int], dict[str, np.ndarray]],
                agree: Callable[[dict, dict], bool]) -> tuple[Any, str | None]:
    """The model with a symbolic batch if every data input's batch is fixed at 1 and the
    rewrite agrees with the original run one example at a time.

    Args:
        model: the source ModelProto (not modified).
        run: (model bytes, feeds) -> outputs (onnxruntime).
        make_feeds: (model, batch) -> example inputs of that model at that batch size.
        agree: (outputs, reference outputs) -> True when within the parity tolerances.
    Returns: (model to use, note for the manifest: None when the batch was not fixed at 1).
    """
    inits = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in inits]
    if not data or not all(_pinned(i) for i in data):
        return model, None
    new = copy.deepcopy(model)
    for vi in [*new.graph.input, *new.graph.output]:
        if vi.name not in inits and _pinned(vi):
            vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    del new.graph.value_info[:]
    reshapes = _unpin_reshapes(onnx, new, _static_shapes(onnx, model))
    original = model.SerializeToString()
    try:
        feeds = make_feeds(new, 3)
        got = run(new.SerializeToString(), feeds)
        rows = [run(original, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(3)]
        ref = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        ok = agree(got, ref)
    except Exception:  # the rewritten graph does not run: keep the model, loop at batch 1
        ok = False
    if not ok:
        return model, "fixed at 1 (runs one example at a time)"
    return new, f"made symbolic (was fixed at 1; {reshapes} Reshape constant(s) rewritten)"
