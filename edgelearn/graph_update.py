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
run records its mode and replay re-runs the same graph. The targets y and lr are graph inputs
(`Y`, `LR`); the outputs are `LOSS` and `output_name(role)`. onnx is imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgelearn.layers import Layer

Y = "edgelearn.head_update.y"
LR = "edgelearn.head_update.lr"
LOSS = "edgelearn.head_update.loss"
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


def build(suffix: bytes, head: Layer, trainable: Sequence[str], loss: str) -> bytes:
    """The suffix graph `suffix` with head `head`'s update appended (see the module docstring).

    Args:
        suffix: ONNX bytes of the cached taps suffix (inputs: cut tensors + trainable weights;
            outputs: the logits `head.preact` and the other taps); opset >= 12.
        head: the linear output layer. trainable: its trainable parameter names.
        loss: "cross-entropy" (y: int64 [N]) or "mse" (y: float32 [N, out]).
    Returns:
        ONNX bytes with extra inputs Y, LR (float32 scalar) and outputs LOSS, output_name(role).
    Raises: ValueError when the suffix cannot take the update (opset, missing tensors).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(suffix)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    g = model.graph
    known = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    if opset < 12 or head.input not in known or head.preact not in known:
        raise ValueError(f"the suffix graph (opset {opset}) cannot take the update: it needs "
                         f"opset >= 12 and the head's input and logits")
    nodes = _Nodes(g)
    # G_lr = lr * dL/dZ [N, out]: lr folds into the small G, so each parameter's update is
    # one node (Gemm: W + (-1) G_lr^T X; Sub: b - sum_n G_lr)
    if loss == "cross-entropy":
        grad_lr, y_type = _cross_entropy(nodes, head, _classes(g, head)), TensorProto.INT64
    else:
        grad_lr, y_type = _mse(nodes, head), TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [])]
    for role, name in head.params.items():
        if name not in trainable:
            continue
        if role == "weight":
            a, b = (grad_lr, head.input) if head.weight_layout == "out_in" else (
                head.input, grad_lr)
            nodes.add("Gemm", [a, b, name], output_name(role), alpha=-1.0, beta=1.0, transA=1)
        else:
            if opset >= 13:  # axes: an input since opset 13, an attribute before
                db = nodes.add("ReduceSum", [grad_lr, nodes.const(
                    "axis0", [0], TensorProto.INT64, [1])], keepdims=0)
            else:
                db = nodes.add("ReduceSum", [grad_lr], keepdims=0, axes=[0])
            nodes.add("Sub", [name, db], output_name(role))
        out = onnx.ValueInfoProto(name=output_name(role))
        out.type.CopyFrom(next(i.type for i in g.input if i.name == name))
        outputs.append(out)
    g.node.extend(nodes.nodes)
    g.input.extend([helper.make_tensor_value_info(Y, y_type, ["n"] if y_type ==
                                                  TensorProto.INT64 else ["n", "k"]),
                    helper.make_tensor_value_info(LR, TensorProto.FLOAT, [])])
    g.output.extend(outputs)
    onnx.checker.check_model(model)
    return model.SerializeToString()


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
