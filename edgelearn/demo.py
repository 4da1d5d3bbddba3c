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

import edgelearn as el

DATA = Path(__file__).resolve().parent / "data"
#: the demo's report page, beside its run directories
REPORT = "report.html"
#: held-out scores per demo run (each run scores the user's test digits this many times)
EVALS = 20

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


def demo_data(seed: int = 0) -> tuple[el.Dataset, el.Dataset, el.Dataset]:
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
    return (el.Dataset(user_shift(xu[tr]), yu[tr]), el.Dataset(user_shift(xu[te]), yu[te]),
            el.Dataset(np.ascontiguousarray(xu[te]), yu[te]))


def run_demo(out: str | Path, *, backend: str = "onnxruntime", threads: int | None = None,
             providers: list[str] | None = None, steps: int | None = None,
             batch_size: int | None = None, seed: int = 0,
             progress: bool = False) -> dict[str, Any]:
    """Personalize the shipped model with every available optimizer; the `demo --json` object
    (its "report" is the HTML page comparing the runs, written in `out`).

    Args:
        out: directory for the runs (weights, journals).
        backend: runtime backend.
        threads: runtime threads.
        providers: ORT execution providers (None = CPU).
        steps: override every recipe's step count (short runs in tests).
        batch_size: examples per training step for every optimizer (None = each recipe's).
        seed: run seed.
        progress: progress on stderr (labelled bars on a terminal, plain lines otherwise).
    """
    out = Path(out)
    bundle = el.load_bundle(DATA / "demo")
    user_train, user_test, population_test = demo_data(seed)
    runtime = el.RuntimeConfig(backend=backend, threads=threads, providers=providers,
                               device=None)
    before = el.evaluate(bundle, user_test, runtime=runtime)
    population = el.evaluate(bundle, population_test, runtime=runtime)
    res: dict[str, Any] = {
        "bundle": str(bundle.path),
        "backend": backend,
        "data": {"user_train": len(user_train), "user_test": len(user_test),
                 "source": "UCI/sklearn 8x8 digits (CC BY 4.0), shifted user handwriting"},
        "accuracy_population": population.accuracy,
        "accuracy_before": before.accuracy,
        "loss_before": before.loss,
        "accuracy_after": {},
        # what `train` without --optimizer would pick for the demo's head on this backend
        "default_optimizer": el.TrainConfig(trainable="head.*").resolve(
            bundle, backend).chosen_by,
        "optimizers": {},
        "unavailable": {},
    }
    peak = population.peak_rss_mb
    for name, recipe in RECIPES.items():
        n_steps = steps or recipe["steps"]
        options = dict(recipe["options"])
        if recipe.get("schedule"):
            options["total_steps"] = n_steps
        config = el.TrainConfig(optimizer=name, options=options, trainable=recipe["trainable"],
                                batch_size=batch_size or recipe["batch_size"], seed=seed,
                                fsync_every=100)  # a demo run: durability every 100 steps
        t0 = time.perf_counter()
        try:
            # restart: each demo starts its runs afresh (only run files are removed)
            metrics = el.RunMetrics(user_test, eval_every=max(1, n_steps // EVALS))
            bar = [el.ProgressBar(label=name, metrics=metrics)] if progress else []
            with el.Session(bundle, out / name, config, runtime, restart=True) as session:
                run = session.run(user_train, n_steps, callbacks=[metrics, *bar])
                seconds = time.perf_counter() - t0
                after = session.evaluate(user_test)
        except el.InputError as e:  # e.g. an optimizer the chosen backend cannot run
            res["unavailable"][name] = str(e)
            continue
        res["accuracy_after"][name] = after.accuracy
        peak = max(peak, run.peak_rss_mb, after.peak_rss_mb)
        res["optimizers"][name] = {
            "trainable": recipe["trainable"], "trainable_params": run.trainable_params,
            "steps": run.steps, "batch_size": run.batch_size,
            "loss_after": after.loss, "seconds": seconds,
            "step_ms_median": run.step_ms_median,
            "forward_ms_median": run.forward_ms_median,
            "run_dir": str(out / name), "weights": run.weights, "journal": run.journal,
        }
    res["peak_rss_mb"] = peak  # the peak so far: the last figure taken is the largest
    if res["optimizers"]:
        res["report"] = el.tools.report(
            [o["run_dir"] for o in res["optimizers"].values()], out / REPORT,
            title="edgelearn demo: personalizing for a new user's handwriting",
            note="Held-out: the new user's test digits.")["html"]
    return res
