"""Training runs on device: data order, journal, checkpoints, resume and replay.

A run directory holds:
  journal.bin              header record (bundle, optimizer config, trainable set, data order)
                           then one record per step (seeds, projected gradients, lr, eps, ...)
  checkpoint.safetensors   arena at some step (a cache: the journal alone rebuilds everything)
  checkpoint.json          {"step", "records", "optimizer", "sha256", "data"} naming that arena:
                           step count, journal records it covers (header included), optimizer
                           state, digest, and the data position (the batch of step t is
                           `batch_indices(n, batch_size, t, seed)`: seeded per-epoch
                           permutations, so the next step number *is* the data position)
  weights.safetensors      the weights after the last step
  lock                     held (flock) while a process trains in this directory
Resume = load the newest valid checkpoint, replay the journal records after it (no forwards),
continue. Because replay performs the same float operations as training, an interrupted and
resumed run ends bit-identical to an uninterrupted one. A journal header that differs from the
command's settings is refused with every change named (`header_changes`); `restart=True`
(`train --restart`) deletes the run's own files first (`clear_run`).

Ctrl-C: while training, the first SIGINT only raises a flag; the loop stops before the next
step, fsyncs the journal, writes a checkpoint and the weights, and raises TrainingInterrupted
(a KeyboardInterrupt; the CLI exits 130). Running the same command again resumes.

Memory stays flat however long the run: journal records are appended to disk and streamed
back (`iter_journal`) on resume and replay, never listed; the loop keeps only the first and
last loss and fixed rings of timings. What a run does keep is in `budget.run_memory_bytes`.

Crash safety: journal records are appended (length-prefixed, CRC-32) and fsynced per policy
(`fsync_every` records / `fsync_seconds`); checkpoints are written to a temp file, fsynced,
renamed, and the directory fsynced; a torn journal tail is dropped on open. A checkpoint that is
missing, corrupt or ahead of the (possibly truncated) journal is ignored: it is only a cache.

Divergence rollback (`divergence=DivergencePolicy(...)`, off by default): after each step the
step's loss (mean of its finite recorded losses, recomputed from the journal record so training,
resume and replay decide alike) is compared with `factor` x the running minimum; after
`patience` consecutive such steps the weights go back to the last good snapshot and the
learning rate is scaled by `lr_scale` (cumulative). Snapshots ("good" points) are taken every
`every` steps while no streak is running; they are also the run's checkpoints. The journal gets
{"kind": "rollback", "step", "to_step", "lr_scale", "sha256"}; replay rebuilds the snapshot on
its way (it passes every good point), so the journal alone still rebuilds the weights. The step
counter is not rewound: a rolled-back run still stops after `steps` optimizer steps, and later
steps draw fresh noise and batches.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgelearn.budget import plan_batch, run_memory_bytes
from edgelearn.bundle import Bundle
from edgelearn.data import Dataset, batch_indices, data_sha256
from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.journal import MAGIC, Journal, iter_journal
from edgelearn.losses import default_loss, get_loss
from edgelearn.model import Model
from edgelearn.optim import REGISTRY, Optimizer, make_optimizer
from edgelearn.osutil import atomic_write_json, fsync_dir, peak_rss_mb
from edgelearn.params import ParamStore

JOURNAL, CKPT, CKPT_META, WEIGHTS, LOCK = (
    "journal.bin", "checkpoint.safetensors", "checkpoint.json", "weights.safetensors", "lock")


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
        legacy = getattr(REGISTRY.get(header["optimizer"]), "header_defaults", {})
        return make_optimizer(header["optimizer"], **{**legacy, **header["config"]})
    except (KeyError, TypeError) as e:
        raise InputError(f"journal header does not describe an optimizer ({e})") from None


#: backend name -> the bundle file role of its taps graph
TAPS_GRAPH = {"onnxruntime": "onnx_taps", "ort": "onnx_taps", "litert": "tflite_taps",
              "tflite": "tflite_taps"}


def taps_evaluator(bundle: Bundle, store: ParamStore, data: Dataset, opt: Optimizer, *,
                   batch_size: int, seed: int, backend: str = "onnxruntime",
                   threads: int | None = None,
                   times: list[float] | RecentTimes | None = None,
                   ) -> Callable[[int], Callable[[], Any]]:
    """For optimizers with `needs == "taps"` (tpsgd): step -> evaluate() returning (taps, y).

    Binds the bundle's taps graph (model_taps.onnx, or model_taps.tflite on litert) to the
    same arena and hands the optimizer the manifest's layer records. evaluate() runs ONE taps
    forward on the step's batch; on onnxruntime its tap arrays are the backend's reused output
    buffers (no copy of the activations), valid until the next evaluate() call.
    """
    from edgelearn.backends import make_backend
    from edgelearn.layers import needed_taps, parse_layers

    if "onnx_taps" not in bundle.files:
        why = bundle.manifest.get("taps_unsupported", "exported without taps")
        raise InputError(f"{opt.name} needs a bundle with layer taps; this one has none ({why})")
    graph = TAPS_GRAPH.get(backend)
    if graph is None:
        raise InputError(f"{opt.name} has no taps graph for backend {backend!r}")
    if graph not in bundle.files:
        why = bundle.manifest.get("tflite_taps_skipped") or bundle.manifest.get(
            "tflite_skipped", "exported without formats tflite, or before TFLite taps graphs")
        raise InputError(f"{opt.name} on {backend} needs the bundle's model_taps.tflite; this "
                         f"one has none ({why}): use --backend onnxruntime or re-export")
    layers = parse_layers(bundle.manifest, {p.name for p in bundle.params})
    opt.setup(layers, store)  # type: ignore[attr-defined]
    out_shape = bundle.outputs[0].shape[1:]
    if all(isinstance(d, int) for d in out_shape):  # before any journal is written
        opt.check_targets(data.y, out_shape)  # type: ignore[attr-defined]
    in_name = bundle.inputs[0].name
    need = needed_taps(layers, set(store.trainable_names)) - {in_name}
    if backend in ("onnxruntime", "ort"):
        # only the taps a step reads: a frozen layer's taps are dropped from the graph, so
        # onnxruntime may fuse that layer (Conv+BN+Relu) as in the plain graph; the backend
        # refuses names that are not graph outputs
        be = make_backend(backend, bundle, threads=threads, graph=graph, outputs=need)
        be.bind(store)
        run = functools.partial(be.forward, reuse_outputs=True)  # type: ignore[call-arg]
    else:
        be = make_backend(backend, bundle, threads=threads, graph=graph)
        be.bind(store)
        missing = sorted(need - set(be.output_names))  # type: ignore[attr-defined]
        if missing:
            raise BundleError(f"manifest.json: layer taps {missing[:4]} are not outputs of "
                              "the taps graph")
        run = be.forward

    def at(step: int) -> Callable[[], Any]:
        idx = batch_indices(len(data), batch_size, step, seed)
        xb, yb = data.x[idx], data.y[idx]

        def evaluate() -> tuple[dict[str, np.ndarray], np.ndarray]:
            t0 = time.perf_counter()
            out = run({in_name: xb})
            if times is not None:
                times.append(time.perf_counter() - t0)
            out[in_name] = xb
            return out, yb

        return evaluate

    return at


def replay_journal(bundle: Bundle, journal_path: str | os.PathLike,
                   data: Dataset | None = None) -> tuple[ParamStore, int]:
    """Rebuild weights from the bundle's base weights and a journal (no data, no forwards).

    Optimizers whose updates depend on the data (tpsgd) re-run each step's forward on `data`
    instead, which must be the run's data (its sha256 is in the journal header), on the
    backend the run used (header "taps_backend", default onnxruntime).
    Returns (store, steps replayed).
    """
    records = iter_journal(journal_path)  # streamed: a long journal is never held whole
    header = next(records, {})
    if header.get("kind") != "header":
        raise InputError(f"{journal_path}: journal has no header record")
    if header.get("base_sha256") != bundle.manifest["files"]["weights"]["sha256"]:
        raise InputError("journal was recorded on a bundle with different base weights")
    store = bundle.load_store(trainable=header.get("trainable", []) or "")
    opt = optimizer_from_header(header)
    taps_at = None
    if opt.needs == "taps":
        if data is None:
            raise InputError(f"{opt.name} journals replay by re-running the steps on the run's "
                             "data: pass --data")
        if data_sha256(data) != header.get("data_sha256"):
            raise InputError("--data is not the data this run was trained on (sha256 differs)")
        taps_at = taps_evaluator(bundle, store, data, opt, batch_size=header["batch_size"],
                                 seed=header["data_seed"],
                                 backend=header.get("taps_backend", "onnxruntime"))
    guard = _guard_from_header(header)
    if guard is not None:
        guard.take_snapshot(store, opt)  # step 0: the base weights are the first good point
    _apply_records(records, store, opt, guard, taps_at)
    return store, opt.t


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

    def close(self) -> None:
        """End a bar left unfinished (e.g. on Ctrl-C) so the next message has its own line."""
        if self.enabled and self.last:
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
    backend_options: dict[str, Any] | None = None,
    checkpoint_every: int = 100,
    fsync_every: int = 1,
    fsync_seconds: float | None = None,
    divergence: DivergencePolicy | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    population: bool = True,
    restart: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run until `steps` steps are in its journal.

    Args:
        bundle: the bundle to personalize.
        data: training examples.
        run_dir: run directory (created; resumed when it holds a journal).
        optimizer: registry name; `options` are its keyword arguments (seed is added).
        steps: total steps of the run (a resumed run continues up to this number; fewer
            than the run already has is refused with InputError).
        batch_size: examples per step.
        seed: run seed (noise and data order).
        trainable: glob patterns of parameters to train (None = manifest flags).
        objective: loss name (default from the task: cross-entropy / mse).
        backend: runtime backend name.
        threads: runtime threads.
        providers: ORT execution providers (None = CPU).
        memory_budget_mb: peak memory the run may use (MiB); the batch shrinks to fit, or the
            run is refused with InputError if even batch 1 would not fit.
        backend_options: further backend options (litert: {"strategy": "inputs"|"rebuild"}).
        checkpoint_every: steps between checkpoints.
        fsync_every: journal records between fsyncs.
        fsync_seconds: also fsync when this many seconds passed since the last one (None = off).
        divergence: roll back to the last good snapshot and lower lr when the loss diverges
            (None = off); its snapshots replace `checkpoint_every` checkpoints.
        progress: draw a progress bar on stderr.
        on_step: callback(step, loss) after every step.
        population: score population requests (polystep) with the bundle's population
            graph when it has one that batches the trainable set (one call per population).
        restart: delete the run files `run_dir` holds (journal, checkpoint, weights) and
            start over; refused (InputError) when the directory is not a run directory.
    Returns: the `train --json` summary.
    Raises: TrainingInterrupted (a KeyboardInterrupt) after SIGINT, once the step in flight
        has finished and the weights and a checkpoint are written.
    """
    if steps < 0:
        raise InputError("steps must be >= 0")
    run_dir = Path(run_dir)
    if memory_budget_mb is not None:
        weights_mb = sum(p.nbytes for p in bundle.params) / (1 << 20)
        if 2 * weights_mb > memory_budget_mb:
            raise InputError(f"the bundle's weights ({weights_mb:.0f} MB) cannot be trained "
                             f"within a memory budget of {memory_budget_mb:.0f} MB")
    if trainable is None:  # e.g. zo-scale trains the quantization scales unless told otherwise
        trainable = getattr(REGISTRY.get(optimizer), "default_trainable", None)
    model = Model(bundle, backend=backend, trainable=trainable, threads=threads,
                  providers=providers, backend_options=backend_options)
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
        plan = _plan(bundle, data, store, opt, pop_eval, batch_size=batch_size,
                     budget_mb=memory_budget_mb, divergence=divergence is not None)
        if plan["batch_size"] < batch_size:
            print(f"edgelearn: batch size {batch_size} would exceed the memory budget of "
                  f"{memory_budget_mb:.0f} MB; using {plan['batch_size']}", file=sys.stderr)
            batch_size = plan["batch_size"]
    loss_name = objective or default_loss(bundle.task)
    loop = _Loop(data=data, batch_size=batch_size, seed=seed, model=model, opt=opt,
                 loss_fn=get_loss(loss_name), pop_eval=pop_eval,
                 checkpoint_every=checkpoint_every)
    extra: dict[str, Any] = {}
    if opt.needs == "taps":  # tpsgd: one taps forward per step, replay re-runs it on the data
        extra["data_sha256"] = data_sha256(data)
        if TAPS_GRAPH.get(backend) == "tflite_taps":  # replay must re-run the same runtime
            extra["taps_backend"] = "litert"
        loop.taps_at = taps_evaluator(bundle, store, data, opt, batch_size=batch_size,
                                      seed=seed, backend=backend, threads=threads,
                                      times=loop.times_fwd)
    if divergence is not None:
        extra["divergence"] = divergence.to_json(store, opt, checkpoint_every)
    header = make_header(bundle, store, opt, batch_size=batch_size, data_seed=seed,
                         n_examples=len(data), objective=loss_name, **extra)
    loop.guard = _guard_from_header(header)
    done = _train_locked(run_dir, loop, header, steps=steps, restart=restart,
                         fsync_every=fsync_every, fsync_seconds=fsync_seconds,
                         bar=_Progress(steps, progress), on_step=on_step)
    return loop.summary(run_dir, steps=steps, done=done, plan=plan)


def _train_locked(run_dir: Path, loop: _Loop, header: dict[str, Any], *, steps: int,
                  restart: bool, fsync_every: int, fsync_seconds: float | None,
                  bar: _Progress, on_step: Callable[[int, float], None] | None) -> int:
    """Under the run's lock (Ctrl-C deferred to step boundaries): restart or resume, train
    up to `steps`, write the weights. Returns the steps already done before this call."""
    store, opt = loop.model.store, loop.opt
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no directory
    with run_lock(run_dir), _deferred_sigint() as interrupted:
        check_run_dir(run_dir)
        if restart:
            clear_run(run_dir)
        journal = Journal(run_dir / JOURNAL, fsync_every=fsync_every,
                          fsync_seconds=fsync_seconds)
        try:
            done, loop.rollbacks = _resume(journal, header, store, opt, run_dir, loop.guard,
                                           loop.taps_at, steps=steps)
            loop.times_fwd.clear()
            loop.run(journal, run_dir, range(done, steps), interrupted, bar, on_step)
            journal.sync()
        finally:
            journal.close()
        store.save(run_dir / WEIGHTS, metadata={"sha256": store.digest()})
    return done


def _plan(bundle: Bundle, data: Dataset, store: ParamStore, opt: Optimizer, pop_eval: Any, *,
          batch_size: int, budget_mb: float, divergence: bool) -> dict[str, Any]:
    """The memory plan: optimizer and population buffers plus what the run keeps."""
    keeps = run_memory_bytes(n_examples=len(data), trainable_bytes=_trainable_bytes(store),
                             snapshots=divergence, timing_samples=TIMING_SAMPLES,
                             timers=len(_Loop.TIMERS))
    return plan_batch(bundle, batch_size=batch_size, budget_mb=budget_mb,
                      extra_bytes=opt.memory_bytes(store)
                      + (pop_eval.memory_bytes() if pop_eval is not None else 0) + keeps)


def _trainable_bytes(store: ParamStore) -> int:
    return sum(store.flat(dt).nbytes for dt in store.arenas if store.n_trainable(dt))


#: timing samples a run keeps per timer: the medians in the summary are over the most recent
#: steps of this invocation (all of them in runs up to this length)
TIMING_SAMPLES = 4096


class RecentTimes:
    """The last `size` durations (seconds) in a fixed ring: bounded however long a run is.

    Args:
        size: samples kept (older ones are overwritten).
    """

    def __init__(self, size: int = TIMING_SAMPLES) -> None:
        self._buf = np.zeros(size, np.float64)
        self._n = 0

    def append(self, seconds: float) -> None:
        """Record one duration (seconds)."""
        self._buf[self._n % self._buf.size] = seconds
        self._n += 1

    def clear(self) -> None:
        """Forget every sample."""
        self._n = 0

    def median_ms(self) -> float | None:
        """Median of the kept samples in milliseconds (None when there are none)."""
        if self._n == 0:
            return None
        return 1e3 * float(np.median(self._buf[: min(self._n, self._buf.size)]))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run at a step boundary; its weights so far are written.

    Args:
        step: steps the run holds now (running the same command again resumes from here).
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}; run the same command again to resume")
        self.step = step


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[Callable[[], bool]]:
    """While active, the first SIGINT only raises a flag (polled between steps); a second one
    interrupts at once (like a kill: the journal stays valid, resume redoes the step).

    Only in the main thread with Python's default handler in place (a program that installed
    its own keeps it); otherwise the flag never rises.
    """
    hit: list[bool] = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        hit.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _Loop:
    """The step loop of `train` and what it keeps: bounded timings, first/last loss only."""

    TIMERS: ClassVar[tuple[str, ...]] = ("times_step", "times_fwd", "times_pop")
    data: Dataset
    batch_size: int
    seed: int
    model: Model
    opt: Optimizer
    loss_fn: Callable[[np.ndarray, np.ndarray], float]
    pop_eval: Any
    checkpoint_every: int
    taps_at: Callable[[int], Callable[[], Any]] | None = None
    guard: _Guard | None = None
    times_step: RecentTimes = field(default_factory=RecentTimes)
    times_fwd: RecentTimes = field(default_factory=RecentTimes)
    times_pop: RecentTimes = field(default_factory=RecentTimes)  # one population call each
    loss_first: float | None = None
    loss_last: float | None = None
    rollbacks: int = 0

    def run(self, journal: Journal, run_dir: Path, todo: range,
            interrupted: Callable[[], bool], bar: _Progress,
            on_step: Callable[[int, float], None] | None) -> None:
        """Steps `todo` (journaled, checkpointed); stops before a step once interrupted."""
        store, opt = self.model.store, self.opt
        for t in todo:
            if interrupted():
                bar.close()
                self._stop(journal, run_dir)
            evaluate, evaluate_population = self._evaluators(t)
            t0 = time.perf_counter()
            info = opt.step(store, evaluate, evaluate_population)
            self.times_step.append(time.perf_counter() - t0)
            written = journal.append({"kind": "step", **info.record})
            self.loss_last = info.loss
            if self.loss_first is None:
                self.loss_first = info.loss
            if self.guard is not None:
                self.rollbacks += _guard_after_step(self.guard, journal, written, store, opt,
                                                    run_dir)
            elif (t + 1) % self.checkpoint_every == 0:
                journal.sync()
                _checkpoint(run_dir, store, opt, len(journal))
            bar.update(t + 1, info.loss)
            if on_step is not None:
                on_step(t, info.loss)

    def summary(self, run_dir: Path, *, steps: int, done: int,
                plan: dict[str, Any] | None) -> dict[str, Any]:
        """The `train --json` object."""
        store = self.model.store
        return {
            "steps": steps,
            "resumed_from": done,
            "rollbacks": self.rollbacks,
            "loss_first": self.loss_first,
            "loss_last": self.loss_last,
            "weights": str(run_dir / WEIGHTS),
            "journal": str(run_dir / JOURNAL),
            "sha256": store.digest(),
            "optimizer": self.opt.name,
            "trainable_params": store.n_trainable("float32"),
            "step_ms_median": self.times_step.median_ms(),
            "forward_ms_median": self.times_fwd.median_ms(),
            "peak_rss_mb": peak_rss_mb(),
            "batch_size": self.batch_size,
            "memory_plan": plan,
            "population_graph": self.pop_eval is not None,
            "population_call_ms_median": self.times_pop.median_ms(),
        }

    def _stop(self, journal: Journal, run_dir: Path) -> None:
        """Ctrl-C: make the steps done durable, write the weights, raise TrainingInterrupted.

        With a divergence policy the checkpoint stays the last good snapshot (it is the
        rollback target); resume replays the journal records after it.
        """
        store, opt = self.model.store, self.opt
        journal.sync()
        if self.guard is None and opt.t > 0:
            _checkpoint(run_dir, store, opt, len(journal))
        store.save(run_dir / WEIGHTS, metadata={"sha256": store.digest()})
        raise TrainingInterrupted(opt.t)

    def _evaluators(self, t: int) -> tuple[Callable[[], Any],
                                           Callable[[Any], list[float]] | None]:
        """evaluate() and evaluate_population(pop) (None without a population graph) of step t.

        tpsgd's evaluate() is its taps forward (`taps_at`); the others score a loss.
        """
        idx = batch_indices(len(self.data), self.batch_size, t, self.seed)
        xb, yb = self.data.x[idx], self.data.y[idx]

        def evaluate() -> float:
            t0 = time.perf_counter()
            out = self.model.predict(xb)
            self.times_fwd.append(time.perf_counter() - t0)
            return self.loss_fn(out, yb)

        def evaluate_population(pop: Any) -> list[float]:
            t0 = time.perf_counter()
            losses = self.pop_eval.losses(pop, xb, yb, self.loss_fn)
            self.times_pop.append(time.perf_counter() - t0)
            return losses

        return (evaluate if self.taps_at is None else self.taps_at(t),
                evaluate_population if self.pop_eval is not None else None)


def _checkpoint(run_dir: Path, store: ParamStore, opt: Optimizer, records: int) -> None:
    """Atomic checkpoint (arena, then its metadata) covering the first `records` journal records.

    Order matters for crash safety: the arena is renamed into place first; metadata naming it
    (with its digest) second. A crash in between leaves metadata whose digest does not match
    the arena, and resume then ignores the checkpoint.
    """
    store.save(run_dir / CKPT)
    atomic_write_json(run_dir / CKPT_META, {
        "step": opt.t, "records": records, "optimizer": opt.state_dict(),
        "sha256": store.digest(),
        "data": {"next_step": opt.t, "order": "batch_indices(n, batch_size, step, data_seed)"},
    })


def check_run_dir(run_dir: Path) -> None:
    """Refuse run files that are symlinks: training must not write outside its directory."""
    for name in (JOURNAL, CKPT, CKPT_META, WEIGHTS):
        if (run_dir / name).is_symlink():
            raise InputError(f"{run_dir / name} is a symlink; run files must be plain files "
                             "inside the run directory")


#: the files of a run that `clear_run` deletes, metadata first (a kill midway never leaves a
#: checkpoint that a new journal could be mistaken for)
RUN_FILES = (CKPT_META, CKPT, WEIGHTS, JOURNAL)


def clear_run(run_dir: Path) -> list[str]:
    """Delete a run directory's own files so its run starts over (`train --restart`).

    Removes the journal, checkpoint (+ metadata), weights and their leftover temp files;
    keeps the lock (the caller holds it) and every other file. A directory holding files but
    no edgelearn journal is refused (InputError); an empty one has nothing to clear.

    Args:
        run_dir: the run directory (its lock must be held).
    Returns: names of the files removed.
    """
    journal = run_dir / JOURNAL
    if not journal.is_file():
        if any(p.name != LOCK for p in run_dir.iterdir()):
            raise InputError(f"{run_dir} is not an edgelearn run directory (no {JOURNAL}); "
                             "--restart only clears run directories")
        return []
    with open(journal, "rb") as f:
        head = f.read(len(MAGIC))
    if not MAGIC.startswith(head):
        raise InputError(f"{journal} is not an edgelearn journal; --restart only clears run "
                         "directories")
    temps = tuple(f".{name}.tmp-" for name in RUN_FILES)
    names = [n for n in RUN_FILES if (run_dir / n).exists()]
    names += sorted(p.name for p in run_dir.iterdir() if p.name.startswith(temps))
    for name in names:
        (run_dir / name).unlink(missing_ok=True)
    fsync_dir(run_dir)
    return names


def _checkpoint_meta(run_dir: Path) -> tuple[dict[str, Any], int] | None:
    """(metadata, journal records after the header it covers) of the checkpoint, if any."""
    meta_path = run_dir / CKPT_META
    if not (meta_path.is_file() and (run_dir / CKPT).is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        k = int(meta["step"])
        pos = int(meta.get("records", k + 1)) - 1  # older checkpoints: step records only
    except (ValueError, KeyError, TypeError, OSError):
        return None  # an unusable checkpoint only costs replay time
    return (meta, pos) if k > 0 and pos > 0 else None


def _load_checkpoint(run_dir: Path, store: ParamStore, opt: Optimizer,
                     ckpt: tuple[dict[str, Any], int] | None, last: dict[str, Any]) -> int:
    """Load the checkpoint when it is valid and agrees with the journal.

    Args:
        ckpt: `_checkpoint_meta` of the run directory.
        last: the journal record (after the header) the checkpoint says it ends on, {} if
            the journal is shorter.
    Returns how many journal records after the header it covers (0 = none usable; store and
    optimizer are then untouched).
    """
    if ckpt is None:
        return 0
    meta, pos = ckpt
    try:
        k = int(meta["step"])
        if not (last.get("kind") == "step" and last.get("step") == k - 1):
            return 0  # ahead of a truncated journal, or not at a step boundary
        saved = store.copy()
        store.load(run_dir / CKPT)
        if store.digest() != meta["sha256"]:
            store.assign(saved.state())
            return 0
        opt.load_state_dict(meta["optimizer"])
        return pos
    except (ValueError, KeyError, TypeError, OSError, EdgelearnError):
        return 0  # an unusable checkpoint only costs replay time


def _body(journal: Journal, start: int = 0, stop: int | None = None
          ) -> Iterator[dict[str, Any]]:
    """Journal records after the header, [start, stop), streamed from the file."""
    records = iter_journal(journal.path, max_records=len(journal))
    return itertools.islice(records, 1 + start, None if stop is None else 1 + stop)


def _survey(journal: Journal, pos: int) -> tuple[int, int, dict[str, Any]]:
    """One streamed pass: (step records, rollback records, body record pos - 1 or {})."""
    steps = rollbacks = 0
    at: dict[str, Any] = {}
    for i, rec in enumerate(_body(journal)):
        steps += rec.get("kind") == "step"
        rollbacks += rec.get("kind") == "rollback"
        if i == pos - 1:
            at = rec
    return steps, rollbacks, at


def _resume(journal: Journal, header: dict[str, Any], store: ParamStore, opt: Optimizer,
            run_dir: Path, guard: _Guard | None = None,
            taps_at: Callable[[int], Any] | None = None, *,
            steps: int | None = None) -> tuple[int, int]:
    """Bring store and optimizer to the end of the journal, streaming its records.

    Args:
        steps: the run's requested total; fewer than the journal holds is an InputError.
    Returns: (steps already done, rollback records in the journal).
    """
    if len(journal) == 0:
        journal.append(header)
        journal.sync()
        if guard is not None:
            guard.take_snapshot(store, opt)
        return 0, 0
    old = next(iter_journal(journal.path, max_records=1))
    if old.get("kind") != "header":
        raise InputError(f"{run_dir}: journal does not start with a header")
    changes = header_changes(old, header)
    if changes:
        raise InputError(f"run dir {run_dir} holds a run with different settings: "
                         f"{', '.join(changes)}; use --restart to start it over (or another "
                         "--out)")
    ckpt = _checkpoint_meta(run_dir)
    n_steps, rollbacks, at_ckpt = _survey(journal, ckpt[1] if ckpt else 0)
    if steps is not None and steps < n_steps:
        raise InputError(f"run dir {run_dir} already has {n_steps} steps; --steps {steps} is "
                         f"fewer (pass --steps {n_steps} or more to continue it, or --restart)")
    base = None
    if guard is not None:  # rollback target if the checkpoint is no good snapshot
        base = _Snapshot()
        base.take(store, opt)
    start = _load_checkpoint(run_dir, store, opt, ckpt, at_ckpt)
    if guard is not None:
        assert base is not None
        start = _guard_resume_point(guard, _body(journal, 0, start), start, store, opt, base)
    _apply_records(_body(journal, start), store, opt, guard, taps_at)
    if opt.t != n_steps:
        raise InputError(f"{run_dir}: journal step records are not consecutive")
    if guard is not None and guard.pending:  # killed between a step and its rollback
        _rollback(guard, journal, store, opt)
        rollbacks += 1
    return n_steps, rollbacks


#: header keys -> the setting's name in messages (config keys are the optimizer's options)
_SETTING_NAMES = {"data_seed": "seed", "base_sha256": "bundle weights", "data_sha256": "data",
                  "n_examples": "examples", "n_trainable": "trainable params",
                  "taps_backend": "taps backend", "version": "journal version"}


def header_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`name old -> new` for every setting two journal headers disagree on (config first).

    Args:
        old: the header in the run directory's journal.
        new: the header the current command would write.
    """
    out: list[str] = []
    for key, prefix in (("config", ""), ("divergence", "divergence ")):
        a, b = old.get(key), new.get(key)
        same_optimizer = key != "config" or old.get("optimizer") == new.get("optimizer")
        if isinstance(a, dict) and isinstance(b, dict) and same_optimizer:
            out += [f"{prefix}{k} {_show(a.get(k), k in a)} -> {_show(b.get(k), k in b)}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b and key == "divergence":
            out.append(f"divergence {_show_policy(a)} -> {_show_policy(b)}")
    for key in sorted((set(old) | set(new)) - {"config", "divergence"}):
        if old.get(key) != new.get(key):
            out.append(f"{_SETTING_NAMES.get(key, key)} {_show(old.get(key), key in old)} -> "
                       f"{_show(new.get(key), key in new)}")
    return list(dict.fromkeys(out))  # config seed and data_seed say the same thing once


def _show(value: Any, present: bool = True) -> str:
    if not present:
        return "unset"
    if isinstance(value, str):
        hexdigest = len(value) == 64 and all(c in "0123456789abcdef" for c in value)
        return f"sha256 {value[:12]}" if hexdigest else value
    if isinstance(value, float):
        return repr(value)
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 48 else text[:45] + "..."


def _show_policy(policy: Any) -> str:
    if not isinstance(policy, dict):
        return "off"
    return " ".join(f"{k}={_show(v)}" for k, v in sorted(policy.items()))


# -- divergence rollback --------------------------------------------------------------------------
@dataclass(frozen=True)
class DivergencePolicy:
    """When to roll back: loss above `factor` x running minimum for `patience` steps.

    Args:
        factor: threshold multiplier (> 1) on the running minimum of step losses.
        patience: consecutive steps above the threshold that trigger a rollback (>= 1).
        lr_scale: learning-rate multiplier applied at each rollback (0 < lr_scale <= 1).
        every: steps between good snapshots / checkpoints (None = the run's checkpoint_every).
    """

    factor: float = 3.0
    patience: int = 20
    lr_scale: float = 0.5
    every: int | None = None

    def to_json(self, store: ParamStore, opt: Optimizer, checkpoint_every: int
                ) -> dict[str, Any]:
        """Validated header form (with `every` filled in)."""
        if not opt.supports_lr_scale:
            raise InputError(f"optimizer {opt.name!r} does not support divergence rollback")
        every = checkpoint_every if self.every is None else self.every
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise InputError(f"divergence factor must be > 1, got {self.factor}")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise InputError(f"divergence patience must be an integer >= 1, got {self.patience}")
        if not 0 < self.lr_scale <= 1:
            raise InputError(f"divergence lr_scale must be in (0, 1], got {self.lr_scale}")
        if not (isinstance(every, int) and every >= 1):
            raise InputError(f"snapshot period must be an integer >= 1, got {every}")
        return {**asdict(self), "factor": float(self.factor),
                "lr_scale": float(self.lr_scale), "every": every}


def record_loss(record: dict[str, Any]) -> float:
    """A step's loss from its journal record: mean of the finite losses (as StepInfo.loss)."""
    finite = [float(v) for v in record.get("evals", []) if v is not None]
    return sum(finite) / len(finite) if finite else math.nan


class _Snapshot:
    """Trainable slices + optimizer state at a good point (`step` = steps done)."""

    def __init__(self) -> None:
        self.step = -1
        self.flats: dict[str, np.ndarray] = {}
        self.opt_state: dict[str, Any] = {}

    def take(self, store: ParamStore, opt: Optimizer) -> None:
        for dt in store.arenas:
            if store.n_trainable(dt):
                src = store.flat(dt)
                if dt in self.flats:
                    np.copyto(self.flats[dt], src)  # reuse: no allocation per snapshot
                else:
                    self.flats[dt] = src.copy()
        self.step = opt.t
        self.opt_state = opt.state_dict()

    def restore(self, store: ParamStore, opt: Optimizer, lr_scale: float) -> None:
        for dt, a in self.flats.items():
            np.copyto(store.flat(dt), a)
        t = opt.t
        opt.load_state_dict(self.opt_state)
        opt.t, opt.lr_scale = t, lr_scale  # the step counter is never rewound


class _Guard:
    """Divergence rule state; fed the same journal records in training, resume and replay."""

    def __init__(self, policy: dict[str, Any]) -> None:
        self.factor, self.patience = policy["factor"], policy["patience"]
        self.lr_scale, self.every = policy["lr_scale"], policy["every"]
        self.best = math.inf
        self.streak = 0
        self.pending = False
        self.snap = _Snapshot()

    def feed_step(self, record: dict[str, Any]) -> str | None:
        """Update on a step record; "rollback" when one is due now, "snapshot" at good points."""
        if self.pending:
            raise InputError(f"journal: step {record.get('step')} follows a due rollback "
                             "(journal written with other settings?)")
        loss = record_loss(record)
        if record.get("accepted", True) and math.isfinite(loss):  # rejected steps: no vote
            self.streak = self.streak + 1 if loss > self.factor * self.best else 0
            self.best = min(self.best, loss)
        if self.streak >= self.patience:
            self.pending = True
            return "rollback"
        if self.streak == 0 and (int(record["step"]) + 1) % self.every == 0:
            return "snapshot"
        return None

    def take_snapshot(self, store: ParamStore, opt: Optimizer) -> None:
        self.snap.take(store, opt)


def _guard_from_header(header: dict[str, Any]) -> _Guard | None:
    policy = header.get("divergence")
    if policy is None:
        return None
    try:
        return _Guard(policy)
    except (KeyError, TypeError):
        raise InputError("journal header has a malformed divergence policy") from None


def _apply_rollback(guard: _Guard | None, store: ParamStore, opt: Optimizer,
                    record: dict[str, Any]) -> None:
    """Replay a rollback record: same restore as training, checked against its digest."""
    if guard is None:
        raise InputError("journal has a rollback record but its run has no divergence policy")
    want_scale = opt.lr_scale * guard.lr_scale
    if not guard.pending or record.get("to_step") != guard.snap.step \
            or record.get("lr_scale") != want_scale or record.get("step") != opt.t:
        raise InputError(f"journal rollback at step {record.get('step')} does not follow from "
                         "the divergence rule (corrupt, or written with other settings)")
    guard.snap.restore(store, opt, want_scale)
    guard.pending, guard.streak = False, 0
    if store.digest() != record.get("sha256"):
        raise InputError(f"journal rollback at step {record.get('step')} does not reproduce "
                         "its weights digest")


def _rollback(guard: _Guard, journal: Journal, store: ParamStore, opt: Optimizer) -> None:
    """Training side: restore the last good snapshot, lower lr, journal the event."""
    scale = opt.lr_scale * guard.lr_scale
    rec: dict[str, Any] = {"kind": "rollback", "step": opt.t, "to_step": guard.snap.step,
                           "lr_scale": scale}
    guard.snap.restore(store, opt, scale)
    guard.pending, guard.streak = False, 0
    rec["sha256"] = store.digest()
    journal.append(rec)
    journal.sync()


def _guard_after_step(guard: _Guard, journal: Journal, record: dict[str, Any],
                      store: ParamStore, opt: Optimizer, run_dir: Path) -> bool:
    """After a journaled step (`record`, as written): roll back, or take a good snapshot
    (= a checkpoint). Returns True when it rolled back."""
    event = guard.feed_step(record)
    if event == "rollback":
        _rollback(guard, journal, store, opt)
    elif event == "snapshot":
        guard.take_snapshot(store, opt)
        journal.sync()
        _checkpoint(run_dir, store, opt, len(journal))
    return event == "rollback"


def _guard_resume_point(guard: _Guard, body: Iterable[dict[str, Any]], start: int,
                        store: ParamStore, opt: Optimizer, base: _Snapshot) -> int:
    """Rebuild the rule's state up to `start` records from the losses alone.

    Args:
        body: the first `start` journal records after the header (streamed).
        base: trainable weights and optimizer state before any record.

    With a divergence policy the checkpoint is always a good snapshot, so it becomes the
    rollback target; if the records say otherwise the checkpoint is dropped and the run is
    replayed from the base weights (start 0, snapshot at step 0).
    """
    event = None
    for rec in body:
        if rec.get("kind") == "rollback":
            guard.pending, guard.streak = False, 0
            event = None
        else:
            event = guard.feed_step(rec)
    if start > 0 and event != "snapshot":
        for dt, a in base.flats.items():
            np.copyto(store.flat(dt), a)
        opt.load_state_dict(base.opt_state)
        guard.best, guard.streak, guard.pending = math.inf, 0, False
        start = 0
    guard.take_snapshot(store, opt)
    return start


def _apply_records(records: Iterable[dict[str, Any]], store: ParamStore, opt: Optimizer,
                   guard: _Guard | None,
                   taps_at: Callable[[int], Any] | None = None) -> None:
    """Replay step and rollback records (no forwards), following the divergence rule.

    Optimizers whose update depends on the data (tpsgd) get `taps_at(step)`: an evaluate()
    that re-runs that step's taps forward on its batch.
    """
    for rec in records:
        kind = rec.get("kind")
        if kind == "step":
            if taps_at is None:
                opt.replay(store, rec)
            else:
                opt.replay(store, rec, evaluate=taps_at(int(rec["step"])))  # type: ignore[call-arg]
            if guard is not None and guard.feed_step(rec) == "snapshot":
                guard.take_snapshot(store, opt)
        elif kind == "rollback":
            _apply_rollback(guard, store, opt, rec)
        else:
            raise InputError(f"journal record of unknown kind {kind!r}")
