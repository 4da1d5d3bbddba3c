"""Frozen-prefix caching benchmark: head-only step time cached vs uncached, side by side.

Usage:
    python benchmarks/bench_prefix_cache.py            # MiniLM-L3-sized encoder, 128px CNN
    python benchmarks/bench_prefix_cache.py --quick    # smaller backbones (< 30 s)

Two backbones are generated as ONNX (no torch, tests/backbone_models.py) and prepared with
a new 2-class head (`prepare --new-head`): a pre-LN transformer encoder (3 layers, hidden
384, 12 heads, 32 tokens: MiniLM-L3's shape) and a MobileNetV2-like CNN (128x128 input,
inverted residual blocks, 1280 pooled features). On each, two sessions train the head only
with zo-sgd on the same data (batch 32, threads 1): one with the prefix cache, one with
`prefix_cache=False`; their steps are interleaved in chunks (`Session.run` continues a run),
so both see the same machine load. Reported per backbone:
  step_ms_uncached / step_ms_cached: medians of the optimizer step (train's step_ms_median);
  speedup: uncached / cached (goal >= 50);
  head_forward_ms: one forward of the head alone (the suffix graph on cached features, a
      plain onnxruntime session), interleaved with the steps; step_per_head_forward =
      step_ms_cached / head_forward_ms (goal <= 2 per forward: a zo-sgd step runs
      `evaluations` forwards, so the per-forward ratio is reported too);
  identical: both runs end with the same weights sha256 and journal bytes.
Prints ONE JSON object on stdout; progress on stderr. It never asserts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from backbone_models import mobilenet_onnx, transformer_onnx  # noqa: E402

import edgelearn as el  # noqa: E402

BATCH = 32
N = 64
MOBILENET_V2 = ((1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 64, 2),
                (6, 64, 1), (6, 96, 1), (6, 160, 2), (6, 320, 1))


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(f"[bench_prefix_cache {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def backbones(tmp: Path, quick: bool) -> dict[str, tuple[Path, str]]:
    """name -> (generated ONNX backbone, its feature output)."""
    if quick:
        enc = transformer_onnx(tmp / "enc.onnx", tokens=16, dim=128, heads=4, layers=2)
        cnn = mobilenet_onnx(tmp / "cnn.onnx", size=64, width=16, blocks=MOBILENET_V2[:6],
                             features=256)
    else:
        enc = transformer_onnx(tmp / "enc.onnx", tokens=32, dim=384, heads=12, layers=3)
        cnn = mobilenet_onnx(tmp / "cnn.onnx", size=128, width=32, blocks=MOBILENET_V2,
                             features=1280)
    return {"transformer": (enc, "hidden"), "cnn": (cnn, "features")}


def head_forward_ms(session: el.Session, data: el.Dataset) -> float:
    """One forward of the head alone: the cached run's suffix graph on cached features."""
    ev = session.evaluator  # Unstable internals: a CachedEvaluator here
    feeds = ev.run_prefix(data.x[:BATCH])
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        ev.suffix.run(feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


class Evaluations(el.Callback):
    """Records the forwards each step ran."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_step(self, session: el.Session, result: el.StepResult) -> None:
        self.counts.append(result.evaluations)


def compare(name: str, src: Path, output: str, tmp: Path, chunks: int, per_chunk: int
            ) -> dict[str, Any]:
    """Prepare a head on `src` and train it cached and uncached, interleaved."""
    bundle = tmp / f"{name}_bundle"
    el.tools.prepare(src, bundle, new_head=f"{output}:2")
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(0)
    data = el.Dataset(rng.standard_normal((N, *spec.shape[1:])).astype(np.float32),
                      rng.integers(0, 2, N))
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=BATCH)
    sessions = {c: el.Session(bundle, tmp / f"{name}_{c}", cfg,
                              el.RuntimeConfig(backend="onnxruntime", device=None, threads=1,
                                               prefix_cache=c == "cached"))
                for c in ("cached", "uncached")}
    steps: dict[str, list[float]] = {"cached": [], "uncached": []}
    wall: dict[str, list[float]] = {"cached": [], "uncached": []}
    heads, results, evals = [], {}, Evaluations()
    for k in range(1, chunks + 1):
        for c, s in sessions.items():
            t0 = time.perf_counter()
            results[c] = s.run(data, k * per_chunk, callbacks=[evals] if c == "cached" else [])
            wall[c].append((time.perf_counter() - t0) / per_chunk)
            steps[c].append(results[c].step_ms_median)
        heads.append(head_forward_ms(sessions["cached"], data))
        log(f"{name}: chunk {k}: cached {steps['cached'][-1]:.3f} ms, uncached "
            f"{steps['uncached'][-1]:.1f} ms, head forward {heads[-1]:.3f} ms")
    for s in sessions.values():
        s.close()
    r_c, r_u = results["cached"], results["uncached"]
    cached, uncached, head = (statistics.median(steps["cached"][1:] or steps["cached"]),
                              statistics.median(steps["uncached"]), statistics.median(heads))
    n_eval = statistics.median(evals.counts)
    return {
        "bundle_inputs": list(spec.shape), "cut": r_c.cache["cut"],
        "prefix_nodes": r_c.cache["prefix_nodes"], "suffix_nodes": r_c.cache["suffix_nodes"],
        "cached_examples": r_c.cache["cached_examples"], "cache_bytes": r_c.cache["bytes"],
        "refused_cuts": r_c.cache["refused_cuts"],
        "step_ms_cached": cached, "step_ms_uncached": uncached, "speedup": uncached / cached,
        "wall_ms_per_step_cached_first_chunk": 1e3 * wall["cached"][0],
        "wall_ms_per_step_cached_warm": 1e3 * statistics.median(wall["cached"][1:] or
                                                                 wall["cached"]),
        "wall_ms_per_step_uncached": 1e3 * statistics.median(wall["uncached"]),
        "forward_ms_uncached": r_u.forward_ms_median, "head_forward_ms": head,
        "evaluations_per_step": n_eval, "step_per_head_forward": cached / head,
        "step_per_head_forward_per_evaluation": cached / head / n_eval,
        "identical": r_c.sha256 == r_u.sha256 and Path(r_c.journal).read_bytes()
        == Path(r_u.journal).read_bytes(), "steps": r_c.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller backbones, fewer steps")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_prefix_cache_"))
    try:
        out: dict[str, Any] = {"batch": BATCH, "examples": N, "optimizer": "zo-sgd",
                               "threads": 1, "quick": args.quick}
        for name, (src, output) in backbones(tmp, args.quick).items():
            out[name] = compare(name, src, output, tmp, chunks=4, per_chunk=2 if args.quick
                                else 3)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
