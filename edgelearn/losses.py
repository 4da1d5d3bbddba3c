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


def cross_entropy_rows(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`cross_entropy` of every candidate at once: the same float operations per row.

    Args:
        out: logits, float [K, batch, classes] (K candidates' outputs on one batch).
        y: int labels [batch].
    Returns: float64 [K].
    """
    z = out.astype(np.float64, copy=False)
    z = z - z.max(axis=2, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=2))
    return np.mean(lse - z[:, np.arange(len(y)), y], axis=1)


def mse_rows(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`mse` of every candidate at once (out [K, batch, ...], y broadcastable to out[0])."""
    d = out.astype(np.float64, copy=False) - np.asarray(y, dtype=np.float64).reshape(
        out.shape[1:])
    return np.mean((d * d).reshape(len(out), -1), axis=1)


#: loss -> its row-wise form over K candidates' outputs (same values as the loss of each row)
ROW_LOSSES: dict[Callable[[np.ndarray, np.ndarray], float],
                 Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    cross_entropy: cross_entropy_rows, mse: mse_rows}


def row_losses(loss_fn: Callable[[np.ndarray, np.ndarray], float], out: np.ndarray,
               y: np.ndarray) -> list[float]:
    """[loss_fn(out[k], y) for every k], in one vectorized call when the loss has a row form.

    Args:
        out: model outputs of K candidates, [K, batch, ...].
        y: the batch's targets.
    """
    rows = ROW_LOSSES.get(loss_fn)
    if rows is None or len(out) == 0:
        return [loss_fn(o, y) for o in out]
    return [float(v) for v in rows(out, y)]


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
