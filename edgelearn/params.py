"""ParamStore: every model parameter in one aligned arena per dtype, exposed as named views.

Optimizers work on flat slices of an arena (the trainable parameters of a dtype are laid out
first and contiguously, so "all trainable fp32 weights" is one 1-D view); backends bind the very
same memory to the runtime, so an in-place numpy edit is what the next forward sees.
Weights are stored on disk as safetensors (JSON header + offsets + raw bytes), read and written
with the `safetensors` library after our own validation of the header.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.errors import BundleError
from edgelearn.osutil import atomic_path, default_file_mode

#: safetensors dtype tag <-> numpy dtype name, for the dtypes an arena may hold.
ST_DTYPES: dict[str, str] = {"F32": "float32", "I8": "int8", "I32": "int32", "U8": "uint8"}
NP_TO_ST: dict[str, str] = {v: k for k, v in ST_DTYPES.items()}
ALIGN_BYTES = 64
MAX_HEADER_BYTES = 64 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-/]*")


def check_name(name: object, what: str = "parameter") -> str:
    """Return `name` if it is a plain tensor name (no path tricks), else raise BundleError."""
    if (
        not isinstance(name, str)
        or len(name) > 512
        or not _NAME_RE.fullmatch(name)
        or ".." in name.split("/")
        or name.startswith("/")
    ):
        raise BundleError(f"invalid {what} name {name!r}")
    return name


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: torch name, shape, numpy dtype name, trainable flag (+ int8 quant info)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    trainable: bool = True
    quant: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.numel * np.dtype(self.dtype).itemsize


def _aligned_empty(n: int, dtype: np.dtype) -> np.ndarray:
    """A zeroed 1-D array of `n` elements whose data starts on an ALIGN_BYTES boundary."""
    nbytes = n * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN_BYTES, dtype=np.uint8)
    off = (-raw.ctypes.data) % ALIGN_BYTES
    return raw[off : off + nbytes].view(dtype)


class ParamStore:
    """All parameters in one arena per dtype; trainable ones first and contiguous.

    Args:
        specs: the parameters, in manifest order (layout order within a dtype: trainable
            parameters in spec order, then frozen ones).
        values: optional initial values by name (copied in; shapes/dtypes must match).
    """

    def __init__(
        self, specs: Sequence[ParamSpec], *, values: Mapping[str, np.ndarray] | None = None
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise BundleError("duplicate parameter names in the parameter list")
        self.specs: dict[str, ParamSpec] = {s.name: s for s in specs}
        self.arenas: dict[str, np.ndarray] = {}
        self._views: dict[str, np.ndarray] = {}
        # (dtype) -> list of (name, start, stop) in arena elements; trainable ones first.
        self._layout: dict[str, list[tuple[str, int, int]]] = {}
        self._n_trainable: dict[str, int] = {}
        for dtype in dict.fromkeys(s.dtype for s in specs):
            if dtype not in NP_TO_ST:
                raise BundleError(f"unsupported parameter dtype {dtype!r}")
            group = [s for s in specs if s.dtype == dtype]
            ordered = [s for s in group if s.trainable] + [s for s in group if not s.trainable]
            total = sum(s.numel for s in ordered)
            arena = _aligned_empty(total, np.dtype(dtype))
            layout, pos = [], 0
            for s in ordered:
                layout.append((s.name, pos, pos + s.numel))
                self._views[s.name] = arena[pos : pos + s.numel].reshape(s.shape)
                pos += s.numel
            self.arenas[dtype] = arena
            self._layout[dtype] = layout
            self._n_trainable[dtype] = sum(s.numel for s in ordered if s.trainable)
        if values is not None:
            self.assign(values)

    # -- access -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Parameter names in spec order."""
        return list(self.specs)

    @property
    def trainable_names(self) -> list[str]:
        """Names of trainable parameters in spec order."""
        return [n for n, s in self.specs.items() if s.trainable]

    def __getitem__(self, name: str) -> np.ndarray:
        """Zero-copy view of one parameter, shaped like the torch tensor."""
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r}") from None

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        """Copy `value` into the parameter's view (never rebinds it: backends keep seeing it).

        Makes `store[name] += delta` work in place; other values need the exact shape/dtype.
        """
        if value is self[name]:
            return  # in-place operator already wrote through the view
        self.assign({name: value})

    def __contains__(self, name: object) -> bool:
        return name in self._views

    def flat(self, dtype: str = "float32", *, trainable: bool | None = True) -> np.ndarray:
        """Contiguous 1-D view of the arena: its trainable prefix (default) or all of it.

        Args:
            dtype: arena dtype name ("float32", "int8").
            trainable: True = trainable prefix, False = frozen suffix, None = whole arena.
        """
        if dtype not in self.arenas:
            return np.zeros(0, dtype=dtype)
        arena, k = self.arenas[dtype], self._n_trainable[dtype]
        if trainable is None:
            return arena
        return arena[:k] if trainable else arena[k:]

    def segments(self, dtype: str = "float32") -> list[tuple[str, int, int]]:
        """(name, start, stop) of each trainable parameter inside `flat(dtype)`."""
        return [seg for seg in self._layout.get(dtype, []) if self.specs[seg[0]].trainable]

    def n_trainable(self, dtype: str = "float32") -> int:
        """Number of trainable elements of `dtype`."""
        return self._n_trainable.get(dtype, 0)

    def assign(self, values: Mapping[str, np.ndarray]) -> None:
        """Copy values into the arena by name (exact shape and dtype required)."""
        for name, v in values.items():
            view = self[name]
            v = np.asarray(v)
            if v.shape != view.shape or v.dtype != view.dtype:
                raise BundleError(
                    f"parameter {name!r}: got {v.dtype}{list(v.shape)}, "
                    f"expected {view.dtype}{list(view.shape)}"
                )
            view[...] = v

    def copy(self) -> ParamStore:
        """An independent store with the same specs and values."""
        return ParamStore(list(self.specs.values()), values=self._views)

    def state(self) -> dict[str, np.ndarray]:
        """Name -> view mapping (zero-copy), in spec order."""
        return {n: self._views[n] for n in self.specs}

    def digest(self) -> str:
        """sha256 over (name, dtype, shape, bytes) of every parameter in name order."""
        h = hashlib.sha256()
        for name in sorted(self.specs):
            v = self._views[name]
            h.update(f"{name}|{v.dtype.str}|{list(v.shape)}\n".encode())
            h.update(memoryview(np.ascontiguousarray(v)).cast("B"))
        return h.hexdigest()

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> Path:
        """Write all parameters to a safetensors file atomically (temp file, fsync, rename).

        Args:
            path: destination file.
            metadata: optional str -> str pairs stored in the safetensors header.
        """
        from safetensors.numpy import save_file  # lazy: device imports stay numpy-only

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(self.state(), str(tmp), metadata=dict(metadata or {}))
            os.chmod(tmp, default_file_mode())  # the writer creates 0600: use the umask's
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Overwrite the arena with the values in a safetensors file (validated first).

        Each tensor's bytes are read straight into its view of the arena: no mapping of the
        file and no tensor copy, so loading peaks at the arena itself (the safetensors
        library's mapped file and per-tensor arrays took about 3x the weights' bytes)."""
        header = read_safetensors_header(path)
        check_against_specs(header, self.specs.values(), path)
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                for name in self.specs:
                    begin, end = header[name]["data_offsets"]
                    view = self._views[name]
                    f.seek(8 + n + begin)
                    if f.readinto(memoryview(view).cast("B")) != end - begin:
                        raise BundleError(f"{path}: cannot read weights: {name!r} is cut short")
                    if sys.byteorder == "big":  # safetensors holds little-endian bytes
                        view.byteswap(inplace=True)
        except OSError as e:
            raise BundleError(f"{path}: cannot read weights: {e.strerror or e}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, specs: Sequence[ParamSpec]) -> ParamStore:
        """A new store with `specs` and values read from a safetensors file."""
        store = cls(specs)
        store.load(path)
        return store


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Parse and validate a safetensors header without reading tensor data.

    Checks: header length inside the file and bounded, JSON object, plain names, known dtypes,
    shapes of non-negative ints, offsets inside the data section, sizes == shape x itemsize,
    no overlapping tensors. Returns name -> {"dtype", "shape", "data_offsets"} (no metadata).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BundleError(f"{path.name}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise BundleError(
                    f"{path.name}: safetensors header length {n} does not fit a "
                    f"{size}-byte file"
                )
            raw = f.read(n)
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path.name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path.name}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    out: dict[str, dict[str, Any]] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        check_name(name, "tensor")
        if not isinstance(info, dict):
            raise BundleError(f"{path.name}: tensor {name!r} entry is not an object")
        dtype = ST_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise BundleError(f"{path.name}: tensor {name!r} has unsupported dtype "
                              f"{info.get('dtype')!r}")
        shape, offs = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise BundleError(f"{path.name}: tensor {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
            and 0 <= offs[0] <= offs[1] <= data_size
        ):
            raise BundleError(
                f"{path.name}: tensor {name!r} offsets {offs!r} lie outside the "
                f"{data_size}-byte data section"
            )
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offs[1] - offs[0] != expected:
            raise BundleError(
                f"{path.name}: tensor {name!r} spans {offs[1] - offs[0]} bytes, its shape "
                f"{shape} x {dtype} needs {expected}"
            )
        spans.append((offs[0], offs[1], name))
        out[name] = {"dtype": dtype, "shape": tuple(shape), "data_offsets": tuple(offs)}
    spans.sort()
    for (_, e0, a), (s1, _, b) in itertools.pairwise(spans):
        if s1 < e0:
            raise BundleError(f"{path.name}: tensors {a!r} and {b!r} overlap")
    return out


def check_against_specs(
    header: Mapping[str, Mapping[str, Any]], specs: Iterable[ParamSpec], path: object
) -> None:
    """Raise BundleError unless the file holds exactly `specs` (names, shapes, dtypes)."""
    specs = list(specs)
    want = {s.name for s in specs}
    missing = sorted(want - set(header))
    extra = sorted(set(header) - want)
    if missing:
        raise BundleError(f"{Path(str(path)).name}: missing tensors {missing[:5]}")
    if extra:
        raise BundleError(f"{Path(str(path)).name}: unexpected tensors {extra[:5]}")
    for s in specs:
        h = header[s.name]
        if tuple(h["shape"]) != tuple(s.shape) or h["dtype"] != s.dtype:
            raise BundleError(
                f"{Path(str(path)).name}: tensor {s.name!r} is {h['dtype']}{list(h['shape'])}, "
                f"the manifest says {s.dtype}{list(s.shape)}"
            )
