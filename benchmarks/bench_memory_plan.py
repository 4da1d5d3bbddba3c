"""The memory plan against the measured peak: population optimizers on a model large enough
for their candidates to matter.

Usage:
    python benchmarks/bench_memory_plan.py            # 4.7M-weight MLP, batch 256 (~1 min)
    python benchmarks/bench_memory_plan.py --quick    # 1.2M weights, batch 64
    python benchmarks/bench_memory_plan.py --before REF   # also the tree of git ref REF

A torch child exports an MLP 256-2048-2048-10 (`--quick`: 256-1024-1024-10) with a population
graph (export/population.py: every weight carries the population dimension). Each optimizer
then trains it, every weight trainable, for a few steps in its own fresh process under a
generous memory budget (so the batch is not shrunk): the process prints the run's memory plan
(`RunResult.memory_plan`: predicted peak with its 10% margin, candidates per runtime call),
its measured peak resident memory (getrusage) and its median step time. The plan promises
that a batch that fits there fits on the device: predicted >= measured, and close to it.
With --before REF the same runs use the `edgelearn` of git ref REF as well (extracted with
git archive; its plans may lack "candidates_per_call"). Prints a table on stderr and ONE
JSON object on stdout; never asserts.
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

ROOT = Path(__file__).resolve().parent.parent

#: optimizer -> options (zo-sgd: its default restore, drift at this size: no population)
OPTIMIZERS: dict[str, dict[str, Any]] = {"zo-gn": {}, "fzoo": {}, "adamezo": {},
                                         "zo-sgd": {}}

EXPORT = r"""
import sys, torch
from edgelearn.export import export_bundle
from edgelearn.export.population import add_population_graph
from edgelearn.export.zoo import MLP
torch.manual_seed(0)
width = int(sys.argv[2])
m = MLP(256, (width, width), 10)
export_bundle(m, torch.randn(1, 256), sys.argv[1])
add_population_graph(m, torch.randn(1, 256), sys.argv[1])
"""

RUN = r"""
import json, resource, sys, tempfile
from pathlib import Path
import numpy as np
import edgelearn as el
bundle, name, options, batch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
data = el.Dataset(rng.standard_normal((4 * batch, 256)).astype(np.float32),
                  rng.integers(0, 10, 4 * batch))
cfg = el.TrainConfig(optimizer=name, options=options, trainable="*", batch_size=batch)
runtime = el.RuntimeConfig(threads=2, memory_budget_mb=1 << 20)
with el.Session(el.load_bundle(bundle), Path(tempfile.mkdtemp()) / "run", cfg, runtime) as s:
    res = s.run(data, 4)
    pop = s.evaluator.population_graph
plan = res.memory_plan
print(json.dumps({"predicted_peak_mb": plan["predicted_peak_mb"],
                  "candidates_per_call": plan.get("candidates_per_call"),
                  "batch_size": plan["batch_size"], "population_graph": pop,
                  "step_ms_median": res.step_ms_median,
                  "measured_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def log(msg: str) -> None:
    sys.stderr.write(f"[bench_memory_plan {time.strftime('%H:%M:%S')}] {msg}\n")


def run(tree: Path, bundle: Path, name: str, options: dict[str, Any], batch: int
        ) -> dict[str, Any]:
    """One optimizer's run in a fresh process on the `edgelearn` of `tree`: its plan, peak."""
    p = subprocess.run([sys.executable, "-c", RUN, str(bundle), name, json.dumps(options),
                        str(batch)], capture_output=True, text=True, cwd=tree, check=True,
                       env={**os.environ, "PYTHONPATH": str(tree)})
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["predicted_over_measured"] = r["predicted_peak_mb"] / r["measured_peak_mb"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 1024-wide MLP, batch 64")
    ap.add_argument("--before", metavar="REF", help="also run the tree of git ref REF")
    args = ap.parse_args()
    width, batch = (1024, 64) if args.quick else (2048, 256)
    res: dict[str, Any] = {"model": f"256-{width}-{width}-10", "batch_size": batch,
                           "ref_before": args.before, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "mlp"
        log(f"exporting the {res['model']} MLP with its population graph (torch child)")
        subprocess.run([sys.executable, "-c", EXPORT, str(bundle), str(width)], check=True,
                       capture_output=True, cwd=ROOT)
        trees = {"after": ROOT}
        if args.before:
            trees["before"] = Path(tmp) / "before"
            trees["before"].mkdir()
            arch = subprocess.run(["git", "-C", str(ROOT), "archive", args.before,
                                   "edgelearn"], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(trees["before"])], input=arch, check=True)
        for tag, tree in trees.items():
            for name, options in OPTIMIZERS.items():
                r = res["runs"].setdefault(tag, {})[name] = run(tree, bundle, name, options,
                                                                batch)
                log(f"{tag:6s} {name:8s} candidates per call "
                    f"{r['candidates_per_call'] or '-':>2}  predicted "
                    f"{r['predicted_peak_mb']:7.1f} MB  measured {r['measured_peak_mb']:7.1f} MB  "
                    f"step {r['step_ms_median']:.0f} ms")
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
