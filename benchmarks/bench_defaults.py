"""The default optimizer (`train` without --optimizer) against plain zo-sgd, one forward budget.

Usage:
    python benchmarks/bench_defaults.py            # 3000 forwards, seeds 0 1 2 (~2-4 min)
    python benchmarks/bench_defaults.py --quick    # 600 forwards, one seed, two zo-sgd lrs

The demo's task (`edgelearn demo`: the shipped digits MLP, the new user's shifted digits,
half to personalize, half held out), batch 32, onnxruntime, one thread, three bundle kinds:
  - "demo": the shipped bundle (taps for every layer; the manifest's trainable set, the
    head). The default is tpsgd.
  - "no taps": the same bundle with its taps graphs left out (as an exporter writes it when
    it cannot trace the model into layers). The default is zo-gn.
  - "prepared": the demo model as plain inference ONNX (`bake`) through `prepare` (head taps
    found in the ONNX graph,
    every weight trainable, so ZO must train the hidden layer). The default is hybrid.
  - "binary" (not run unless named in --kinds): a wake-word-like head, one sigmoid
    probability, on the same features: the demo's frozen hidden layer and a new 64 -> 1
    head fitted (numpy logistic regression) on the pretraining digits to "is the digit odd",
    built as plain ONNX and prepared; the head trains on the user's shifted digits with the
    bce loss, which tpSGD's head does not compute, so the default is a ZO method.
  - "two-class" (not run unless named): the binary kind's head as two softmax logits
    (cross-entropy), prepared the same way with its head taps left out ("no taps": the head
    alone trains, so the default is zo-readout, which reads two directions a probe here).
  - "error-rate" (not run unless named): the shipped bundle's head trained on the error
    rate, a loss in steps of one example that tpSGD does not compute (the default is zo-sgd
    with its lr relative to each tensor's RMS; `--also fzoo` for the default before).
On each: the default (`TrainConfig()`, optimizer "auto") and zo-sgd (one probe, eps 1e-3)
at each lr of a small grid, every run `budget` forwards (a population of K counts K, a taps
forward counts one), held-out accuracy every ~50 forwards. zo-sgd's target is the final
held-out accuracy (mean over seeds) of its best grid lr; the table gives the forwards at which
each run first reaches it (mean over seeds; a seed that never does counts as the budget and
is flagged) and the ratio to the budget. Prints a table on stderr and ONE JSON object on
stdout; never asserts.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgelearn as el  # noqa: E402
from edgelearn.demo import DATA, demo_data  # noqa: E402

#: zo-sgd's lr grid: the head alone, and every weight (the hidden layer's 4160 weights need a
#: smaller lr: the ZO estimate's norm grows with the dimension)
ZO_LRS = {"head": (0.003, 0.01, 0.03, 0.1), "all": (1e-4, 3e-4, 1e-3, 3e-3, 0.01)}


def no_taps_bundle(dst: Path, src: Path = DATA / "demo") -> Path:
    """A copy of bundle `src` (the demo's) without its taps graphs and layer records (an
    export that left them out)."""
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    m = json.loads(path.read_text())
    for role in ("onnx_taps", "tflite_taps"):
        if role in m["files"]:
            (dst / m["files"].pop(role)["path"]).unlink()
        m.pop(role, None)
    m.pop("layers", None)
    m["taps_unsupported"] = "left out for bench_defaults"
    path.write_text(json.dumps(m))
    return dst


def per_step(config: el.TrainConfig) -> int:
    """Forwards one step of the (resolved) config costs."""
    name = config.optimizer
    probes = config.options.get("probes", getattr(el.optimizers()[name], "probes", 1))
    return {"tpsgd": 1, "fzoo": probes + 1, "zo-gn": probes + 2,
            "zo-readout": probes + 1}.get(name, 2 * probes)


def run(bundle: el.Bundle, config: el.TrainConfig, budget: int, out: Path,
        binary: bool = False) -> dict[str, Any]:
    """One run of `budget` forwards: (forwards, held-out accuracy) points and its choice
    (binary: the labels "is the digit odd")."""
    tr, te, _ = demo_data(0)
    if binary:
        tr, te = (el.Dataset(d.x, d.y % 2) for d in (tr, te))
    runtime = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None)
    resolved = config.resolve(bundle, "onnxruntime")
    fwd = per_step(resolved)
    metrics = el.RunMetrics(te, eval_every=max(1, 50 // fwd))
    t0 = time.perf_counter()
    with el.Session(bundle, out, config, runtime, restart=True) as s:
        s.run(tr, budget // fwd, callbacks=[metrics])
        chosen = (s.config.optimizer, s.config.chosen_by, dict(s.config.options))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    points = [(r.get("forwards", 0), r["eval_accuracy"]) for r in rows
              if r.get("eval_accuracy") is not None]
    return {"points": points, "seconds": time.perf_counter() - t0, "optimizer": chosen[0],
            "chosen_by": chosen[1], "options": chosen[2]}


def summarize(runs: list[dict[str, Any]], target: float, budget: int) -> dict[str, Any]:
    """Forwards to `target` (mean over seeds, a miss counts `budget`) and final accuracy."""
    reach = [next((f for f, a in r["points"] if a >= target), None) for r in runs]
    hit = [f if f is not None else budget for f in reach]
    finals = [r["points"][-1][1] for r in runs]
    first = runs[0]
    return {"optimizer": first["optimizer"], "chosen_by": first["chosen_by"],
            "options": first["options"], "final_accuracy": statistics.mean(finals),
            "final_per_seed": finals, "forwards_to_target": statistics.mean(hit),
            "per_seed": reach, "ratio": statistics.mean(hit) / budget,
            "all_seeds_reached": all(f is not None for f in reach),
            "seconds": sum(r["seconds"] for r in runs)}


def bench_kind(bundle: el.Bundle, trainable: str | None, args: argparse.Namespace,
               tmp: Path, binary: bool = False, objective: str | None = None
               ) -> dict[str, Any]:
    """The default and zo-sgd's lr grid on one bundle kind (binary: its labels 0/1;
    objective: the training loss, None for the bundle's)."""
    common = {"trainable": trainable, "fsync_every": 10_000, "objective": objective}
    labels: dict[str, el.TrainConfig] = {"default": el.TrainConfig(**common)}
    grid = ZO_LRS["all" if trainable == "*" else "head"]
    for lr in grid[1:3] if args.quick else grid:
        labels[f"zo-sgd lr {lr}"] = el.TrainConfig(
            optimizer="zo-sgd", options={"lr": lr, "eps": 1e-3, "probes": 1}, **common)
    labels.update({name: el.TrainConfig(optimizer=name, **common) for name in args.also})
    runs = {label: [run(bundle, el.TrainConfig(**{**cfg.__dict__, "seed": seed}),
                        args.budget, tmp / f"{label}-{seed}".replace(" ", "_"), binary)
                    for seed in args.seeds]
            for label, cfg in labels.items()}
    finals = {label: statistics.mean(r["points"][-1][1] for r in rs)
              for label, rs in runs.items() if label.startswith("zo-sgd lr")}
    best = max(finals, key=lambda k: finals[k])
    target = finals[best]
    return {"trainable": trainable, "zo_sgd_best": best, "target_accuracy": target,
            "methods": {label: summarize(rs, target, args.budget) for label, rs in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="600 forwards, one seed, 2 lrs")
    ap.add_argument("--budget", type=int, default=None, help="forwards per run (3000)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (0 1 2)")
    ap.add_argument("--kinds", nargs="+", default=["demo", "no-taps", "prepared"],
                    choices=["demo", "no-taps", "prepared", "binary", "two-class",
                             "error-rate"])
    ap.add_argument("--also", nargs="+", default=[], metavar="OPTIMIZER",
                    help="further optimizers at their own defaults on every kind (zo-gn fzoo)")
    args = ap.parse_args()
    args.budget = args.budget or (600 if args.quick else 3000)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    res: dict[str, Any] = {"budget_forwards": args.budget, "seeds": args.seeds,
                           "batch_size": 32, "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        bundles = {"demo": (lambda: el.load_bundle(DATA / "demo"), None),
                   "no-taps": (lambda: el.load_bundle(no_taps_bundle(tmp / "nt")), None),
                   "prepared": (lambda: _prepared(tmp), "*"),
                   "binary": (lambda: _binary(tmp), "head.*"),
                   "two-class": (lambda: _binary(tmp, two_class=True), "head.*"),
                   "error-rate": (lambda: el.load_bundle(DATA / "demo"), None)}
        for kind in args.kinds:
            make, trainable = bundles[kind]
            res["kinds"][kind] = bench_kind(
                make(), trainable, args, tmp / kind, binary=kind in ("binary", "two-class"),
                objective="error-rate" if kind == "error-rate" else None)
    _table(res)
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


def _prepared(tmp: Path) -> el.Bundle:
    """The demo model as a plain inference ONNX (`bake`, weights as initializers) through
    `prepare` (every weight trainable; head taps found in the graph)."""
    baked = el.tools.bake(DATA / "demo", DATA / "demo" / "weights.safetensors", tmp / "baked")
    el.tools.prepare(baked["inference"]["onnx"], tmp / "prep")
    return el.load_bundle(tmp / "prep")


def _binary(tmp: Path, two_class: bool = False) -> el.Bundle:
    """The binary kind's bundle (module docstring): the demo's hidden layer, a 64 -> 1
    sigmoid head fitted to "odd" on the pretraining digits, as plain ONNX through prepare
    (two_class: the same fit as two softmax logits -z/2, z/2, whose class-1 probability is
    sigmoid(z): the "two-class" kind, cross-entropy on logits [batch, 2])."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgelearn.model import Model

    store = Model(el.load_bundle(DATA / "demo")).store
    w0, b0 = np.array(store["layers.0.weight"]), np.array(store["layers.0.bias"])
    with np.load(DATA / "digits.npz", allow_pickle=False) as f:
        pre = f["pretrain"]
        x, t = f["x"][pre].astype(np.float64) / 16.0, (f["y"][pre] % 2).astype(np.float64)
    h = np.maximum(x @ w0.T + b0, 0.0)
    w, c = np.zeros(h.shape[1]), 0.0
    for _ in range(2000):  # logistic regression by gradient descent (convex: any start)
        g = 1.0 / (1.0 + np.exp(-(h @ w + c))) - t
        w, c = w - 0.5 * h.T @ g / len(t), c - 0.5 * float(g.mean())
    hw, hb = (np.stack([-w / 2, w / 2]), np.array([-c / 2, c / 2])) if two_class else (
        w[None], np.array([c]))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("layers.0.weight", w0), ("layers.0.bias", b0), ("head.weight", hw),
        ("head.bias", hb))]
    nodes = [helper.make_node("Gemm", ["x", "layers.0.weight", "layers.0.bias"], ["a"],
                              transB=1),
             helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("Gemm", ["h", "head.weight", "head.bias"], ["z"], transB=1)]
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 2])
    if not two_class:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["prob"]))
        out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(
        nodes, "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    name = "odd2" if two_class else "odd"
    onnx.save(model, tmp / f"{name}.onnx")
    el.tools.prepare(tmp / f"{name}.onnx", tmp / name)
    if two_class:
        return el.load_bundle(no_taps_bundle(tmp / f"{name}-no-taps", tmp / name))
    return el.load_bundle(tmp / name)


def _table(res: dict[str, Any]) -> None:
    w = sys.stderr.write
    w(f"budget {res['budget_forwards']} forwards, seeds {res['seeds']}, batch 32\n")
    for kind, k in res["kinds"].items():
        w(f"\n{kind}: target = {k['zo_sgd_best']} final accuracy {k['target_accuracy']:.3f}\n")
        w(f"{'method':18s} {'optimizer':9s} {'fwd->target':>11s} {'ratio':>6s} "
          f"{'final acc':>9s} {'seconds':>7s}\n")
        for label, s in k["methods"].items():
            flag = "" if s["all_seeds_reached"] else "*"
            w(f"{label:18s} {s['optimizer']:9s} {s['forwards_to_target']:>10.0f}{flag:1s} "
              f"{s['ratio']:>6.2f} {s['final_accuracy']:>9.3f} {s['seconds']:>7.1f}\n")
        w(f"  default: {k['methods']['default']['chosen_by']}\n")
    w("* a seed never reached the target (counted as the whole budget)\n")


if __name__ == "__main__":
    main()
