"""Training runs on device: data order, journal, checkpoints, resume and replay.

A run directory holds:
  journal.bin              header record (bundle, optimizer config, trainable set, data order)
                           then one record per step (seeds, projected gradients, lr, eps, ...)
  checkpoint.safetensors   arena at some step (a cache: the journal alone rebuilds everything)
  checkpoint.json          {"step", "optimizer", "sha256"} naming that arena
  weights.safetensors      the weights after the last step
  lock                     held (flock) while a process trains in this directory
Resume = load the newest valid checkpoint, replay the journal records after it (no forwards),
continue. Because replay performs the same float operations as training, an interrupted and
resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.budget import plan_batch
from edgelearn.bundle import Bundle
from edgelearn.data import Dataset
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.journal import Journal, read_journal
from edgelearn.losses import default_loss, get_loss
from edgelearn.model import Model, peak_rss_mb
from edgelearn.optim import REGISTRY, Optimizer, make_optimizer
from edgelearn.params import ParamStore, fsync_dir

JOURNAL, CKPT, CKPT_META, WEIGHTS, LOCK = (
    "journal.bin", "checkpoint.safetensors", "checkpoint.json", "weights.safetensors", "lock")
_DATA_DOMAIN = 0xDA7A  # separates data-order draws from noise draws of the same seed


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Example indices of the batch used at `step`: seeded per-epoch permutations.

    Args:
        n: dataset size.
        batch_size: examples per batch (capped at n); the epoch's tail is dropped.
        step: 0-based step.
        seed: data-order seed.
    """
    bs = min(batch_size, n)
    per_epoch = n // bs
    epoch, i = divmod(step, per_epoch)
    ss = np.random.SeedSequence([seed, _DATA_DOMAIN, epoch])
    perm = np.random.Generator(np.random.Philox(ss)).permutation(n)
    return perm[i * bs : (i + 1) * bs]


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on a run directory; a second trainer fails fast instead of interleaving."""
    import fcntl

    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgelearnError(f"{run_dir} is in use by another edgelearn process") from None
        yield
    finally:
        os.close(fd)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_header(bundle: Bundle, store: ParamStore, opt: Optimizer, **run: Any) -> dict[str, Any]:
    """The journal's first record: everything replay and resume must agree on."""
    return {
        "kind": "header", "version": 1, "optimizer": opt.name, "config": opt.config(),
        "trainable": store.trainable_names, "n_trainable": store.n_trainable("float32"),
        "base_sha256": bundle.manifest["files"]["weights"]["sha256"], **run,
    }


def optimizer_from_header(header: dict[str, Any]) -> Optimizer:
    """Rebuild the optimizer a journal was written with."""
    try:
        return make_optimizer(header["optimizer"], **header["config"])
    except (KeyError, TypeError) as e:
        raise InputError(f"journal header does not describe an optimizer ({e})") from None


def replay_journal(bundle: Bundle, journal_path: str | os.PathLike) -> tuple[ParamStore, int]:
    """Rebuild weights from the bundle's base weights and a journal only (no data, no forwards).

    Returns (store, steps replayed).
    """
    records, _ = read_journal(journal_path)
    if not records or records[0].get("kind") != "header":
        raise InputError(f"{journal_path}: journal has no header record")
    header = records[0]
    if header.get("base_sha256") != bundle.manifest["files"]["weights"]["sha256"]:
        raise InputError("journal was recorded on a bundle with different base weights")
    store = bundle.load_store(trainable=header.get("trainable", []) or "")
    opt = optimizer_from_header(header)
    for rec in records[1:]:
        opt.replay(store, rec)
    return store, len(records) - 1


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.last = total, enabled, 0.0

    def update(self, done: int, loss: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        width = 30
        fill = int(width * done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                         f"loss {loss:.4f}")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train(
    bundle: Bundle,
    data: Dataset,
    run_dir: str | os.PathLike,
    *,
    optimizer: str = "zo-sgd",
    options: dict[str, Any] | None = None,
    steps: int = 100,
    batch_size: int = 32,
    seed: int = 0,
    trainable: str | None = None,
    objective: str | None = None,
    backend: str = "onnxruntime",
    threads: int | None = None,
    providers: list[str] | None = None,
    memory_budget_mb: float | None = None,
    checkpoint_every: int = 100,
    fsync_every: int = 1,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    population: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a run until `steps` steps are in its journal.

    Args:
        bundle: the bundle to personalize.
        data: training examples.
        run_dir: run directory (created; resumed when it holds a journal).
        optimizer: registry name; `options` are its keyword arguments (seed is added).
        steps: total steps of the run (a resumed run continues up to this number).
        batch_size: examples per step.
        seed: run seed (noise and data order).
        trainable: glob patterns of parameters to train (None = manifest flags).
        objective: loss name (default from the task: cross-entropy / mse).
        backend: runtime backend name.
        threads: runtime threads.
        providers: ORT execution providers (None = CPU).
        memory_budget_mb: peak memory the run may use (MiB); the batch shrinks to fit, or the
            run is refused with InputError if even batch 1 would not fit.
        checkpoint_every: steps between checkpoints.
        fsync_every: journal records between fsyncs.
        progress: draw a progress bar on stderr.
        on_step: callback(step, loss) after every step.
        population: score population requests (polystep) with the bundle's population
            graph when it has one that batches the trainable set (one call per population).
    Returns: the `train --json` summary.
    """
    if steps < 0:
        raise InputError("steps must be >= 0")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if memory_budget_mb is not None:
        weights_mb = sum(p.nbytes for p in bundle.params) / (1 << 20)
        if 2 * weights_mb > memory_budget_mb:
            raise InputError(f"the bundle's weights ({weights_mb:.0f} MB) cannot be trained "
                             f"within a memory budget of {memory_budget_mb:.0f} MB")
    if trainable is None:  # e.g. zo-scale trains the quantization scales unless told otherwise
        trainable = getattr(REGISTRY.get(optimizer), "default_trainable", None)
    model = Model(bundle, backend=backend, trainable=trainable, threads=threads,
                  providers=providers)
    model.check_data(data)
    store = model.store
    opts = dict(options or {})
    opts.setdefault("seed", seed)
    opt = make_optimizer(optimizer, **opts)
    pop_eval = None
    if population and "onnx_population" in bundle.files and backend in ("onnxruntime", "ort"):
        from edgelearn.backends.ort_population import OrtPopulation, supports_population

        if supports_population(bundle, store):  # K candidates per runtime call
            pop_eval = OrtPopulation(bundle, store, threads=threads)
    plan = None
    if memory_budget_mb is not None:
        plan = plan_batch(bundle, batch_size=batch_size, budget_mb=memory_budget_mb,
                          extra_bytes=opt.memory_bytes(store)
                          + (pop_eval.memory_bytes() if pop_eval is not None else 0))
        if plan["batch_size"] < batch_size:
            print(f"edgelearn: batch size {batch_size} would exceed the memory budget of "
                  f"{memory_budget_mb:.0f} MB; using {plan['batch_size']}", file=sys.stderr)
            batch_size = plan["batch_size"]
    loss_name = objective or default_loss(bundle.task)
    loss_fn = get_loss(loss_name)
    header = make_header(bundle, store, opt, batch_size=batch_size, data_seed=seed,
                         n_examples=len(data), objective=loss_name)
    with run_lock(run_dir):
        journal = Journal(run_dir / JOURNAL, fsync_every=fsync_every)
        try:
            done = _resume(journal, header, store, opt, run_dir)
            times_step: list[float] = []
            times_fwd: list[float] = []
            times_pop: list[float] = []  # one population-graph call each
            losses: list[float] = []
            bar = _Progress(steps, progress)
            for t in range(done, steps):
                idx = batch_indices(len(data), batch_size, t, seed)
                xb, yb = data.x[idx], data.y[idx]

                def evaluate(xb: np.ndarray = xb, yb: np.ndarray = yb) -> float:
                    t0 = time.perf_counter()
                    out = model.predict(xb)
                    times_fwd.append(time.perf_counter() - t0)
                    return loss_fn(out, yb)

                def evaluate_population(pop: Any, xb: np.ndarray = xb,
                                        yb: np.ndarray = yb) -> list[float]:
                    assert pop_eval is not None
                    t0 = time.perf_counter()
                    pop_losses = pop_eval.losses(pop, xb, yb, loss_fn)
                    times_pop.append(time.perf_counter() - t0)
                    return pop_losses

                t0 = time.perf_counter()
                info = opt.step(store, evaluate,
                                evaluate_population if pop_eval is not None else None)
                times_step.append(time.perf_counter() - t0)
                journal.append({"kind": "step", **info.record})
                losses.append(info.loss)
                if (t + 1) % checkpoint_every == 0:
                    journal.sync()
                    _checkpoint(run_dir, store, opt)
                bar.update(t + 1, info.loss)
                if on_step is not None:
                    on_step(t, info.loss)
            journal.sync()
        finally:
            journal.close()
        store.save(run_dir / WEIGHTS, metadata={"sha256": store.digest()})
    return {
        "steps": steps,
        "resumed_from": done,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "weights": str(run_dir / WEIGHTS),
        "journal": str(run_dir / JOURNAL),
        "sha256": store.digest(),
        "optimizer": opt.name,
        "trainable_params": store.n_trainable("float32"),
        "step_ms_median": 1e3 * statistics.median(times_step) if times_step else None,
        "forward_ms_median": 1e3 * statistics.median(times_fwd) if times_fwd else None,
        "peak_rss_mb": peak_rss_mb(),
        "batch_size": batch_size,
        "memory_plan": plan,
        "population_graph": pop_eval is not None,
        "population_call_ms_median": 1e3 * statistics.median(times_pop) if times_pop else None,
    }


def _checkpoint(run_dir: Path, store: ParamStore, opt: Optimizer) -> None:
    store.save(run_dir / CKPT)
    _atomic_json(run_dir / CKPT_META, {"step": opt.t, "optimizer": opt.state_dict(),
                                       "sha256": store.digest()})


def _resume(journal: Journal, header: dict[str, Any], store: ParamStore, opt: Optimizer,
            run_dir: Path) -> int:
    """Bring store and optimizer to the end of the journal; returns the steps already done."""
    recs = journal.records
    if not recs:
        journal.append(header)
        journal.sync()
        return 0
    old = recs[0]
    if old.get("kind") != "header":
        raise InputError(f"{run_dir}: journal does not start with a header")
    diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
    if diff:
        raise InputError(f"{run_dir} holds a run with different settings ({', '.join(diff)}); "
                         "use another --out or the same settings to resume")
    steps = recs[1:]
    start = 0
    meta_path = run_dir / CKPT_META
    if meta_path.is_file() and (run_dir / CKPT).is_file():
        try:
            meta = json.loads(meta_path.read_text())
            k = int(meta["step"])
            if 0 < k <= len(steps):
                saved = store.copy()
                store.load(run_dir / CKPT)
                if store.digest() == meta["sha256"]:
                    opt.load_state_dict(meta["optimizer"])
                    start = k
                else:
                    store.assign(saved.state())
        except (ValueError, KeyError, TypeError, EdgelearnError):
            start = 0  # an unusable checkpoint only costs replay time
    for rec in steps[start:]:
        opt.replay(store, rec)
    opt.t = len(steps)
    return len(steps)

