"""tpSGD step fast paths: bit-identical to the plain expressions they replace."""

from __future__ import annotations

import numpy as np
import pytest

from edgelearn.backends.ort import OrtBackend
from edgelearn.bundle import Bundle
from edgelearn.layers import act_grad, bn_backward


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _special(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 normals with NaN, +-inf, +-0 and subnormals sprinkled in."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    flat = a.reshape(-1)
    flat[rng.integers(0, flat.size, 40)] = rng.choice(
        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45], np.float32), 40)
    return a


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "none"])
def test_act_grad_is_bit_identical_to_the_plain_expression(act: str) -> None:
    pre = _special((4, 6, 5, 7), 0)
    out = {"relu": np.maximum(pre, 0), "tanh": np.tanh(pre)}.get(act, 1 / (1 + np.exp(-pre)))
    out = out.astype(np.float32)
    d = _special(pre.shape, 1)
    ref = {"relu": lambda p, o, g: np.where(p > 0, g, np.float32(0)),
           "tanh": lambda p, o, g: g * (np.float32(1) - o * o),
           "sigmoid": lambda p, o, g: g * o * (np.float32(1) - o),
           "none": lambda p, o, g: g}[act]
    t = (0, 2, 1, 3)
    cases = [(pre, out, d),                                    # fast path
             (pre, out, d.astype(np.float64)),                 # other dtype: fallback
             (pre.transpose(t), out.transpose(t), d.transpose(t)),  # non-contiguous
             (pre, out, d[:1])]                                # broadcast d_out
    for p, o, g in cases:
        want = ref(p, o, g)
        got = act_grad(act, p, o, g)
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(d, _special(pre.shape, 1))  # inputs untouched (NaN == NaN)


def test_bn_backward_is_bit_identical_to_the_plain_expression() -> None:
    rng = np.random.default_rng(2)
    raw, d = _special((3, 5, 4, 6), 3), rng.standard_normal((3, 5, 4, 6)).astype(np.float32)
    mean = rng.standard_normal(5).astype(np.float32)
    var = rng.uniform(0.5, 2, 5).astype(np.float32)
    gamma = rng.standard_normal(5).astype(np.float32)
    shape, axes = (1, -1, 1, 1), (0, 2, 3)
    inv = (np.float32(1) / np.sqrt(var + np.float32(1e-5))).astype(np.float32)
    xhat = (raw - mean.reshape(shape)) * inv.reshape(shape)
    for g in (gamma, None):
        for dp in (d, d.astype(np.float64)):
            with np.errstate(invalid="ignore"):  # inf - inf in the sums: NaN on both sides
                got, grads = bn_backward(raw, mean, var, 1e-5, g, dp)
                want_w = (dp * xhat).sum(axis=axes)
            scale = inv if g is None else g * inv
            np.testing.assert_array_equal(_bits(got), _bits(dp * scale.reshape(shape)))
            np.testing.assert_array_equal(_bits(grads["weight"]), _bits(want_w))
            np.testing.assert_array_equal(_bits(grads["bias"]), _bits(dp.sum(axis=axes)))


@pytest.mark.torch
def test_reused_outputs_equal_fresh_ones_and_are_overwritten_next_call(bundles, digits) -> None:
    bundle = Bundle(bundles["cnn"].path)
    store = bundle.load_store()
    be = OrtBackend(bundle, graph="onnx_taps", threads=1)
    be.bind(store)
    x = digits.x.reshape(-1, 1, 8, 8)
    name = bundle.inputs[0].name

    def fresh(xb: np.ndarray) -> dict[str, np.ndarray]:
        return be.forward({name: xb})

    first = be.forward({name: x[:8]}, reuse_outputs=True)
    want = {k: v.copy() for k, v in fresh(x[:8]).items()}
    assert first.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(first[k], want[k])
    a = be.forward({name: x[:8]}, reuse_outputs=True)
    b = be.forward({name: x[8:16]}, reuse_outputs=True)
    assert all(a[k] is b[k] for k in a)  # the same buffers, written in place
    want_b = fresh(x[8:16])
    for k in want_b:
        np.testing.assert_array_equal(b[k], want_b[k])
    kept = fresh(x[:8])  # a plain call's arrays are its own: later reused calls leave them
    c = be.forward({name: x[16:21]}, reuse_outputs=True)  # other batch size: new buffers
    c2 = be.forward({name: x[16:21]}, reuse_outputs=True)
    assert c["logits"].shape[0] == 5
    assert c["logits"] is c2["logits"]
    for k in want:
        np.testing.assert_array_equal(kept[k], want[k])
        np.testing.assert_array_equal(c2[k], fresh(x[16:21])[k])
    store["head.bias"][:] += 1.0  # in-place weight edits are seen through reused outputs too
    np.testing.assert_allclose(be.forward({name: x[16:21]}, reuse_outputs=True)["logits"],
                               fresh(x[16:21])["logits"], atol=0)


def test_chunked_float64_sum_is_bit_identical_to_numpy_sum() -> None:
    from edgelearn.optim import tpsgd

    rng = np.random.default_rng(5)
    for n in (1, 7, 8, 129, 65536, 65537, 200_003, 1_000_000):
        x = (rng.standard_normal(n) * rng.uniform(0.1, 50)).astype(np.float32)
        y = rng.standard_normal(n).astype(np.float32)
        for a, b in ((x, x), (x, y), (x.reshape(-1, 1), y.reshape(-1, 1)), (x[::2], y[::2])):
            want = float(np.sum(np.multiply(a, b, dtype=np.float64)))
            assert tpsgd._sum_products64(a, b) == want, n
