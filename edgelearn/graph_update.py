"""tpSGD's exact head update inside the runtime call (`TPSGDOptions.head_update="graph"`).

"Learning with Local Gradients at the Edge" (2022; tpSGD): the output layer's update is the
exact gradient step of the true loss. For a head-only run on cached frozen-prefix features
(`edgelearn.training.cached_taps`), the suffix taps graph is the linear head itself; this
module appends that step to it, so ONE onnxruntime call returns the logits, the loss and the
updated head weights, instead of a forward and ~20 numpy calls. With input X [N, in], logits
Z [N, out], weight W ([out, in], or [in, out] for an ONNX MatMul head) and bias b [out]:

    cross-entropy: loss = -1/N sum_n log softmax(Z)[n, y_n],  G = (softmax(Z) - onehot(y)) / N
    mse:           d = Z - y,  loss = sum(d^2) / size(Z),      G = 2 d / size(Z)
    dW = G^T X ([in, out] layout: X^T G),  db = sum_n G,  W' = W - lr dW,  b' = b - lr db

the same rule as tpSGD's numpy path (`edgelearn.optim.tpsgd.head_grad`, `_sub`), in float32
(the numpy path computes the loss and G in float64 and rounds G to float32) and with lr folded
into G before the products (lr G^T X: one Gemm per weight), so the floats differ slightly: a
run records its mode and replay re-runs the same graph. onnx is imported lazily.

Two forms of the graph exist; a run records which one it ran (`TPSGDOptions.head_graph`), and
replay builds the same one:
  1 (the first form; journals written before the option existed): inputs `Y` (targets) and
    `LR`; onehot(y), N and lr/N are computed in the graph (11 nodes); outputs: the suffix's
    outputs (every tap), `LOSS` and `output_name(role)` shaped like the parameters.
  2 (`VERSION`, new runs): the per-batch constants come in as inputs the caller fills in
    place (`feeds`): the scale `S` (lr/N, or 2 lr/size(Z) for mse), a row of ones `ONES`
    [1, N] (db = ONES G: the bias update is one Gemm, as the weight's), for cross-entropy the
    one-hot rows `T` = onehot(y) and `TN` = -onehot(y)/N, for mse the targets `Y` and `SIZE`;
    8 nodes (mse 6; an [out, in] weight adds a Transpose of G, cheaper than Gemm's transA),
    each cheaper than form 1's SoftmaxCrossEntropyLoss kernel alone:
        cross-entropy: log P = LogSoftmax(Z), LOSS = ReduceSum(TN log P), G = (Exp(log P) - T) S
        mse:           d = Z - Y, LOSS = ReduceSumSquare(d) / SIZE,       G = d S
        W' = Gemm(G^T X (or X^T G), W, alpha=-1, beta=1), b' = Gemm(ONES G, b, alpha=-1, beta=1)
    outputs: the logits, `LOSS` and `output_name(role)` (the bias as [1, out]); the suffix's
    other taps are dropped (a head update reads none of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgelearn.layers import Layer

#: the graph form new runs build (see the module docstring); 1 replays older journals
VERSION = 2
VERSIONS = (1, 2)
Y = "edgelearn.head_update.y"
LR = "edgelearn.head_update.lr"
LOSS = "edgelearn.head_update.loss"
T = "edgelearn.head_update.targets"
TN = "edgelearn.head_update.targets_neg_mean"
S = "edgelearn.head_update.scale"
ONES = "edgelearn.head_update.ones"
SIZE = "edgelearn.head_update.size"
_P = "edgelearn.head_update."


def output_name(role: str) -> str:
    """The graph output holding the updated head parameter `role` ("weight" or "bias")."""
    return f"{_P}new_{role}"


def why_not(layers: Sequence[Layer], trainable: Sequence[str],
            suffix_inputs: Sequence[str]) -> str | None:
    """Why a run cannot take the graph head update (None: it can; `build` checks the rest).

    Args:
        layers: the bundle's layer records, head last. trainable: the store's trainable names.
        suffix_inputs: the suffix graph's input names.
    """
    head = layers[-1] if layers else None
    if head is None or not head.head:
        return "no output layer record"
    if head.kind != "linear" or head.bn or head.ln or head.post:
        return f"the head is a {head.kind} layer with a norm or post ops, not a plain linear one"
    stray = sorted(set(trainable) - set(head.params.values()))
    if stray:
        return f"weights outside the head are trainable ({stray[:3]}): not a head-only run"
    if not trainable:
        return "nothing is trainable"
    missing = [n for n in trainable if n not in suffix_inputs]
    if missing:
        return f"the suffix graph does not read {missing} as inputs"
    return None


def build(suffix: bytes, head: Layer, trainable: Sequence[str], loss: str,
          version: int = VERSION) -> bytes:
    """The suffix graph `suffix` with head `head`'s update appended (see the module docstring).

    Args:
        suffix: ONNX bytes of the cached taps suffix (inputs: cut tensors + trainable weights;
            outputs: the logits `head.preact` and the other taps); opset >= 12.
        head: the linear output layer. trainable: its trainable parameter names.
        loss: "cross-entropy" (y: int64 [N]) or "mse" (y: float32 [N, out]).
        version: the graph form (`VERSIONS`; 1 for journals recorded before form 2).
    Returns:
        ONNX bytes with the form's extra inputs (1: Y, LR; 2: `feeds`' names) and outputs
        LOSS, output_name(role).
    Raises: ValueError when the suffix cannot take the update (opset, missing tensors).
    """
    import onnx

    if version not in VERSIONS:
        raise ValueError(f"head update graph form {version} is not one of {VERSIONS}")
    model = onnx.load_from_string(suffix)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    g = model.graph
    known = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    if opset < 12 or head.input not in known or head.preact not in known:
        raise ValueError(f"the suffix graph (opset {opset}) cannot take the update: it needs "
                         f"opset >= 12 and the head's input and logits")
    nodes = _Nodes(g)
    # G_lr = lr * dL/dZ [N, out]: lr folds into the small G, so each parameter's update is
    # one node (Gemm: W + (-1) G_lr^T X) or two (form 1's bias: b - ReduceSum(G_lr))
    grad = _grad_v1 if version == 1 else _grad_v2
    grad_lr, inputs = grad(nodes, g, head, loss)
    outputs = _param_updates(nodes, g, head, trainable, grad_lr, version, opset)
    if version == 2:  # the logits only: a head update reads no other tap
        logits = [o for o in g.output if o.name == head.preact]
        del g.output[:]
        g.output.extend(logits)
    g.node.extend(nodes.nodes)
    g.input.extend(inputs)
    g.output.extend(outputs)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _grad_v1(nodes: _Nodes, g: Any, head: Layer, loss: str) -> tuple[str, list[Any]]:
    """Form 1: (G_lr, the extra graph inputs Y and LR)."""
    from onnx import TensorProto, helper

    if loss == "cross-entropy":
        grad_lr, y_type = _cross_entropy(nodes, head, _classes(g, head)), TensorProto.INT64
    else:
        grad_lr, y_type = _mse(nodes, head), TensorProto.FLOAT
    return grad_lr, [helper.make_tensor_value_info(Y, y_type, ["n"] if y_type ==
                                                   TensorProto.INT64 else ["n", "k"]),
                     helper.make_tensor_value_info(LR, TensorProto.FLOAT, [])]


def _grad_v2(nodes: _Nodes, g: Any, head: Layer, loss: str) -> tuple[str, list[Any]]:
    """Form 2: (G_lr = dL/dZ * S, the extra graph inputs: `feeds`' names)."""
    from onnx import TensorProto, helper

    assert head.preact is not None
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(S, f32, []),
              helper.make_tensor_value_info(ONES, f32, [1, "n"])]
    if loss == "cross-entropy":
        # LogSoftmax + Mul + ReduceSum for the loss: onnxruntime's SoftmaxCrossEntropyLoss
        # kernel costs more than the three together (measured 7 us vs 3 us at N=32)
        logp = nodes.add("LogSoftmax", [head.preact], axis=1)
        nodes.add("ReduceSum", [nodes.add("Mul", [logp, TN])], LOSS, keepdims=0)
        grad = nodes.add("Sub", [nodes.add("Exp", [logp]), T])
        inputs += [helper.make_tensor_value_info(T, f32, ["n", "k"]),
                   helper.make_tensor_value_info(TN, f32, ["n", "k"])]
    else:
        grad = nodes.add("Sub", [head.preact, Y])
        nodes.add("Div", [nodes.add("ReduceSumSquare", [grad], keepdims=0), SIZE], LOSS)
        inputs += [helper.make_tensor_value_info(Y, f32, ["n", "k"]),
                   helper.make_tensor_value_info(SIZE, f32, [])]
    return nodes.add("Mul", [grad, S]), inputs


def _param_updates(nodes: _Nodes, g: Any, head: Layer, trainable: Sequence[str],
                   grad_lr: str, version: int, opset: int) -> list[Any]:
    """Append W' and b' of the trainable head parameters; returns the graph outputs (LOSS
    first)."""
    import onnx
    from onnx import TensorProto, helper

    outputs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [])]
    for role, name in head.params.items():
        if name not in trainable:
            continue
        out = onnx.ValueInfoProto(name=output_name(role))
        out.type.CopyFrom(next(i.type for i in g.input if i.name == name))
        if role == "weight" and version == 2 and head.weight_layout == "out_in":
            # G_lr^T materialized, then a plain Gemm: the same floats as transA=1, which
            # onnxruntime runs slower (measured 9.1 vs 5.5 us at [32, 2] x [32, 256])
            nodes.add("Gemm", [nodes.add("Transpose", [grad_lr]), head.input, name],
                      output_name(role), alpha=-1.0, beta=1.0)
        elif role == "weight":
            a, b = (grad_lr, head.input) if head.weight_layout == "out_in" else (
                head.input, grad_lr)
            nodes.add("Gemm", [a, b, name], output_name(role), alpha=-1.0, beta=1.0, transA=1)
        elif version == 2:  # db = ONES G_lr: one Gemm, b' shaped [1, out]
            nodes.add("Gemm", [ONES, grad_lr, name], output_name(role), alpha=-1.0, beta=1.0)
            out = helper.make_tensor_value_info(output_name(role), TensorProto.FLOAT,
                                                [1, "k"])
        else:
            if opset >= 13:  # axes: an input since opset 13, an attribute before
                db = nodes.add("ReduceSum", [grad_lr, nodes.const(
                    "axis0", [0], TensorProto.INT64, [1])], keepdims=0)
            else:
                db = nodes.add("ReduceSum", [grad_lr], keepdims=0, axes=[0])
            nodes.add("Sub", [name, db], output_name(role))
        outputs.append(out)
    return outputs


def feeds(loss: str, y: np.ndarray, lr: float, classes: int) -> dict[str, np.ndarray]:
    """Form 2's extra inputs for targets `y` (a reference: `HeadRunner` fills the same values
    into arrays bound once).

    Args:
        loss: "cross-entropy" (y: int [N] labels) or "mse" (y: [N, classes] targets).
        lr: the head's learning rate. classes: the logits' width.
    """
    n = len(y)
    out = {S: scale(loss, lr, n, classes), ONES: np.ones((1, n), np.float32)}
    if loss == "cross-entropy":
        out[T] = np.eye(classes, dtype=np.float32)[np.asarray(y, np.int64)]
        out[TN] = out[T] * neg_mean(n)
    else:
        out[Y] = np.asarray(y, np.float32).reshape(n, classes)
        out[SIZE] = np.asarray(n * classes, np.float32)
    return out


def neg_mean(n: int) -> np.float32:
    """-1/N in float32: `TN` = onehot(y) * neg_mean(N), so LOSS = sum(TN * log P)."""
    return np.float32(-1.0 / n)


def scale(loss: str, lr: float, n: int, classes: int) -> np.ndarray:
    """Form 2's `S` for a batch of `n` (float32 0-d): lr/N (cross-entropy) or
    2 lr/size(Z) (mse), rounded as form 1 computes it in the graph."""
    lr32 = np.float32(lr)
    if loss == "cross-entropy":
        return np.asarray(lr32 / np.float32(n), np.float32)
    return np.asarray(lr32 * np.float32(2.0) / np.float32(n * classes), np.float32)


class _Nodes:
    """Nodes appended to graph `g` (fresh output names), and constants as initializers."""

    def __init__(self, g: Any) -> None:
        self.g, self.nodes = g, []

    def add(self, op: str, ins: list[str], out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or f"{_P}{len(self.nodes)}_{op}"
        self.nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def const(self, name: str, values: list[Any], dtype: int, dims: list[int]) -> str:
        from onnx import helper

        self.g.initializer.append(helper.make_tensor(_P + name, dtype, dims, values))
        return _P + name


def _classes(g: Any, head: Layer) -> int | None:
    """The head's output count from its bias or weight shape in `g` (None: not static)."""
    dims = {i.name: [d.dim_value if d.HasField("dim_value") else 0
                     for d in i.type.tensor_type.shape.dim] for i in g.input}
    dims.update({t.name: list(t.dims) for t in g.initializer})
    if "bias" in head.params and dims.get(head.params["bias"], [0])[-1:] != [0]:
        return int(dims[head.params["bias"]][-1])
    w = dims.get(head.params.get("weight", ""), [])
    k = (w[0] if head.weight_layout == "out_in" else w[1]) if len(w) == 2 else 0
    return int(k) or None


def _cross_entropy(nodes: _Nodes, head: Layer, classes: int | None) -> str:
    """LOSS = mean cross-entropy of logits Z and labels Y; returns lr * (softmax(Z) -
    onehot(Y)) / N."""
    from onnx import TensorProto

    assert head.preact is not None
    logp = nodes.add("SoftmaxCrossEntropyLoss", [head.preact, Y], None, reduction="mean")
    nodes.nodes[-1].output[:] = [LOSS, logp]  # (loss, log_prob)
    if classes is None:
        depth = nodes.add("Gather", [nodes.add("Shape", [head.preact]),
                                     nodes.const("i1", [1], TensorProto.INT64, [])])
    else:
        depth = nodes.const("depth", [classes], TensorProto.INT64, [])
    onehot = nodes.add("OneHot", [Y, depth, nodes.const("off_on", [0.0, 1.0],
                                                        TensorProto.FLOAT, [2])], axis=-1)
    n = nodes.add("Cast", [nodes.add("Size", [Y])], to=TensorProto.FLOAT)
    return nodes.add("Mul", [nodes.add("Sub", [nodes.add("Exp", [logp]), onehot]),
                             nodes.add("Div", [LR, n])])


def _mse(nodes: _Nodes, head: Layer) -> str:
    """LOSS = mean squared error of logits Z and targets Y (shaped like Z); returns
    lr * 2 (Z - Y) / size(Z)."""
    from onnx import TensorProto

    assert head.preact is not None
    d = nodes.add("Sub", [head.preact, Y])
    size = nodes.add("Cast", [nodes.add("Size", [d])], to=TensorProto.FLOAT)
    nodes.add("Div", [nodes.add("ReduceSum", [nodes.add("Mul", [d, d])], keepdims=0), size],
              LOSS)
    two_lr = nodes.add("Mul", [LR, nodes.const("two", [2.0], TensorProto.FLOAT, [])])
    return nodes.add("Mul", [d, nodes.add("Div", [two_lr, size])])
