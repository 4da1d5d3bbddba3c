"""`edgelearn demo`: the main job end to end on data shipped in the package.

A small MLP was pretrained by backprop on a workstation (export/build_demo.py) on 1000 of the
UCI/sklearn 8x8 digits (CC BY 4.0). A "new user" writes differently: their digits sit one
pixel to the right and have heavier strokes, and the pretrained model loses much of its
accuracy on them. The device personalizes the model on half of that user's digits with each
available forward-only optimizer, on the inference runtime only, and is scored on the other
half. No download, no torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.errors import InputError
from edgelearn.model import Model
from edgelearn.optim import REGISTRY
from edgelearn.osutil import peak_rss_mb

DATA = Path(__file__).resolve().parent / "data"

#: optimizer -> how the demo personalizes with it (only registered optimizers run)
RECIPES: dict[str, dict[str, Any]] = {
    "zo-sgd": {"trainable": "head.*", "steps": 1500, "batch_size": 32,
               "options": {"lr": 0.01, "eps": 1e-3, "probes": 4}},
    # tpSGD on the head alone is exact SGD on the true loss from one taps forward per step.
    "tpsgd": {"trainable": "head.*", "steps": 500, "batch_size": 32, "options": {"lr": 0.1}},
    # PolyStep scores 16 polytope vertices per 8-dim block through the population graph;
    # its radius / epsilon follow cosine schedules over the run's steps.
    "polystep": {"trainable": "head.*", "steps": 300, "batch_size": 32,
                 "options": {"radius": 0.3}, "schedule": True},
}


def user_shift(x: np.ndarray) -> np.ndarray:
    """The new user's handwriting: one pixel to the right, heavier strokes.

    Args:
        x: float32 [n, 64] digits scaled to [0, 1].
    """
    img = x.reshape(-1, 8, 8).copy()
    img = np.roll(img, 1, axis=2)
    img[:, :, 0] = 0.0
    return np.clip(1.6 * img, 0.0, 1.0).reshape(-1, 64).astype(np.float32)


def demo_data(seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """(user personalization set, user test set, same test digits as written by the
    pretraining population), from the shipped digits the pretraining did not see."""
    with np.load(DATA / "digits.npz", allow_pickle=False) as f:
        x = f["x"].astype(np.float32) / 16.0
        y = f["y"].astype(np.int64)
        held = ~f["pretrain"]
    xu, yu = x[held], y[held]
    order = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0xDE30]))) \
        .permutation(len(xu))
    half = len(order) // 2
    tr, te = order[:half], order[half:]
    return (Dataset(user_shift(xu[tr]), yu[tr]), Dataset(user_shift(xu[te]), yu[te]),
            Dataset(np.ascontiguousarray(xu[te]), yu[te]))


def _clear_previous_run(run_dir: Path) -> None:
    """Remove an earlier demo run (only if it holds nothing but run files) so runs start fresh."""
    from edgelearn.train import CKPT, CKPT_META, JOURNAL, LOCK, WEIGHTS

    if not run_dir.is_dir():
        return
    names = {p.name for p in run_dir.iterdir()}
    if JOURNAL in names and names <= {JOURNAL, CKPT, CKPT_META, WEIGHTS, LOCK}:
        for n in names:
            (run_dir / n).unlink()


def run_demo(out: str | Path, *, backend: str = "onnxruntime", threads: int | None = None,
             providers: list[str] | None = None, steps: int | None = None,
             batch_size: int | None = None, seed: int = 0,
             progress: bool = False) -> dict[str, Any]:
    """Personalize the shipped model with every available optimizer; the `demo --json` object.

    Args:
        out: directory for the runs (weights, journals).
        backend: runtime backend.
        threads: runtime threads.
        providers: ORT execution providers (None = CPU).
        steps: override every recipe's step count (short runs in tests).
        batch_size: examples per training step for every optimizer (None = each recipe's).
        seed: run seed.
        progress: progress bars on stderr.
    """
    from edgelearn.train import train

    out = Path(out)
    bundle = load_bundle(DATA / "demo")
    user_train, user_test, population_test = demo_data(seed)
    base = Model(bundle, backend=backend, trainable=(), threads=threads, providers=providers)
    before = base.evaluate(user_test)
    population = base.evaluate(population_test)
    res: dict[str, Any] = {
        "bundle": str(bundle.path),
        "backend": backend,
        "data": {"user_train": len(user_train), "user_test": len(user_test),
                 "source": "UCI/sklearn 8x8 digits (CC BY 4.0), shifted user handwriting"},
        "accuracy_population": population["accuracy"],
        "accuracy_before": before["accuracy"],
        "loss_before": before["loss"],
        "accuracy_after": {},
        "optimizers": {},
        "unavailable": {},
    }
    for name, recipe in RECIPES.items():
        if name not in REGISTRY:
            continue
        _clear_previous_run(out / name)
        n_steps = steps or recipe["steps"]
        options = dict(recipe["options"])
        if recipe.get("schedule"):
            options["total_steps"] = n_steps
        t0 = time.perf_counter()
        try:
            run = train(bundle, user_train, out / name, optimizer=name,
                        options=options, steps=n_steps,
                        batch_size=batch_size or recipe["batch_size"], seed=seed,
                        trainable=recipe["trainable"], backend=backend, threads=threads,
                        providers=providers, progress=progress,
                        fsync_every=100)  # a demo run: durability every 100 steps is plenty
        except InputError as e:  # e.g. an optimizer the chosen backend cannot run
            res["unavailable"][name] = str(e)
            continue
        seconds = time.perf_counter() - t0
        after = Model(bundle, backend=backend, trainable=(), threads=threads,
                      providers=providers, weights=run["weights"]).evaluate(user_test)
        res["accuracy_after"][name] = after["accuracy"]
        res["optimizers"][name] = {
            "trainable": recipe["trainable"], "trainable_params": run["trainable_params"],
            "steps": run["steps"], "batch_size": run["batch_size"],
            "loss_after": after["loss"], "seconds": seconds,
            "step_ms_median": run["step_ms_median"],
            "forward_ms_median": run["forward_ms_median"],
            "run_dir": str(out / name), "weights": run["weights"], "journal": run["journal"],
        }
    res["peak_rss_mb"] = peak_rss_mb()
    return res
