"""An app that learns on device from samples as they arrive, and survives being killed.

A "new user" writes digits one pixel to the right with heavier strokes (the shipped UCI/sklearn
8x8 digits, CC BY 4.0); each digit they write, with the label they confirm, is one training
step of the shipped demo model's head (edgelearn.Session.step). The app may be killed at any
moment (SIGKILL: no cleanup runs); started again, it asks the session how many samples are
already learned and goes on with the next one. Its weights end bit-identical to an app that
was never killed, and to `edgelearn replay` of its journal.

    python examples/app_loop.py --out runs/app [--optimizer zo-sgd|tpsgd] [--samples 300]

ZO-SGD replays from the journal alone (seeds and scalars); tpSGD's updates depend on the
activations, so the app records each sample (TrainConfig(record_samples=True), samples.bin
beside the journal) and replay re-runs those steps on them. Only the public API is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from runner import run_cli

import edgelearn as el

PROG = "app_loop"
SHIPPED = Path(el.__file__).resolve().parent / "data"  # demo bundle and digits
CONFIGS = {
    "zo-sgd": el.TrainConfig(optimizer="zo-sgd", options={"lr": 0.003, "eps": 1e-3, "probes": 4},
                             trainable="head.*", checkpoint_every=50),
    "tpsgd": el.TrainConfig(optimizer="tpsgd", options={"lr": 0.05}, trainable="head.*",
                            checkpoint_every=50, record_samples=True),
}


def user_digits() -> tuple[np.ndarray, np.ndarray]:
    """The new user's digits (x float32 [n, 64] in [0, 1], y int64), in the order they write
    them: the shipped digits the model was not pretrained on, shifted and thickened."""
    with np.load(SHIPPED / "digits.npz", allow_pickle=False) as f:
        held = ~f["pretrain"]
        x, y = f["x"][held].astype(np.float32) / 16.0, f["y"][held]
    img = np.roll(x.reshape(-1, 8, 8), 1, axis=2)
    img[:, :, 0] = 0.0
    order = np.random.default_rng(7).permutation(len(x))
    return np.clip(1.6 * img, 0.0, 1.0).reshape(-1, 64)[order], y[order]


def arriving(x: np.ndarray, y: np.ndarray, start: int, stop: int, delay_s: float
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Samples start..stop-1, one at a time (`delay_s` apart, as a user writes them)."""
    for i in range(start, stop):
        time.sleep(delay_s)
        yield x[i], y[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the app's run directory")
    p.add_argument("--optimizer", choices=sorted(CONFIGS), default="zo-sgd")
    p.add_argument("--samples", type=int, default=300, help="samples the user writes")
    p.add_argument("--delay-ms", type=float, default=0.0, help="time between samples")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args()
    x, y = user_digits()
    test = el.Dataset(x[-300:], y[-300:])  # the user's last digits: scored, never trained on
    if not 0 < args.samples <= len(x) - len(test):
        raise el.InputError(f"--samples must be in 1..{len(x) - len(test)}")
    runtime = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None)
    bundle = el.load_bundle(SHIPPED / "demo")
    with el.Session(bundle, args.out, CONFIGS[args.optimizer], runtime) as session:
        start = session.steps_done  # learned before a kill: go on with the next sample
        before = session.evaluate(test).accuracy
        for sample in arriving(x, y, start, args.samples, args.delay_ms / 1e3):
            session.step(sample)
        res = {"optimizer": args.optimizer, "resumed_at": start, "steps": session.steps_done,
               "accuracy_at_start": before, "accuracy": session.evaluate(test).accuracy,
               "sha256": session.digest(), "weights": str(session.save()),
               "journal": str(session.journal_path)}
    print(json.dumps(res) if args.json else
          f"{res['steps']} samples learned ({start} before this start), accuracy "
          f"{before:.3f} -> {res['accuracy']:.3f}\nweights: {res['weights']} "
          f"(sha256 {res['sha256'][:16]})\njournal: {res['journal']}", file=sys.stdout)


if __name__ == "__main__":
    run_cli(PROG, main)
