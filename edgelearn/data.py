"""Data files: `.npz` with `x` (float32, model input layout) and `y` (int labels or floats).

Loaded with allow_pickle=False and validated (keys, dtypes, lengths, finite values) so a bad
file fails with a one-line message naming the problem, before any training starts.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgelearn.errors import InputError


@dataclass(frozen=True)
class Dataset:
    """In-memory examples: x float32 [n, ...], y int64 [n] (classification) or float32."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive batches in file order (last one may be short)."""
        for i in range(0, len(self.x), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]


def load_npz(path: str | os.PathLike, *, task: str = "classification") -> Dataset:
    """Load and validate a data file.

    Args:
        path: `.npz` file holding arrays `x` and `y`.
        task: "classification" (y must be integers) or "regression" (y floats).
    """
    name = os.path.basename(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = {"x", "y"} - keys
            if missing:
                raise InputError(f"{name}: data file has no {sorted(missing)} array "
                                 f"(found {sorted(keys)})")
            x, y = f["x"], f["y"]
    except FileNotFoundError:
        raise InputError(f"{name}: no such data file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{name}: not a readable .npz data file ({e})") from None
    if x.dtype.kind != "f":
        raise InputError(f"{name}: x has dtype {x.dtype}, expected float32")
    x = x.astype(np.float32, copy=False)
    if x.ndim < 1 or len(x) == 0:
        raise InputError(f"{name}: x is empty")
    if y.ndim < 1 or len(y) != len(x):
        raise InputError(f"{name}: x has {len(x)} examples but y has {y.shape[:1]}")
    if task == "classification":
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise InputError(
                f"{name}: y must be integer class labels [n], got {y.dtype}{list(y.shape)}"
            )
        y = y.astype(np.int64, copy=False)
        if y.min() < 0:
            raise InputError(f"{name}: y has negative labels")
    else:
        if y.dtype.kind != "f":
            raise InputError(f"{name}: y must be float targets, got {y.dtype}")
        y = y.astype(np.float32, copy=False)
        if not np.isfinite(y).all():
            raise InputError(f"{name}: y contains NaN or inf")
    if not np.isfinite(x).all():
        raise InputError(f"{name}: x contains NaN or inf")
    return Dataset(np.ascontiguousarray(x), np.ascontiguousarray(y))
