"""Bundles with parts missing, made from the shipped demo bundle (no torch): the same model as
an exporter would write it when it left out a graph, with the reason in the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgelearn.demo import DATA

TFLITE_ROLES = ("tflite", "tflite_const", "tflite_taps")


def demo_bundle_without(dst: Path, roles: tuple[str, ...], **manifest: Any) -> Path:
    """Copy the demo bundle to `dst`, drop the file roles `roles` (and their manifest
    sections), and set the given manifest keys (e.g. taps_unsupported="why")."""
    shutil.copytree(DATA / "demo", dst)
    path = dst / "manifest.json"
    m = json.loads(path.read_text())
    for role in roles:
        (dst / m["files"].pop(role)["path"]).unlink()
        m.pop(role, None)  # "tflite", "tflite_taps" sections
    if "onnx_population" in roles:
        m.pop("population", None)
    if "onnx_taps" in roles:
        m.pop("layers", None)
    m.update(manifest)
    path.write_text(json.dumps(m))
    return dst
