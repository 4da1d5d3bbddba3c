"""Frozen-prefix caching on LiteRT: head-only step time cached vs uncached, interleaved.

Usage:
    python benchmarks/bench_prefix_cache_litert.py            # 96px MobileNetV2-like CNN
    python benchmarks/bench_prefix_cache_litert.py --quick    # 48px, fewer blocks

Host side (torch + litert-torch): a small MobileNetV2-like CNN backbone (stem conv, inverted
residual blocks with depthwise convs, batch norm, ReLU6, global average pooling) with a linear
head is built from a fixed seed and exported with `formats=("onnx", "tflite")`, TFLite batch
32, only `head.*` trainable. Then, for each LiteRT weight strategy ("inputs": parameters as
inputs, builtin kernels; "rebuild": constants, XNNPACK re-created on change), two sessions
train the head with zo-sgd on the same 64 examples (batch 32, threads 1): one with the prefix
cache (the TFLite flatbuffer split on the device), one with `prefix_cache=False`; their steps
are interleaved in chunks (`Session.run` continues a run) so both see the same machine load.
The same for tpSGD (row "tpsgd": its taps graph model_taps.tflite, "inputs" strategy, split
with the logits and the head's input as outputs; one taps forward per step).
Reported per strategy (and for the tpsgd row):
  step_ms_uncached / step_ms_cached_warm: medians of the optimizer step (StepResult.seconds;
      warm: after the first chunk, when every example is cached);
  speedup: uncached / cached warm;
  forward_ms_uncached: median forward of the whole model in the uncached run;
  cut / prefix_nodes / suffix_nodes / cached_examples / cache_bytes: the cache report;
  identical: a cached run of as many steps as the uncached one ends with the same weights
      sha256 and the same journal bytes.
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
sys.path.insert(0, str(ROOT))

import edgelearn as el  # noqa: E402

BATCH = 32
N = 64
#: (expansion, channels, stride) of the inverted residual blocks (MobileNetV2's first ones)
BLOCKS = ((1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 64, 2), (6, 64, 1))


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(f"[bench_prefix_cache_litert {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def backbone(blocks: tuple[tuple[int, int, int], ...], features: int) -> Any:
    """A MobileNetV2-like CNN (torch, eval mode) with a 2-class `head`."""
    import torch
    from torch import nn

    def conv(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True) -> list:
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        return layers + ([nn.ReLU6()] if act else [])

    class Block(nn.Module):
        def __init__(self, cin: int, t: int, cout: int, s: int) -> None:
            super().__init__()
            mid = cin * t
            layers = (conv(cin, mid, 1, 1) if t != 1 else []) + conv(mid, mid, 3, s, mid)
            self.body = nn.Sequential(*layers, *conv(mid, cout, 1, 1, act=False))
            self.skip = s == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x) if self.skip else self.body(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers, cin = conv(3, 32, 3, 2), 32
            for t, c, s in blocks:
                layers.append(Block(cin, t, c, s))
                cin = c
            self.features = nn.Sequential(*layers, *conv(cin, features, 1, 1),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(features, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    torch.manual_seed(0)
    return Net().eval()


def export(tmp: Path, quick: bool) -> tuple[Path, dict[str, Any]]:
    """The CNN exported to a bundle (ONNX + TFLite, batch 32, head trainable), and the
    export summary."""
    import torch
    from edgelearn.export import export_bundle

    size = 48 if quick else 96
    model = backbone(BLOCKS[:4] if quick else BLOCKS, 128 if quick else 256)
    t0 = time.perf_counter()
    summary = export_bundle(model, torch.randn(1, 3, size, size), tmp / "cnn",
                            trainable="head.*", formats=("onnx", "tflite"), tflite_batch=BATCH)
    log(f"exported in {time.perf_counter() - t0:.1f} s")
    return tmp / "cnn", summary


class StepTimes(el.Callback):
    """Records each step's optimizer time (seconds)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step(self, session: el.Session, result: el.StepResult) -> None:
        self.seconds.append(result.seconds)


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def compare(bundle: Path, tmp: Path, strategy: str, chunks: int, slow: int, fast: int,
            optimizer: str = "zo-sgd") -> dict[str, Any]:
    """Cached vs uncached head training with `optimizer` on LiteRT with `strategy`,
    interleaved (tpsgd: its taps graph, model_taps.tflite, "inputs" only)."""
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(0)
    data = el.Dataset(rng.standard_normal((N, *spec.shape[1:])).astype(np.float32),
                      rng.integers(0, 2, N))
    cfg = el.TrainConfig(optimizer=optimizer, batch_size=BATCH, fsync_every=1 << 20)

    def session(run: str, cache: bool) -> el.Session:
        return el.Session(bundle, tmp / f"{optimizer}_{strategy}_{run}", cfg, el.RuntimeConfig(
            backend="litert", device=None, threads=1, prefix_cache=cache,
            backend_options={"strategy": strategy}))

    sessions = {"cached": session("cached", True), "uncached": session("uncached", False)}
    times = {k: StepTimes() for k in sessions}
    results: dict[str, Any] = {}
    for k in range(1, chunks + 1):
        for c, s in sessions.items():
            n = slow if c == "uncached" else fast
            results[c] = s.run(data, k * n, callbacks=[times[c]])
        log(f"{optimizer} {strategy}: chunk {k}: step cached "
            f"{1e3 * times['cached'].seconds[-1]:.3f} ms, "
            f"uncached {1e3 * times['uncached'].seconds[-1]:.1f} ms")
    for s in sessions.values():
        s.close()
    r_u = results["uncached"]
    with session("cached_check", True) as s:  # same steps as the uncached run
        r_c = s.run(data, r_u.steps)
    cached = median_ms(times["cached"].seconds[fast:])
    uncached = median_ms(times["uncached"].seconds)
    rep = results["cached"].cache
    return {
        "optimizer": optimizer, "cache_enabled": rep["enabled"], "cut": rep.get("cut"),
        "prefix_nodes": rep.get("prefix_nodes"), "suffix_nodes": rep.get("suffix_nodes"),
        "cached_examples": rep.get("cached_examples"), "cache_bytes": rep.get("bytes"),
        "refused_cuts": rep.get("refused_cuts"), "reason": rep.get("reason"),
        "step_ms_uncached": uncached, "step_ms_cached_warm": cached,
        "step_ms_cached_first_chunk": median_ms(times["cached"].seconds[:fast]),
        "speedup": uncached / cached, "forward_ms_uncached": r_u.forward_ms_median,
        "identical": r_c.sha256 == r_u.sha256 and Path(r_c.journal).read_bytes()
        == Path(r_u.journal).read_bytes(), "identical_steps": r_u.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller backbone, fewer steps")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_prefix_cache_litert_"))
    try:
        bundle, summary = export(tmp, args.quick)
        out: dict[str, Any] = {
            "backbone": "MobileNetV2-like CNN",
            "input": list(el.load_bundle(bundle).inputs[0].shape),
            "params": summary["params"], "trainable_params": summary["trainable_params"],
            "batch": BATCH, "examples": N, "optimizer": "zo-sgd", "threads": 1,
            "quick": args.quick, "backend": "litert"}
        for strategy in ("inputs", "rebuild"):
            out[strategy] = compare(bundle, tmp, strategy, chunks=4, slow=2, fast=25)
        # tpSGD's taps graph (model_taps.tflite, "inputs"): one taps forward per step
        out["tpsgd"] = compare(bundle, tmp, "inputs", chunks=4, slow=2, fast=25,
                               optimizer="tpsgd")
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
