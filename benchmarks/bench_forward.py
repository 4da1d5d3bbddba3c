"""Forward latency: weights bound as live graph inputs vs weights baked as initializers.

Exports bigger versions of the zoo models into a temp dir (host side, torch), then times
`backend.forward` of onnxruntime sessions over the same bundle, side by side in one process:
  live  = every parameter a graph input bound zero-copy from the arena (what training uses)
  baked = every parameter an initializer (plain inference; ORT may prepack)
  head  = CNN only: convs baked, only `head.*` live (the recommended CNN training setup)
Runs are interleaved in short blocks (first run of each block dropped) to cancel drift;
the figure is the median. Prints one JSON object; never asserts.

    python benchmarks/bench_forward.py [--quick] [--threads N] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: name -> (factory name in edgelearn.export.zoo, kwargs, input shape without batch)
ARCHS: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "mlp": ("mlp", {"in_features": 784, "hidden": (1024, 1024), "classes": 10}, (784,)),
    "cnn": ("cnn", {"in_ch": 1, "size": 28, "width": 32, "classes": 10}, (1, 28, 28)),
    "gru": ("gru", {"in_features": 16, "hidden": 256, "classes": 10}, (50, 16)),
    "transformer": ("transformer", {"in_features": 16, "d_model": 128, "heads": 4, "layers": 4,
                                    "classes": 10}, (64, 16)),
}
#: arch -> variants (name -> trainable glob given to Model; () = everything baked)
VARIANTS: dict[str, dict[str, Any]] = {
    "mlp": {"live": "*", "baked": ()},
    "cnn": {"live": "*", "head": "head.*", "baked": ()},
    "gru": {"live": "*", "baked": ()},
    "transformer": {"live": "*", "baked": ()},
}


def export_all(root: Path, archs: list[str]) -> dict[str, dict[str, Any]]:
    """Export `archs` into `root` (parity atol 1e-4: bigger sums); arch -> exporter summary."""
    import torch
    from edgelearn.export import export_bundle, zoo

    out = {}
    for arch in archs:
        factory, kwargs, shape = ARCHS[arch]
        torch.manual_seed(0)
        model = getattr(zoo, factory)(**kwargs)
        out[arch] = export_bundle(model, torch.randn(1, *shape), root / arch, atol=1e-4)
    return out


def time_arch(path: Path, shape: tuple[int, ...], variants: dict[str, Any], *, batch: int,
              threads: int, blocks: int, per_block: int, warmup: int) -> dict[str, Any]:
    """Median forward ms per variant, runs interleaved in blocks."""
    from edgelearn.bundle import load_bundle
    from edgelearn.model import Model

    bundle = load_bundle(path)
    models = {v: Model(bundle, trainable=t, threads=threads) for v, t in variants.items()}
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    feed = {bundle.inputs[0].name: x}
    outs = {v: m.backend.forward(feed)[bundle.outputs[0].name] for v, m in models.items()}
    ref = outs[next(iter(outs))]
    max_diff = max(float(np.max(np.abs(o - ref))) for o in outs.values())
    for m in models.values():
        for _ in range(warmup):
            m.backend.forward(feed)
    times: dict[str, list[float]] = {v: [] for v in models}
    for _ in range(blocks):
        for v, m in models.items():
            fwd = m.backend.forward
            fwd(feed)  # first run after switching sessions: dropped
            for _ in range(per_block):
                t0 = time.perf_counter()
                fwd(feed)
                times[v].append((time.perf_counter() - t0) * 1e3)
    res: dict[str, Any] = {f"{v}_ms": round(statistics.median(t), 4) for v, t in times.items()}
    base = statistics.median(times["baked"])
    for v, t in times.items():
        if v != "baked":
            key = "ratio" if v == "live" else f"{v}_ratio"
            res[key] = round(statistics.median(t) / base, 3)
    res["runs_per_variant"] = len(times["baked"])
    res["max_abs_diff_between_variants"] = max_diff
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few runs (smoke test)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="ORT intra-op threads (default: all cores)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="subset of archs")
    args = ap.parse_args(argv)
    blocks, per_block, warmup = (3, 3, 3) if args.quick else (10, 5, 10)
    archs = args.arch or list(ARCHS)

    import onnxruntime

    result: dict[str, Any] = {
        "benchmark": "forward_live_vs_baked",
        "batch": args.batch,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "onnxruntime": onnxruntime.__version__,
        "quick": args.quick,
        "archs": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_forward_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        summaries = export_all(root, archs)
        result["export_s"] = round(time.perf_counter() - t0, 1)
        for arch in archs:
            res = time_arch(root / arch, ARCHS[arch][2], VARIANTS[arch], batch=args.batch,
                            threads=args.threads, blocks=blocks, per_block=per_block,
                            warmup=warmup)
            res["params"] = summaries[arch]["params"]
            result["archs"][arch] = res
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
