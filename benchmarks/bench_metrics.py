"""Cost of metrics.jsonl on the demo: zo-sgd runs with and without `RunMetrics`, interleaved
in one process (same machine state), plus the time spent inside the callback itself.

    python benchmarks/bench_metrics.py [--steps 300] [--rounds 5]

Prints one JSON object: per-step wall time of `Session.run` with and without metrics
(median over rounds), their ratio, and the callback's own time per step as a fraction of
the step (the figure the <= 2% target is about; the wall ratio also carries machine noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import edgelearn as el
from edgelearn.demo import DATA, RECIPES, demo_data
from edgelearn.training.metrics import RunMetrics


class TimedMetrics(RunMetrics):
    """RunMetrics that adds up the time spent in its on_step."""

    spent = 0.0

    def on_step(self, session: Any, result: Any) -> None:
        t0 = time.perf_counter()
        super().on_step(session, result)
        self.spent += time.perf_counter() - t0


def one_run(root: Path, name: str, steps: int, metrics: TimedMetrics | None) -> float:
    """Seconds per step of one fresh demo zo-sgd run."""
    recipe = RECIPES["zo-sgd"]
    config = el.TrainConfig(optimizer="zo-sgd", options=recipe["options"],
                            trainable=recipe["trainable"], batch_size=recipe["batch_size"],
                            fsync_every=100)
    train, _, _ = demo_data(0)
    with el.Session(DATA / "demo", root / name, config, el.RuntimeConfig(device=None),
                    restart=True) as s:
        t0 = time.perf_counter()
        s.run(train, steps, callbacks=[metrics] if metrics is not None else [])
        return (time.perf_counter() - t0) / steps


def main() -> None:
    """Run the interleaved comparison and print the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    off, on, inside = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one_run(root, "warm", 20, None)
        for r in range(args.rounds):
            m = TimedMetrics()
            for with_metrics in ((False, True) if r % 2 else (True, False)):  # alternate order
                if with_metrics:
                    on.append(one_run(root, "on", args.steps, m))
                else:
                    off.append(one_run(root, "off", args.steps, None))
            inside.append(m.spent / args.steps / on[-1])
    off_ms, on_ms = 1e3 * statistics.median(off), 1e3 * statistics.median(on)
    print(json.dumps({
        "optimizer": "zo-sgd (demo recipe)", "steps": args.steps, "rounds": args.rounds,
        "step_ms_without_metrics": round(off_ms, 4), "step_ms_with_metrics": round(on_ms, 4),
        "ratio": round(on_ms / off_ms, 4),
        "callback_fraction_of_step": round(statistics.median(inside), 4),
        "target": "callback_fraction_of_step <= 0.02"}))


if __name__ == "__main__":
    main()
