"""A bundle whose base weights are other weights (the fleet's global model of a round).

A Session trains a bundle from its base weights and journals against their sha256; a client
that trains on top of the global model therefore trains a copy of the bundle rebased on it.
Model files are hard-linked when the filesystem allows (copied otherwise); only the weights
and the manifest are new. The manifest records `fleet.from_weights_sha256` (the source bundle)
and `fleet.weights_sha256` (the store digest the weights hold).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from edgelearn import bundle_writer as writer
from edgelearn.bundle import Bundle, load_bundle
from edgelearn.errors import EdgelearnError
from edgelearn.params import ParamStore


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def rebase_bundle(bundle: Bundle, store: ParamStore, out_dir: str | os.PathLike) -> Bundle:
    """Write (or reuse) `out_dir`: `bundle` with base weights `store`; returns it loaded.

    Args:
        bundle: the source bundle.
        store: the weights (every parameter of the bundle).
        out_dir: the rebased bundle's directory (replaced unless it already holds `store`).
    """
    out_dir = Path(out_dir)
    digest = store.digest()
    if (out_dir / "manifest.json").is_file():
        try:
            old = load_bundle(out_dir)
            if old.manifest.get("fleet", {}).get("weights_sha256") == digest:
                return old
        except (EdgelearnError, OSError, ValueError):  # a damaged copy is rewritten
            pass
    with writer.staging_dir(out_dir, overwrite=True) as tmp:
        manifest = copy.deepcopy(bundle.manifest)
        for role, path in bundle.files.items():
            if role != "weights":
                _link_or_copy(path, tmp / path.name)
        store.save(tmp / writer.WEIGHTS, metadata={"sha256": digest})
        writer.add_file(manifest, tmp, "weights", writer.WEIGHTS)
        manifest["fleet"] = {"from_weights_sha256": bundle.manifest["files"]["weights"]["sha256"],
                             "weights_sha256": digest}
        writer.write_manifest(tmp, manifest)
        writer.publish(tmp, out_dir)
    return load_bundle(out_dir)
