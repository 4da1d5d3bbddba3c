"""ZO-SGD step and forward: LiteRT backend (both weight strategies) vs onnxruntime, same bundle.

Exports zoo models with formats ("onnx", "tflite") into a temp dir (host, torch +
litert-torch), then in one process times, interleaved in blocks (first of each block
dropped), the median of:
  step_ms     one ZO-SGD step (2 forwards with weights changed in place, restore, update)
  forward_ms  one forward with unchanged weights
for ort (weights live via IOBinding), litert "inputs" (set_tensor per forward, builtin
kernels) and litert "rebuild" (patch the in-memory const model, re-create XNNPACK).
Ratios are litert / ort. Prints one JSON object; never asserts. With --int8 the bundles are
int8 (export/quantize.py: QDQ for ort, int8 inputs dequantized in-graph for litert) and the
step is zo-scale on the per-channel scales (the int8 weights stay frozen).

    python benchmarks/bench_litert.py [--archs mlp,gru] [--batch 32] [--reps 30] [--int8]
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

#: name -> (factory in edgelearn.export.zoo, kwargs, input shape without batch, trainable glob)
ARCHS: dict[str, tuple[str, dict[str, Any], tuple[int, ...], str]] = {
    "mlp": ("mlp", {"in_features": 784, "hidden": (1024, 1024), "classes": 10}, (784,), "*"),
    "cnn": ("cnn", {"in_ch": 1, "size": 28, "width": 32, "classes": 10}, (1, 28, 28),
            "head.*"),
    "gru": ("gru", {"in_features": 16, "hidden": 256, "classes": 10}, (50, 16), "*"),
    "transformer": ("transformer", {"in_features": 16, "d_model": 128, "heads": 4,
                                    "layers": 4, "classes": 10}, (64, 16), "*"),
}
BACKENDS = {"ort": ("onnxruntime", {}), "litert_inputs": ("litert", {"strategy": "inputs"}),
            "litert_rebuild": ("litert", {"strategy": "rebuild"})}


def bench_arch(root: Path, arch: str, batch: int, reps: int, blocks: int,
               int8: bool = False) -> dict[str, Any]:
    import torch
    from edgelearn.export import export_bundle, zoo

    from edgelearn.bundle import load_bundle
    from edgelearn.losses import cross_entropy
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer

    factory, kwargs, shape, trainable = ARCHS[arch]
    torch.manual_seed(0)
    module, example = getattr(zoo, factory)(**kwargs), torch.randn(1, *shape)
    if int8:
        from edgelearn.export.quantize import export_int8_bundle

        summary = export_int8_bundle(module, example, root / arch, formats=("onnx", "tflite"),
                                     atol=1e-4, tflite_batch=batch)
        trainable = "*.scale"
    else:
        summary = export_bundle(module, example, root / arch, formats=("onnx", "tflite"),
                                atol=1e-4, tflite_batch=batch)
    bundle = load_bundle(root / arch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    runs = {}
    for key, (name, opts) in BACKENDS.items():
        model = Model(bundle, backend=name, trainable=trainable, threads=1,
                      backend_options=opts or None)
        opt = (make_optimizer("zo-scale", lr=1e-5, eps=1e-4, seed=0) if int8 else
               make_optimizer("zo-sgd", lr=1e-4, eps=1e-3, seed=0))
        runs[key] = (model, opt)
    step_t: dict[str, list[float]] = {k: [] for k in runs}
    fwd_t: dict[str, list[float]] = {k: [] for k in runs}
    per_block = max(2, reps // blocks)
    for _ in range(blocks):
        for key, (model, opt) in runs.items():
            def evaluate(model: Any = model) -> float:
                return cross_entropy(model.predict(x), y)

            for i in range(per_block + 1):
                t0 = time.perf_counter()
                opt.step(model.store, evaluate)
                dt = time.perf_counter() - t0
                if i:
                    step_t[key].append(dt)
            for i in range(per_block + 1):
                t0 = time.perf_counter()
                model.predict(x)
                dt = time.perf_counter() - t0
                if i:
                    fwd_t[key].append(dt)
    step = {k: 1e3 * statistics.median(v) for k, v in step_t.items()}
    fwd = {k: 1e3 * statistics.median(v) for k, v in fwd_t.items()}
    best = min(("litert_inputs", "litert_rebuild"), key=step.__getitem__)
    return {
        "params": summary["params"], "trainable": trainable,
        "exporter_choice": json.loads((root / arch / "manifest.json").read_text())
        ["tflite"]["strategy"]["choice"],
        "step_ms": step, "forward_ms": fwd,
        "step_ratio_litert_best_vs_ort": step[best] / step["ort"],
        "step_ratio_inputs_vs_ort": step["litert_inputs"] / step["ort"],
        "step_ratio_rebuild_vs_ort": step["litert_rebuild"] / step["ort"],
        "best_litert_strategy_here": best,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default="mlp,cnn,gru,transformer")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--int8", action="store_true", help="int8 bundles, zo-scale step")
    a = p.parse_args(argv)
    out: dict[str, Any] = {"machine": {"platform": platform.platform(),
                                       "python": platform.python_version()},
                           "batch": a.batch, "threads": 1, "int8": a.int8, "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.archs.split(","):
            out["archs"][arch] = bench_arch(Path(tmp), arch, a.batch, a.reps, a.blocks,
                                           a.int8)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
