"""Layer taps for tpSGD: find each trainable layer of a model and expose its activations.

tpSGD (layer-local target projection) needs, per trainable layer, the layer's input, its
pre-activation and its activation output, all from ONE forward. `trace_layers(model)` traces
the model with torch.fx, recognises the supported layer patterns and returns a GraphModule
whose forward returns `(model output, *taps)` plus the manifest "layers" records that name
those taps. Supported patterns (anything else raises TapsError naming the node):

  Linear | Conv1d | Conv2d (any groups: depthwise and grouped convs too)
      [-> BatchNorm1d/2d (eval: a fixed per-channel affine) | LayerNorm]
      [-> relu|tanh|sigmoid|gelu|silu|relu6|hardswish]   (none: the target sits on the
                                                           layer's (normed) output)
  GRU (1 layer, unidirectional, batch_first, no initial state) -> its output sequence
  Linear as the model's output (the head; it trains on the true loss)

A LayerNorm anywhere else (a pre-norm) is not supported (it has parameters no layer owns).

Between layers any parameter-free ops may sit (flatten, pooling, a mean over time): a layer's
input is tapped wherever it comes from. A hidden layer's own pooling belongs to it: the chain
of MaxPool/AvgPool (1d/2d, no padding), AdaptiveAvgPool(1) (global average pooling, module or
functional), mean over dims, residual additions `skip + a` (identity backward: the skip path
does not depend on the layer), then flatten/view/reshape that follows its activation is
recorded as the layer's "post" ops, and the end of that chain is tapped as its "target":
tpSGD puts the projected label there (as DRTP does after pooling) and differentiates the
pooling in numpy. Any other op ends the chain.

Parameter names are unchanged (fx keeps the module hierarchy), so the taps graph takes the
same weight inputs as model.onnx.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from edgelearn.export.common import as_tuple, describe_error, with_batch
from torch import fx, nn

from edgelearn.errors import EdgelearnError

_F = torch.nn.functional
_ACT_FUNCS = {torch.relu: "relu", _F.relu: "relu", torch.tanh: "tanh",
              torch.sigmoid: "sigmoid", _F.sigmoid: "sigmoid", _F.tanh: "tanh",
              _F.gelu: "gelu", _F.silu: "silu", _F.relu6: "relu6", _F.hardswish: "hardswish"}
_ACT_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu",
                nn.SiLU: "silu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_ADDS = {operator.add, operator.iadd, torch.add}
_GLOBAL_POOLS = {_F.adaptive_avg_pool1d: 1, _F.adaptive_avg_pool2d: 2,
                 torch.adaptive_avg_pool1d: 1}


class TapsError(EdgelearnError):
    """The model has a structure tpSGD's layer taps do not support."""


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _single(v: Any) -> list[int]:
    return [int(v)] if isinstance(v, int) else [int(a) for a in v]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _activation(gm: fx.GraphModule, node: fx.Node | None) -> str | None:
    if node is None:
        return None
    if node.op == "call_function" and node.target in _ACT_FUNCS:
        if set(node.kwargs) - {"inplace", "approximate"} or len(node.args) != 1:
            return None
        act = _ACT_FUNCS[node.target]
        return "gelu_tanh" if node.kwargs.get("approximate") == "tanh" else act
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target]
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        act = _ACT_MODULES.get(type(mod))
        return "gelu_tanh" if act == "gelu" and mod.approximate == "tanh" else act
    return None


def _ints(v: Any, n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(a) for a in v]


def _residual(node: fx.Node, prev: fx.Node) -> dict[str, Any] | None:
    """{"op": "add"} when `node` is `prev + skip` (skip another tensor or a number)."""
    if node.op == "call_function" and node.target in _ADDS:
        pass
    elif not (node.op == "call_method" and node.target in ("add", "add_")):
        return None
    if node.kwargs or len(node.args) != 2 or node.args.count(prev) != 1:
        return None  # alpha=, or prev + prev (its gradient would be doubled)
    return {"op": "add"}


def _global_pool(node: fx.Node) -> dict[str, Any] | None:
    """A functional adaptive average pool to size 1 as a "mean" post op, else None."""
    dims = _GLOBAL_POOLS.get(node.target) if node.op == "call_function" else None
    if dims is None or node.kwargs or len(node.args) != 2:
        return None
    if any(o != 1 for o in _ints(node.args[1], dims)):
        return None
    return {"op": "mean", "dims": list(range(2, 2 + dims)), "keepdim": True}


def _post_op(gm: fx.GraphModule, node: fx.Node, prev: fx.Node) -> dict[str, Any] | None:
    """The "post" record of a parameter-free op that may follow a layer's activation `prev`,
    or None."""
    add = _residual(node, prev)
    if add is not None or (node.op == "call_function" and node.target in _GLOBAL_POOLS):
        return add or _global_pool(node)
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.MaxPool1d | nn.MaxPool2d | nn.AvgPool1d | nn.AvgPool2d):
            dims = 1 if isinstance(mod, nn.MaxPool1d | nn.AvgPool1d) else 2
            kernel = _ints(mod.kernel_size, dims)
            stride = _ints(mod.stride if mod.stride is not None else mod.kernel_size, dims)
            if (any(_ints(mod.padding, dims)) or mod.ceil_mode
                    or (isinstance(mod, nn.MaxPool1d | nn.MaxPool2d)
                        and any(d != 1 for d in _ints(mod.dilation, dims)))
                    or getattr(mod, "divisor_override", None) is not None):
                return None
            kind = "maxpool" if isinstance(mod, nn.MaxPool1d | nn.MaxPool2d) else "avgpool"
            return {"op": kind, "dims": dims, "kernel": kernel, "stride": stride}
        if isinstance(mod, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d):
            dims = 1 if isinstance(mod, nn.AdaptiveAvgPool1d) else 2
            if any(o != 1 for o in _ints(mod.output_size, dims)):
                return None
            return {"op": "mean", "dims": list(range(2, 2 + dims)), "keepdim": True}
        if isinstance(mod, nn.Flatten):
            return {"op": "reshape"} if mod.start_dim == 1 and mod.end_dim == -1 else None
        return None
    if node.op not in ("call_method", "call_function"):
        return None
    fn = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args = node.args[1:]
    if fn == "mean":
        dim = node.kwargs.get("dim", args[0] if args else None)
        keep = node.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
        if dim is None or not isinstance(keep, bool) or set(node.kwargs) - {"dim", "keepdim"}:
            return None
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, list | tuple) else []
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            return None  # negative dims would need the rank; dim 0 is the batch
        return {"op": "mean", "dims": sorted(dims), "keepdim": keep}
    if fn == "flatten":
        start = node.kwargs.get("start_dim", args[0] if args else 0)
        end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return {"op": "reshape"} if start == 1 and end == -1 else None
    if fn in ("view", "reshape") and node.op == "call_method":
        return {"op": "reshape"}
    return None


def _post_chain(gm: fx.GraphModule, act: fx.Node) -> tuple[list[dict[str, Any]], fx.Node | None]:
    """The pooling/reshape ops that follow a layer's activation alone, and the chain's end."""
    ops: list[dict[str, Any]] = []
    end, prev, node = None, act, _only_user(act)
    while node is not None:
        op = _post_op(gm, node, prev)
        # a reshape may only trail: the device gets every other op's shape from the previous;
        # a max pool after a residual add would need the skip path's values on the device
        if op is None or (ops and ops[-1]["op"] == "reshape" and op["op"] != "reshape") or (
                op["op"] == "maxpool" and any(o["op"] == "add" for o in ops)):
            break
        ops.append(op)
        end, prev, node = node, node, _only_user(node)
    while ops and ops[-1]["op"] == "reshape" and not any(o["op"] != "reshape" for o in ops):
        ops.pop()  # a reshape alone changes nothing a flat target sees
    if not ops:
        return [], None
    return ops, end


class _Taps:
    """The tensors tapped so far: fx node -> tap name, in the order they become outputs.

    Args:
        input_name: graph name of the model input (taps of it cost no extra output).
    """

    def __init__(self, input_name: str) -> None:
        self.input_name = input_name
        self.name_of: dict[fx.Node, str] = {}
        self.nodes: list[fx.Node] = []

    def tap(self, node: Any, name: str) -> str:
        """Tap `node` (once; a node tapped again keeps its first name); returns its name."""
        if not isinstance(node, fx.Node):
            raise TapsError(f"{name}: layer input is not a tensor computed by the graph")
        if node.op == "placeholder":
            return self.input_name  # the device already holds the model input
        if node not in self.name_of:
            self.name_of[node] = name
            self.nodes.append(node)
        return self.name_of[node]

    def names(self) -> list[str]:
        """Tap names in output order."""
        return [self.name_of[n] for n in self.nodes]


def _gru_record(mod: nn.GRU, node: fx.Node, name: str, taps: _Taps) -> dict[str, Any]:
    """The layer record of a GRU whose output sequence is tapped."""
    if (mod.num_layers != 1 or mod.bidirectional or not mod.batch_first
            or getattr(mod, "proj_size", 0)):
        raise TapsError(f"GRU {name!r}: tpsgd supports 1-layer, unidirectional, "
                        "batch_first GRUs without projection")
    seq = [u for u in node.users
           if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
    if len(seq) != 1:
        raise TapsError(f"GRU {name!r}: its output sequence is not used exactly once")
    params = {"weight_ih": f"{name}.weight_ih_l0", "weight_hh": f"{name}.weight_hh_l0",
              **({"bias_ih": f"{name}.bias_ih_l0", "bias_hh": f"{name}.bias_hh_l0"}
                 if mod.bias else {})}
    return {"name": name, "head": False, "kind": "gru", "hidden": int(mod.hidden_size),
            "activation": "none", "params": params, "input": taps.tap(node.args[0], f"{name}:in"),
            "preact": None, "output": taps.tap(seq[0], f"{name}:out")}


def _geometry(mod: nn.Module, name: str) -> dict[str, Any]:
    """kind (and stride/padding/dilation of a convolution) of a Linear/Conv1d/Conv2d."""
    if not isinstance(mod, nn.Conv1d | nn.Conv2d):
        return {"kind": "linear"}
    kind = "conv1d" if isinstance(mod, nn.Conv1d) else "conv2d"
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise TapsError(f"{type(mod).__name__} {name!r}: tpsgd supports zero padding given "
                        "as numbers")
    geo = _single if kind == "conv1d" else _pair
    groups = {"groups": int(mod.groups)} if mod.groups != 1 else {}
    return {"kind": kind, "stride": geo(mod.stride), "padding": geo(mod.padding),
            "dilation": geo(mod.dilation), **groups}


def _batch_norm(gm: fx.GraphModule, node: fx.Node | None) -> dict[str, Any] | None:
    """The "bn" record of an eval-mode BatchNorm module node, None if `node` is not one."""
    if node is None or node.op != "call_module" or not isinstance(
            gm.get_submodule(str(node.target)), nn.BatchNorm1d | nn.BatchNorm2d):
        return None
    bmod = gm.get_submodule(str(node.target))
    if not bmod.track_running_stats or bmod.running_mean is None:
        raise TapsError(f"{node.target!r}: batch norm without running statistics")
    b = str(node.target)
    bn = {"running_mean": f"{b}.running_mean", "running_var": f"{b}.running_var",
          "eps": float(bmod.eps)}
    if bmod.affine:
        bn.update(weight=f"{b}.weight", bias=f"{b}.bias")
    return bn


def _layer_norm(gm: fx.GraphModule, node: fx.Node | None) -> dict[str, Any] | None:
    """The "ln" record of a LayerNorm module node, None if `node` is not one."""
    if node is None or node.op != "call_module" or not isinstance(
            gm.get_submodule(str(node.target)), nn.LayerNorm):
        return None
    mod = gm.get_submodule(str(node.target))
    b = str(node.target)
    ln: dict[str, Any] = {"eps": float(mod.eps), "dims": len(mod.normalized_shape)}
    if mod.weight is not None:
        ln["weight"] = f"{b}.weight"
    if mod.bias is not None:
        ln["bias"] = f"{b}.bias"
    return ln


def _hidden_record(gm: fx.GraphModule, node: fx.Node, rec: dict[str, Any],
                   params: dict[str, str], taps: _Taps) -> dict[str, Any]:
    """Complete the record of a hidden layer: [norm ->] [activation ->] [post ops]."""
    name = rec["name"]
    cur, raw = node, None
    nxt = _only_user(cur)
    bn, ln = _batch_norm(gm, nxt), _layer_norm(gm, nxt)
    if bn is not None or ln is not None:
        raw, cur = cur, nxt
        nxt = _only_user(cur)
    act = _activation(gm, nxt)
    if act is None:  # the target sits on the (normed) layer output itself
        act, nxt = "none", cur
    rec.update(params=params, activation=act, input=taps.tap(node.args[0], f"{name}:in"),
               raw=None if raw is None else taps.tap(raw, f"{name}:raw"),
               preact=taps.tap(cur, f"{name}:pre"), output=taps.tap(nxt, f"{name}:out"), bn=bn)
    if ln is not None:
        rec["ln"] = ln
    post, end = _post_chain(gm, nxt)
    if post:
        assert end is not None
        rec.update(post=post, target=taps.tap(end, f"{name}:pooled"))
    return rec


def _follows_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when `node`'s input is a hidden Linear/Conv call that feeds only `node`."""
    src = node.args[0] if node.args else None
    return (isinstance(src, fx.Node) and src.op == "call_module" and _only_user(src) is node
            and isinstance(gm.get_submodule(str(src.target)), nn.Linear | nn.Conv1d | nn.Conv2d))


def _layer_record(gm: fx.GraphModule, node: fx.Node, final: fx.Node,
                  taps: _Taps) -> dict[str, Any] | None:
    """The layer record of a module call (None for parameter-free modules and batch norms)."""
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    name = str(node.target)
    if isinstance(mod, nn.LayerNorm) and not _follows_layer(gm, node):
        raise TapsError(f"layer norm {name!r} does not directly follow a Linear/Conv layer "
                        "(a pre-norm): its parameters would belong to no layer")
    if not isinstance(mod, nn.Linear | nn.Conv1d | nn.Conv2d | nn.GRU):
        # recurse: fx keeps torch.nn containers (TransformerEncoder, ...) as leaf calls
        if any(p.requires_grad for p in mod.parameters()) and not isinstance(
                mod, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm):
            raise TapsError(f"layer {name!r} is a {type(mod).__name__}, which tpsgd does not "
                            "support (Linear, Conv1d, Conv2d, GRU)")
        return None
    if len(node.args) != 1 or node.kwargs:
        raise TapsError(f"layer {name!r} is called with more than one input")
    if isinstance(mod, nn.GRU):
        return _gru_record(mod, node, name, taps)
    rec: dict[str, Any] = {"name": name, "head": False, **_geometry(mod, name)}
    params = {"weight": f"{name}.weight"}
    if mod.bias is not None:
        params["bias"] = f"{name}.bias"
    if node is not final:
        return _hidden_record(gm, node, rec, params, taps)
    if rec["kind"] != "linear":
        raise TapsError(f"output layer {name!r} must be a Linear head")
    rec.update(head=True, params=params, activation="none",
               input=taps.tap(node.args[0], f"{name}:in"), preact=None, output=None)
    return rec


def trace_layers(model: nn.Module, input_name: str = "x"
                 ) -> tuple[fx.GraphModule, list[dict[str, Any]], list[str]]:
    """Trace `model` and build its taps graph.

    Args:
        model: torch module in eval mode with a single tensor output.
        input_name: graph name of the model input (a layer fed by it taps it by that name).
    Returns: (graph module returning (output, *taps), layer records, tap output names).
    Raises TapsError for unsupported structures.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types on data-dependent control flow
        raise TapsError(f"torch.fx cannot trace the model ({describe_error(e)})") from None
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    final = out_node.args[0]
    if not isinstance(final, fx.Node):
        raise TapsError("tpsgd taps need a model with one tensor output")
    taps = _Taps(input_name)
    records = [r for node in list(gm.graph.nodes)
               if (r := _layer_record(gm, node, final, taps)) is not None]
    if len([r for r in records if r["head"]]) != 1:
        raise TapsError("tpsgd needs the model output to come straight from a Linear head")
    if not records[-1]["head"]:
        raise TapsError("the Linear head must be the last trainable layer")
    out_node.args = ((final, *taps.nodes),)
    gm.graph.lint()
    gm.recompile()
    return gm, records, taps.names()


def check_batch_first(gm: nn.Module, example: tuple[torch.Tensor, ...], names: list[str]) -> None:
    """Raise TapsError unless every output of the taps graph has the batch as its first dim.

    tpSGD reads dim 0 of every tap as the batch, and the fixed-batch TFLite taps graph is
    padded and chunked along it. Tried at batch sizes 2 and 3.

    Args:
        gm: the taps graph module (returns (output, *taps)).
        example: example inputs (their batch dim is replaced).
        names: output then tap names, in gm's return order (for the message).
    """
    for b in (2, 3):
        with torch.no_grad():
            outs = as_tuple(gm(*(with_batch(x, b, 0) for x in example)))
        for name, t in zip(names, outs, strict=True):
            if t.ndim == 0 or t.shape[0] != b:
                raise TapsError(f"tap {name!r} is not batch-first (shape {list(t.shape)} at "
                                f"batch {b}); tpsgd reads dim 0 of every tap as the batch")


def check_records(gm: nn.Module, example: tuple[torch.Tensor, ...], records: list[dict[str, Any]],
                  names: list[str]) -> None:
    """Raise TapsError unless each layer's post ops map its activation onto its target tap.

    fx records ops without shapes: a residual add that broadcasts, or a pooling that does not
    fit, is caught here on the example, with the device's own parser and backward.

    Args:
        gm: the taps graph module (returns (output, *taps)). example: example inputs.
        records: the layer records. names: output then tap names, in gm's return order.
    """
    from edgelearn.errors import BundleError
    from edgelearn.layers import parse_layers, post_backward

    with torch.no_grad():
        outs = as_tuple(gm(*example))
    values = {n: t.numpy() for n, t in zip(names, outs, strict=True)}
    known = {v for r in records for d in (r["params"], r.get("bn") or {}, r.get("ln") or {})
             for v in d.values() if isinstance(v, str)}
    try:
        for layer in parse_layers({"layers": records}, known):
            if layer.post and layer.output in values and layer.target in values:
                a, t = values[layer.output], values[layer.target]
                post_backward(layer.post, a, t)
    except BundleError as e:
        raise TapsError(str(e)) from None
