"""Objectives in numpy: cross-entropy, BCE, MSE, accuracy (non-differentiable ones welcome).

Objectives are a registry (`LOSSES`); each has the accuracy that goes with it (`ACCURACIES`):
argmax for logits, a 0.5 threshold for `bce` on a single sigmoid probability.

Each takes the model output `out` (float32 [batch, ...]) and targets `y`, returns a Python float
(mean over the batch; losses are accumulated in float64 so the scalar does not depend on
summation order beyond numpy's own pairwise sum).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgelearn.errors import InputError


def cross_entropy(out: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy.

    Computed as max-shifted log-sum-exp minus the label's logit, in float64, reduced with
    numpy's own reductions (the batch mean is sum / batch, what np.mean computes), in place
    in one buffer: `cross_entropy_rows` runs the very same operations on each row. The max
    is taken on the float32 logits (the float64 cast is exact and monotone: the same value)
    and the shift casts as it subtracts (one call, the same float64 differences).

    Args:
        out: logits, float [batch, classes].
        y: int labels [batch] in [0, classes).
    """
    # a fresh float64 buffer: the steps below run in place
    z = np.subtract(out, np.maximum.reduce(out, axis=1, keepdims=True), dtype=np.float64)
    picked = z[_arange(len(y)), y]
    lse = np.add.reduce(np.exp(z, out=z), axis=1)
    np.log(lse, out=lse)
    np.subtract(lse, picked, out=lse)
    return float(np.add.reduce(lse) / len(lse))


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


def _probabilities(out: np.ndarray, n: int) -> np.ndarray:
    """The single probability per example of a sigmoid output [n] or [n, 1] (float64)."""
    p = out.astype(np.float64, copy=False).reshape(n, -1)
    if p.shape[1] != 1:
        raise InputError(f"bce needs one probability per example (output [batch] or "
                         f"[batch, 1]), got output {list(out.shape)}")
    return p[:, 0]


def binary_cross_entropy(out: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (a sigmoid output, not logits).

    Args:
        out: probabilities in [0, 1], float [batch] or [batch, 1]; clipped to [1e-7, 1-1e-7]
            so a saturated sigmoid gives a large finite loss.
        y: 0/1 labels (int) or target probabilities (float), [batch].
    """
    t = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.clip(_probabilities(out, len(t)), BCE_EPS, 1.0 - BCE_EPS)
    return float(np.mean(-(t * np.log(p) + (1.0 - t) * np.log1p(-p))))


def binary_accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Accuracy in [0, 1] of a probability output thresholded at 0.5 vs 0/1 labels [batch]."""
    t = np.asarray(y).reshape(-1) >= 0.5
    return float(np.mean((_probabilities(out, len(t)) >= 0.5) == t))


def error_rate(out: np.ndarray, y: np.ndarray) -> float:
    """1 - accuracy: a non-differentiable loss that zeroth-order optimizers can minimize."""
    return 1.0 - accuracy(out, y)


def cross_entropy_rows(out: np.ndarray, y: np.ndarray) -> list[float]:
    """`cross_entropy` of every candidate at once: the same float operations per row.

    The same operations as `cross_entropy`, on a [K, batch, classes] buffer; the means are
    taken on Python floats (sum / batch: the float64 division numpy does, one call fewer).

    Args:
        out: logits, float [K, batch, classes] (K candidates' outputs on one batch).
        y: int labels [batch].
    Returns: K floats.
    """
    # a fresh float64 buffer: the steps below run in place
    z = np.subtract(out, np.maximum.reduce(out, axis=2, keepdims=True), dtype=np.float64)
    b = z.shape[1]
    picked = z[:, _arange(len(y)), y]
    lse = np.add.reduce(np.exp(z, out=z), axis=2)
    np.log(lse, out=lse)
    np.subtract(lse, picked, out=lse)
    return [s / b for s in np.add.reduce(lse, axis=1).tolist()]


@functools.lru_cache(maxsize=16)
def _arange(n: int) -> np.ndarray:
    """np.arange(n), read-only, kept per n (a batch's row indices, asked every step)."""
    a = np.arange(n)
    a.setflags(write=False)
    return a


def mse_rows(out: np.ndarray, y: np.ndarray) -> list[float]:
    """`mse` of every candidate at once (out [K, batch, ...], y broadcastable to out[0])."""
    d = out.astype(np.float64, copy=False) - np.asarray(y, dtype=np.float64).reshape(
        out.shape[1:])
    return np.mean((d * d).reshape(len(out), -1), axis=1).tolist()


#: loss -> its row-wise form over K candidates' outputs: the K losses as Python floats (the
#: same values as the loss of each row)
ROW_LOSSES: dict[Callable[[np.ndarray, np.ndarray], float],
                 Callable[[np.ndarray, np.ndarray], list[float]]] = {
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
    return rows(out, y)


LOSSES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "cross-entropy": cross_entropy,
    "mse": mse,
    "error-rate": error_rate,
    "bce": binary_cross_entropy,
}
#: objective -> the accuracy reported with it (objectives absent here report argmax accuracy)
ACCURACIES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"bce": binary_accuracy}
BCE_EPS = 1e-7


def get_loss(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """Loss function by name ("cross-entropy", "mse", "error-rate", "bce")."""
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(f"unknown objective {name!r}; choose one of {sorted(LOSSES)}") from None


def get_accuracy(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The accuracy that goes with objective `name` (argmax unless the objective has its own)."""
    return ACCURACIES.get(name, accuracy)


def default_loss(task: str, outputs: Sequence[Any] = ()) -> str:
    """Objective name for a bundle task: classification -> cross-entropy (bce when the first
    output has one value per example: a sigmoid probability), else mse.

    Args:
        task: the bundle's task. outputs: the bundle's output specs (`bundle.outputs`).
    """
    if task != "classification":
        return "mse"
    shape = tuple(outputs[0].shape) if outputs else ()
    return "bce" if len(shape) in (1, 2) and shape[1:] in ((), (1,)) else "cross-entropy"
