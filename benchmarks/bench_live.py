"""Samples arriving one at a time: each optimizer personalizes the demo head with
`Session.step`, one sample a step (batch 1), and is scored on the held-out digits.

Usage:
    python benchmarks/bench_live.py              # 400 samples (~1 min)
    python benchmarks/bench_live.py --samples 100

The demo's task (`edgelearn demo`: the new user's shifted digits; the head's 650 weights
trainable; onnxruntime). Each run feeds the user's personalization digits in order, one per
`Session.step` (an app's samples as they come: no batches, no epochs), and scores the
held-out digits every 50 samples. Methods: zo-gn at its defaults, zo-gn without its trust
region (`trust` null) and with its first version's damping (0.1 per unit-norm direction, no
trust region), fzoo and zo-sgd (lr 0.01, the demo's) at their defaults, tpsgd (exact head
updates; its run records the samples, which its replay needs) and zo-readout at its
defaults. Prints a table on stderr and ONE JSON object on stdout; never asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgelearn as el  # noqa: E402
from edgelearn.demo import DATA, demo_data  # noqa: E402

#: label -> (optimizer, options, TrainConfig extras)
RUNS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "zo-gn": ("zo-gn", {}, {}),
    "zo-gn, no trust region": ("zo-gn", {"trust": None}, {}),
    "zo-gn, first version": ("zo-gn", {"damping_scale": "weights", "damping": 0.1,
                                       "trust": None}, {}),
    "fzoo": ("fzoo", {}, {}),
    "zo-sgd lr 0.01": ("zo-sgd", {"lr": 0.01}, {}),
    "tpsgd": ("tpsgd", {"lr": 0.1}, {"record_samples": True}),
    "zo-readout": ("zo-readout", {}, {}),
}


def live(name: str, options: dict[str, Any], extra: dict[str, Any], samples: int,
         out: Path) -> list[tuple[int, float]]:
    """(samples seen, held-out accuracy) every 50 samples of one run fed by `Session.step`."""
    train, test, _ = demo_data(0)
    cfg = el.TrainConfig(optimizer=name, options=options, trainable="head.*", batch_size=1,
                         fsync_every=10_000, **extra)
    rt = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None)
    with el.Session(el.load_bundle(DATA / "demo"), out, cfg, rt) as s:
        scores = [(0, s.model.evaluate(test)["accuracy"])]
        for i in range(samples):
            j = i % len(train.y)
            s.step((train.x[j], train.y[j]))
            if (i + 1) % 50 == 0:
                scores.append((i + 1, s.model.evaluate(test)["accuracy"]))
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400, help="samples fed (400)")
    args = ap.parse_args()
    res: dict[str, Any] = {"samples": args.samples, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, options, extra) in RUNS.items():
            scores = live(name, options, extra, args.samples, Path(tmp) / str(len(res["runs"])))
            res["runs"][label] = {"optimizer": name, "options": options, "scores": scores}
            shown = " ".join(f"{a:.3f}" for _, a in scores)
            sys.stderr.write(f"{label:24s} {shown}\n")
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
