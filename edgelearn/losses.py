"""Objectives in numpy: cross-entropy, MSE, accuracy (non-differentiable objectives welcome).

Each takes the model output `out` (float32 [batch, ...]) and targets `y`, returns a Python float
(mean over the batch; losses are accumulated in float64 so the scalar does not depend on
summation order beyond numpy's own pairwise sum).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgelearn.errors import InputError


def cross_entropy(out: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy.

    Args:
        out: logits, float [batch, classes].
        y: int labels [batch] in [0, classes).
    """
    z = out.astype(np.float64, copy=False)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def mse(out: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error over all elements.

    Args:
        out: predictions, float [batch, ...].
        y: targets broadcastable to `out`.
    """
    d = out.astype(np.float64, copy=False) - np.asarray(y, dtype=np.float64).reshape(out.shape)
    return float(np.mean(d * d))


def accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1] (argmax of logits [batch, classes] vs labels [batch])."""
    return float(np.mean(np.argmax(out, axis=1) == y))


def error_rate(out: np.ndarray, y: np.ndarray) -> float:
    """1 - accuracy: a non-differentiable loss that zeroth-order optimizers can minimize."""
    return 1.0 - accuracy(out, y)


LOSSES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "cross-entropy": cross_entropy,
    "mse": mse,
    "error-rate": error_rate,
}


def get_loss(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """Loss function by name ("cross-entropy", "mse", "error-rate")."""
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(f"unknown objective {name!r}; choose one of {sorted(LOSSES)}") from None


def default_loss(task: str) -> str:
    """Objective name for a bundle task ("classification" -> cross-entropy, else mse)."""
    return "cross-entropy" if task == "classification" else "mse"
