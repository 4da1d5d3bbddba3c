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
Gemm's alpha multiplies the added term (beta only scales C, untouched).

Stacked probes (`rewrite(..., dense=...)`): both probes in ONE run on the batch stacked twice,
SCALE then 1-D [2N] (row n's s: +eps for the first copy, -eps for the second), each term
scaled per row; the dense part (biases: 1-D tensors read only as the C operand of Gemm nodes)
is perturbed in the graph too, + beta * s_n * z_c with `<c>.lozo_z` [out] an input. A batch
of 2N rows costs less than two runs of N (the weights are read once: ~1.7x one forward
instead of 2x on the 12.6M MLP at N = 32). Only for graphs whose perturbed tensors are all
Gemm operands (`why_not_stacked`) and whose rows are independent (a batch-symbolic model).
Where the data inputs are read only as the A operand of perturbed Gemms (`shares_input`: an
MLP whose first layer trains), the batch is fed once: those Gemms compute X @ W (+ C) and
X @ U on N rows and stack them (Concat), since both probes' first layer sees the same X.
A pending sum (`rewrite(..., pending=True)`): lozo may defer its update of the 2-D weights
for as long as V stays the same, W_eff = W + P V^T with P [a, r] the sum of the steps' c U,
so probes are W + (P + s U) V^T. The graph then takes U as [P | U] and V as [V | V] (2r
columns) and scales the columns by 1 (P) and s (U), computed in the graph from SCALE.
onnx is imported lazily (device code imports only stdlib + numpy at module level).
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


def z_name(tensor: str) -> str:
    """The graph input holding the dense noise z of 1-D tensor `tensor` (stacked probes)."""
    return f"{tensor}.lozo_z"


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


def why_not_stacked(model: Any, weights: Sequence[str], dense: Sequence[str]) -> str | None:
    """Why the stacked rewrite cannot carry `weights` and the dense tensors `dense` (None: it
    can): every one must be read only by Gemm nodes (transA = 0), weights as B, dense as C."""
    why = why_not(model, weights)
    if why:
        return why
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return f"opset {opset} < 13"
    for t in weights:
        if any(n.op_type != "Gemm" for n in model.graph.node if t in n.input):
            return f"{t} is read by a MatMul (stacked probes: Gemm weights only)"
    inputs = {i.name for i in model.graph.input}
    for t in dense:
        users = [n for n in model.graph.node if t in n.input]
        inner = any(t in n.input for n in _subgraph_nodes(model.graph))
        if t not in inputs or inner or not users or any(
                n.op_type != "Gemm" or list(n.input).index(t) != 2 or _attr(n, "transA", 0)
                for n in users):
            return f"{t} is not only the bias (C) of Gemm nodes"
    return None


def shares_input(model: Any, weights: Sequence[str], inputs: Sequence[str]) -> bool:
    """Whether the stacked graph may take the batch once (`rewrite(..., shared=inputs)`): every
    node reading a data input is a Gemm (transA = 0) reading it as A, with a weight of
    `weights` as B, so only those Gemms see unstacked rows.

    Args:
        model: the onnx ModelProto. weights: the perturbed 2-D weights. inputs: data inputs.
    """
    data = set(inputs)
    if data & {o.name for o in model.graph.output} or any(
            data & set(n.input) for n in _subgraph_nodes(model.graph)):
        return False
    readers = [n for n in model.graph.node if data & set(n.input)]
    return bool(readers) and all(
        n.op_type == "Gemm" and n.input[0] in data and _attr(n, "transA", 0) == 0
        and len(n.input) > 1 and n.input[1] in weights
        and not data & set(n.input[1:]) for n in readers)


def _const(g: Any, name: str, value: float) -> str:
    from onnx import TensorProto, helper

    g.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    return name


def _terms(g: Any, node: Any, i: int, weights: Any, dense: Any, scale: str,
           tile: bool = False, low_scale: str | None = None) -> list[Any]:
    """The nodes adding node i's perturbation terms to its output (renamed `.base`); `tile`:
    node reads the unstacked batch, its product and X @ U are computed once and stacked;
    `low_scale`: what scales the low-rank term's columns (None: `scale`)."""
    from onnx import helper

    w = node.input[1] if len(node.input) > 1 else None
    low = w in weights and _linear_use(node, w)
    c = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else None
    bias = dense is not None and c in dense
    if not (low or bias):
        return []
    p = f"{_P}{i}."
    out, node.output[0] = node.output[0], p + ("once" if tile else "base")
    nodes, acc = [], p + "base"
    if tile:  # both probes share X @ W (+ C): one product on the batch, stacked
        nodes.append(helper.make_node("Concat", [p + "once"] * 2, [acc], axis=0))
    if low:
        left, right = u_name(w), v_name(w)
        if node.op_type == "Gemm" and _attr(node, "transB", 0):  # W^T: (X @ V) @ U^T
            left, right = right, left
        s = low_scale or scale
        alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        if alpha != 1.0:
            nodes.append(helper.make_node("Mul", [s, _const(g, p + "alpha", alpha)],
                                          [p + "scale"]))
            s = p + "scale"
        if tile:
            nodes += [helper.make_node("MatMul", [node.input[0], left], [p + "xl1"]),
                      helper.make_node("Concat", [p + "xl1"] * 2, [p + "xl"], axis=0)]
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], left], [p + "xl"]))
        nodes += [helper.make_node("Mul", [p + "xl", s], [p + "xls"]),
                  helper.make_node("Transpose", [right], [p + "rt"], perm=[1, 0]),
                  helper.make_node("MatMul", [p + "xls", p + "rt"], [p + "delta"]),
                  helper.make_node("Add", [acc, p + "delta"], [p + "low"])]
        acc = p + "low"
    if bias:
        beta = float(_attr(node, "beta", 1.0))
        s = scale
        if beta != 1.0:
            s = p + "bscale"
            nodes.append(helper.make_node("Mul", [scale, _const(g, p + "beta", beta)], [s]))
        nodes += [helper.make_node("Mul", [s, z_name(c)], [p + "bdelta"]),
                  helper.make_node("Add", [acc, p + "bdelta"], [p + "bias"])]
        acc = p + "bias"
    nodes.append(helper.make_node("Identity", [acc], [out]))
    return nodes


def rewrite(model: Any, weights: dict[str, tuple[int, int]], rank: int,
            dense: dict[str, int] | None = None, shared: Sequence[str] = (),
            pending: bool = False) -> Any:
    """Add the perturbation terms of `weights` (and `dense`) to `model` in place.

    Args:
        model: onnx ModelProto whose graph reads every weight as a graph input.
        weights: name -> shape (a, b) of each 2-D float32 weight to perturb.
        rank: r, the columns of U and V.
        dense: None: scalar SCALE, the caller perturbs the other tensors itself; a dict
            (1-D tensor name -> size, possibly empty): stacked probes (module docstring).
        shared: stacked probes only: the data inputs, fed once (not stacked) where
            `shares_input` holds; the Gemms reading them stack their products.
        pending: U and V get 2 rank columns, [P | U] and [V | V]: the first `rank` are a
            pending sum P that every probe carries unscaled (W + (P + s U) V^T: lozo's
            deferred update), the last `rank` are scaled by s as before.
    Returns: `model`, with new inputs `u_name(w)`, `v_name(w)`, `z_name(c)`, `SCALE`.
    Raises: ValueError naming the reason (`why_not` / `why_not_stacked`).
    """
    from onnx import TensorProto, helper

    why = why_not(model, list(weights)) if dense is None else \
        why_not_stacked(model, list(weights), list(dense))
    if why:
        raise ValueError(why)
    g = model.graph
    scale, new_nodes = SCALE, []
    if dense is not None:  # [M] -> [M, 1]: one s per row of the stacked batch
        scale = _P + "rows"
        g.initializer.append(helper.make_tensor(_P + "axes", TensorProto.INT64, [1], [1]))
        new_nodes.append(helper.make_node("Unsqueeze", [SCALE, _P + "axes"], [scale]))
    cols = None
    if pending:  # the columns' scales: 1 for P, s for U (per row when stacked)
        cols, f = _P + "cols", TensorProto.FLOAT
        g.initializer.extend([
            helper.make_tensor(_P + "pmask", f, [2 * rank], [1.0] * rank + [0.0] * rank),
            helper.make_tensor(_P + "umask", f, [2 * rank], [0.0] * rank + [1.0] * rank)])
        new_nodes += [helper.make_node("Mul", [scale, _P + "umask"], [_P + "ucols"]),
                      helper.make_node("Add", [_P + "pmask", _P + "ucols"], [cols])]
    once = set(shared)
    for i, node in enumerate(list(g.node)):
        tile = bool(once) and node.op_type == "Gemm" and node.input[0] in once
        new_nodes += [node, *_terms(g, node, i, weights, dense, scale, tile, cols)]
    del g.node[:]
    g.node.extend(new_nodes)
    f, cols_in = TensorProto.FLOAT, 2 * rank if pending else rank
    for w, (a, b) in weights.items():
        g.input.append(helper.make_tensor_value_info(u_name(w), f, [a, cols_in]))
        g.input.append(helper.make_tensor_value_info(v_name(w), f, [b, cols_in]))
    for c, n in (dense or {}).items():
        g.input.append(helper.make_tensor_value_info(z_name(c), f, [n]))
    g.input.append(helper.make_tensor_value_info(SCALE, f, [] if dense is None else ["rows"]))
    return model
