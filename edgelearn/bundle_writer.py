"""Writing bundles: the one place that builds manifests, file entries and publishes a directory.

Every producer of a bundle (the torch exporter, int8 and population export, `prepare`, `bake`)
writes through these functions, so the manifest's layout is defined once:

    {"format", "format_version", "task", "inputs", "outputs", "params", "layers",
     "files": {role: {"path", "size", "sha256"}}, "exporter", ...producer sections}

A bundle is built in a hidden temporary directory beside its destination (`staging_dir`) and
moved into place with one rename (`publish`) only after its parity checks pass, so a failed
export leaves nothing behind and a reader never sees a half-written bundle.

Torch-free (stdlib and edgelearn.bundle): importable on a device, where bake runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgelearn.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from edgelearn.errors import InputError
from edgelearn.params import ParamSpec

WEIGHTS = "weights.safetensors"
#: Bundles are meant to be copied and shared; mkdtemp's 0700 would hide them from other users.
DIR_MODE = 0o755


def file_entry(directory: Path, name: str) -> dict[str, Any]:
    """The manifest entry of a file of the bundle: {"path", "size", "sha256"}.

    Args:
        directory: the bundle directory being written.
        name: the file's plain name inside it.
    """
    path = Path(directory) / name
    return {"path": name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def file_entries(directory: Path, roles: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The manifest's "files" section: role -> `file_entry` of the file named for it.

    Args:
        directory: the bundle directory being written.
        roles: role ("weights", "onnx", "tflite", ...) -> file name, in manifest order.
    """
    return {role: file_entry(directory, name) for role, name in roles.items()}


def add_file(manifest: dict[str, Any], directory: Path, role: str, name: str) -> None:
    """Record (or re-record) file `name` of `directory` as files[role] of `manifest`."""
    manifest.setdefault("files", {})[role] = file_entry(directory, name)


def param_entry(spec: ParamSpec, **extra: Any) -> dict[str, Any]:
    """The manifest entry of a parameter: name, shape, dtype, trainable, then `extra`
    (kind, source_name, quant, ...)."""
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype,
            "trainable": spec.trainable, **extra}


def new_manifest(*, task: str, inputs: Sequence[dict[str, Any]],
                 outputs: Sequence[dict[str, Any]], params: Sequence[dict[str, Any]],
                 files: dict[str, dict[str, Any]], exporter: dict[str, Any],
                 layers: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A manifest with the fields every bundle has (`edgelearn.bundle.Bundle` reads them).

    Args:
        task: "classification" or "regression".
        inputs / outputs: tensor specs {"name", "shape" (ints, "batch" first), "dtype"}.
        params: `param_entry` records, in weight-file order.
        files: the "files" section (`file_entries`).
        exporter: who wrote the bundle (tool and library versions, source model).
        layers: tpSGD layer records (export/taps.py), empty when the bundle has no taps.
    """
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task,
            "inputs": list(inputs), "outputs": list(outputs), "params": list(params),
            "layers": list(layers), "files": files, "exporter": exporter}


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write `manifest` as the bundle's manifest.json (indented one space, as all bundles)."""
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest.json of a bundle this process is writing (not validated: use
    `edgelearn.bundle.Bundle` for a bundle from elsewhere)."""
    return json.loads((Path(directory) / MANIFEST).read_text())


def check_new_dir(out_dir: Path, *, overwrite: bool, hint: str = "pass overwrite=True",
                  error: type[Exception] = InputError) -> None:
    """Raise `error` when `out_dir` exists and may not be replaced.

    Args:
        out_dir: the bundle directory to create.
        overwrite: replacing an existing directory is allowed.
        hint: how the caller allows it ("pass --overwrite" for the CLI's users).
        error: the exception type the caller's API raises.
    """
    if Path(out_dir).exists() and not overwrite:
        raise error(f"{out_dir} already exists ({hint} to replace it)")


@contextmanager
def staging_dir(out_dir: Path, *, overwrite: bool,
                hint: str = "pass overwrite=True") -> Iterator[Path]:
    """A new hidden temporary directory beside `out_dir`, removed on exit unless published.

    Args:
        out_dir: the bundle directory to create (its parent is created if missing).
        overwrite / hint: see `check_new_dir` (raises InputError).
    Yields: the temporary directory; `publish(tmp, out_dir)` moves it (or a subdirectory of
        it) into place.
    """
    out_dir = Path(out_dir)
    check_new_dir(out_dir, overwrite=overwrite, hint=hint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside the destination: same filesystem, so `publish` is one atomic rename.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished bundle directory `tmp` to `out_dir`, replacing what is there.

    Args:
        tmp: the complete bundle (from `staging_dir`, on the same filesystem).
        out_dir: its destination.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.chmod(tmp, DIR_MODE)
    os.replace(tmp, out_dir)
