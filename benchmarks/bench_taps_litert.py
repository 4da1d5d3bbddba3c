"""tpSGD taps forward and step: LiteRT (model_taps.tflite) vs onnxruntime (model_taps.onnx).

Exports zoo models with formats ("onnx", "tflite") into a temp dir (host, torch +
litert-torch), then in one process times, interleaved in blocks (first call of each block
dropped), the median of:
  taps_forward_ms  one taps-graph forward (model output + every layer tap) on a fixed batch,
                   weights unchanged
  step_ms          one tpSGD step (taps forward + the numpy layer-local updates in place)
for ort (every weight a live input via IOBinding) and litert (every weight an input,
set_tensor per forward: the taps graph has the "inputs" strategy only). Ratios are
litert / ort. Prints one JSON object; never asserts.

    python benchmarks/bench_taps_litert.py [--archs mlp,cnn] [--batch 32] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: name -> (factory in edgelearn.export.zoo, kwargs, input shape without batch, tpsgd options)
ARCHS: dict[str, tuple[str, dict[str, Any], tuple[int, ...], dict[str, float]]] = {
    "mlp": ("mlp", {"in_features": 784, "hidden": (1024, 1024), "classes": 10}, (784,),
            {"lr": 1e-3}),
    "cnn": ("cnn", {"in_ch": 1, "size": 28, "width": 32, "classes": 10}, (1, 28, 28),
            {"lr": 1e-3, "hidden_lr": 1e-4}),
}
BACKENDS = ("onnxruntime", "litert")


def bench_arch(root: Path, arch: str, batch: int, reps: int, blocks: int) -> dict[str, Any]:
    import torch
    from edgelearn.export import export_bundle, zoo

    from edgelearn.bundle import load_bundle
    from edgelearn.data import Dataset
    from edgelearn.optim import make_optimizer
    from edgelearn.training.evaluators import make_evaluator

    factory, kwargs, shape, opts = ARCHS[arch]
    torch.manual_seed(0)
    module, example = getattr(zoo, factory)(**kwargs), torch.randn(1, *shape)
    summary = export_bundle(module, example, root / arch, formats=("onnx", "tflite"),
                            atol=1e-4, tflite_batch=batch)
    bundle = load_bundle(root / arch)
    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((batch, *shape)).astype(np.float32),
                   rng.integers(0, 10, batch))
    runs = {}
    for backend in BACKENDS:
        store = bundle.load_store(trainable="*")
        opt = make_optimizer("tpsgd", seed=0, **opts)
        ev = make_evaluator(bundle, store, opt, backend=backend, threads=1)
        runs[backend] = (store, opt, ev.forwards(data.x, data.y).evaluate)
    fwd_t: dict[str, list[float]] = {k: [] for k in runs}
    step_t: dict[str, list[float]] = {k: [] for k in runs}
    per_block = max(2, reps // blocks)
    for _ in range(blocks):
        for key, (store, opt, evaluate) in runs.items():
            for i in range(per_block + 1):
                t0 = time.perf_counter()
                evaluate()
                dt = time.perf_counter() - t0
                if i:
                    fwd_t[key].append(dt)
            for i in range(per_block + 1):
                t0 = time.perf_counter()
                opt.step(store, evaluate)
                dt = time.perf_counter() - t0
                if i:
                    step_t[key].append(dt)
    fwd = {k: 1e3 * statistics.median(v) for k, v in fwd_t.items()}
    step = {k: 1e3 * statistics.median(v) for k, v in step_t.items()}
    par = bundle.manifest["parity"]
    return {
        "params": summary["params"], "taps": len(bundle.manifest["tflite_taps"]["outputs"]) - 1,
        "taps_forward_ms": fwd, "step_ms": step,
        "taps_forward_ratio_litert_vs_ort": fwd["litert"] / fwd["onnxruntime"],
        "step_ratio_litert_vs_ort": step["litert"] / step["onnxruntime"],
        "parity_taps_max_abs_err": {"onnx": par["onnx_taps"]["max_abs_err"],
                                    "tflite": par["tflite_taps"]["max_abs_err"]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default="mlp,cnn")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--blocks", type=int, default=3)
    a = p.parse_args(argv)
    out: dict[str, Any] = {"machine": {"platform": platform.platform(),
                                       "python": platform.python_version()},
                           "batch": a.batch, "threads": 1, "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.archs.split(","):
            out["archs"][arch] = bench_arch(Path(tmp), arch, a.batch, a.reps, a.blocks)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
