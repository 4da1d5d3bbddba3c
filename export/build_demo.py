"""Build the demo assets shipped inside the package (run on the host, with torch).

    python -m edgelearn.export.build_demo --write        # rewrite the committed assets
    python -m edgelearn.export.build_demo --out DIR      # build elsewhere (default: a new temp dir)

Prints the export summary as one JSON object. With --write it rewrites
edgelearn/data/digits.npz (the UCI/sklearn 8x8 digits, CC BY 4.0, 1797 images as uint8
0..16, labels, and which images the pretraining used) and edgelearn/data/demo/ (a bundle:
an MLP 64-64-10 pretrained by backprop on the pretraining images). `edgelearn demo` then
personalizes it on device for a new user whose handwriting differs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from edgelearn.export import export_bundle
from edgelearn.export.population import add_population_graph
from edgelearn.export.quiet import quiet_third_party
from edgelearn.export.zoo import MLP

DATA = Path(__file__).resolve().parents[1] / "edgelearn" / "data"


def build(out: Path = DATA, seed: int = 0) -> dict:
    """Pretrain and export the demo bundle; returns the export summary."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x8 = d.data.astype(np.uint8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x8))
    pretrain = np.zeros(len(x8), bool)
    pretrain[order[:1000]] = True
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "digits.npz", x=x8, y=y, pretrain=pretrain)
    torch.manual_seed(seed)
    model = MLP(64, (64,), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xb = torch.from_numpy(x8[pretrain].astype(np.float32) / 16.0)
    yb = torch.from_numpy(y[pretrain])
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    with quiet_third_party():
        summary = export_bundle(model, xb[:2], out / "demo", trainable="head.*",
                                overwrite=True, formats=("onnx", "tflite"))
    # PolyStep scores many candidate heads per runtime call through this graph.
    with quiet_third_party():
        summary["population"] = add_population_graph(model, xb[:2], out / "demo")
    summary["data"] = str(out / "digits.npz")
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--write", action="store_true",
                       help=f"rewrite the committed assets in {DATA}")
    where.add_argument("--out", default=None, help="directory to build into (default: temp)")
    args = ap.parse_args()
    if args.write:
        target = DATA
    elif args.out:
        target = Path(args.out)
    else:
        target = Path(tempfile.mkdtemp(prefix="edgelearn-demo-build-"))
    print(json.dumps(build(target), sort_keys=True, default=str))
