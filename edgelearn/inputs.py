"""Model inputs of a data set or a batch: one array per model input, named after it.

A single-input model is fed one array (`x`). A model with several inputs (a text encoder's
token ids and attention mask, a recurrent model's state) is fed a dict input name -> array.
Each array is either

- per example: [n, ...], sliced with the batch (`take`), or
- a constant: one example's array (the input's shape without its batch axis), the same for
  every example (e.g. a recurrent model's initial state); it is broadcast over the examples
  (a zero-copy view) so it slices like the others. An input with no batch axis (its first
  dimension fixed at a size other than 1) takes its declared shape as is, fed to every batch.

Dtypes follow the model: integer inputs (token ids, masks, lengths) stay integers (int data is
cast to the declared integer width only when every value fits; floats are never cast to ints),
float inputs become the declared float type (int or bool data such as 0/1 masks included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from edgelearn.errors import InputError

#: a batch's model inputs: one array (single-input models) or input name -> array
Inputs = Union[np.ndarray, Mapping[str, np.ndarray]]  # noqa: UP007 (runtime alias)


def n_rows(x: Inputs) -> int:
    """Examples in `x` (the first per-example array's length)."""
    if isinstance(x, np.ndarray):
        return len(x)
    return len(next(iter(x.values()))) if x else 0


def take(x: Inputs, idx: Any) -> Inputs:
    """The rows `idx` (indices or a slice) of every per-example array of `x`."""
    if isinstance(x, np.ndarray):
        return x[idx]
    return {k: v[idx] for k, v in x.items()}


def has_batch_axis(spec: Any) -> bool:
    """True when the input's first dimension is the batch (symbolic, or fixed at 1)."""
    return bool(spec.shape) and (isinstance(spec.shape[0], str) or spec.shape[0] == 1)


def describe(specs: Sequence[Any]) -> str:
    """What a model wants, for messages: `ids int64[batch, 8], mask int64[batch, 8]`."""
    return ", ".join(f"{s.name} {s.dtype}[{', '.join(str(d) for d in s.shape)}]"
                     for s in specs)


def convert(spec: Any, arr: np.ndarray, where: str) -> np.ndarray:
    """`arr` as the input's dtype: ints stay ints (range-checked), ints/bools -> floats ok.

    Args:
        spec: the model input (TensorSpec). arr: the data. where: prefix of error messages.
    """
    arr = np.asarray(arr)
    want = np.dtype(spec.dtype)
    if arr.dtype == want:
        return arr
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where}: input {spec.name!r} must hold numbers, got {arr.dtype}")
    if want.kind in "iu":
        if arr.dtype.kind == "f":
            raise InputError(f"{where}: input {spec.name!r} has dtype {arr.dtype} but the model "
                             f"wants {want} (integer inputs are not cast from floats)")
        info = np.iinfo(want)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise InputError(f"{where}: input {spec.name!r} holds values outside {want}")
    elif want.kind == "b" and arr.dtype.kind == "f":
        raise InputError(f"{where}: input {spec.name!r} is bool in the model, got {arr.dtype}")
    with np.errstate(over="ignore"):  # out-of-range floats become inf, refused by the caller
        return arr.astype(want)


def _fits(spec_dims: Sequence[Any], shape: Sequence[int]) -> bool:
    return len(spec_dims) == len(shape) and all(
        isinstance(d, str) or d == v for d, v in zip(spec_dims, shape, strict=True))


def shape_error(spec: Any, shape: Sequence[int], where: str, what: str = "") -> InputError:
    """The one-line error of a mis-shaped input array."""
    want = "[" + ", ".join(str(d) for d in spec.shape) + "]"
    return InputError(f"{where}: input {spec.name!r}{what} has shape {list(shape)}, the model "
                      f"wants {want}")


def place(spec: Any, arr: np.ndarray, n: int, where: str) -> tuple[np.ndarray, bool]:
    """Classify one input's array of a data set with `n` examples.

    Returns (array, per_example): per-example arrays are [n, ...] (constants with a batch axis
    become a broadcast view of that shape); False: a constant fed as is to every batch.
    Raises InputError naming the input when the shape fits neither.
    """
    rank = len(spec.shape)
    if has_batch_axis(spec):
        if arr.ndim == rank and len(arr) == n and _fits(spec.shape[1:], arr.shape[1:]):
            return arr, True
        if arr.ndim == rank - 1 and _fits(spec.shape[1:], arr.shape):  # one example's value
            return np.broadcast_to(arr, (n, *arr.shape)), True
        raise shape_error(spec, arr.shape, where,
                          f" (for {n} examples: [{n}, ...] or one example's array)")
    if _fits(spec.shape, arr.shape):
        return arr, False
    raise shape_error(spec, arr.shape, where)


def bind(specs: Sequence[Any], arrays: Mapping[str, np.ndarray], n: int, where: str
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Map named arrays onto the model's inputs: (per-example arrays, constants).

    Args:
        specs: the model's inputs. arrays: name -> array (extra names are ignored).
        n: examples in the data set. where: prefix of error messages (the file).
    Raises: InputError naming a missing or mis-shaped input and listing what the model wants.
    """
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InputError(f"{where}: no array for model input(s) {missing}; the model wants "
                         f"{describe(specs)} (found {sorted(arrays)})")
    per, const = {}, {}
    for s in specs:
        a, per_example = place(s, convert(s, arrays[s.name], where), n, where)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise InputError(f"{where}: input {s.name!r} contains NaN or inf")
        (per if per_example else const)[s.name] = a
    if not per:
        raise InputError(f"{where}: no input of the model varies per example "
                         f"(the model wants {describe(specs)})")
    return per, const


def feeds(specs: Sequence[Any], x: Inputs) -> dict[str, np.ndarray]:
    """The runtime feed of a batch: input name -> C-contiguous array of the declared dtype."""
    if isinstance(x, np.ndarray):
        if len(specs) != 1:
            raise InputError(f"this model has {len(specs)} inputs; pass a dict name -> array "
                             f"({describe(specs)})")
        x = {specs[0].name: x}
    out = {}
    for s in specs:
        if s.name not in x:
            raise InputError(f"no array for model input {s.name!r}; the model wants "
                             f"{describe(specs)} (got {sorted(x)})")
        # asarray, not ascontiguousarray: that one turns a 0-d input (a sample rate) 1-d
        out[s.name] = np.asarray(convert(s, x[s.name], "batch"), order="C")
    return out
