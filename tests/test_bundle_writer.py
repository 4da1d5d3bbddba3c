"""The one bundle writer: manifests it builds load as bundles, staged directories appear whole
or not at all."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from edgelearn.bundle import MANIFEST, load_bundle
from edgelearn.bundle_writer import (
    WEIGHTS,
    add_file,
    check_new_dir,
    file_entries,
    new_manifest,
    param_entry,
    publish,
    read_manifest,
    staging_dir,
    write_manifest,
)
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.params import ParamSpec, ParamStore


def _write_tiny(d: Path) -> dict:
    """A minimal bundle (weights + a stand-in graph file) written through the writer."""
    spec = ParamSpec("w", (2, 3), "float32", True)
    ParamStore([spec], values={"w": np.arange(6, dtype=np.float32).reshape(2, 3)}).save(
        d / WEIGHTS)
    (d / "model.onnx").write_bytes(b"not parsed by Bundle")
    x = {"name": "x", "shape": ["batch", 3], "dtype": "float32"}
    y = {"name": "y", "shape": ["batch", 2], "dtype": "float32"}
    manifest = new_manifest(task="regression", inputs=[x], outputs=[y],
                            params=[param_entry(spec, kind="parameter")],
                            files=file_entries(d, {"weights": WEIGHTS, "onnx": "model.onnx"}),
                            exporter={"tool": "test"})
    write_manifest(d, manifest)
    return manifest


def test_written_manifest_loads_as_a_bundle(tmp_path: Path) -> None:
    m = _write_tiny(tmp_path)
    b = load_bundle(tmp_path)  # verifies every file's size and sha256
    assert [p.name for p in b.params] == ["w"]
    assert b.params[0].trainable
    assert b.task == "regression"
    assert read_manifest(tmp_path) == m
    entry = m["files"]["onnx"]
    data = (tmp_path / "model.onnx").read_bytes()
    assert entry == {"path": "model.onnx", "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}
    assert list(m)[:3] == ["format", "format_version", "task"]


def test_add_file_records_a_changed_file(tmp_path: Path) -> None:
    m = _write_tiny(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"changed")
    with pytest.raises(EdgelearnError, match=r"model\.onnx"):
        load_bundle(tmp_path)
    add_file(m, tmp_path, "onnx", "model.onnx")
    write_manifest(tmp_path, m)
    assert load_bundle(tmp_path).files["onnx"].read_bytes() == b"changed"


def test_staging_dir_leaves_nothing_when_the_export_fails(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "bundle"
    seen = []

    def export() -> None:
        with staging_dir(out, overwrite=False) as tmp:
            seen.append(tmp)
            _write_tiny(tmp)
            raise RuntimeError("parity failed")

    with pytest.raises(RuntimeError):
        export()
    assert seen[0].parent == out.parent  # beside the destination: publish is one rename
    assert seen[0].name.startswith(".bundle.")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_publish_replaces_the_destination_whole(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(InputError, match=r"already exists \(pass --overwrite to replace it"):
        staging_dir(out, overwrite=False, hint="pass --overwrite").__enter__()
    with staging_dir(out, overwrite=True) as tmp:
        _write_tiny(tmp)
        publish(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, WEIGHTS, "model.onnx"])
    assert out.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging left over
    load_bundle(out)


def test_check_new_dir_raises_the_callers_error(tmp_path: Path) -> None:
    class MyError(Exception):
        pass

    check_new_dir(tmp_path / "new", overwrite=False, error=MyError)
    check_new_dir(tmp_path, overwrite=True, error=MyError)
    with pytest.raises(MyError, match="pass overwrite=True to replace it"):
        check_new_dir(tmp_path, overwrite=False, error=MyError)
