"""Quantized weights in third-party ONNX graphs: which integer tensors are weights, and their
scales, found by the role each tensor plays in the graph (never by its name).

Forms recognised (W an integer constant: initializer or Constant node):
  * QDQ: `DequantizeLinear(W, scale, zero_point, axis)` (per-tensor or per-channel).
  * weight-only: `Cast(W -> float)`, optionally `Sub(zero_point)`, then `Mul(., scale)`
    (the scale on either side of the Mul; a real int8 MiniLM ships 38 tensors this way).
  * `QLinearConv` / `QLinearMatMul` / `QGemm` (com.microsoft): the weight operand with its
    scale and zero-point inputs.
  * `ConvInteger` / `MatMulInteger` (onnxruntime's `quantize_dynamic`): W with its zero point;
    the scale sits downstream: the int32 output is Cast to float and multiplied by the weight
    scale, directly or through `Mul(activation_scale, weight_scale)`.
A scale is a float constant; `scale_shape` and `axis` say how it broadcasts over W.
onnx is never imported here: callers pass the ModelProto and the constant values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

#: integer dtypes a quantized weight may have
QUANT_DTYPES = ("int8", "uint8", "int32")
_FLOAT = 1  # onnx.TensorProto.FLOAT
# op -> (weight input index, scale index, zero-point index, default axis) for quantized weights
# (per-channel scales: DequantizeLinear says its axis; a conv's is the output channel, a
# MatMul B [K, N]'s the last axis, a QGemm B's 0 with transB, else 1)
_DIRECT_OPS: dict[str, tuple[tuple[int, int, int, int | None], ...]] = {
    "DequantizeLinear": ((0, 1, 2, 1),),
    "QLinearConv": ((3, 4, 5, 0),),
    "QLinearMatMul": ((3, 4, 5, -1), (0, 1, 2, None)),
    "QGemm": ((3, 4, 5, 1),),  # com.microsoft, from quantize_static(QOperator)
}
_INTEGER_OPS = {"ConvInteger": 0, "MatMulInteger": -1}  # op -> axis of a per-channel scale


def graphs(graph: Any) -> Iterator[Any]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.ByteSize():
                yield from graphs(attr.g)
            for g in attr.graphs:
                yield from graphs(g)


def _value(v: np.ndarray | None) -> Any:
    return None if v is None else (v.item() if v.size == 1 else v.reshape(-1).tolist())


def _axis_of(scale: np.ndarray, weight: np.ndarray) -> int | None:
    """The axis of `weight` a broadcast `scale` varies along (None: per-tensor or unclear)."""
    if scale.size == 1 or scale.ndim > weight.ndim:
        return None
    shape = (1,) * (weight.ndim - scale.ndim) + scale.shape
    axes = [i for i, (s, w) in enumerate(zip(shape, weight.shape, strict=True)) if s > 1]
    return axes[0] if len(axes) == 1 and shape[axes[0]] == weight.shape[axes[0]] else None


def _info(op: str, axis: int | None, consts: Mapping[str, np.ndarray], scale: str | None,
          zero: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {"op": op, "axis": axis}
    for key, name in (("scale", scale), ("zero_point", zero)):
        if name:
            info[f"{key}_name"] = name
            info[key] = _value(consts.get(name))
            if key == "scale" and name in consts:
                info["scale_shape"] = list(consts[name].shape)
    return info


class _Graph:
    """Producers and consumers of one graph's values."""

    def __init__(self, g: Any) -> None:
        self.nodes = list(g.node)
        self.users: dict[str, list[Any]] = {}
        self.producer: dict[str, Any] = {}
        for n in self.nodes:
            for i in n.input:
                self.users.setdefault(i, []).append(n)
            for o in n.output:
                self.producer[o] = n

    def only_user(self, name: str, op: str) -> Any | None:
        users = self.users.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None


def _float_const(consts: Mapping[str, np.ndarray], name: str) -> bool:
    v = consts.get(name)
    return v is not None and v.dtype == np.float32


def _other(node: Any, name: str) -> str | None:
    rest = [i for i in node.input if i != name]
    return rest[0] if len(rest) == 1 else None


def _cast_mul(gr: _Graph, cast: Any, consts: Mapping[str, np.ndarray]
              ) -> tuple[str | None, str | None]:
    """(scale name, zero-point name) of `Cast(W) [-> Sub(zp)] -> Mul(scale)`."""
    out, zero = cast.output[0], None
    sub = gr.only_user(out, "Sub")
    if sub is not None and sub.input[0] == out and sub.input[1] in consts:
        out, zero = sub.output[0], sub.input[1]
    mul = gr.only_user(out, "Mul")
    other = _other(mul, out) if mul is not None else None
    if other is not None and _float_const(consts, other):
        return other, zero
    return None, zero


def _downstream_scale(gr: _Graph, node: Any, consts: Mapping[str, np.ndarray]) -> str | None:
    """The weight scale of a ConvInteger / MatMulInteger: Cast(out) -> Mul(., s) with s a
    float constant or s = Mul(activation_scale, weight_scale)."""
    cast = gr.only_user(node.output[0], "Cast")
    if cast is None:
        return None
    mul = gr.only_user(cast.output[0], "Mul")
    other = _other(mul, cast.output[0]) if mul is not None else None
    if other is None:
        return None
    if _float_const(consts, other):
        return other
    prod = gr.producer.get(other)
    if prod is not None and prod.op_type == "Mul":
        found = [i for i in prod.input if _float_const(consts, i)]
        return found[0] if len(found) == 1 else None
    return None


def _direct(n: Any, consts: Mapping[str, np.ndarray], out: dict[str, dict]) -> None:
    for w, s, z, axis in _DIRECT_OPS[n.op_type]:
        if w >= len(n.input) or n.input[w] not in consts or n.input[w] in out:
            continue
        scale = consts.get(n.input[s]) if s < len(n.input) else None
        if n.op_type == "DequantizeLinear":
            axis = next((a.i for a in n.attribute if a.name == "axis"), axis)
            if consts[n.input[w]].ndim <= 1 and scale is not None and scale.size == 1:
                axis = None
        elif scale is None or scale.size == 1:
            axis = None
        elif n.op_type == "QGemm":
            axis = 0 if any(a.name == "transB" and a.i for a in n.attribute) else 1
        elif axis is not None:
            axis %= max(consts[n.input[w]].ndim, 1)
        scale_name = n.input[s] if s < len(n.input) else None
        zero = n.input[z] if z < len(n.input) else None
        out[n.input[w]] = _info(n.op_type, axis, consts, scale_name, zero)


def quant_info(model: Any, consts: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """weight name -> {"op", "axis", "scale_name", "scale", "scale_shape", "zero_point_name",
    "zero_point"} for every integer constant a quantized form reads as its weight.

    Args:
        model: an onnx ModelProto.
        consts: name -> value of every initializer and Constant output (any graph).
    Returns: scale / zero-point keys are absent when the form has none (a bare Cast).
    """
    out: dict[str, dict[str, Any]] = {}
    for g in graphs(model.graph):
        gr = _Graph(g)
        for n in gr.nodes:
            if n.op_type in _DIRECT_OPS:
                _direct(n, consts, out)
            elif n.op_type in _INTEGER_OPS and len(n.input) > 1 and n.input[1] in consts:
                w = n.input[1]
                scale = _downstream_scale(gr, n, consts)
                per_channel = scale is not None and consts[scale].size > 1
                axis = _INTEGER_OPS[n.op_type] % consts[w].ndim if per_channel else None
                zero = n.input[3] if len(n.input) > 3 and n.input[3] else None
                out.setdefault(w, _info(n.op_type, axis, consts, scale, zero))
            elif n.op_type == "Cast" and n.input and n.input[0] in consts \
                    and str(consts[n.input[0]].dtype) in ("int8", "uint8") \
                    and next((a.i for a in n.attribute if a.name == "to"), 0) == _FLOAT:
                w = n.input[0]
                scale, zero = _cast_mul(gr, n, consts)
                axis = _axis_of(consts[scale], consts[w]) if scale else None
                out.setdefault(w, _info("Cast+Mul" if scale else "Cast", axis, consts, scale,
                                        zero))
    return out


def scale_roles(quant: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """scale tensor name -> the quantized weights it scales (from `quant_info`)."""
    roles: dict[str, list[str]] = {}
    for w, q in quant.items():
        if q.get("scale_name"):
            roles.setdefault(q["scale_name"], []).append(w)
    return roles
