"""tpSGD step time vs one plain forward, over a size sweep: where the time of a step goes.

Usage:
    python benchmarks/bench_tpsgd_step.py            # full sweep (a few minutes on 2 cores)
    python benchmarks/bench_tpsgd_step.py --quick    # batch 32 only, fewer repeats (< 1 min)

Prints ONE JSON object on stdout; progress on stderr; never asserts. For every model, batch size
and trainable set, measured side by side in this process (ORT and BLAS on 1 thread, random
inputs, blocks of the three timings interleaved, each block ~2 s (--quick: 0.3 s), medians of
block medians):
  forward_ms       one plain forward of model.onnx with the same trainable set bound live
                   (frozen weights baked, as `edgelearn train` runs it).
  taps_forward_ms  one forward of model_taps.onnx alone (every layer's taps copied out).
  step_ms          one full tpSGD step at lr 0 (same work, weights unchanged): taps forward,
                   local gradients, in-place updates.
  split_ms         the step split: taps forward / local gradients (+ losses, bookkeeping) /
                   updates (`_sub` calls), medians over the step runs.
  flops            forward FLOPs (2 * multiply-adds of the conv / linear layers) and the
                   weight-gradient GEMM FLOPs of the trainable layers: `floor_ratio` =
                   (forward + gradient GEMM FLOPs) / forward FLOPs is the ratio a step cannot
                   beat when the taps forward costs a plain forward and GEMMs run at the
                   forward's FLOP rate.
  floor            the same floor measured: the trainable layers' bare dW GEMMs timed alone
                   (random operands of the step's shapes), (forward + GEMMs) / forward, and
                   how far the step is above forward + GEMMs.
Trainable sets: "all" (every layer), "last2" (head + last hidden layer, its batch norm
included) and "head" (the output layer alone: exact SGD on the true loss), the
personalization cases. The models are exported by a child process, so torch's threads never run
beside the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (zoo factory, kwargs, input shape without batch, trainable globs by set name)
MODELS: dict[str, tuple[str, dict[str, Any], tuple[int, ...], dict[str, str]]] = {
    "mlp_64_64_10": ("mlp", {}, (64,), {"all": "*", "last2": "layers.0.*,head.*",
                                        "head": "head.*"}),
    "cnn_8x8_w16": ("cnn", {}, (1, 8, 8), {"all": "*", "last2": "conv2.*,bn2.*,head.*",
                                           "head": "head.*"}),
    "mlp_784_1024_1024_10": ("mlp", {"in_features": 784, "hidden": (1024, 1024)}, (784,),
                             {"all": "*", "last2": "layers.1.*,head.*", "head": "head.*"}),
    "cnn_28x28_w32": ("cnn", {"size": 28, "width": 32}, (1, 28, 28),
                      {"all": "*", "last2": "conv2.*,bn2.*,head.*", "head": "head.*"}),
}


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(f"[bench_tpsgd_step {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def export_all(out: Path) -> None:
    """Child process: export every model of MODELS under `out` (torch lives only here)."""
    import torch
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import ZOO

    for name, (zoo, kw, shape, _) in MODELS.items():
        torch.manual_seed(0)
        module = ZOO[zoo][0](**kw)
        export_bundle(module, torch.randn(1, *shape), out / name)


def layer_flops(bundle: Any, store: Any, x: np.ndarray
                ) -> list[tuple[str, list[str], float, tuple[int, int, int]]]:
    """(name, parameter names, forward FLOPs on batch x, dW GEMM (M, K, N)) per layer record."""
    from edgelearn.backends.ort import OrtBackend
    from edgelearn.layers import parse_layers

    layers = parse_layers(bundle.manifest, {p.name for p in bundle.params})
    be = OrtBackend(bundle, graph="onnx_taps", threads=1)
    be.bind(store)
    taps = be.forward({bundle.inputs[0].name: x})
    taps[bundle.inputs[0].name] = x
    out = []
    for layer in layers:
        w = store[layer.params["weight"]]
        z = taps[layer.preact]  # [N, out] or [N, O, Ho, Wo]
        fan_in = int(np.prod(w.shape[1:]))  # in, or C*kh*kw
        macs = z.size * fan_in
        gemm = (w.shape[0], z.size // w.shape[0], fan_in)  # dW [O, fan_in] over N*Ho*Wo
        out.append((layer.name, layer.param_names(), 2.0 * macs, gemm))
    return out


def gemm_ms(shapes: list[tuple[int, int, int]], runs: int) -> float:
    """Median time of the bare weight-gradient GEMMs [M, K] @ [K, N] (float32, 1 thread)."""
    from threadpoolctl import threadpool_limits

    from edgelearn.bench import median_ms

    rng = np.random.default_rng(0)
    mats = [(rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32))
            for m, k, n in shapes]  # B stored [N, K] and used transposed, as conv2d_grads does
    with threadpool_limits(limits=1, user_api="blas"):
        return median_ms(lambda: [a @ b.T for a, b in mats], runs)


def measure(bundle: Any, glob: str, batch: int, block_s: float, blocks: int) -> dict[str, Any]:
    """Forward / taps forward / step timings of one bundle, trainable set and batch size.

    Args:
        block_s: wall time one block of (forwards, taps forwards, steps) should take; the
            number of runs per timing is set from one probe of each.
        blocks: interleaved blocks; figures are medians of the block medians.
    """
    from edgelearn.bench import median_ms, random_batch
    from edgelearn.data import Dataset
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer
    from edgelearn.optim import tpsgd as tpsgd_mod
    from edgelearn.training.evaluators import make_evaluator
    from edgelearn.training.timing import Timers

    x, y = random_batch(bundle, 4 * batch)
    data = Dataset(x, y.astype(np.int64))
    plain = Model(bundle, trainable=glob, threads=1)
    store = bundle.load_store(trainable=glob)
    opt = make_optimizer("tpsgd", lr=0.0)  # lr 0: same work, weights unchanged
    timers = Timers()  # its forward ring gets the taps forward of each step
    ev = make_evaluator(bundle, store, opt, backend="onnxruntime", threads=1, timers=timers)
    xb, yb = data.batch_at(0, batch, 0)
    evaluate = ev.forwards(xb, yb).evaluate
    sub_times: list[float] = []
    real_sub = tpsgd_mod._sub

    def timed_sub(view: np.ndarray, grad: np.ndarray, lr: np.float32) -> None:
        t0 = time.perf_counter()
        real_sub(view, grad, lr)
        sub_times.append(time.perf_counter() - t0)

    fwd, taps, step, split = [], [], [], []
    tpsgd_mod._sub = timed_sub  # type: ignore[assignment]
    try:
        probe = sum(median_ms(fn, 3, warmup=2) for fn in (lambda: plain.predict(xb), evaluate,
                                                          lambda: opt.step(store, evaluate)))
        runs = int(min(max(1e3 * block_s / probe, 10), 2000))
        for _ in range(blocks):
            fwd.append(median_ms(lambda: plain.predict(xb), runs))
            taps.append(median_ms(evaluate, runs))
            for i in range(runs + 3):  # 3 warm-up steps per block
                timers.clear()
                sub_times.clear()
                t0 = time.perf_counter()
                opt.step(store, evaluate)
                total = time.perf_counter() - t0
                taps_ms = timers.forward.median_ms() or 0.0  # the step's one taps forward
                if i >= 3:
                    split.append((total, taps_ms / 1e3, sum(sub_times)))
            step.append(float(np.median([s[0] for s in split[-runs:]])) * 1e3)
    finally:
        tpsgd_mod._sub = real_sub  # type: ignore[assignment]
    f, tp, s = (float(np.median(v)) for v in (fwd, taps, step))
    sp = np.array(split)
    t_taps, t_upd = float(np.median(sp[:, 1])) * 1e3, float(np.median(sp[:, 2])) * 1e3
    t_grad = float(np.median(sp[:, 0] - sp[:, 1] - sp[:, 2])) * 1e3
    flops = layer_flops(bundle, store, xb)
    trainable = set(store.trainable_names)
    fwd_flops = sum(fl for _, _, fl, _ in flops)
    grad_flops = sum(fl for _, names, fl, _ in flops if trainable & set(names))
    g_ms = gemm_ms([g for _, names, _, g in flops if trainable & set(names)], runs)
    return {
        "runs_per_block": runs, "forward_ms": f, "taps_forward_ms": tp, "step_ms": s,
        "step_over_forward": s / f, "taps_over_forward": tp / f,
        "split_ms": {"taps_forward": t_taps, "local_gradients": t_grad, "updates": t_upd},
        "trainable_params": store.n_trainable("float32"),
        "flops": {"forward": fwd_flops, "gradient_gemms": grad_flops,
                  "floor_ratio": (fwd_flops + grad_flops) / fwd_flops,
                  "forward_gflops_per_s": fwd_flops / f / 1e6,
                  "step_gflops_per_s": (fwd_flops + grad_flops) / s / 1e6},
        "floor": {"gradient_gemms_ms": g_ms, "forward_plus_gemms_over_forward": (f + g_ms) / f,
                  "step_over_forward_plus_gemms": s / (f + g_ms)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--export", help=argparse.SUPPRESS)  # child process: export, then exit
    args = ap.parse_args()
    if args.export:
        export_all(Path(args.export))
        return
    from edgelearn.bundle import Bundle

    batches = [32] if args.quick else [32, 256]
    block_s, blocks = (0.3, 2) if args.quick else (2.0, 3)
    with tempfile.TemporaryDirectory(prefix="bench_tpsgd_step") as tmp:
        log("exporting models (child process)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        child = subprocess.run([sys.executable, __file__, "--export", tmp], env=env,
                               capture_output=True, text=True)
        if child.returncode:
            sys.stderr.write(child.stderr)
            raise SystemExit(f"export failed (exit {child.returncode})")
        out: dict[str, Any] = {
            "note": "2 shared vCPUs under load by other jobs; ORT and BLAS on 1 thread",
            "block_s": block_s, "blocks": blocks, "results": {}}
        for name, (_, _, _, globs) in MODELS.items():
            bundle = Bundle(Path(tmp) / name)
            for batch in batches:
                for which, glob in globs.items():
                    key = f"{name}/b{batch}/{which}"
                    log(key)
                    out["results"][key] = {"trainable": glob,
                                           **measure(bundle, glob, batch, block_s, blocks)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
