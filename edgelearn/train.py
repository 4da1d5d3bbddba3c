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
resumed run ends bit-identical to an uninterrupted one.

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
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.budget import plan_batch
from edgelearn.bundle import Bundle
from edgelearn.data import Dataset
from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.journal import Journal, read_journal
from edgelearn.losses import default_loss, get_loss
from edgelearn.model import Model, peak_rss_mb
from edgelearn.optim import Optimizer, make_optimizer, optimizer_class, optimizer_from_config
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
    return _epoch_permutation(n, seed, epoch)[i * bs : (i + 1) * bs].copy()


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # cached: drawing a permutation of n per step cost more than a small model's forward
    ss = np.random.SeedSequence([seed, _DATA_DOMAIN, epoch])
    return np.random.Generator(np.random.Philox(ss)).permutation(n)


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
        return optimizer_from_config(header["optimizer"], header["config"])
    except (KeyError, TypeError) as e:
        raise InputError(f"journal header does not describe an optimizer ({e})") from None


#: backend name -> the bundle file role of its taps graph
TAPS_GRAPH = {"onnxruntime": "onnx_taps", "ort": "onnx_taps", "litert": "tflite_taps",
              "tflite": "tflite_taps"}


def taps_evaluator(bundle: Bundle, store: ParamStore, data: Dataset, opt: Optimizer, *,
                   batch_size: int, seed: int, backend: str = "onnxruntime",
                   threads: int | None = None,
                   times: list[float] | None = None) -> Callable[[int], Callable[[], Any]]:
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
    out_shape = bundle.outputs[0].shape[1:]
    static = all(isinstance(d, int) for d in out_shape)  # targets checked before any journal
    opt.setup(store, layers=layers, targets=data.y if static else None, out_shape=out_shape)
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


def data_sha256(data: Dataset) -> str:
    """sha256 of a data set's x and y bytes (pins the data of runs whose replay needs it)."""
    import hashlib

    h = hashlib.sha256()
    for a in (data.x, data.y):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def replay_journal(bundle: Bundle, journal_path: str | os.PathLike,
                   data: Dataset | None = None) -> tuple[ParamStore, int]:
    """Rebuild weights from the bundle's base weights and a journal (no data, no forwards).

    Optimizers whose updates depend on the data (tpsgd) re-run each step's forward on `data`
    instead, which must be the run's data (its sha256 is in the journal header), on the
    backend the run used (header "taps_backend", default onnxruntime).
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
    _apply_records(records[1:], store, opt, guard, taps_at)
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
    Returns: the `train --json` summary.
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
        trainable = optimizer_class(optimizer).default_trainable
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
        plan = plan_batch(bundle, batch_size=batch_size, budget_mb=memory_budget_mb,
                          extra_bytes=opt.memory_bytes(store)
                          + (pop_eval.memory_bytes() if pop_eval is not None else 0))
        if plan["batch_size"] < batch_size:
            print(f"edgelearn: batch size {batch_size} would exceed the memory budget of "
                  f"{memory_budget_mb:.0f} MB; using {plan['batch_size']}", file=sys.stderr)
            batch_size = plan["batch_size"]
    loss_name = objective or default_loss(bundle.task)
    loss_fn = get_loss(loss_name)
    extra: dict[str, Any] = {}
    taps_at = None
    times_fwd: list[float] = []
    if opt.needs == "taps":  # tpsgd: one taps forward per step, replay re-runs it on the data
        extra["data_sha256"] = data_sha256(data)
        if TAPS_GRAPH.get(backend) == "tflite_taps":  # replay must re-run the same runtime
            extra["taps_backend"] = "litert"
        taps_at = taps_evaluator(bundle, store, data, opt, batch_size=batch_size, seed=seed,
                                 backend=backend, threads=threads, times=times_fwd)
    if divergence is not None:
        extra["divergence"] = divergence.to_json(store, opt, checkpoint_every)
    header = make_header(bundle, store, opt, batch_size=batch_size, data_seed=seed,
                         n_examples=len(data), objective=loss_name, **extra)
    guard = _guard_from_header(header)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no directory
    with run_lock(run_dir):
        check_run_dir(run_dir)
        journal = Journal(run_dir / JOURNAL, fsync_every=fsync_every,
                          fsync_seconds=fsync_seconds)
        try:
            done = _resume(journal, header, store, opt, run_dir, guard, taps_at)
            times_fwd.clear()
            times_step: list[float] = []
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
                                evaluate_population if pop_eval is not None else None,
                                taps=None if taps_at is None else taps_at(t))
                times_step.append(time.perf_counter() - t0)
                journal.append({"kind": "step", **info.record})
                losses.append(info.loss)
                if guard is not None:
                    _guard_after_step(guard, journal, store, opt, run_dir)
                elif (t + 1) % checkpoint_every == 0:
                    journal.sync()
                    _checkpoint(run_dir, store, opt, len(journal))
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
        "rollbacks": sum(r.get("kind") == "rollback" for r in journal.records),
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


def _checkpoint(run_dir: Path, store: ParamStore, opt: Optimizer, records: int) -> None:
    """Atomic checkpoint (arena, then its metadata) covering the first `records` journal records.

    Order matters for crash safety: the arena is renamed into place first; metadata naming it
    (with its digest) second. A crash in between leaves metadata whose digest does not match
    the arena, and resume then ignores the checkpoint.
    """
    store.save(run_dir / CKPT)
    _atomic_json(run_dir / CKPT_META, {
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


def _load_checkpoint(run_dir: Path, store: ParamStore, opt: Optimizer,
                     body: list[dict[str, Any]]) -> int:
    """Load the checkpoint when it is valid and agrees with the journal.

    Returns how many journal records after the header it covers (0 = none usable; store and
    optimizer are then untouched).
    """
    meta_path = run_dir / CKPT_META
    if not (meta_path.is_file() and (run_dir / CKPT).is_file()):
        return 0
    try:
        meta = json.loads(meta_path.read_text())
        k = int(meta["step"])
        pos = int(meta.get("records", k + 1)) - 1  # older checkpoints: step records only
        last = body[pos - 1] if 0 < pos <= len(body) else {}
        if not (k > 0 and last.get("kind") == "step" and last.get("step") == k - 1):
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


def _resume(journal: Journal, header: dict[str, Any], store: ParamStore, opt: Optimizer,
            run_dir: Path, guard: _Guard | None = None,
            taps_at: Callable[[int], Any] | None = None) -> int:
    """Bring store and optimizer to the end of the journal; returns the steps already done."""
    recs = journal.records
    if not recs:
        journal.append(header)
        journal.sync()
        if guard is not None:
            guard.take_snapshot(store, opt)
        return 0
    old = recs[0]
    if old.get("kind") != "header":
        raise InputError(f"{run_dir}: journal does not start with a header")
    diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
    if diff:
        raise InputError(f"{run_dir} holds a run with different settings ({', '.join(diff)}); "
                         "use another --out or the same settings to resume")
    body = recs[1:]
    base = store.copy() if guard is not None else None
    fresh = opt.state_dict()
    start = _load_checkpoint(run_dir, store, opt, body)
    if guard is not None:
        assert base is not None
        start = _guard_resume_point(guard, body, start, store, opt, (base, fresh))
    _apply_records(body[start:], store, opt, guard, taps_at)
    n_steps = sum(r.get("kind") == "step" for r in body)
    if opt.t != n_steps:
        raise InputError(f"{run_dir}: journal step records are not consecutive")
    if guard is not None and guard.pending:  # killed between a step and its rollback
        _rollback(guard, journal, store, opt)
    return n_steps


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


def _guard_after_step(guard: _Guard, journal: Journal, store: ParamStore, opt: Optimizer,
                      run_dir: Path) -> None:
    """After a journaled step: roll back, or take a good snapshot (= a checkpoint)."""
    event = guard.feed_step(journal.records[-1])
    if event == "rollback":
        _rollback(guard, journal, store, opt)
    elif event == "snapshot":
        guard.take_snapshot(store, opt)
        journal.sync()
        _checkpoint(run_dir, store, opt, len(journal))


def _guard_resume_point(guard: _Guard, body: list[dict[str, Any]], start: int,
                        store: ParamStore, opt: Optimizer,
                        base: tuple[ParamStore, dict[str, Any]]) -> int:
    """Rebuild the rule's state up to `start` records from the losses alone.

    With a divergence policy the checkpoint is always a good snapshot, so it becomes the
    rollback target; if the records say otherwise the checkpoint is dropped and the run is
    replayed from the base weights (start 0, snapshot at step 0).
    """
    event = None
    for rec in body[:start]:
        if rec.get("kind") == "rollback":
            guard.pending, guard.streak = False, 0
            event = None
        else:
            event = guard.feed_step(rec)
    if start > 0 and event != "snapshot":
        store.assign(base[0].state())
        opt.load_state_dict(base[1])
        guard.best, guard.streak, guard.pending = math.inf, 0, False
        start = 0
    guard.take_snapshot(store, opt)
    return start


def _apply_records(records: list[dict[str, Any]], store: ParamStore, opt: Optimizer,
                   guard: _Guard | None,
                   taps_at: Callable[[int], Any] | None = None) -> None:
    """Replay step and rollback records (no forwards), following the divergence rule.

    Optimizers whose update depends on the data (tpsgd) get `taps_at(step)`: an evaluate()
    that re-runs that step's taps forward on its batch.
    """
    for rec in records:
        kind = rec.get("kind")
        if kind == "step":
            opt.replay(store, rec, taps=None if taps_at is None else taps_at(int(rec["step"])))
            if guard is not None and guard.feed_step(rec) == "snapshot":
                guard.take_snapshot(store, opt)
        elif kind == "rollback":
            _apply_rollback(guard, store, opt, rec)
        else:
            raise InputError(f"journal record of unknown kind {kind!r}")
