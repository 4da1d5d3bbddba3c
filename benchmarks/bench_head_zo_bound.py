"""How far forward-only estimators can take the demo head without taps, in exact arithmetic.

Usage:
    python benchmarks/bench_head_zo_bound.py            # ~1 min, seeds 0 1 2
    python benchmarks/bench_head_zo_bound.py --quick    # one seed
    python benchmarks/bench_head_zo_bound.py --marks 1000,3000,4000,12000   # the demo's
        # zo-sgd budget (probes 4 x 1500 steps = 12000 forwards)

A numpy simulation of issue 16's demo target (no taps: the new ZO default >= 0.87 held-out
accuracy, and plain zo-sgd's final accuracy in <= 1/3 of its 3000 forwards). The demo
model's frozen hidden layer gives each example's 64 head inputs h; the head (10 x 64 + 10,
cross-entropy, batch 32) trains from the shipped weights on the user's shifted digits
(`edgelearn.demo.demo_data`), held-out accuracy at 1000 and 3000 forwards, for:
  - exact: the head's exact gradient from one forward a step (what tpSGD's head rule gets
    from the taps), lr 0.1 as the demo's tpsgd recipe;
  - zo-sgd: two-sided Rademacher probes on all 650 weights, the losses exact (Malladi et
    al. 2023, "Fine-Tuning Language Models with Just Forward Passes");
  - rank1: probes that read the head's outputs, not one loss, through rank-1 probes u v^T
    (Chen et al. 2024, LOZO, low-rank ZO perturbations): on a linear last layer they move
    example b's logits by u (v . h_b), so K probes and the base forward give S = H V and
    with it G V, the gradient in K probed input directions.
  - dense: what `zo-readout` does (edgelearn/optim/zo_readout.py): dense probes U_k move
    example b's logits by U_k h_b, ten numbers about h_b per probe where a rank-1 probe
    gives one, so K probes read 10 K input directions (all 64 from K = 7: the exact
    gradient). Sessions 15-16 took rank1 for the most a forward-only probe could read; it
    is not: dense probes read ten times more per forward.
Forwards: a step of K probes costs K + 1 (rank1, dense) or 2K (zo-sgd). The zo-sgd rows are
this simulation's (fixed lr, no schedule), not `bench_defaults.py`'s runs of the real one.
Prints a table on stderr and ONE JSON object on stdout; never asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgelearn as el  # noqa: E402
from edgelearn.demo import DATA, demo_data  # noqa: E402
from edgelearn.losses import accuracy, cross_entropy  # noqa: E402

MARKS = (1000, 3000)  # forwards at which accuracy is read (--marks)
BATCH = 32


def features() -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, np.ndarray]]:
    """((train h, train y, test h, test y), (head W, head b)), float64."""
    store = el.load_bundle(DATA / "demo").load_store()
    w0, b0 = (store[n].astype(np.float64) for n in ("layers.0.weight", "layers.0.bias"))
    tr, te, _ = demo_data(0)
    h = [np.maximum(d.x.astype(np.float64) @ w0.T + b0, 0.0) for d in (tr, te)]
    head = tuple(store[n].astype(np.float64) for n in ("head.weight", "head.bias"))
    return (h[0], tr.y, h[1], te.y), head


def ce_grad(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The gradient of the mean cross-entropy over the logits [B, C] (softmax - one-hot) / B."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p / len(y)


def step(method: str, w: np.ndarray, b: np.ndarray, h: np.ndarray, y: np.ndarray,
         probes: int, lr: float, rng: np.random.Generator, eps: float = 1e-3) -> int:
    """One step of `method` on batch (h, y), w and b updated in place; its forwards."""
    if method == "exact":
        g = ce_grad(h @ w.T + b, y)
        w -= lr * g.T @ h
        b -= lr * g.sum(0)
        return 1
    if method == "rank1":  # orthonormal input directions: G V V^T, the projected gradient
        g = ce_grad(h @ w.T + b, y)
        v = np.linalg.qr(rng.choice([-1.0, 1.0], size=(h.shape[1], probes)))[0]
        w -= lr * (g.T @ (h @ v)) @ v.T
        b -= lr * g.sum(0)
        return probes + 1
    if method == "dense":  # the K probes' rows R [10 K, 64]: h read as R^+ R h
        g = ce_grad(h @ w.T + b, y)
        rows = rng.choice([-1.0, 1.0], size=(probes * w.shape[0], h.shape[1]))
        w -= lr * g.T @ ((h @ rows.T) @ np.linalg.pinv(rows).T)
        b -= lr * g.sum(0)
        return probes + 1
    zs = [(rng.choice([-1.0, 1.0], size=w.shape), rng.choice([-1.0, 1.0], size=b.shape))
          for _ in range(probes)]
    for zw, zb in zs:
        lp = cross_entropy(h @ (w + eps * zw).T + b + eps * zb, y)
        lm = cross_entropy(h @ (w - eps * zw).T + b - eps * zb, y)
        c = lr * (lp - lm) / (2 * eps * probes)
        w -= c * zw
        b -= c * zb
    return 2 * probes


def run(data: tuple[np.ndarray, ...], head: tuple[np.ndarray, ...], method: str,
        probes: int, lr: float, seed: int, marks: tuple[int, ...] = MARKS) -> dict[int, float]:
    """Held-out accuracy at each of `marks` forwards of one run."""
    htr, ytr, hte, yte = data
    w, b = (a.copy() for a in head)
    rng = np.random.default_rng([seed, 0x5EED])
    done, acc = 0, {}
    while done < marks[-1]:
        idx = rng.integers(0, len(htr), BATCH)
        done += step(method, w, b, htr[idx], ytr[idx], probes, lr, rng)
        for m in marks:
            if done >= m and m not in acc:
                acc[m] = accuracy(hte @ w.T + b, yte)
    return acc


#: (method, probes, lr) grid: zo-sgd's lrs as bench_defaults' head grid
GRID = [("exact", 0, 0.1)] + [("zo-sgd", 1, lr) for lr in (0.003, 0.01, 0.03, 0.1)] + [
    ("zo-sgd", 4, 0.01)] + [("rank1", k, lr) for k in (4, 8, 16, 32) for lr in (0.3, 1.0)] + [
    ("dense", k, lr) for k in (1, 2, 4, 7) for lr in (0.1, 0.3)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--marks", default=",".join(map(str, MARKS)),
                    help="comma-separated forward counts to read the accuracy at")
    args = ap.parse_args(argv)
    marks = tuple(sorted(int(m) for m in args.marks.split(",")))
    seeds = (0,) if args.quick else (0, 1, 2)
    data, head = features()
    start = accuracy(data[2] @ head[0].T + head[1], data[3])
    rows = []
    for method, probes, lr in GRID:
        runs = [run(data, head, method, probes, lr, s, marks) for s in seeds]
        mean = {m: float(np.mean([r[m] for r in runs])) for m in marks}
        rows.append({"method": method, "probes": probes, "lr": lr,
                     **{f"acc_{m}": round(v, 4) for m, v in mean.items()}})
        print(f"{method:8s} K {probes:2d} lr {lr:<6g} " + "  ".join(
            f"{m} fwd {v:.3f}" for m, v in mean.items()), file=sys.stderr)
    print(json.dumps({"start_accuracy": round(start, 4), "seeds": list(seeds), "runs": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
