"""zo-gn's damping across model sizes: Marquardt's scaling against a damping per unit-norm
direction, on a 4.35M-weight MLP where the demo head has 650 weights, one forward budget.

Usage:
    python benchmarks/bench_zo_gn_scale.py            # 3000 forwards, seed 0 (~4 min)
    python benchmarks/bench_zo_gn_scale.py --quick    # 600 forwards, a 1.1M-weight MLP
    python benchmarks/bench_zo_gn_scale.py --width 4096 --no-taps --runs auto,zo-gn
        # 17.1M weights (68 MB, above zo-gn's 64 MiB copy limit), exported without taps:
        # what `train` picks by default ("auto") against named runs (~7 min)
    python benchmarks/bench_zo_gn_scale.py --width 1024 --objective error-rate \
        --runs "auto,zo-sgd lr 1e-3,fzoo,zo-sgd relative 0.003"   # a loss in steps (~1 min)

The task is the demo's (`edgelearn demo`: the new user's shifted digits, half to personalize,
half held out), on a wider model: an MLP 64-2048-2048-10 (4.35M weights, 17 MB; --width
sets the hidden width) pretrained in a torch child process on the digits the demo's
pretraining used (30 epochs of Adam), exported as a bundle. Every weight is
trainable; batch 32; onnxruntime. Each run gets `budget` forwards (zo-gn: K + 2 a step):
  - zo-gn at its defaults (damping 3 times each direction's curvature, Marquardt 1963, and
    the trust region on the outputs);
  - zo-gn's first version: damping_scale "weights" at 0.1 (its default then, per unit-norm
    direction: lambda n with n the trainable count), and at 0.001, without a trust region;
  - zo-sgd (probes 1, eps 1e-3) at lr 1e-4, 3e-4 and 1e-3 (its default);
  - zo-sgd with lr 0.003 of each tensor's RMS (`relative_lr`), and fzoo at its defaults;
  - with --runs, "auto" as well: the optimizer and options `train` picks without
    --optimizer (`edgelearn.optim.defaults`; with --no-taps a ZO method), its reason recorded
    under "chosen_by".
Prints each run's held-out accuracy (and the accuracy before) on stderr and ONE JSON object on
stdout; never asserts. The curvature per weight (the mean of G's diagonal over n) is reported
from zo-gn's first step: how far apart the damping per unit-norm direction must be set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_defaults import per_step  # noqa: E402  (this script's folder is on sys.path)

import edgelearn as el  # noqa: E402
from edgelearn.demo import demo_data  # noqa: E402

#: label -> (optimizer, options)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "zo-gn": ("zo-gn", {}),
    "zo-gn first version": ("zo-gn", {"damping_scale": "weights", "damping": 0.1,
                                      "trust": None}),
    "first version, 0.001": ("zo-gn", {"damping_scale": "weights", "damping": 0.001,
                                       "trust": None}),
    "zo-sgd lr 1e-4": ("zo-sgd", {"lr": 1e-4}),
    "zo-sgd lr 3e-4": ("zo-sgd", {"lr": 3e-4}),
    "zo-sgd lr 1e-3": ("zo-sgd", {}),
    "zo-sgd relative 0.003": ("zo-sgd", {"relative_lr": True, "lr": 0.003}),
    "fzoo": ("fzoo", {}),
}

EXPORT = """
import sys, numpy as np, torch
from edgelearn.export import export_bundle
from edgelearn.export.zoo import MLP
torch.manual_seed(0)
with np.load(sys.argv[2]) as f:
    x = torch.from_numpy(f["x"].astype(np.float32) / 16)
    y = torch.from_numpy(f["y"].astype(np.int64))
    pre = torch.from_numpy(f["pretrain"])
m = MLP(64, (int(sys.argv[3]), int(sys.argv[3])), 10)
opt = torch.optim.Adam(m.parameters(), 1e-3)
xp, yp = x[pre], y[pre]
for _ in range(30):
    perm = torch.randperm(len(xp))
    for i in range(0, len(xp), 64):
        idx = perm[i:i + 64]
        loss = torch.nn.functional.cross_entropy(m(xp[idx]), yp[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
export_bundle(m.eval(), torch.zeros(1, 64), sys.argv[1], taps=sys.argv[4] == "taps")
"""


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(f"[bench_zo_gn_scale {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def export(out: Path, width: int, taps: bool = True) -> Path:
    """Pretrain and export the wide MLP in a torch child process (never imported here); no
    taps graphs with taps=False (what `train` then picks by default is a ZO method)."""
    subprocess.run([sys.executable, "-c", EXPORT, str(out), str(ROOT / "edgelearn" / "data" /
                                                              "digits.npz"), str(width),
                    "taps" if taps else "none"],
                   check=True, capture_output=True, cwd=ROOT)
    return out


def personalize(bundle: Path, name: str, options: dict[str, Any], budget: int, seed: int,
                out: Path, objective: str | None = None) -> dict[str, Any]:
    """Held-out accuracy after `budget` forwards of optimizer `name` on every weight."""
    config = el.TrainConfig(optimizer=name, options=options, trainable="*", batch_size=32,
                            seed=seed, fsync_every=10_000, objective=objective)
    train, test, _ = demo_data(0)
    t0 = time.perf_counter()
    with el.Session(el.load_bundle(bundle), out, config, el.RuntimeConfig(device=None)) as s:
        opt = s.optimizer
        r = s.run(train, budget // per_step(s.config))
        acc = s.model.evaluate(test)["accuracy"]
    return {"optimizer": opt.name, "options": options, "chosen_by": r.chosen_by,
            "steps": r.steps, "accuracy": acc, "loss_last": r.loss_last,
            "peak_rss_mb": r.peak_rss_mb, "step_ms_median": r.step_ms_median,
            "seconds": round(time.perf_counter() - t0, 1)}


def curvature_per_weight(bundle: Path) -> float:
    """Mean diagonal of zo-gn's first Gauss-Newton system over the trainable count."""
    from edgelearn.optim import zo_gn

    seen: list[float] = []
    solve = zo_gn.gauss_newton_step

    def spy(G: Any, g: Any, damping: Any) -> Any:
        seen.append(float(G.diagonal().mean()))
        return solve(G, g, damping)

    zo_gn.gauss_newton_step = spy
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = el.TrainConfig(optimizer="zo-gn", trainable="*", batch_size=32)
            with el.Session(el.load_bundle(bundle), Path(tmp) / "r", cfg,
                            el.RuntimeConfig(device=None)) as s:
                s.run(demo_data(0)[0], 1)
                n = s.store.n_trainable("float32")
    finally:
        zo_gn.gauss_newton_step = solve
    return seen[0] / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="600 forwards, a 1024-wide MLP")
    ap.add_argument("--budget", type=int, default=None, help="forwards per run (3000)")
    ap.add_argument("--seed", type=int, default=0, help="run seed")
    ap.add_argument("--width", type=int, default=None,
                    help="hidden width (2048; 4096: 17.1M weights, above zo-gn's copy limit)")
    ap.add_argument("--no-taps", action="store_true",
                    help="export without taps graphs (the 'auto' run then picks a ZO method)")
    ap.add_argument("--objective", default=None,
                    help="the training loss (cross-entropy; error-rate: the runs "
                    "'auto,zo-sgd lr 1e-3,fzoo,zo-sgd relative 0.003' compare its defaults)")
    ap.add_argument("--runs", default=None,
                    help="comma-separated labels of RUNS and 'auto' to run (all of RUNS)")
    args = ap.parse_args()
    budget = args.budget or (600 if args.quick else 3000)
    width = args.width or (1024 if args.quick else 2048)
    runs = {**RUNS, "auto": ("auto", {})}
    labels = args.runs.split(",") if args.runs else list(RUNS)
    unknown = [x for x in labels if x not in runs]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(runs)}")
    with tempfile.TemporaryDirectory() as tmp:
        log(f"pretraining and exporting the 64-{width}-{width}-10 MLP (torch child)")
        bundle = export(Path(tmp) / "mlp", width, taps=not args.no_taps)
        from edgelearn.model import Model
        model = Model(el.load_bundle(bundle))
        before = model.evaluate(demo_data(0)[1])["accuracy"]
        res: dict[str, Any] = {"budget_forwards": budget, "seed": args.seed,
                               "objective": args.objective or "cross-entropy",
                               "weights": model.store.n_trainable("float32"),
                               "accuracy_before": before,
                               "curvature_per_weight": curvature_per_weight(bundle),
                               "runs": {}}
        log(f"{res['weights']} weights, held-out accuracy before {before:.3f}, curvature "
            f"per weight {res['curvature_per_weight']:.3g}")
        for label in labels:
            name, options = runs[label]
            r = personalize(bundle, name, options, budget, args.seed, Path(tmp) / label,
                            args.objective)
            res["runs"][label] = r
            log(f"{label:22s} {r['steps']:5d} steps  accuracy {r['accuracy']:.3f}  "
                f"({r['seconds']} s)")
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
