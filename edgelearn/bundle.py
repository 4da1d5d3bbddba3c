"""Bundle: a directory with manifest.json, weights.safetensors and the model graphs.

Everything in a bundle is untrusted: the manifest is size-bounded and schema-checked, every
file it names must be a plain file name that resolves inside the bundle directory (no `..`,
no symlink leaving it), its size and sha256 must match, and the weight file header must agree
with the parameter list before a single tensor byte is read. Nothing is ever unpickled.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.errors import BundleError, InputError
from edgelearn.params import (
    NP_TO_ST,
    ParamSpec,
    ParamStore,
    check_against_specs,
    check_name,
    read_safetensors_header,
)

FORMAT = "edgelearn.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_PARAM_ELEMENTS = 1 << 33
TASKS = ("classification", "regression")
IO_DTYPES = ("float32", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (ints; str = symbolic dim such as "batch"), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """Manifest form."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def check(self, value: np.ndarray) -> None:
        """Raise InputError unless `value` fits this spec (symbolic dims match anything)."""
        if not isinstance(value, np.ndarray):
            raise InputError(f"input {self.name!r} must be a numpy array, got {type(value)}")
        if value.dtype != np.dtype(self.dtype):
            raise InputError(
                f"input {self.name!r} has dtype {value.dtype}, the model expects {self.dtype}"
            )
        ok = value.ndim == len(self.shape) and all(
            isinstance(d, str) or d == v for d, v in zip(self.shape, value.shape, strict=False)
        )
        if not ok:
            want = "[" + ", ".join(str(d) for d in self.shape) + "]"
            raise InputError(
                f"input {self.name!r} has shape {list(value.shape)}, the model expects {want}"
            )


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Streaming sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


#: `--trainable` role selectors (a pattern "@ROLE"): what a parameter does in the graph
ROLES = {"scale": "quantization scales (manifest quant.role 'scale')",
         "int8": "int8 quantized weights"}


def param_role(spec: ParamSpec) -> str | None:
    """The role of a parameter for "@ROLE" patterns: "scale", "int8" or None."""
    quant = spec.quant or {}
    if quant.get("role") == "scale":
        return "scale"
    return "int8" if spec.dtype == "int8" and quant else None


def select_trainable(names: Sequence[str], patterns: str | Sequence[str] | None,
                     roles: Mapping[str, str | None] | None = None) -> set[str]:
    """Names matched by comma-separated glob patterns (`"head.*,*.bias"`); "*" = all;
    "@scale" / "@int8" select by role (`roles`: name -> `param_role`).

    Raises InputError when a pattern matches nothing (a typo would otherwise train nothing).
    """
    if patterns is None:
        return set(names)
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen: set[str] = set()
    for pat in patterns:
        if pat.startswith("@"):
            if pat[1:] not in ROLES:
                raise InputError(f"--trainable role {pat!r} is not one of "
                                 f"{', '.join('@' + r for r in ROLES)}")
            hit = {n for n in names if (roles or {}).get(n) == pat[1:]}
            if not hit:
                raise InputError(f"--trainable role {pat!r} matches no parameter: the bundle "
                                 f"has no {ROLES[pat[1:]]}")
        else:
            hit = {n for n in names if fnmatch.fnmatchcase(n, pat)}
        if not hit:
            raise InputError(f"--trainable pattern {pat!r} matches no parameter")
        chosen |= hit
    return chosen


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise BundleError(f"manifest.json: {msg}")


def _tensor_spec(obj: Any, what: str) -> TensorSpec:
    _require(isinstance(obj, dict), f"{what} entry is not an object")
    name = check_name(obj.get("name"), what)
    shape = obj.get("shape")
    _require(
        isinstance(shape, list)
        and len(shape) <= 8
        and all((type(d) is int and 0 <= d < 1 << 31) or (isinstance(d, str) and d)
                for d in shape),
        f"{what} {name!r} has an invalid shape {shape!r}",
    )
    dtype = obj.get("dtype")
    _require(dtype in IO_DTYPES, f"{what} {name!r} has unsupported dtype {dtype!r}")
    return TensorSpec(name, tuple(shape), dtype)


def _param_spec(obj: Any) -> ParamSpec:
    _require(isinstance(obj, dict), "params entry is not an object")
    name = check_name(obj.get("name"))
    shape = obj.get("shape")
    _require(
        isinstance(shape, list) and len(shape) <= 8
        and all(type(d) is int and 0 <= d < 1 << 31 for d in shape),
        f"parameter {name!r} has an invalid shape {shape!r}",
    )
    numel = int(np.prod(shape, dtype=np.int64))
    _require(numel <= MAX_PARAM_ELEMENTS, f"parameter {name!r} declares {numel} elements")
    dtype = obj.get("dtype")
    _require(dtype in NP_TO_ST, f"parameter {name!r} has unsupported dtype {dtype!r}")
    trainable = obj.get("trainable", False)
    _require(isinstance(trainable, bool), f"parameter {name!r}: trainable must be true/false")
    quant = obj.get("quant")
    _require(quant is None or isinstance(quant, dict), f"parameter {name!r}: bad quant entry")
    return ParamSpec(name, tuple(shape), dtype, trainable, quant)


class Bundle:
    """A validated bundle directory.

    Args:
        path: the bundle directory.
        verify: check sizes and sha256 of every file the manifest names (default True).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise BundleError(f"{self.path}: not a bundle directory")
        self.root = self.path.resolve()
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{self.path}: no {MANIFEST}")
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{MANIFEST}: larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{MANIFEST}: not valid JSON ({e})") from None
        _require(isinstance(m, dict), "not a JSON object")
        _require(m.get("format") == FORMAT, f"format is {m.get('format')!r}, not {FORMAT!r}")
        _require(
            m.get("format_version") == FORMAT_VERSION,
            f"format_version {m.get('format_version')!r} is not supported "
            f"(this edgelearn reads {FORMAT_VERSION})",
        )
        self.manifest: dict[str, Any] = m
        self.task: str = m.get("task", "classification")
        _require(self.task in TASKS, f"task {self.task!r} is not one of {TASKS}")
        for key in ("inputs", "outputs", "params"):
            _require(isinstance(m.get(key), list) and m[key], f"{key!r} must be a non-empty list")
        self.inputs = [_tensor_spec(t, "input") for t in m["inputs"]]
        self.outputs = [_tensor_spec(t, "output") for t in m["outputs"]]
        self.params = [_param_spec(p) for p in m["params"]]
        names = [p.name for p in self.params]
        _require(len(set(names)) == len(names), "duplicate parameter names")
        files = m.get("files")
        _require(isinstance(files, dict) and "weights" in files, "'files' must name 'weights'")
        self.files: dict[str, Path] = {}
        for role, entry in files.items():
            _require(isinstance(entry, dict), f"files.{role} is not an object")
            self.files[role] = self._inside(entry.get("path"), role)
            if verify:
                self._verify(role, entry)
        header = read_safetensors_header(self.files["weights"])
        check_against_specs(header, self.params, self.files["weights"])

    def _inside(self, rel: Any, role: str) -> Path:
        """Resolve a manifest file name; it must be a plain name of a file inside the bundle."""
        _require(
            isinstance(rel, str) and rel and "/" not in rel and "\\" not in rel
            and rel not in (".", ".."),
            f"files.{role}.path {rel!r} is not a plain file name",
        )
        p = self.path / rel
        if not p.is_file():
            raise BundleError(f"{self.path}: files.{role} names {rel!r}, which does not exist")
        if p.resolve().parent != self.root:
            raise BundleError(f"files.{role} {rel!r} resolves outside the bundle directory")
        return p

    def _verify(self, role: str, entry: dict[str, Any]) -> None:
        p = self.files[role]
        size = entry.get("size")
        if size is not None and p.stat().st_size != size:
            raise BundleError(
                f"{p.name}: {p.stat().st_size} bytes, the manifest says {size} (truncated?)"
            )
        want = entry.get("sha256")
        _require(isinstance(want, str), f"files.{role} has no sha256")
        if sha256_file(p) != want:
            raise BundleError(f"{p.name}: sha256 does not match the manifest (corrupt file?)")

    # -- helpers ----------------------------------------------------------------------------
    @property
    def formats(self) -> list[str]:
        """Model formats the bundle carries ("onnx", "tflite")."""
        return [r for r in ("onnx", "tflite") if r in self.files]

    def param_specs(self, trainable: str | Sequence[str] | None = None) -> list[ParamSpec]:
        """Parameter specs with the trainable flag set from glob patterns (None = manifest)."""
        if trainable is None:
            return list(self.params)
        chosen = select_trainable([p.name for p in self.params], trainable,
                                  {p.name: param_role(p) for p in self.params})
        return [
            ParamSpec(p.name, p.shape, p.dtype, p.name in chosen, p.quant) for p in self.params
        ]

    def load_store(
        self,
        *,
        trainable: str | Sequence[str] | None = None,
        weights: str | os.PathLike | None = None,
    ) -> ParamStore:
        """A ParamStore holding the bundle weights (or `weights`, a safetensors file)."""
        return ParamStore.from_file(
            weights if weights is not None else self.files["weights"], self.param_specs(trainable)
        )

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise InputError unless `inputs` has exactly the declared names, shapes, dtypes."""
        want = [t.name for t in self.inputs]
        if sorted(inputs) != sorted(want):
            raise InputError(f"model inputs are {want}, got {sorted(inputs)}")
        batch = None
        for t in self.inputs:
            t.check(inputs[t.name])
            if t.shape and isinstance(t.shape[0], str):
                b = inputs[t.name].shape[0]
                if batch is not None and b != batch:
                    raise InputError("inputs disagree on the batch size")
                batch = b

    def info(self) -> dict[str, Any]:
        """What the bundle holds, as plain JSON data."""
        trainable = [p for p in self.params if p.trainable]
        return {
            "bundle": str(self.path),
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "params": sum(p.numel for p in self.params),
            "trainable_params": sum(p.numel for p in trainable),
            "tensors": [
                {"name": p.name, "shape": list(p.shape), "dtype": p.dtype,
                 "trainable": p.trainable}
                for p in self.params
            ],
            "formats": self.formats,
            "exporter": self.manifest.get("exporter", {}),
            "parity": self.manifest.get("parity", {}),
        }


def load_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Open and validate a bundle directory (see Bundle)."""
    return Bundle(path, verify=verify)
