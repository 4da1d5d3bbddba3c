"""Frozen backbones built with onnx.helper (no torch) for frozen-prefix caching: a
transformer-like encoder (attention, LayerNorm, GELU, residuals) and a MobileNet-like CNN
(conv, batch norm, ReLU6, depthwise convs, inverted residuals, global pooling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class _Graph:
    """Accumulates nodes and initializers; names are made unique by a counter."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def const(self, stem: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        nm = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), nm))
        return nm

    def weight(self, stem: str, shape: tuple[int, ...], scale: float) -> str:
        return self.const(stem, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _save(g: _Graph, name: str, inp, out, path: Path, out_name: str, last: str) -> Path:
    import onnx
    from onnx import helper

    g.nodes.append(helper.make_node("Identity", [last], [out_name]))
    graph = helper.make_graph(g.nodes, name, [inp], [out], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _layer_norm(g: _Graph, x: str, dim: int) -> str:
    scale = g.const("ln.scale", (1 + 0.1 * g.rng.standard_normal(dim)).astype(np.float32))
    bias = g.const("ln.bias", (0.1 * g.rng.standard_normal(dim)).astype(np.float32))
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)


def _gelu(g: _Graph, x: str) -> str:
    inv = g.const("gelu.inv_sqrt2", np.array(1 / np.sqrt(2), np.float32))
    one = g.const("gelu.one", np.array(1.0, np.float32))
    half = g.const("gelu.half", np.array(0.5, np.float32))
    e = g.op("Erf", [g.op("Mul", [x, inv])])
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [e, one])]), half])


def _dense(g: _Graph, x: str, d_in: int, d_out: int) -> str:
    w = g.weight("dense.weight", (d_in, d_out), 1 / np.sqrt(d_in))
    b = g.weight("dense.bias", (d_out,), 0.02)
    return g.op("Add", [g.op("MatMul", [x, w]), b])


def _attention(g: _Graph, x: str, dim: int, heads: int, tokens: int) -> str:
    hd = dim // heads
    split = g.const("attn.split", np.array([0, tokens, heads, hd], np.int64))
    merge = g.const("attn.merge", np.array([0, tokens, dim], np.int64))

    def heads_of(t: str) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, split])], perm=[0, 2, 1, 3])

    q, k, v = (heads_of(_dense(g, x, dim, dim)) for _ in range(3))
    kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
    scale = g.const("attn.scale", np.array(1 / np.sqrt(hd), np.float32))
    att = g.op("Softmax", [g.op("Mul", [g.op("MatMul", [q, kt]), scale])], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
    return _dense(g, g.op("Reshape", [ctx, merge]), dim, dim)


def transformer_onnx(path: Path, *, seed: int = 0, features: int = 64, tokens: int = 16,
                     dim: int = 64, heads: int = 4, layers: int = 2) -> Path:
    """A pre-LN encoder [batch, features] -> token states [batch, tokens, dim] ("hidden").

    The input is projected to `tokens` x `dim` (a stand-in for an embedding lookup), then
    `layers` blocks of x + attn(LN(x)), x + MLP(GELU)(LN(x)), then a final LayerNorm.
    """
    from onnx import TensorProto, helper

    g = _Graph(seed)
    shape = g.const("embed.shape", np.array([0, tokens, dim], np.int64))
    h = g.op("Reshape", [_dense(g, "x", features, tokens * dim), shape])
    for _ in range(layers):
        h = g.op("Add", [h, _attention(g, _layer_norm(g, h, dim), dim, heads, tokens)])
        mlp = _dense(g, _gelu(g, _dense(g, _layer_norm(g, h, dim), dim, 4 * dim)), 4 * dim, dim)
        h = g.op("Add", [h, mlp])
    h = _layer_norm(g, h, dim)
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", tokens, dim])
    return _save(g, "encoder", inp, out, path, "hidden", h)


def _conv_bn(g: _Graph, x: str, c_in: int, c_out: int, *, k: int = 1, stride: int = 1,
             group: int = 1, act: bool = True) -> str:
    w = g.weight("conv.weight", (c_out, c_in // group, k, k), np.sqrt(2 / (c_in // group * k * k)))
    y = g.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], group=group,
             pads=[k // 2] * 4)
    bn = [g.const(s, v.astype(np.float32)) for s, v in (
        ("bn.scale", 1 + 0.1 * g.rng.standard_normal(c_out)),
        ("bn.bias", 0.1 * g.rng.standard_normal(c_out)),
        ("bn.mean", 0.1 * g.rng.standard_normal(c_out)),
        ("bn.var", 1 + 0.1 * np.abs(g.rng.standard_normal(c_out))))]
    y = g.op("BatchNormalization", [y, *bn], epsilon=1e-5)
    if not act:
        return y
    lo = g.const("relu6.min", np.array(0.0, np.float32))
    hi = g.const("relu6.max", np.array(6.0, np.float32))
    return g.op("Clip", [y, lo, hi])


def mobilenet_onnx(path: Path, *, seed: int = 0, size: int = 64, width: int = 16,
                   blocks: tuple[tuple[int, int, int], ...] = ((1, 16, 1), (6, 24, 2),
                                                              (6, 24, 1), (6, 32, 2),
                                                              (6, 32, 1), (6, 64, 2)),
                   features: int = 256) -> Path:
    """A MobileNetV2-like CNN [batch, 3, size, size] -> pooled features [batch, features].

    Stem conv 3x3/2, inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1, a
    residual add where shapes allow), a 1x1 conv to `features`, global average pooling.
    `blocks` holds (expansion, out channels, stride).
    """
    from onnx import TensorProto, helper

    g = _Graph(seed)
    h = _conv_bn(g, "x", 3, width, k=3, stride=2)
    c = width
    for t, c_out, s in blocks:
        hidden = c * t
        y = _conv_bn(g, h, c, hidden) if t != 1 else h
        y = _conv_bn(g, y, hidden, hidden, k=3, stride=s, group=hidden)
        y = _conv_bn(g, y, hidden, c_out, act=False)
        h = g.op("Add", [h, y]) if s == 1 and c == c_out else y
        c = c_out
    h = _conv_bn(g, h, c, features)
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h])], axis=1)
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])
    out = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", features])
    return _save(g, "mobilenet", inp, out, path, "features", h)
