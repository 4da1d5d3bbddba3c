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
(the numpy path computes the loss and G in float64 and rounds G to float32), so the floats
differ slightly: a run records its mode and replay re-runs the same graph. The targets y and
lr are graph inputs (`Y`, `LR`); the outputs are `LOSS` and `output_name(role)`.
onnx is imported lazily (device code).
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
            outputs: the logits `head.preact` and the other taps).
        head: the linear output layer. trainable: its trainable parameter names.
        loss: "cross-entropy" (y: int64 [N]) or "mse" (y: float32 [N, k], as many values
            as Z).
    Returns:
        ONNX bytes with extra inputs Y, LR (float32 scalar) and outputs LOSS, output_name(role).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(suffix)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    g = model.graph
    x, z = head.input, head.preact
    known = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    if x not in known or z not in known:
        raise ValueError(f"the suffix graph does not hold the head's input {x!r} and logits "
                         f"{z!r}")
    nodes: list[Any] = []

    def node(op: str, ins: list[str], **attrs: Any) -> str:
        out = f"{_P}{len(nodes)}_{op}"
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def const(name: str, values: list[Any], dtype: int, dims: list[int]) -> str:
        g.initializer.append(helper.make_tensor(_P + name, dtype, dims, values))
        return _P + name

    shape = node("Shape", [z])
    if loss == "cross-entropy":
        n = node("Cast", [node("Gather", [shape, const("i0", [0], TensorProto.INT64, [])])],
                 to=TensorProto.FLOAT)
        depth = node("Gather", [shape, const("i1", [1], TensorProto.INT64, [])])
        onehot = node("OneHot", [Y, depth, const("off_on", [0.0, 1.0], TensorProto.FLOAT, [2])],
                      axis=-1)
        logp = node("LogSoftmax", [z], axis=1)
        picked = node("ReduceSum", [node("Mul", [logp, onehot])], keepdims=0)
        value = node("Neg", [node("Div", [picked, n])])
        grad = node("Div", [node("Sub", [node("Exp", [logp]), onehot]), n])
        y_type, y_shape = TensorProto.INT64, ["n"]
    else:
        size = node("Cast", [node("Size", [z])], to=TensorProto.FLOAT)
        d = node("Sub", [z, node("Reshape", [Y, shape])])
        value = node("Div", [node("ReduceSum", [node("Mul", [d, d])], keepdims=0), size])
        grad = node("Div", [node("Mul", [d, const("two", [2.0], TensorProto.FLOAT, [])]), size])
        y_type, y_shape = TensorProto.FLOAT, ["n", "k"]
    nodes.append(helper.make_node("Identity", [value], [LOSS]))
    outputs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [])]
    for role, name in head.params.items():
        if name not in trainable:
            continue
        if role == "weight":
            step = (node("MatMul", [node("Transpose", [grad]), x])
                    if head.weight_layout == "out_in"
                    else node("MatMul", [node("Transpose", [x]), grad]))
        elif opset >= 13:
            step = node("ReduceSum", [grad, const("axis0", [0], TensorProto.INT64, [1])],
                        keepdims=0)
        else:
            step = node("ReduceSum", [grad], axes=[0], keepdims=0)
        # numpy's `_sub`: g = grad * lr (float32), then W - g
        nodes.append(helper.make_node("Sub", [name, node("Mul", [step, LR])],
                                      [output_name(role)]))
        out = onnx.ValueInfoProto(name=output_name(role))
        out.type.CopyFrom(next(i.type for i in g.input if i.name == name))
        outputs.append(out)
    g.node.extend(nodes)
    g.input.extend([helper.make_tensor_value_info(Y, y_type, y_shape),
                    helper.make_tensor_value_info(LR, TensorProto.FLOAT, [])])
    g.output.extend(outputs)
    onnx.checker.check_model(model)
    return model.SerializeToString()
