"""cross_entropy keeps its values: journals of earlier runs hold them (replay compares ==)."""

from __future__ import annotations

import numpy as np

from edgelearn.losses import cross_entropy, cross_entropy_rows


def textbook_cross_entropy(out: np.ndarray, y: np.ndarray) -> float:
    """The formula as first written: float64, max shift, log-sum-exp, np.mean."""
    z = out.astype(np.float64, copy=False)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def test_cross_entropy_equals_the_textbook_formula_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        b, c = int(rng.integers(1, 80)), int(rng.integers(2, 30))
        dtype = np.float32 if rng.integers(0, 2) else np.float64
        out = (rng.standard_normal((b, c)) * rng.choice([0.01, 1.0, 30.0, 1e3])).astype(dtype)
        y = rng.integers(0, c, b)
        assert cross_entropy(out, y) == textbook_cross_entropy(out, y)
        rows = cross_entropy_rows(np.stack([out, out[::-1]]), y)
        assert rows == [cross_entropy(out, y), cross_entropy(out[::-1], y)]


def test_cross_entropy_does_not_modify_its_input() -> None:
    out = np.linspace(-3, 3, 40, dtype=np.float64).reshape(4, 10)
    before = out.copy()
    cross_entropy(out, np.array([0, 3, 9, 1]))
    cross_entropy_rows(out[None], np.array([0, 3, 9, 1]))
    assert np.array_equal(out, before)
