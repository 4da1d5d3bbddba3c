"""PolyStep benchmark: one runtime call per probe vs the population graph (K probes per call).

Usage:
    python benchmarks/bench_polystep.py            # MLP 64-256-10 and 64-512-512-10, batch 32
    python benchmarks/bench_polystep.py --quick

Prints ONE JSON object on stdout; never asserts. For each model and trainable set, a PolyStep
step (rank 16 per tensor -> 16 probes per particle) is timed three ways side by side in this
run, interleaved, medians:
  single       `opt.step(store, evaluate)`: the base class expands the population request,
               one IOBinding forward per probe (weights edited in place).
  population   `opt.step(store, evaluate, evaluate_population)`: every candidate written into
               a [K, n] buffer and scored by the vmap'ed population graph in one call (chunks
               of 64 candidates).
  zo_sgd       a 1-probe ZO-SGD step (2 forwards), for scale.
Ratios: single / population (> 1 = population is faster). Also per-probe costs and the int8
step (QDQ bundle, head int8 weights, single path: population graphs are float32-only).

    python benchmarks/bench_polystep.py --scaling   # torch-free

Step time vs the number of trainable tensors: a deep int8 MLP (width 32, L layers, built with
onnx.helper, `quantize_dynamic` -> MatMulInteger) prepared by `edgelearn prepare`, PolyStep on
its int8 weights, batch 32: unbounded (`max_particles=None`, the behaviour before the probe
budget: 16 probes x 2 particles per tensor) vs the default budget (8 particles per step).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np


def _compare(path: Path, x: np.ndarray, y: np.ndarray, reps: int) -> dict:
    """Time single-call vs population-graph PolyStep steps (and a ZO-SGD step) on a bundle."""
    from edgelearn.backends.ort_population import OrtPopulation
    from edgelearn.bench import median_ms
    from edgelearn.bundle import load_bundle
    from edgelearn.losses import cross_entropy
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer

    bundle = load_bundle(path)
    model = Model(bundle, threads=2)
    store = model.store
    pop = OrtPopulation(bundle, store, threads=2)
    opt = make_optimizer("polystep", rank=16, radius=1e-3, seed=0)
    zo = make_optimizer("zo-sgd", lr=0.0, seed=0)

    def ev() -> float:
        return cross_entropy(model.predict(x), y)

    def single() -> None:
        opt.step(store, ev)

    def batched() -> None:
        opt.step(store, ev, lambda p: pop.losses(p, x, y, cross_entropy))

    probes = opt.probes_per_step(store)
    single()
    batched()
    s_ms, p_ms, z_ms = [], [], []
    for _ in range(reps):
        s_ms.append(median_ms(single, 1, warmup=0))
        p_ms.append(median_ms(batched, 1, warmup=0))
        z_ms.append(median_ms(lambda: zo.step(store, ev), 1, warmup=0))
    s, p, z = (statistics.median(v) for v in (s_ms, p_ms, z_ms))
    fwd = median_ms(lambda: model.predict(x), 30, warmup=0)
    return {
        "trainable_params": store.n_trainable("float32"),
        "probes_per_step": probes, "forward_ms": fwd,
        "step_ms_single": s, "step_ms_population": p, "step_ms_zo_sgd": z,
        "ms_per_probe_single": s / probes, "ms_per_probe_population": p / probes,
        "ratio_single_over_population": s / p,
    }


def _deep_int8(tmp: Path, layers: int) -> Path:
    """A prepared bundle of an int8 (MatMulInteger) MLP [N, 32] with `layers` 32x32 layers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgelearn.prepare import prepare_onnx

    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        h = f"h{i}"
    nodes[-1] = helper.make_node("Identity", [f"m{layers - 1}"], ["logits"])
    graph = helper.make_graph(
        nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp / f"f{layers}.onnx"))
    quantize_dynamic(str(tmp / f"f{layers}.onnx"), str(tmp / f"q{layers}.onnx"),
                     weight_type=QuantType.QInt8, per_channel=True)
    prepare_onnx(tmp / f"q{layers}.onnx", tmp / f"b{layers}")
    return tmp / f"b{layers}"


def scaling(layer_counts: tuple[int, ...] = (4, 16, 64)) -> dict:
    """PolyStep step time vs trainable tensors, with and without the probe budget."""
    import logging

    from edgelearn.bench import median_ms
    from edgelearn.bundle import load_bundle
    from edgelearn.losses import cross_entropy
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer

    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 32)).astype(np.float32)
    y = rng.integers(0, 32, 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in layer_counts:
            model = Model(load_bundle(_deep_int8(Path(tmp), layers)), threads=2)
            fwd = median_ms(lambda m=model: m.predict(x), 20, warmup=2)
            row = {"int8_tensors": layers, "int8_params": model.store.n_trainable("int8"),
                   "forward_ms": fwd}
            for label, budget in (("unbounded", None), ("budget_8", 8)):
                opt = make_optimizer("polystep", radius=2.0, max_particles=budget, seed=0)
                ms = median_ms(lambda o=opt, m=model: o.step(
                    m.store, lambda: cross_entropy(m.predict(x), y)), 3, warmup=1)
                row[f"probes_{label}"] = opt.probes_per_step(model.store)
                row[f"step_ms_{label}"] = ms
            rows.append(row)
            print(row, file=sys.stderr)
    return {"machine": platform.machine(), "batch": 32, "runs": rows, "note":
            "2 shared vCPUs under load from other jobs: figures are noisy"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scaling", action="store_true",
                    help="step time vs trainable tensors, with / without the probe budget")
    args = ap.parse_args()
    if args.scaling:
        print(json.dumps(scaling()))
        return
    import torch
    from edgelearn.export import export_bundle
    from edgelearn.export.population import add_population_graph
    from edgelearn.export.quantize import export_int8_bundle
    from edgelearn.export.zoo import MLP

    from edgelearn.bench import median_ms
    from edgelearn.bundle import load_bundle
    from edgelearn.losses import cross_entropy
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer

    reps = 3 if args.quick else 7
    configs = [("mlp_64_256_10", (256,), "head.*"), ("mlp_64_256_10", (256,), "*")]
    if not args.quick:
        configs.append(("mlp_64_512x2_10", (512, 512), "head.*"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    out: dict = {"machine": platform.machine(), "batch": 32, "reps": reps, "note":
                 "2 shared vCPUs under load from other jobs: figures are noisy", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, hidden, trainable in configs:
            torch.manual_seed(0)
            module = MLP(64, hidden, 10)
            path = Path(tmp) / f"{name}_{trainable.strip('.*') or 'all'}"
            export_bundle(module, torch.randn(1, 64), path, trainable=trainable)
            add_population_graph(module, torch.randn(1, 64), path)
            row = _compare(path, x, y, reps)
            row.update(model=name, trainable=trainable)
            out["runs"].append(row)
            s, p = row["step_ms_single"], row["step_ms_population"]
            print(f"{name} {trainable}: single {s:.1f} ms, population {p:.1f} ms",
                  file=sys.stderr)
        torch.manual_seed(0)
        module = MLP(64, (256,), 10)
        path = Path(tmp) / "int8"
        export_int8_bundle(module, torch.randn(1, 64), path)
        model = Model(load_bundle(path), trainable="head.weight", threads=2)
        opt = make_optimizer("polystep", rank=16, radius=2.0, seed=0)
        fwd = median_ms(lambda: model.predict(x), 30, warmup=0)
        step = median_ms(lambda: opt.step(model.store,
                                          lambda: cross_entropy(model.predict(x), y)), reps,
                         warmup=0)
        out["int8"] = {"model": "mlp_64_256_10 int8 QDQ", "trainable": "head.weight (int8)",
                       "probes_per_step": opt.probes_per_step(model.store),
                       "forward_ms": fwd, "step_ms_single": step,
                       "overhead_per_probe_over_forward": step / opt.probes_per_step(
                           model.store) / fwd}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
