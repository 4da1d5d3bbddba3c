"""Data files: `.npz` with `x` (float32, model input layout) and `y` (int labels or floats).

A model with several inputs reads one array per input, named after it (labels stay `y`);
integer inputs keep their integer dtype; see `edgelearn.inputs` for constants (e.g. a
recurrent state given once for every example).

Data files are untrusted. They are read without numpy's pickle path at all: the zip members
`x.npy` / `y.npy` are opened with zipfile, each .npy header is parsed and checked (plain numeric
dtype, declared size == stored size, size under `max_bytes`) before a byte of data is read, so a
pickle, an object array, a shape that lies or a zip bomb declaring terabytes fails with a
one-line message, and memory stays bounded by what the file really holds. Then keys, dtypes,
lengths and finite values are validated before any training starts.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn.errors import InputError
from edgelearn.inputs import Inputs, bind, n_rows, take

MAX_DATA_BYTES = 2 << 30  # per array; pass max_bytes= to load larger files
#: per-epoch permutations kept in memory (`batch_indices`); `budget.run_memory_bytes` counts them
PERMUTATIONS_CACHED = 4
_DATA_DOMAIN = 0xDA7A  # separates data-order draws from noise draws of the same seed
_NPY_KINDS = "biuf"  # bool, ints, floats: nothing that can hold Python objects


@dataclass(frozen=True)
class Dataset:
    """In-memory examples: x float32 [n, ...], y int64 [n] (classification) or float32.

    Args:
        x: the model input [n, ...], or for a multi-input model a dict input name -> [n, ...]
            (integer inputs keep their dtype).
        y: labels / targets [n, ...].
        constants: inputs with no batch axis, fed as they are to every batch.
    """

    x: Inputs
    y: np.ndarray
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return n_rows(self.x)

    def _rows(self, idx: Any) -> Inputs:
        x = take(self.x, idx)
        return {**x, **self.constants} if self.constants else x

    def batch_at(self, step: int, batch_size: int, seed: int) -> tuple[Inputs, np.ndarray]:
        """The (x, y) batch `Session.run` feeds at `step` (`batch_indices` order).

        Args:
            step: 0-based step. batch_size: examples per batch. seed: the run seed.
        """
        return self.rows_at(batch_indices(len(self), batch_size, step, seed))

    def rows_at(self, idx: np.ndarray) -> tuple[Inputs, np.ndarray]:
        """The (x, y) of examples `idx` (int [b], batch order)."""
        return self._rows(idx), self.y[idx]

    def batches(self, batch_size: int) -> Iterator[tuple[Inputs, np.ndarray]]:
        """Consecutive batches in file order (last one may be short)."""
        for i in range(0, len(self), batch_size):
            yield self._rows(slice(i, i + batch_size)), self.y[i : i + batch_size]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Example indices of the batch used at `step`: seeded per-epoch permutations.

    Args:
        n: dataset size.
        batch_size: examples per batch (capped at n); the epoch's tail is dropped.
        step: 0-based step.
        seed: data-order seed.
    Returns: int64 indices [min(batch_size, n)].
    """
    bs = min(batch_size, n)
    per_epoch = n // bs
    epoch, i = divmod(step, per_epoch)
    return _epoch_permutation(n, seed, epoch)[i * bs : (i + 1) * bs].copy()


@functools.lru_cache(maxsize=PERMUTATIONS_CACHED)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # cached: drawing a permutation of n per step cost more than a small model's forward
    ss = np.random.SeedSequence([seed, _DATA_DOMAIN, epoch])
    return np.random.Generator(np.random.Philox(ss)).permutation(n)


def arrays_sha256(*arrays: np.ndarray | Mapping[str, np.ndarray]) -> str:
    """sha256 over arrays' dtype, shape and bytes (pins the exact data a step or a run used).

    Args:
        arrays: e.g. (x, y) of a batch or of a whole data set; a dict (multi-input x) counts
            its arrays in name order, each after its name.
    """
    h = hashlib.sha256()
    flat: list[Any] = []
    for a in arrays:
        if isinstance(a, Mapping):
            for k in sorted(a):
                flat += [np.frombuffer(k.encode(), np.uint8), a[k]]
        else:
            flat.append(a)
    for a in flat:
        a = np.asarray(a)
        h.update(f"{_dtype_name(a.dtype)}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)  # the buffer itself: no copy
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    """str(dtype), cached: numpy builds it in Python, a step's largest bookkeeping cost."""
    return str(dtype)


def data_sha256(data: Dataset) -> str:
    """sha256 of a data set's x and y (pins the data of runs whose replay needs it)."""
    if data.constants:
        return arrays_sha256(data.x, data.y, dict(data.constants))
    return arrays_sha256(data.x, data.y)


# -- batch identity: per-example digests -------------------------------------------------------
# A step's journaled `batch_digest` is sha256 over the batch's arrays without a batch axis and
# the per-example digests in batch order; an example's digest is sha256 over its rows of every
# input (by name) and of the target, each after its dtype and row shape. The digests of a data
# set's examples are computed once per run (`ExampleDigests`), so a step costs one sha256 of
# 32 bytes per example instead of one over the whole batch; a live batch (`Session.step`) is
# digested the same way (`batch_digest`), so the field has one meaning.

#: bytes per data-set example a run keeps for its batch digests (a sha256 and a "done" flag)
EXAMPLE_DIGEST_BYTES = 33
_BATCH_DOMAIN = b"edgelearn batch_digest v1\0"
_Named = tuple[bytes, str, np.ndarray]  # (tag, name, array)


def _head(tag: bytes, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """What precedes an array's bytes: tag, length-prefixed name, dtype and shape."""
    return tag + f"{len(name)}:{name}|{dtype.str}{tuple(shape)}|".encode()


def _split_batch(x: Inputs, y: np.ndarray) -> tuple[list[_Named], list[_Named]]:
    """(per-example arrays, arrays without a batch axis) of a batch: an input is per-example
    when its first dimension is the batch's length (that of y)."""
    y = np.asarray(y)
    n = len(y) if y.ndim else 0
    items = sorted(x.items()) if isinstance(x, Mapping) else [("", x)]
    per: list[_Named] = []
    wide: list[_Named] = []
    for name, a in items:
        a = np.asarray(a)
        (per if a.ndim >= 1 and a.shape[0] == n else wide).append((b"x", name, a))
    return [*per, (b"y", "", y)], wide


def _row_digests(arrays: Sequence[_Named], rows: Iterator[int] | Sequence[int]) -> list[bytes]:
    """The sha256 (32 bytes) of each example `rows` of the per-example `arrays`."""
    heads = [_head(tag, name, a.dtype, a.shape[1:]) for tag, name, a in arrays]
    out = []
    for i in rows:
        h = hashlib.sha256()
        for head, (_, _, a) in zip(heads, arrays, strict=True):
            h.update(head)
            h.update(np.ascontiguousarray(a[i : i + 1]).data)  # the row's bytes, no copy
        out.append(h.digest())
    return out


def _wide_hasher(wide: Sequence[_Named]) -> Any:
    """sha256 state after the domain and the batch's arrays without a batch axis."""
    h = hashlib.sha256(_BATCH_DOMAIN + f"{len(wide)}|".encode())
    for _, name, a in wide:
        h.update(_head(b"c", name, a.dtype, a.shape))
        h.update(np.ascontiguousarray(a).data)
    return h


def _finish(h: Any, n: int, digests: bytes) -> str:
    h.update(f"{n} examples|".encode())
    h.update(digests)
    return h.hexdigest()


def example_digests(x: Inputs, y: np.ndarray) -> np.ndarray:
    """Per-example digests of a batch: uint8 [n, 32] (see `batch_digest`).

    Args:
        x: the batch's input [n, ...] or dict input name -> array (arrays without a batch
            axis are not per-example). y: its targets [n, ...].
    """
    per, _ = _split_batch(x, y)
    n = len(per[-1][2])
    return np.frombuffer(b"".join(_row_digests(per, range(n))), np.uint8).reshape(n, 32)


def batch_digest(x: Inputs, y: np.ndarray) -> str:
    """The journaled identity of a step's batch: sha256 (hex) over its arrays without a batch
    axis, then its per-example digests in batch order.

    Args:
        x: the batch's input [n, ...] or dict input name -> array. y: its targets [n, ...].
    """
    per, wide = _split_batch(x, y)
    n = len(per[-1][2])
    return _finish(_wide_hasher(wide), n, b"".join(_row_digests(per, range(n))))


class ExampleDigests:
    """The per-example digests of a data set, each computed the first time its example is
    fed and kept for the run (`EXAMPLE_DIGEST_BYTES` per example): a batch's digest is then
    one sha256 over 32 bytes per example, equal to `batch_digest` of the batch's rows.

    Args:
        data: the data set (must not change while the run uses it: a digest is of the
            example as it was first fed).
    """

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.per, _ = _split_batch(data.x, data.y)
        self.constants = sorted(data.constants.items())
        self.digests = np.zeros((len(data), 32), np.uint8)
        self.done = np.zeros(len(data), bool)
        self._wide = _wide_hasher([(b"x", k, np.asarray(a)) for k, a in self.constants])
        #: batch lengths at which a constant reads as per-example (`_split_batch`)
        self._ambiguous = {np.shape(a)[0] for _, a in self.constants if np.ndim(a) >= 1}

    def batch_digest(self, idx: np.ndarray) -> str:
        """`batch_digest` of the data set's examples `idx` (int [n], batch order)."""
        n = len(idx)
        if n in self._ambiguous:
            # a constant as long as the batch reads as per-example: digest the rows as such
            return batch_digest(self.data._rows(idx), self.data.y[idx])
        new = ~self.done[idx]
        if new.any():  # examples fed for the first time in this run
            todo = np.unique(idx[new])
            self.digests[todo] = np.frombuffer(b"".join(_row_digests(self.per, todo.tolist())),
                                               np.uint8).reshape(-1, 32)
            self.done[todo] = True
        return _finish(self._wide.copy(), n, self.digests[idx].tobytes())


def _read_npy_member(zf: zipfile.ZipFile, key: str, name: str, max_bytes: int) -> np.ndarray:
    """Read array `key` of an .npz after validating its header against the stored size."""
    fmt = np.lib.format
    info = zf.getinfo(f"{key}.npy")
    if info.file_size > max_bytes + 65536:
        raise InputError(f"{name}: {key} is {info.file_size} bytes uncompressed, over the "
                         f"{max_bytes}-byte limit")
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise InputError(f"{name}: {key} uses .npy format version {version}, not 1.0/2.0")
        if dtype.hasobject or dtype.kind not in _NPY_KINDS or dtype.fields is not None:
            raise InputError(f"{name}: {key} has dtype {dtype}; data files hold plain numbers")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if nbytes > max_bytes:
            raise InputError(f"{name}: {key} declares shape {list(shape)} ({nbytes} bytes), "
                             f"over the {max_bytes}-byte limit")
        if f.tell() + nbytes != info.file_size:
            raise InputError(f"{name}: {key} declares shape {list(shape)} x {dtype} but holds "
                             f"{info.file_size - f.tell()} data bytes")
        buf = bytearray(nbytes)
        if f.readinto(buf) != nbytes:
            raise InputError(f"{name}: {key} is truncated")
    return np.frombuffer(buf, dtype).reshape(shape, order="F" if fortran else "C")


def load_npz(
    path: str | os.PathLike, *, task: str = "classification", max_bytes: int = MAX_DATA_BYTES,
    inputs: Sequence[Any] | None = None,
) -> Dataset:
    """Load and validate a data file.

    Args:
        path: `.npz` file holding arrays `x` and `y`, or for a model with several inputs one
            array per input, named after it, and `y`.
        task: "classification" (y must be integers) or "regression" (y floats).
        max_bytes: largest array (uncompressed bytes) accepted; bounds memory on hostile files.
        inputs: the model's input specs (`bundle.inputs`): arrays are read, typed and checked
            against them (None: `x` if the file has one, else every array but `y`, those of
            length n per example).
    """
    name = os.fspath(path)  # as the user gave it: a base name alone can be ambiguous
    single = inputs is not None and len(inputs) == 1
    try:
        with zipfile.ZipFile(path) as zf:
            keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            want = _wanted_keys(keys, inputs, name)
            arrays = {k: _read_npy_member(zf, k, name, max_bytes) for k in [*want, "y"]}
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{name}: no such data file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not a data file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError,
            KeyError) as e:
        raise InputError(f"{name}: not a readable .npz data file ({e})") from None
    y = arrays.pop("y")
    if "x" in arrays and (inputs is None or (single and np.dtype(inputs[0].dtype).kind == "f")):
        x = _float_x(arrays["x"], name)
        return Dataset(x, _labels(y, len(x), task, name))
    if single and "x" in arrays:  # a single integer input (token ids) given as `x`
        arrays = {inputs[0].name: arrays["x"]}
    n = len(y) if y.ndim else 0
    if inputs is None:
        per = {k: a for k, a in arrays.items() if a.ndim >= 1 and len(a) == n}
        const = {k: a for k, a in arrays.items() if k not in per}
    else:
        per, const = bind(inputs, arrays, n, name)
    if not per:
        raise InputError(f"{name}: no array has one row per label ({n} labels)")
    x_in: Inputs = per[inputs[0].name] if single and not const else per
    return Dataset(x_in, _labels(y, n, task, name), const)


def _wanted_keys(keys: set[str], inputs: Sequence[Any] | None, name: str) -> list[str]:
    """The arrays of the file that feed the model (InputError naming what is missing)."""
    if inputs is None or len(inputs) == 1:
        xkey = next((k for k in ("x", *(s.name for s in inputs or ())) if k in keys), None)
        missing = [k for k, ok in (("x", xkey is not None), ("y", "y" in keys)) if not ok]
        if inputs is None and missing == ["x"] and len(keys) > 1:
            return sorted(keys - {"y"})  # a multi-input file read without the model's inputs
        if missing:
            named = f" (or {inputs[0].name!r}, the model input's name)" if inputs else ""
            raise InputError(f"{name}: data file has no {missing} array{named} (found "
                             f"{sorted(keys)})")
        return [xkey]
    if "y" not in keys:
        raise InputError(f"{name}: data file has no ['y'] array (found {sorted(keys)})")
    missing = [s.name for s in inputs if s.name not in keys]
    if missing:
        from edgelearn.inputs import describe

        raise InputError(f"{name}: no array for model input(s) {missing}; the model wants "
                         f"{describe(inputs)} (found {sorted(keys)})")
    return [s.name for s in inputs]


def _float_x(x: np.ndarray, name: str) -> np.ndarray:
    """The single float input `x`, checked (float, non-empty, finite) as float32."""
    if x.dtype.kind != "f" or x.dtype.itemsize > 8:
        raise InputError(f"{name}: x has dtype {x.dtype}, expected float32")
    with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
        x = x.astype(np.float32, copy=False)
    if x.ndim < 1 or len(x) == 0:
        raise InputError(f"{name}: x is empty")
    if not np.isfinite(x).all():
        raise InputError(f"{name}: x contains NaN or inf")
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, n: int, task: str, name: str) -> np.ndarray:
    """The labels / targets of `n` examples, checked for the task."""
    if y.ndim < 1 or len(y) != n:
        raise InputError(f"{name}: x has {n} examples but y has {y.shape[:1]}")
    if n == 0:
        raise InputError(f"{name}: x is empty")
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
    return np.ascontiguousarray(y)


#: the public name of `load_npz` (`edgelearn.load_data`)
load_data = load_npz
