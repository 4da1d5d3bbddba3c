"""Low-rank perturbations inside the graph: LOZO's probes without a pass over the weights.

Chen et al. 2025, "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures" (LOZO, ICLR 2025, arXiv 2410.07698) perturbs each 2-D weight W [a, b] by
s * U V^T (U [a, r], V [b, r], s = +-eps). Since a linear layer is linear in its weight,

    MatMul:             X @ (W + s U V^T)     = X @ W     + s * ((X @ U) @ V^T)
    Gemm (transB = 1):  X @ (W + s U V^T)^T   = X @ W^T   + s * ((X @ V) @ U^T)

so the perturbed forward is the plain graph plus two thin products per weight, fed three
small extra inputs: `<W>.lozo_u` [a, r], `<W>.lozo_v` [b, r] and the scalar `SCALE` (s, 0-d
float32). `rewrite` adds them for every weight of `weights`; a weight read by any node other
than as the B operand of a MatMul or of a Gemm with transA = 0 is refused (`why_not`), and the
caller then falls back to writing W + s U V^T into the weights (edgelearn/optim/lozo.py).
Gemm's alpha multiplies the added term (beta only scales C, untouched). onnx is imported
lazily (device code imports only stdlib + numpy at module level).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

SCALE = "edgelearn.lozo.scale"
_P = "edgelearn.lozo."


def u_name(weight: str) -> str:
    """The graph input holding U [a, r] of 2-D weight `weight` [a, b]."""
    return f"{weight}.lozo_u"


def v_name(weight: str) -> str:
    """The graph input holding V [b, r] of 2-D weight `weight` [a, b]."""
    return f"{weight}.lozo_v"


def _subgraph_nodes(graph: Any) -> Iterator[Any]:
    """Every node inside the subgraphs (If / Loop / Scan bodies) of `graph`'s nodes."""
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from g.node
                yield from _subgraph_nodes(g)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _linear_use(node: Any, weight: str) -> bool:
    """Whether `node` reads `weight` only as the B operand of a MatMul / Gemm (transA = 0)."""
    ins = list(node.input)
    if node.op_type == "MatMul":
        return ins[0] != weight and ins[1] == weight
    if node.op_type == "Gemm":
        return ins[1] == weight and weight not in (ins[0], *ins[2:]) \
            and _attr(node, "transA", 0) == 0
    return False


def why_not(model: Any, weights: Sequence[str]) -> str | None:
    """Why `rewrite` cannot carry the low-rank terms of `weights` (None: it can).

    Args:
        model: the onnx ModelProto. weights: names of 2-D trainable weights (graph inputs).
    """
    inputs = {i.name for i in model.graph.input}
    for w in weights:
        if w not in inputs:
            return f"{w} is not a graph input"
        users = [n for n in model.graph.node if w in n.input]
        if not users:
            return f"no node reads {w}"
        inner = next((n for n in _subgraph_nodes(model.graph) if w in n.input), None)
        for n in [*users, *([inner] if inner is not None else [])]:
            if n is inner or not _linear_use(n, w):
                return (f"{w} is read by a {n.op_type} node {n.name!r}, not as the weight of "
                        "a MatMul or Gemm (transA = 0)")
    return None


def rewrite(model: Any, weights: dict[str, tuple[int, int]], rank: int) -> Any:
    """Add the low-rank terms of `weights` to `model` in place (module docstring).

    Args:
        model: onnx ModelProto whose graph reads every weight as a graph input.
        weights: name -> shape (a, b) of each 2-D float32 weight to perturb.
        rank: r, the columns of U and V.
    Returns: `model`, with new inputs `u_name(w)`, `v_name(w)` (float32) and `SCALE`.
    Raises: ValueError with `why_not`'s reason when a weight has another use.
    """
    from onnx import TensorProto, helper

    why = why_not(model, list(weights))
    if why:
        raise ValueError(why)
    g = model.graph
    new_nodes = []
    for i, node in enumerate(g.node):
        new_nodes.append(node)
        w = node.input[1] if len(node.input) > 1 else None
        if w not in weights or not _linear_use(node, w):
            continue
        # Gemm transB = 1 uses W^T: its term is (X @ V) @ U^T
        left, right = u_name(w), v_name(w)
        if node.op_type == "Gemm" and _attr(node, "transB", 0):
            left, right = right, left
        p = f"{_P}{i}."
        base = p + "base"
        out = node.output[0]
        node.output[0] = base
        scale = SCALE
        alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        if alpha != 1.0:
            new_nodes.append(helper.make_node("Mul", [SCALE, p + "alpha"], [p + "scale"]))
            g.initializer.append(helper.make_tensor(p + "alpha", TensorProto.FLOAT, [], [alpha]))
            scale = p + "scale"
        new_nodes += [
            helper.make_node("MatMul", [node.input[0], left], [p + "xl"]),
            helper.make_node("Mul", [p + "xl", scale], [p + "xls"]),
            helper.make_node("Transpose", [right], [p + "rt"], perm=[1, 0]),
            helper.make_node("MatMul", [p + "xls", p + "rt"], [p + "delta"]),
            helper.make_node("Add", [base, p + "delta"], [out]),
        ]
    del g.node[:]
    g.node.extend(new_nodes)
    for w, (a, b) in weights.items():
        g.input.append(helper.make_tensor_value_info(u_name(w), TensorProto.FLOAT, [a, rank]))
        g.input.append(helper.make_tensor_value_info(v_name(w), TensorProto.FLOAT, [b, rank]))
    g.input.append(helper.make_tensor_value_info(SCALE, TensorProto.FLOAT, []))
    return model
