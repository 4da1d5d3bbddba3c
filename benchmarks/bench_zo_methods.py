"""ZO estimators side by side on the demo at one forward budget: zo-sgd, fzoo, adamezo, zo-gn.

Usage:
    python benchmarks/bench_zo_methods.py             # 3000 forwards, seeds 0 1 2 (~1 min)
    python benchmarks/bench_zo_methods.py --quick     # 600 forwards, one seed

The demo's task (`edgelearn demo`): the shipped MLP's head (650 weights) personalized on the
new user's digits (--batch-size examples per forward, default 32 as in the demo and
`edgelearn train`; onnxruntime), scored on the user's held-out digits every ~50 forwards.
Every method gets the same forward budget (a population of K candidates counts K). The
target is plain zo-sgd's final accuracy (the demo's lr 0.01 and eps 1e-3, one probe, mean over
the seeds; the demo's own zo-sgd recipe, 1500 steps of 4 probes, spends 12000 forwards). For
each method the table gives the forwards at which its held-out accuracy first reaches that
target (mean over seeds; a seed that never does counts as the budget and is flagged), the
ratio to zo-sgd's budget, and its final accuracy.
Prints a table on stderr and ONE JSON object on stdout; never asserts.
"""

from __future__ import annotations

import argparse
import json
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

#: method label -> (optimizer, options, forwards per step)
METHODS: dict[str, tuple[str, dict[str, Any], int]] = {
    "zo-sgd": ("zo-sgd", {"lr": 0.01, "eps": 1e-3, "probes": 1}, 2),
    "fzoo": ("fzoo", {}, 0),          # its defaults
    "fzoo cosine": ("fzoo", {"schedule": "cosine"}, 0),
    "adamezo": ("adamezo", {}, 0),    # its defaults
    "zo-gn": ("zo-gn", {}, 0),        # its defaults
}


def resolved(name: str, options: dict[str, Any]) -> Any:
    """The Options `name` runs with `options` (a schedule's length does not matter here)."""
    if options.get("schedule", "constant") != "constant":
        options = {"total_steps": 1, **options}
    return el.optimizers()[name](**options)


def per_step(name: str, options: dict[str, Any]) -> int:
    """Forwards one step of optimizer `name` with `options` costs."""
    k = resolved(name, options).probes
    return {"fzoo": k + 1, "zo-gn": k + 2}.get(name, 2 * k)


def history(name: str, options: dict[str, Any], budget: int, seed: int, out: Path,
            batch_size: int = 32) -> tuple[list[tuple[int, float]], float]:
    """(forwards, held-out accuracy) along one run of `budget` forwards; its seconds."""
    fwd = per_step(name, options)
    steps = budget // fwd
    if options.get("schedule", "constant") != "constant":
        options = {**options, "total_steps": steps}  # the schedule spans the run
    tr, te, _ = demo_data(0)
    config = el.TrainConfig(optimizer=name, options=options, trainable="head.*",
                            batch_size=batch_size, seed=seed, fsync_every=10_000)
    runtime = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None)
    metrics = el.RunMetrics(te, eval_every=max(1, 50 // fwd))
    t0 = time.perf_counter()
    with el.Session(el.load_bundle(DATA / "demo"), out, config, runtime, restart=True) as s:
        s.run(tr, steps, callbacks=[metrics])
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r.get("forwards", 0), r["eval_accuracy"]) for r in rows
            if r.get("eval_accuracy") is not None], seconds


def summarize(runs: list[list[tuple[int, float]]], target: float, budget: int
              ) -> dict[str, Any]:
    """Forwards to reach `target` (mean over seeds) and final accuracy of one method."""
    reach = [next((f for f, a in h if a >= target), None) for h in runs]
    finals = [h[-1][1] for h in runs]
    hit = [f if f is not None else budget for f in reach]
    return {"final_accuracy": statistics.mean(finals), "final_per_seed": finals,
            "forwards_to_target": statistics.mean(hit), "per_seed": reach,
            "ratio_to_zo_sgd": statistics.mean(hit) / budget,
            "all_seeds_reached": all(f is not None for f in reach)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="600 forwards, one seed")
    ap.add_argument("--budget", type=int, default=None, help="forwards per run (3000)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (0 1 2)")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="examples per forward (32: the demo's and edgelearn train's default)")
    args = ap.parse_args()
    budget = args.budget or (600 if args.quick else 3000)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    runs: dict[str, list[list[tuple[int, float]]]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, options, _) in METHODS.items():
            got = [history(name, options, budget, s, Path(tmp) / f"{label}-{s}",
                           args.batch_size)
                   for s in seeds]
            runs[label] = [h for h, _ in got]
            seconds[label] = sum(t for _, t in got)
    target = statistics.mean(h[-1][1] for h in runs["zo-sgd"])
    res = {"budget_forwards": budget, "seeds": seeds, "target_accuracy": target,
           "batch_size": args.batch_size,
           "methods": {}}
    sys.stderr.write(f"target = zo-sgd final accuracy after {budget} forwards "
                     f"(mean of {len(seeds)} seeds): {target:.3f}\n")
    sys.stderr.write(f"{'method':14s} {'options':72s} {'fwd->target':>11s} {'ratio':>6s} "
                     f"{'final acc':>9s} {'seconds':>7s}\n")
    for label, (name, options, _) in METHODS.items():
        s = summarize(runs[label], target, budget)
        shown = resolved(name, options).config()
        s.update(optimizer=name, options=options, seconds=seconds[label])
        res["methods"][label] = s
        flag = "" if s["all_seeds_reached"] else "*"
        keys = ("lr", "probes", "beta1", "beta2", "schedule")
        opts = json.dumps({k: shown[k] for k in keys if k in shown})
        sys.stderr.write(f"{label:14s} {opts:72s} "
                         f"{s['forwards_to_target']:>10.0f}{flag:1s} "
                         f"{s['ratio_to_zo_sgd']:>6.2f} {s['final_accuracy']:>9.3f} "
                         f"{seconds[label]:>7.1f}\n")
    sys.stderr.write("* a seed never reached the target (counted as the whole budget)\n")
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
