"""Layer records of a bundle (manifest "layers") and exact layer-local gradients in numpy.

Each function here computes the gradient of a loss w.r.t. ONE layer's parameters, given that
layer's tapped input (and pre-activation / output) and dL/d(layer output): nothing crosses a
layer boundary. Used by tpSGD (`edgelearn.optim.tpsgd`); torch parity in tests/test_tpsgd.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelearn.errors import BundleError

KINDS = ("linear", "conv1d", "conv2d", "gru")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "none")


@dataclass(frozen=True)
class Layer:
    """One trainable layer of a bundle (a manifest "layers" record).

    Args:
        name: module name. kind: linear | conv1d | conv2d | gru. head: True for the output layer.
        params: role (weight, bias, weight_ih, ...) -> parameter name.
        activation: relu | tanh | sigmoid | none (after the optional batch norm).
        input / preact / output / raw: tap names (model input or taps-graph outputs); raw is the
            conv/linear output before batch norm.
        bn: batch norm after the layer (eval affine): parameter names and eps, or None.
        stride / padding / dilation: conv2d geometry [h, w]; conv1d: (1, s), (0, p), (1, d),
            i.e. the geometry of the same conv seen as a conv2d over [N, C, 1, L].
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

    def param_names(self) -> list[str]:
        """Every parameter this layer's local update may touch (its own and its batch norm's)."""
        bn = [self.bn[k] for k in ("weight", "bias") if self.bn and k in self.bn]
        return [*self.params.values(), *bn]


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
        refs = [*(params or {}).values(), *((bn or {}).get(k) for k in
                                            ("weight", "bias", "running_mean", "running_var")
                                            if bn and k in bn)]
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
        out.append(Layer(name=str(r.get("name")), kind=r["kind"], head=bool(r.get("head")),
                         params=dict(params), activation=r["activation"], input=r.get("input"),
                         preact=r.get("preact"), output=r.get("output"), raw=r.get("raw"),
                         bn=bn, **geo))
    return out


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
    return d_out


def bn_backward(raw: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float,
                gamma: np.ndarray | None, d_pre: np.ndarray) -> tuple[np.ndarray, dict]:
    """Eval batch norm y = (raw - mean)/sqrt(var + eps) * gamma + beta, backward.

    Args:
        raw: layer output before the norm [N, C, ...]; mean/var/gamma [C]; d_pre dL/dy like raw.
    Returns: (dL/d raw, {"weight": dL/dgamma, "bias": dL/dbeta}).
    """
    shape = (1, -1) + (1,) * (raw.ndim - 2)
    inv = (np.float32(1) / np.sqrt(var + np.float32(eps))).astype(np.float32)
    axes = (0, *range(2, raw.ndim))
    grads = {"bias": d_pre.sum(axis=axes)}
    # one temporary, updated in place: the same operations as (d_pre * ((raw - mean) * inv))
    xhat = raw - mean.reshape(shape)
    xhat *= inv.reshape(shape)
    if xhat.shape == d_pre.shape and xhat.dtype == np.result_type(d_pre, xhat):
        grads["weight"] = np.multiply(d_pre, xhat, out=xhat).sum(axis=axes)
    else:
        grads["weight"] = (d_pre * xhat).sum(axis=axes)
    scale = inv if gamma is None else gamma * inv
    return d_pre * scale.reshape(shape), grads


def linear_grads(x: np.ndarray, d_z: np.ndarray) -> dict[str, np.ndarray]:
    """z = x W^T + b: gradients of W [out, in] and b [out] from x [..., in], dL/dz [..., out]."""
    x2 = x.reshape(-1, x.shape[-1])
    d2 = d_z.reshape(-1, d_z.shape[-1])
    return {"weight": np.ascontiguousarray(d2.T) @ x2, "bias": d2.sum(axis=0)}


def conv2d_grads(x: np.ndarray, d_z: np.ndarray, kernel: tuple[int, int], *,
                 stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> dict[str, np.ndarray]:
    """Conv2d (groups=1) weight/bias gradients via im2col.

    Args:
        x: input [N, C, H, W]; d_z: dL/d(conv output) [N, O, Ho, Wo]; kernel (kh, kw).
    Returns: {"weight": [O, C, kh, kw], "bias": [O]}.
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
    gw = (d2 @ cols.reshape(c * kh * kw, n * ho * wo).T).reshape(o, c, kh, kw)
    return {"weight": gw.astype(np.float32, copy=False), "bias": d2.sum(axis=1)}


def conv1d_grads(x: np.ndarray, d_z: np.ndarray, kernel: int, *, stride: int, padding: int,
                 dilation: int) -> dict[str, np.ndarray]:
    """Conv1d (groups=1) weight/bias gradients: the conv2d im2col over [N, C, 1, L].

    Args:
        x: input [N, C, L]; d_z: dL/d(conv output) [N, O, Lo]; kernel: k (time steps).
    Returns: {"weight": [O, C, k], "bias": [O]}.
    """
    g = conv2d_grads(x[:, :, None, :], d_z[:, :, None, :], (1, kernel), stride=(1, stride),
                     padding=(0, padding), dilation=(1, dilation))
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
