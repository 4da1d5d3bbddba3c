"""Layer records of a bundle (manifest "layers") and exact layer-local gradients in numpy.

Each function here computes the gradient of a loss w.r.t. ONE layer's parameters, given that
layer's tapped input (and pre-activation / output) and dL/d(layer output): nothing crosses a
layer boundary. Used by tpSGD (`edgelearn.optim.tpsgd`); torch parity in tests/test_tpsgd.py
and tests/test_tpsgd_modern.py (GELU/SiLU/ReLU6/hardswish, layer norm, grouped and depthwise
convs, residual adds; the papers behind each are cited in `edgelearn.optim.tpsgd`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelearn.errors import BundleError

KINDS = ("linear", "conv1d", "conv2d", "gru")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu", "relu6", "hardswish",
               "none")


@dataclass(frozen=True)
class Layer:
    """One trainable layer of a bundle (a manifest "layers" record).

    Args:
        name: module name. kind: linear | conv1d | conv2d | gru. head: True for the output layer.
        params: role (weight, bias, weight_ih, ...) -> parameter name.
        activation: one of ACTIVATIONS (after the optional norm); "none": the layer's target
            sits on its (normed) output, e.g. before a residual add.
        input / preact / output / raw: tap names (model input or taps-graph outputs); raw is the
            conv/linear output before the norm.
        bn: batch norm after the layer (eval affine): parameter names and eps, or None.
        ln: layer norm after the layer (instead of bn): parameter names, eps and "dims" (how
            many trailing axes it normalizes), or None.
        groups: conv groups (in_channels for a depthwise conv).
        weight_layout: "out_in" (torch's [out, in]) or "in_out" (an ONNX MatMul's [in, out]
            weight; linear heads found in a prepared graph).
        stride / padding / dilation: conv2d geometry [h, w]; conv1d: (1, s), (0, p), (1, d),
            i.e. the geometry of the same conv seen as a conv2d over [N, C, 1, L].
        post: the parameter-free ops (pooling, mean, trailing reshape) between the activation
            output and `target`, in order (see `post_backward`); empty when none were recorded.
        target: tap at the end of `post` (where tpSGD puts the layer's local target), or None.
    """

    name: str
    kind: str
    head: bool
    params: dict[str, str]
    activation: str
    input: str
    preact: str | None
    output: str | None
    raw: str | None = None
    bn: dict[str, Any] | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    post: tuple[dict[str, Any], ...] = ()
    target: str | None = None
    ln: dict[str, Any] | None = None
    groups: int = 1
    weight_layout: str = "out_in"

    def param_names(self) -> list[str]:
        """Every parameter this layer's local update may touch (its own and its norm's)."""
        norm = self.bn or self.ln or {}
        return [*self.params.values(), *(norm[k] for k in ("weight", "bias") if k in norm)]


def _pair(v: Any, what: str) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(type(i) is int and i >= 0 for i in v)):
        raise BundleError(f"manifest.json: layer {what} must be two integers, got {v!r}")
    return v[0], v[1]


def _single(v: Any, what: str) -> int:
    if not (isinstance(v, list) and len(v) == 1 and type(v[0]) is int and v[0] >= 0):
        raise BundleError(f"manifest.json: conv1d layer {what} must be one integer, got {v!r}")
    return v[0]


def parse_layers(manifest: dict[str, Any], param_names: set[str]) -> list[Layer]:
    """Validate the manifest's "layers" records against the parameter names."""
    recs = manifest.get("layers", [])
    if not isinstance(recs, list):
        raise BundleError("manifest.json: 'layers' must be a list")
    out = []
    for r in recs:
        if not isinstance(r, dict) or r.get("kind") not in KINDS:
            raise BundleError(f"manifest.json: bad layer record {str(r)[:80]!r}")
        if r.get("activation") not in ACTIVATIONS:
            raise BundleError(f"manifest.json: layer {r.get('name')!r} has unknown activation")
        params = r.get("params")
        bn = r.get("bn")
        extras = _parse_extras(r)
        norm = bn or extras["ln"]
        refs = [*(params or {}).values(), *((norm or {}).get(k) for k in
                                            ("weight", "bias", "running_mean", "running_var")
                                            if norm and k in norm)]
        if not isinstance(params, dict) or not all(isinstance(n, str) and n in param_names
                                                   for n in refs):
            raise BundleError(f"manifest.json: layer {r.get('name')!r} names unknown parameters")
        for k in ("input", "preact", "output", "raw"):
            if r.get(k) is not None and not isinstance(r[k], str):
                raise BundleError(f"manifest.json: layer {r.get('name')!r}: bad {k} tap")
        geo = {}
        if r["kind"] == "conv2d":
            geo = {k: _pair(r.get(k), k) for k in ("stride", "padding", "dilation")}
        elif r["kind"] == "conv1d":
            s, p, d = (_single(r.get(k), k) for k in ("stride", "padding", "dilation"))
            geo = {"stride": (1, s), "padding": (0, p), "dilation": (1, d)}
        post = _parse_post(r)
        out.append(Layer(name=str(r.get("name")), kind=r["kind"], head=bool(r.get("head")),
                         params=dict(params), activation=r["activation"], input=r.get("input"),
                         preact=r.get("preact"), output=r.get("output"), raw=r.get("raw"),
                         bn=bn, post=post, target=r.get("target") if post else None, **geo,
                         **extras))
    return out


def _parse_extras(r: dict[str, Any]) -> dict[str, Any]:
    """Validate a record's optional "ln", "groups" and "weight_layout" (Layer's defaults)."""
    name, ln = r.get("name"), r.get("ln")
    groups, layout = r.get("groups", 1), r.get("weight_layout", "out_in")
    if type(groups) is not int or not 0 < groups <= 1 << 16 or (
            groups != 1 and r.get("kind") not in ("conv1d", "conv2d")):
        raise BundleError(f"manifest.json: layer {name!r} has bad groups {groups!r}")
    if layout not in ("out_in", "in_out") or (layout != "out_in" and r.get("kind") != "linear"):
        raise BundleError(f"manifest.json: layer {name!r} has bad weight_layout {layout!r}")
    if ln is not None:
        eps, dims = (ln.get("eps"), ln.get("dims")) if isinstance(ln, dict) else (None, None)
        if (not isinstance(eps, float) or not eps >= 0 or type(dims) is not int
                or not 0 < dims <= 4 or r.get("bn") or not isinstance(r.get("raw"), str)
                or set(ln) - {"weight", "bias", "eps", "dims"}):
            raise BundleError(f"manifest.json: layer {name!r} has a malformed layer norm")
    return {"ln": ln, "groups": groups, "weight_layout": layout}


def needed_taps(layers: list[Layer], trainable: set[str]) -> set[str]:
    """The taps a tpSGD step reads: the logits, and the taps of each layer with trainable params.

    Args:
        layers: the bundle's layer records (head last). trainable: trainable parameter names.
    """
    need = {layers[-1].preact} if layers and layers[-1].preact else set()
    for layer in layers:
        if any(n in trainable for n in layer.param_names()):
            need |= {t for t in (layer.input, layer.preact, layer.output, layer.target)
                     if t is not None}
            # the batch norm's input only feeds its own gamma/beta gradients; a layer norm's
            # backward always reads it (per-sample statistics)
            if layer.raw is not None and (layer.ln or (layer.bn and any(
                    layer.bn.get(k) in trainable for k in ("weight", "bias")))):
                need.add(layer.raw)
    return need


_MAX_POST = 8


def _parse_post(r: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Validate a layer record's "post" ops and "target" tap (both or neither)."""
    post, target, name = r.get("post"), r.get("target"), r.get("name")
    if post is None and target is None:
        return ()
    bad = BundleError(f"manifest.json: layer {name!r} has malformed post ops / target")
    if (not isinstance(post, list) or not 0 < len(post) <= _MAX_POST
            or not isinstance(target, str) or r.get("head") or r.get("kind") == "gru"):
        raise bad
    ops = []
    for op in post:
        if not isinstance(op, dict):
            raise bad
        kind = op.get("op")
        if kind in ("maxpool", "avgpool"):
            dims = op.get("dims")
            if dims not in (1, 2) or set(op) != {"op", "dims", "kernel", "stride"}:
                raise bad
            k, st = op["kernel"], op["stride"]
            if not all(isinstance(v, list) and len(v) == dims
                       and all(type(i) is int and 0 < i <= 4096 for i in v) for v in (k, st)):
                raise bad
            pad = [1] * (2 - dims)
            ops.append({"op": kind, "dims": dims, "kernel": (*pad, *k), "stride": (*pad, *st)})
        elif kind == "mean":
            dims, keep = op.get("dims"), op.get("keepdim")
            if (not isinstance(dims, list) or not dims or not isinstance(keep, bool)
                    or not all(type(d) is int and 0 < d < 8 for d in dims)
                    or len(set(dims)) != len(dims)):
                raise bad
            ops.append({"op": "mean", "dims": tuple(sorted(dims)), "keepdim": keep})
        elif kind in ("reshape", "add"):
            if set(op) != {"op"}:
                raise bad
            ops.append({"op": kind})
        else:
            raise bad
    kinds = [o["op"] for o in ops]
    if "add" in kinds and "maxpool" in kinds[kinds.index("add"):]:
        raise bad  # a max pool after a residual add would need the skip path's values
    if "reshape" in kinds and any(k != "reshape" for k in kinds[kinds.index("reshape"):]):
        raise bad  # reshapes only trail (the device derives every other op's shape)
    return tuple(ops)


def _pool_out(size: int, k: int, s: int) -> int:
    return max((size - k) // s + 1, 0)  # 0: a kernel larger than the map (refused by callers)


def _post_forward(op: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """One post op forward (needed only to feed a max pool that is not the first op)."""
    if op["op"] == "mean":
        return x.mean(axis=op["dims"], keepdims=op["keepdim"], dtype=np.float32)
    x4 = x[:, :, None, :] if op["dims"] == 1 else x
    (kh, kw), (sh, sw) = op["kernel"], op["stride"]
    ho, wo = _pool_out(x4.shape[2], kh, sh), _pool_out(x4.shape[3], kw, sw)
    wins = [x4[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    y = np.maximum.reduce(wins) if op["op"] == "maxpool" else np.add.reduce(wins) / (kh * kw)
    return y[:, :, 0] if op["dims"] == 1 else y


def post_backward(ops: tuple[dict[str, Any], ...], a: np.ndarray, d_target: np.ndarray
                  ) -> np.ndarray:
    """dL/da from dL/d(target), back through a layer's post ops (max/avg pool, mean, reshape).

    Max pooling routes each window's gradient to its first maximum in row-major order (as
    torch does, so ties match). Pools have no padding and drop the remainder (floor mode).

    Args:
        ops: the layer's parsed post ops. a: activation output [N, C, ...] (float32).
        d_target: dL/d(end of the chain), any shape with the chain end's element count.
    Returns: dL/da, float32, shaped like a.
    """
    core = [op for op in ops if op["op"] != "reshape"]  # reshapes only trail: no backward
    shape = a.shape
    for op in core:  # a manifest's ops must fit the tapped maps (hostile or stale bundles)
        if op["op"] == "add":
            continue  # same shape out
        if (len(shape) != 2 + op["dims"] if op["op"] != "mean"
                else len(shape) < 1 + max(op["dims"])):
            raise BundleError(f"post op {op['op']} does not fit an activation of shape {shape}")
        shape = _shape_only(op, np.broadcast_to(np.float32(0), shape)).shape
        if 0 in shape:
            raise BundleError(f"post op {op['op']} leaves nothing of activation {a.shape}")
    if int(np.prod(shape)) != d_target.size:
        raise BundleError(f"post ops map activation {a.shape} to {shape}, but the target tap "
                          f"has {d_target.size // max(a.shape[0], 1)} values per sample")
    ins = [a]
    for k, op in enumerate(core[:-1]):
        # a later max pool needs real values to find its maxima; anything else only shapes
        need = any(o["op"] == "maxpool" for o in core[k + 1:])
        ins.append(_post_forward(op, ins[-1]) if need else _shape_only(op, ins[-1]))
    grad = d_target
    for op, x in reversed(list(zip(core, ins, strict=True))):
        grad = _op_backward(op, x, grad)
    return grad.reshape(a.shape)


def _shape_only(op: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """A zero-stride array with the shape `op` gives `x` (when only the shape is needed)."""
    if op["op"] == "add":
        return x
    if op["op"] == "mean":
        shape = list(x.shape)
        for d in op["dims"]:
            shape[d] = 1
        if not op["keepdim"]:
            shape = [s for i, s in enumerate(shape) if i not in op["dims"]]
    else:
        (kh, kw), (sh, sw) = op["kernel"], op["stride"]
        shape = list(x.shape)
        shape[-1] = _pool_out(shape[-1], kw, sw)
        if op["dims"] == 2:
            shape[-2] = _pool_out(shape[-2], kh, sh)
    return np.broadcast_to(np.float32(0), tuple(shape))


def _tiled_pool_backward(kind: str, x4: np.ndarray, d4: np.ndarray, kh: int, kw: int
                         ) -> np.ndarray:
    """Pool backward when windows tile the map (stride == kernel): one pass per window slot.

    Same values as the general path in `_op_backward`, except that a zero here may carry the
    sign of d (d * 0): whole-array passes over the kh*kw strided slot views instead of a
    stacked copy and an argmax over a tiny axis (about 4x faster on 28x28 relu maps).
    """
    n, c, h, w = x4.shape
    ho, wo = d4.shape[2:]
    slots = [(i, j) for i in range(kh) for j in range(kw)]

    def view(a: np.ndarray, i: int, j: int) -> np.ndarray:
        return a[:, :, i:ho * kh:kh, j:wo * kw:kw]

    cut = (ho * kh, wo * kw) != (h, w)  # floor mode: the cut-off border gets no gradient
    out = np.zeros((n, c, h, w), np.float32) if cut else np.empty((n, c, h, w), np.float32)
    if kind == "avgpool":
        g = d4 / np.float32(kh * kw)
        for i, j in slots:
            view(out, i, j)[...] = g
        return out
    top = view(x4, *slots[0])
    for i, j in slots[1:]:
        top = np.maximum(top, view(x4, i, j))
    free: np.ndarray | None = None
    for i, j in slots:  # row-major window order: the first maximum wins, as in torch
        hit = view(x4, i, j) == top
        if free is None:
            free = ~hit
        else:
            hit &= free
            free &= ~hit
        np.multiply(d4, hit, out=view(out, i, j))
    return out


def _op_backward(op: dict[str, Any], x: np.ndarray, d_y: np.ndarray) -> np.ndarray:
    """dL/dx of one post op given its input x and dL/d(output) (any shape of the output size)."""
    kind = op["op"]
    if kind == "add":
        # a residual add: out = x + skip, and the skip path does not depend on this layer's
        # weights (it is computed before the layer), so dL/dx = dL/dout
        return d_y.reshape(x.shape)
    if kind == "mean":
        shape = list(x.shape)
        for dd in op["dims"]:
            shape[dd] = 1
        count = int(np.prod([x.shape[dd] for dd in op["dims"]]))
        g = d_y.reshape(shape) / np.float32(count)
        return np.ascontiguousarray(np.broadcast_to(g, x.shape), dtype=np.float32)
    x4 = x[:, :, None, :] if op["dims"] == 1 else x
    n, c, h, w = x4.shape
    (kh, kw), (sh, sw) = op["kernel"], op["stride"]
    ho, wo = _pool_out(h, kh, sh), _pool_out(w, kw, sw)
    d4 = d_y.reshape(n, c, ho, wo).astype(np.float32, copy=False)
    if (sh, sw) == (kh, kw):
        out = _tiled_pool_backward(kind, x4, d4, kh, kw)
        return out[:, :, 0] if op["dims"] == 1 else out
    out = np.zeros((n, c, h, w), np.float32)
    if kind == "avgpool":
        g = d4 / np.float32(kh * kw)
        for i in range(kh):
            for j in range(kw):
                out[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += g
    else:
        wins = np.stack([x4[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                         for i in range(kh) for j in range(kw)], axis=-1)
        first = wins.argmax(axis=-1)  # first maximum in window order, as torch picks
        for k in range(kh * kw):
            i, j = divmod(k, kw)
            hit = np.where(first == k, d4, np.float32(0))
            # += also covers overlapping windows (stride < kernel) that share a position
            out[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += hit
    return out[:, :, 0] if op["dims"] == 1 else out


def act_grad(activation: str, preact: np.ndarray, out: np.ndarray, d_out: np.ndarray
             ) -> np.ndarray:
    """dL/d(pre-activation) from dL/d(activation output), elementwise (float32)."""
    if activation == "relu":
        if (d_out.dtype == np.float32 and d_out.shape == preact.shape
                and d_out.flags.c_contiguous):
            # == np.where(preact > 0, d_out, 0) bit for bit (NaN, inf and -0.0 included), as
            # d_out's bits AND an all-ones / all-zeros mask: np.where on a data-dependent mask
            # runs a branchy loop ~6x slower than two vectorized integer passes
            mask = np.negative((preact > 0).view(np.int8), dtype=np.int32)  # -1 = all ones
            np.bitwise_and(d_out.view(np.int32), mask, out=mask)
            return mask.view(np.float32)
        return np.where(preact > 0, d_out, np.float32(0))
    if activation == "tanh":
        g = out * out  # in place below: same operations as d_out * (1 - out * out)
        np.subtract(np.float32(1), g, out=g)
        if g.shape == d_out.shape and g.dtype == np.result_type(d_out, g):
            return np.multiply(d_out, g, out=g)
        return d_out * g
    if activation == "sigmoid":
        g = d_out * out  # in place below: same operations as d_out * out * (1 - out)
        return np.multiply(g, np.float32(1) - out, out=g)
    if activation in _SMOOTH:
        return (d_out * _SMOOTH[activation](preact)).astype(np.float32, copy=False)
    return d_out


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (numpy has none): Numerical Recipes' erfc Chebyshev fit, fractional
    error < 1.2e-7 everywhere (Press et al., Numerical Recipes 3rd ed., section 6.2.2)."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(-z * z + poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def _gelu_d(z: np.ndarray) -> np.ndarray:
    """d/dz z * Phi(z) = Phi(z) + z * phi(z) (torch's exact GELU), in float64."""
    v = z.astype(np.float64)
    return 0.5 * (1.0 + _erf(v / np.sqrt(2.0))) + v * np.exp(-0.5 * v * v) / np.sqrt(2 * np.pi)


def _gelu_tanh_d(z: np.ndarray) -> np.ndarray:
    """Derivative of GELU's tanh form 0.5 z (1 + tanh(k (z + 0.044715 z^3))), in float64."""
    v = z.astype(np.float64)
    k = np.sqrt(2.0 / np.pi)
    th = np.tanh(k * (v + 0.044715 * v ** 3))
    return 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * k * (1.0 + 3 * 0.044715 * v * v)


def _silu_d(z: np.ndarray) -> np.ndarray:
    """d/dz z * sigmoid(z) = s (1 + z (1 - s)), in float64."""
    v = z.astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-v))
    return s * (1.0 + v * (1.0 - s))


def _relu6_d(z: np.ndarray) -> np.ndarray:
    """1 on 0 < z < 6 (torch's hardtanh backward: 0 at both kinks)."""
    return ((z > 0) & (z < 6)).astype(np.float32)


def _hardswish_d(z: np.ndarray) -> np.ndarray:
    """0 below -3, z/3 + 1/2 on [-3, 3], 1 above (torch's hardswish backward)."""
    return np.where(z < -3, np.float32(0),
                    np.where(z <= 3, z / np.float32(3) + np.float32(0.5), np.float32(1)))


#: activation -> f'(pre-activation), for activations whose derivative needs the input
_SMOOTH = {"gelu": _gelu_d, "gelu_tanh": _gelu_tanh_d, "silu": _silu_d, "relu6": _relu6_d,
           "hardswish": _hardswish_d}


def ln_backward(raw: np.ndarray, eps: float, dims: int, gamma: np.ndarray | None,
                d_pre: np.ndarray, *, params: bool = True) -> tuple[np.ndarray, dict]:
    """Layer norm y = (raw - mu) / sqrt(var + eps) * gamma + beta over the last `dims` axes.

    Statistics are per sample, so the input gradient is not a fixed scale as in eval batch
    norm: dx = (g - mean(g) - xhat * mean(g * xhat)) / sigma with g = dy * gamma (means over
    the normalized axes), computed in float64.

    Args:
        raw: layer output before the norm [N, ..., *normalized] (float32); eps; dims: number
            of trailing axes normalized; gamma: weight shaped like those axes, or None;
            d_pre: dL/dy like raw.
        params: also return the gradients of gamma and beta.
    Returns: (dL/d raw float32, {"weight": dL/dgamma, "bias": dL/dbeta} or {}).
    """
    axes = tuple(range(raw.ndim - dims, raw.ndim))
    x = raw.astype(np.float64)
    mu = x.mean(axis=axes, keepdims=True)
    xc = x - mu
    inv = 1.0 / np.sqrt((xc * xc).mean(axis=axes, keepdims=True) + eps)
    xhat = xc * inv
    dy = d_pre.astype(np.float64)
    g = dy * gamma.astype(np.float64) if gamma is not None else dy
    dx = (g - g.mean(axis=axes, keepdims=True)
          - xhat * (g * xhat).mean(axis=axes, keepdims=True)) * inv
    grads: dict[str, np.ndarray] = {}
    if params:
        lead = tuple(range(raw.ndim - dims))
        grads = {"weight": (dy * xhat).sum(axis=lead).astype(np.float32),
                 "bias": dy.sum(axis=lead).astype(np.float32)}
    return dx.astype(np.float32), grads


def bn_backward(raw: np.ndarray | None, mean: np.ndarray, var: np.ndarray, eps: float,
                gamma: np.ndarray | None, d_pre: np.ndarray, *, params: bool = True
                ) -> tuple[np.ndarray, dict]:
    """Eval batch norm y = (raw - mean)/sqrt(var + eps) * gamma + beta, backward.

    Args:
        raw: layer output before the norm [N, C, ...] (unused, may be None, when params is
            False); mean/var/gamma [C]; d_pre dL/dy like raw.
        params: also return the gradients of gamma and beta (False: frozen norm, {} returned).
    Returns: (dL/d raw, {"weight": dL/dgamma, "bias": dL/dbeta}).
    """
    shape = (1, -1) + (1,) * (d_pre.ndim - 2)
    inv = (np.float32(1) / np.sqrt(var + np.float32(eps))).astype(np.float32)
    scale = inv if gamma is None else gamma * inv
    if not params:
        return d_pre * scale.reshape(shape), {}
    assert raw is not None
    axes = (0, *range(2, raw.ndim))
    grads = {"bias": d_pre.sum(axis=axes)}
    # one temporary, updated in place: the same operations as (d_pre * ((raw - mean) * inv))
    xhat = raw - mean.reshape(shape)
    xhat *= inv.reshape(shape)
    if xhat.shape == d_pre.shape and xhat.dtype == np.result_type(d_pre, xhat):
        grads["weight"] = np.multiply(d_pre, xhat, out=xhat).sum(axis=axes)
    else:
        grads["weight"] = (d_pre * xhat).sum(axis=axes)
    return d_pre * scale.reshape(shape), grads


def linear_grads(x: np.ndarray, d_z: np.ndarray) -> dict[str, np.ndarray]:
    """z = x W^T + b: gradients of W [out, in] and b [out] from x [..., in], dL/dz [..., out]."""
    x2 = x.reshape(-1, x.shape[-1])
    d2 = d_z.reshape(-1, d_z.shape[-1])
    return {"weight": np.ascontiguousarray(d2.T) @ x2, "bias": d2.sum(axis=0)}


def conv2d_grads(x: np.ndarray, d_z: np.ndarray, kernel: tuple[int, int], *,
                 stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int = 1) -> dict[str, np.ndarray]:
    """Conv2d weight/bias gradients via im2col (grouped and depthwise convs included).

    Args:
        x: input [N, C, H, W]; d_z: dL/d(conv output) [N, O, Ho, Wo]; kernel (kh, kw);
        groups: conv groups (C for a depthwise conv): group g maps input channels
            g*C/G .. (g+1)*C/G - 1 to outputs g*O/G .. (g+1)*O/G - 1.
    Returns: {"weight": [O, C/groups, kh, kw], "bias": [O]}.
    """
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    n, c = x.shape[:2]
    o, ho, wo = d_z.shape[1:]
    # im2col as [C, kh, kw, N, Ho, Wo]: one strided slice copy per kernel offset (kh*kw small
    # copies beat one gather through a 6-d window view), then a single GEMM against
    # dL/dz as [O, N*Ho*Wo]
    cols = np.empty((c, kh, kw, n, ho, wo), np.float32)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            win = xp[:, :, r0:r0 + sh * (ho - 1) + 1:sh, c0:c0 + sw * (wo - 1) + 1:sw]
            cols[:, i, j] = win.transpose(1, 0, 2, 3)
    d2 = np.ascontiguousarray(d_z.transpose(1, 0, 2, 3)).reshape(o, n * ho * wo)
    if groups == 1:
        gw = (d2 @ cols.reshape(c * kh * kw, n * ho * wo).T).reshape(o, c, kh, kw)
    else:  # one batched GEMM over the groups: [G, O/G, NHW] x [G, NHW, C/G*kh*kw]
        cg, og = c // groups, o // groups
        gcols = cols.reshape(groups, cg * kh * kw, n * ho * wo).transpose(0, 2, 1)
        gw = np.matmul(d2.reshape(groups, og, n * ho * wo), gcols).reshape(o, cg, kh, kw)
    return {"weight": gw.astype(np.float32, copy=False), "bias": d2.sum(axis=1)}


def conv1d_grads(x: np.ndarray, d_z: np.ndarray, kernel: int, *, stride: int, padding: int,
                 dilation: int, groups: int = 1) -> dict[str, np.ndarray]:
    """Conv1d weight/bias gradients: the conv2d im2col over [N, C, 1, L].

    Args:
        x: input [N, C, L]; d_z: dL/d(conv output) [N, O, Lo]; kernel: k (time steps);
        groups: conv groups.
    Returns: {"weight": [O, C/groups, k], "bias": [O]}.
    """
    g = conv2d_grads(x[:, :, None, :], d_z[:, :, None, :], (1, kernel), stride=(1, stride),
                     padding=(0, padding), dilation=(1, dilation), groups=groups)
    g["weight"] = g["weight"].reshape(g["weight"].shape[0], g["weight"].shape[1], kernel)
    return g


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-v))


def gru_grads(x: np.ndarray, hs: np.ndarray, w_ih: np.ndarray, w_hh: np.ndarray,
              b_ih: np.ndarray | None, b_hh: np.ndarray | None, d_last: np.ndarray
              ) -> dict[str, np.ndarray]:
    """Backprop through time inside one GRU layer (torch gate order r, z, n; h0 = 0).

    The loss depends on the final hidden state only; gates are recomputed from the tapped
    input and hidden sequence, so nothing but the layer's own taps is needed.

    Args:
        x: input [N, T, F]; hs: output sequence h_1..h_T [N, T, H]; w_ih [3H, F], w_hh [3H, H],
            b_ih / b_hh [3H] or None; d_last: dL/dh_T [N, H].
    Returns: gradients named weight_ih, weight_hh (+ bias_ih, bias_hh).
    """
    n, t_len, _ = x.shape
    h = hs.shape[2]
    zero = np.zeros((n, h), np.float32)
    g = {"weight_ih": np.zeros_like(w_ih), "weight_hh": np.zeros_like(w_hh),
         "bias_ih": np.zeros(3 * h, np.float32), "bias_hh": np.zeros(3 * h, np.float32)}
    dh = d_last.astype(np.float32, copy=True)
    for t in range(t_len - 1, -1, -1):
        xt, hp = x[:, t], (hs[:, t - 1] if t > 0 else zero)
        gi = xt @ w_ih.T
        gh = hp @ w_hh.T
        if b_ih is not None:
            gi += b_ih
        if b_hh is not None:
            gh += b_hh
        r = _sigmoid(gi[:, :h] + gh[:, :h])
        z = _sigmoid(gi[:, h:2 * h] + gh[:, h:2 * h])
        nn_ = np.tanh(gi[:, 2 * h:] + r * gh[:, 2 * h:])
        dn = dh * (np.float32(1) - z)
        dz = dh * (hp - nn_)
        dan = dn * (np.float32(1) - nn_ * nn_)
        dar = dan * gh[:, 2 * h:] * r * (np.float32(1) - r)
        daz = dz * z * (np.float32(1) - z)
        dgi = np.concatenate([dar, daz, dan], axis=1)
        dgh = np.concatenate([dar, daz, dan * r], axis=1)
        g["weight_ih"] += dgi.T @ xt
        g["weight_hh"] += dgh.T @ hp
        g["bias_ih"] += dgi.sum(axis=0)
        g["bias_hh"] += dgh.sum(axis=0)
        dh = dh * z + dgh @ w_hh
    if b_ih is None:
        del g["bias_ih"], g["bias_hh"]
    return g
