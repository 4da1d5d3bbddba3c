"""Per-subject activity recognition from a smartwatch: leave-one-subject-out personalization.

Data nobody here wrote: the 10-subject shoulder-exercise watch dataset that ships with
`seglearn` (Burns et al. 2018, arXiv:1802.01489): 140 recordings, 7 exercises, 6-axis IMU at
50 Hz, each subject doing every exercise once with each arm. For every test subject s:

  host (torch)   pretrain a small 1-D conv net by backprop on the 9 other subjects, export it;
                 backprop fine-tune of the same model on s's personalization part (the ceiling).
  device         (a separate process that never imports torch) personalize the bundle with
                 ZO-SGD on the head / the last layers / all weights, with tpSGD, and with the
                 hybrid (tpSGD's exact head update + ZO-SGD on the conv layers, in one step
                 of two taps forwards; "hybrid-each": the head updated after each of the
                 two) when the bundle has taps, on the same data; evaluate on s's held-out
                 part.

Every method gets the same forward-pass budget (`--budget`, forwards of one batch): a ZO-SGD
step with q probes costs 2q forwards (counted from the journal's "evals" of a 1-step run, so any
optimizer is budgeted by what it really evaluates); a backprop step costs 3 forward-equivalents
(forward + backward ~ 2 forwards). `--device-budget N` gives the device half's methods N
forwards instead while backprop keeps `--budget` (how many forwards a method needs to catch
up with backprop at its budget). Learning rates are chosen by a nested sweep that never sees
subject s: in each fold a pseudo-target subject s' (the next subject id) is held out of a second
pretraining on the remaining 8; each method's lr is the grid value with the best accuracy on
s' held-out part after personalizing on s' personalization part. With `--pseudo-targets N`
(default 2) there are N such subjects (the next id, the previous, the one after next, ...: a
neighbouring pair's pretraining serves two folds) and the lr is chosen by the mean over them of
the held-out loss (`--select loss`, default) or accuracy (`--select accuracy`): one subject's
accuracies for neighbouring lrs are often a few windows apart, so one subject's accuracy picks
by noise. `--pseudo-targets 1 --select accuracy` is the protocol of the first measurements.

Split of a subject's data (`--split`):
  "time" (default): the first half of every recording (about 10 of its 20 repetitions) is the
      personalization part, the second half the held-out part; windows never cross the cut, so
      no sample is shared (a user calibrates on a few repetitions of each exercise, then uses it).
  "series": one whole recording per exercise each way. In this dataset the two recordings of an
      exercise are the left and the right arm, so this split personalizes on one arm and tests
      on the other.

    python examples/har_loso.py [--subjects 1,2] [--budget 3000] [--device-budget N]
                                [--quick] [--out runs/har]
                                [--zo fzoo,adamezo,lozo,zo-gn,zo-readout]
                                [--methods tpsgd-head,hybrid]
                                [--pseudo-targets 2] [--select loss] [--outer-sweep]
Progress goes to stderr (a line per subject and method as it finishes), a table of held-out
accuracies to stdout; all figures are written to OUT/results.json (`--json`: printed instead
of the table, one JSON object).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from runner import run_cli, run_device_half

PROG = "har_loso"
SUBJECTS = tuple(range(1, 11))
CLASSES = 7
WIN, STRIDE = 100, 50  # 2 s windows at 50 Hz, 50% overlap
BATCH = 32
#: ZO variants: name -> trainable globs (parameter names of edgelearn.export.zoo.Conv1dClassifier)
VARIANTS = {"zo-head": "head.*", "zo-last": "conv2.*,head.*", "zo-full": "*"}
TPSGD = "tpsgd"
#: tpSGD variants: name -> (trainable globs, hidden-layer lr as a fraction of the head's lr).
#: Local targets are random projections of the label; on a PRETRAINED net, hidden layers that
#: chase them at the head's lr overwrite the features (measured: accuracy 0.69 -> 0.18), so
#: "tpsgd" keeps the hidden lr 1000x lower and "tpsgd-head" trains the head alone (exact SGD on
#: the true loss from one taps forward).
TPSGD_VARIANTS = {"tpsgd": ("*", 1e-3), "tpsgd-head": ("head.*", None)}
#: hybrid variants: name -> (trainable globs, globs updated exactly; the rest gets ZO, other
#: hybrid options). The head gets tpSGD's exact update, the conv layers ZO-SGD at
#: HYBRID_ZO_LR x the head's lr; "hybrid-each" updates the head after each of the step's two
#: taps forwards (option exact_each: as many head steps as tpsgd-head from the same forwards).
HYBRID_VARIANTS = {"hybrid": ("*", "head.*", {}),
                   "hybrid-each": ("*", "head.*", {"exact_each": True})}
HYBRID_ZO_LR = 0.1
#: lr grids of the nested sweep (the chosen values are printed per fold)
GRIDS = {
    "backprop": (3e-4, 1e-3, 3e-3),
    "zo-head": (1e-3, 3e-3, 1e-2),
    "zo-last": (3e-4, 1e-3, 3e-3),
    "zo-full": (3e-4, 1e-3, 3e-3),
    "tpsgd": (1e-3, 3e-3, 1e-2),
    "tpsgd-head": (1e-3, 3e-3, 1e-2),
    "hybrid": (3e-3, 1e-2, 3e-2),
    "hybrid-each": (3e-3, 1e-2, 3e-2),
}
QUICK_GRIDS = {"backprop": (1e-3,), "zo-head": (3e-3,), "zo-last": (1e-3,), "zo-full": (1e-3,),
               "tpsgd": (1e-2,), "tpsgd-head": (1e-2,), "hybrid": (1e-2,),
               "hybrid-each": (1e-2,)}
ZO_OPTIONS = {"eps": 1e-3, "probes": 1}
#: opt-in ZO estimators (`--zo fzoo,adamezo,lozo,zo-gn,zo-readout`): methods "<optimizer>-head"
#: and "<optimizer>-full" with these lr grids (first: head, second: all weights, None: the
#: optimizer trains the head alone); other options
#: are their defaults. zo-gn's lr is the fraction of its damped Gauss-Newton step taken: it
#: runs at its default 1, unswept (a 0.5 / 1 / 1.5 sweep by the pseudo-targets' loss picked
#: 1.5 on 3-5 of 10 subjects, the worst value on the test subjects: README, HAR section)
EXTRA_ZO = {"fzoo": ((0.03, 0.1, 0.3), (0.01, 0.03, 0.1)),
            "adamezo": ((3e-3, 1e-2, 3e-2), (1e-3, 3e-3, 1e-2)),
            "lozo": ((3e-3, 1e-2, 3e-2), (1e-3, 3e-3, 1e-2)),
            "zo-gn": ((1.0,), (1.0,)),
            "zo-readout": ((0.1, 0.3, 1.0), None)}  # a linear head alone: no "-full"
EXTRA_PARTS = {"head": "head.*", "full": "*"}


def pseudo_targets(subject: int, n: int) -> list[int]:
    """The n pseudo-target subjects of test subject `subject`: next id, previous, next but one."""
    i = SUBJECTS.index(subject)
    offsets = [d for k in range(1, len(SUBJECTS)) for d in (k, -k)]
    picked: list[int] = []
    for d in offsets:
        s = SUBJECTS[(i + d) % len(SUBJECTS)]
        if s not in picked and len(picked) < n:
            picked.append(s)
    return picked


def select_lr(sweep: dict[float, dict[str, list[float]]], criterion: str) -> float:
    """The grid lr of the best mean held-out `criterion` over the pseudo-targets (ties: the
    smaller lr). sweep: lr -> {"accuracy": [per pseudo-target], "loss": [...]}."""
    sign = -1.0 if criterion == "loss" else 1.0  # loss: lower is better
    return max(sweep, key=lambda k: (sign * float(np.mean(sweep[k][criterion])), -k))


def extra_methods(names: list[str]) -> dict[str, tuple[str, str, tuple[float, ...]]]:
    """method -> (optimizer, trainable globs, lr grid) of the `--zo` estimators."""
    return {f"{n}-{part}": (n, globs, EXTRA_ZO[n][i]) for n in names
            for i, (part, globs) in enumerate(EXTRA_PARTS.items()) if EXTRA_ZO[n][i]}


# ---------------------------------------------------------------------------------------------
# Data (host side)

class _WatchUnpickler(pickle.Unpickler):
    """Unpickler for seglearn's watch_dataset.npy that can build numpy arrays and nothing else.

    The file is a pickled dict inside an .npy (object array). Unpickling runs whatever callables
    the stream names, so a tampered file could execute code; `np.load(allow_pickle=True)` (and
    seglearn's own `load_watch`) would run it. Here the stream may only name the four globals a
    protocol-2 numpy pickle needs, each wrapped to accept only the arguments numpy writes:
    ndarray reconstruction (subtype must be ndarray), dtype construction from a type string, and
    `_codecs.encode(str, "latin1")` (how protocol 2 stores raw bytes). Anything else raises.
    dict/list/str/int come from pickle opcodes, not globals.
    """

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray",
                                                 "numpy._core.multiarray"):
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return _dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        raise pickle.UnpicklingError(f"watch dataset names a forbidden global {module}.{name}")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"watch dataset: unexpected array subtype {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("ascii")
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"watch dataset: unexpected dtype spec {spec!r}")
    return np.dtype(spec, align, copy)


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("watch dataset: unexpected _codecs.encode call")
    return text.encode("latin1")


def _watch_npy() -> Path:
    spec = importlib.util.find_spec("seglearn")
    if spec is None or spec.origin is None:
        raise SystemExit("this example needs the seglearn package (pip install seglearn)")
    return Path(spec.origin).parent / "data" / "watch_dataset.npy"


def load_watch(cache: Path) -> dict[str, np.ndarray]:
    """The watch dataset as plain arrays, converted once into `cache` (.npz, no pickle).

    Returns: x float32 [total, 6] (all recordings concatenated), offsets int64 [141] (recording
    i is x[offsets[i]:offsets[i+1]]), y int64 [140] (exercise), subject int64 [140], side
    int64 [140] (1 = right arm).
    """
    if not cache.is_file():
        from numpy.lib import format as npf

        with open(_watch_npy(), "rb") as f:
            npf.read_magic(f)
            shape, _, dtype = npf.read_array_header_1_0(f)
            if shape != () or dtype != np.dtype(object):
                raise SystemExit("watch_dataset.npy: unexpected layout")
            d = _WatchUnpickler(f, encoding="latin1").load().item()
        series = [np.asarray(s, dtype=np.float32) for s in d["X"]]
        if not all(s.ndim == 2 and s.shape[1] == 6 for s in series):
            raise SystemExit("watch_dataset.npy: recordings are not [n, 6]")
        offsets = np.cumsum([0] + [len(s) for s in series]).astype(np.int64)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=np.concatenate(series), offsets=offsets,
                 y=np.asarray(d["y"], np.int64), subject=np.asarray(d["subject"], np.int64),
                 side=np.asarray(d["side"], np.int64))
    with np.load(cache, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _windows(seq: np.ndarray) -> np.ndarray:
    n = (len(seq) - WIN) // STRIDE + 1
    if n <= 0:
        return np.zeros((0, WIN, seq.shape[1]), np.float32)
    return seq[np.arange(n)[:, None] * STRIDE + np.arange(WIN)]


def subject_parts(d: dict[str, np.ndarray], subject: int, split: str
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(personalization, held-out) windows of one subject: each (x [n, WIN, 6], y [n])."""
    parts: tuple[list, list] = ([], [])
    for i in np.flatnonzero(d["subject"] == subject):
        seq = d["x"][d["offsets"][i]:d["offsets"][i + 1]]
        if split == "time":
            cut = len(seq) // 2
            pieces = (seq[:cut], seq[cut:])
        else:  # "series": right arm personalizes, left arm is held out
            pieces = (seq, seq[:0]) if d["side"][i] == 1 else (seq[:0], seq)
        for part, piece in zip(parts, pieces, strict=True):
            w = _windows(piece)
            part.append((w, np.full(len(w), d["y"][i], np.int64)))
    return tuple((np.concatenate([w for w, _ in p]), np.concatenate([y for _, y in p]))
                 for p in parts)  # type: ignore[return-value]


def subjects_windows(d: dict[str, np.ndarray], subjects: list[int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """All windows of whole recordings of `subjects`: x [n, WIN, 6], y [n]."""
    xs, ys = [], []
    for i in np.flatnonzero(np.isin(d["subject"], subjects)):
        w = _windows(d["x"][d["offsets"][i]:d["offsets"][i + 1]])
        xs.append(w)
        ys.append(np.full(len(w), d["y"][i], np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def progress(line: str) -> None:
    """One line of progress on stderr (stdout carries the result)."""
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Host: pretrain, export, backprop ceiling (torch)

def pretrain(x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int) -> Any:
    """Backprop (Adam) on the pretraining windows; returns the torch model."""
    import torch
    from edgelearn.export.zoo import Conv1dClassifier

    torch.manual_seed(seed)
    model = Conv1dClassifier(in_features=6, width=16, classes=CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for b in np.array_split(rng.permutation(len(x)), max(1, len(x) // 64)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    return model.eval()


def torch_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of a torch model on windows."""
    return torch_scores(model, x, y)["accuracy"]


def torch_scores(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """{"accuracy", "loss" (mean cross-entropy)} of a torch model on windows."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
        return {"accuracy": float((logits.argmax(1).numpy() == y).mean()), "loss": float(loss)}


def backprop_finetune(model: Any, x: np.ndarray, y: np.ndarray, *, lr: float, steps: int,
                      seed: int) -> Any:
    """Fine-tune a copy of `model` by backprop (Adam, all weights), batches of BATCH."""
    import copy

    import torch

    import edgelearn as el

    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    data = el.Dataset(x, y)
    for t in range(steps):
        # same data order as the device runs (the batches Session.run feeds)
        xb, yb = data.batch_at(t, BATCH, seed)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(torch.from_numpy(xb)),
                                          torch.from_numpy(yb)).backward()
        opt.step()
    return m.eval()


def prepare_fold(d: dict[str, np.ndarray], target: int, exclude: set[int], fold_dir: Path, *,
                 split: str, epochs: int, seed: int, cache: dict[frozenset, Any]
                 ) -> tuple[Any, dict[str, np.ndarray]]:
    """Pretrain without `exclude` (once per excluded set: `cache`), export to fold_dir/bundle,
    write target's parts as .npz."""
    import torch
    from edgelearn.export import export_bundle

    key = frozenset(exclude)
    if key not in cache:
        xp, yp = subjects_windows(d, [s for s in SUBJECTS if s not in exclude])
        flat = xp.reshape(-1, xp.shape[-1])
        # normalization statistics come from the pretraining subjects only
        mu, sd = flat.mean(0), flat.std(0) + 1e-6
        cache[key] = (mu, sd, pretrain(((xp - mu) / sd).astype(np.float32), yp,
                                       epochs=epochs, seed=seed))
    mu, sd, model = cache[key]
    norm = lambda a: ((a - mu) / sd).astype(np.float32)  # noqa: E731
    (xa, ya), (xb, yb) = subject_parts(d, target, split)
    arrays = {"pers_x": norm(xa), "pers_y": ya, "held_x": norm(xb), "held_y": yb}
    fold_dir.mkdir(parents=True, exist_ok=True)
    export_bundle(model, torch.from_numpy(arrays["pers_x"][:2]), fold_dir / "bundle",
                  trainable="*", overwrite=True)
    np.savez(fold_dir / "pers.npz", x=arrays["pers_x"], y=arrays["pers_y"])
    np.savez(fold_dir / "held.npz", x=arrays["held_x"], y=arrays["held_y"])
    return model, arrays


def host(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Pretrain + export every fold (outer and inner), run the backprop ceiling with its sweep."""
    import torch

    torch.set_num_threads(1)
    d = load_watch(out / "watch.npz")
    grids = QUICK_GRIDS if args.quick else GRIDS
    bp_steps = args.budget // 3
    folds, cache = [], {}
    for s in args.subjects:
        t0 = time.perf_counter()
        inner = pseudo_targets(s, args.pseudo_targets)
        fold = {"subject": s, "pseudo_target": inner[0], "pseudo_targets": inner,
                "dir": str(out / f"s{s}")}
        kw = {"split": args.split, "epochs": args.epochs, "seed": args.seed, "cache": cache}
        for part in (*(inner_dir(p) for p in inner), "outer"):
            # the fold's bundles are exported anew: runs left by an earlier invocation belong
            # to the old bundles and would be refused on resume
            shutil.rmtree(out / f"s{s}" / part / "runs", ignore_errors=True)
        folds_in = [prepare_fold(d, p, {s, p}, out / f"s{s}" / inner_dir(p), **kw)
                    for p in inner]
        m_out, a_out = prepare_fold(d, s, {s}, out / f"s{s}" / "outer", **kw)
        sweep: dict[float, dict[str, list[float]]] = {}
        for lr in grids["backprop"]:
            scores = [torch_scores(backprop_finetune(m_in, a_in["pers_x"], a_in["pers_y"],
                                                     lr=lr, steps=bp_steps, seed=args.seed),
                                   a_in["held_x"], a_in["held_y"]) for m_in, a_in in folds_in]
            sweep[lr] = {k: [sc[k] for sc in scores] for k in ("accuracy", "loss")}
        lr = select_lr(sweep, args.select)
        outs = {x: torch_scores(backprop_finetune(m_out, a_out["pers_x"], a_out["pers_y"],
                                                  lr=x, steps=bp_steps, seed=args.seed),
                                a_out["held_x"], a_out["held_y"])
                for x in (grids["backprop"] if args.outer_sweep else (lr,))}
        fold.update(
            n_personalize=len(a_out["pers_y"]), n_held_out=len(a_out["held_y"]),
            before_torch=torch_accuracy(m_out, a_out["held_x"], a_out["held_y"]),
            backprop={"accuracy": outs[lr]["accuracy"],
                      "lr": lr, "steps": bp_steps, "forwards": 3 * bp_steps,
                      "inner_sweep": {str(k): v for k, v in sweep.items()},
                      **({"outer_sweep": {str(k): v for k, v in outs.items()}}
                         if args.outer_sweep else {})})
        folds.append(fold)
        progress(f"host   subject {s:2d}: pretrained and exported; backprop (lr {lr:g}) "
                 f"{fold['before_torch']:.3f} -> {fold['backprop']['accuracy']:.3f} "
                 f"({time.perf_counter() - t0:.0f} s)")
    return {"folds": folds, "grids": {k: list(v) for k, v in grids.items()}}


def inner_dir(pseudo_target: int) -> str:
    """The fold subdirectory of one pseudo-target's bundle and data."""
    return f"inner{pseudo_target}"


# ---------------------------------------------------------------------------------------------
# Device: forward-only personalization (numpy + onnxruntime, never torch)

def _session(bundle: Any, run_dir: Path, optimizer: str, options: dict[str, Any],
             trainable: str, seed: int = 0) -> Any:
    """A device session of one personalization run (no checkpoints: short runs)."""
    import edgelearn as el

    config = el.TrainConfig(optimizer=optimizer, options=options, trainable=trainable,
                            batch_size=BATCH, seed=seed, checkpoint_every=1 << 30,
                            fsync_every=1 << 30)
    return el.Session(bundle, run_dir, config,
                      el.RuntimeConfig(backend="onnxruntime", device=None))


def _forwards_per_step(bundle: Any, data: Any, run_dir: Path, optimizer: str,
                       options: dict[str, Any], trainable: str) -> int:
    """Forwards one step of `optimizer` evaluates, from a 1-step run."""
    import edgelearn as el

    class Count(el.Callback):
        evaluations = 1

        def on_step(self, session: Any, result: Any) -> None:
            self.evaluations = max(1, result.evaluations)

    count = Count()
    with _session(bundle, run_dir, optimizer, options, trainable) as session:
        session.run(data, 1, callbacks=[count])
    return count.evaluations


_PER_STEP: dict[str, int] = {}


def _personalize(fold_dir: Path, tag: str, method: str, lr: float, budget: int, seed: int,
                 ) -> dict[str, Any]:
    import edgelearn as el

    bundle = el.load_bundle(fold_dir / "bundle")
    pers, held = el.load_data(fold_dir / "pers.npz"), el.load_data(fold_dir / "held.npz")
    extra = extra_methods(list(EXTRA_ZO))
    if method in TPSGD_VARIANTS:
        optimizer, (trainable, hidden) = TPSGD, TPSGD_VARIANTS[method]
        options = {"lr": lr, **({"hidden_lr": lr * hidden} if hidden else {})}
    elif method in extra:
        optimizer, trainable, _ = extra[method]
        options = {"lr": lr}
    elif method in HYBRID_VARIANTS:
        optimizer, (trainable, exact, more) = "hybrid", HYBRID_VARIANTS[method]
        options = {"lr": lr, "exact": exact, "zo_lr": lr * HYBRID_ZO_LR, **ZO_OPTIONS, **more}
    else:
        optimizer, trainable = "zo-sgd", VARIANTS[method]
        options = {"lr": lr, **ZO_OPTIONS}
    runs = fold_dir / "runs"
    if method not in _PER_STEP:  # the same for every lr and fold
        _PER_STEP[method] = _forwards_per_step(bundle, pers, runs / f"{tag}-{method}-probe",
                                               optimizer, options, trainable)
    per_step = _PER_STEP[method]
    steps = budget // per_step
    t0 = time.perf_counter()
    with _session(bundle, runs / f"{tag}-{method}-{lr:g}", optimizer, options, trainable,
                  seed) as session:
        res = session.run(pers, steps)
        scores = session.evaluate(held)
    return {"accuracy": scores.accuracy, "loss": scores.loss, "lr": lr, "steps": steps,
            "forwards": steps * per_step,
            "trainable_params": res.trainable_params, "seconds": time.perf_counter() - t0,
            "step_ms_median": res.step_ms_median}


def device(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """For every fold: inner lr sweep per method, then the outer run with the chosen lr."""
    import edgelearn as el

    extra = extra_methods(args.zo)
    grids = {**(QUICK_GRIDS if args.quick else GRIDS),
             **{m: (g[len(g) // 2],) if args.quick else g for m, (_, _, g) in extra.items()}}
    runtime = el.RuntimeConfig(backend="onnxruntime", device=None)
    # tpSGD needs the bundle's layer-taps graph; the exporter says why when it has none.
    first = el.load_bundle(out / f"s{args.subjects[0]}" / "outer" / "bundle")
    tpsgd_why = None
    if "onnx_taps" not in first.files:
        tpsgd_why = first.manifest.get("taps_unsupported", "bundle exported without taps")
    methods = [*VARIANTS, *extra, *(TPSGD_VARIANTS if tpsgd_why is None else []),
               *(HYBRID_VARIANTS if tpsgd_why is None and "hybrid" in el.optimizers() else [])]
    if args.methods:  # a subset, e.g. to compare two methods on every subject quickly
        methods = [m for m in methods if m in args.methods.split(",")]
    res: dict[str, Any] = {"methods": methods, "tpsgd_available": tpsgd_why is None,
                           "tpsgd_unavailable_reason": tpsgd_why, "folds": {}}
    for s in args.subjects:
        fold_dir = out / f"s{s}"
        outer = fold_dir / "outer"
        before = el.evaluate(outer / "bundle", el.load_data(outer / "held.npz"),
                             runtime=runtime).accuracy
        inner = [fold_dir / inner_dir(p) for p in pseudo_targets(s, args.pseudo_targets)]
        fold: dict[str, Any] = {"before": before, "inner_before": [el.evaluate(
            i / "bundle", el.load_data(i / "held.npz"), runtime=runtime).accuracy
            for i in inner]}
        for method in methods:
            t0 = time.perf_counter()
            sweep = {}
            for lr in grids[method]:
                runs = [_personalize(i, "inner", method, lr, args.device_budget, args.seed)
                        for i in inner]
                sweep[lr] = {k: [r[k] for r in runs] for k in ("accuracy", "loss")}
            lr = select_lr(sweep, args.select)
            outs = {x: _personalize(outer, "outer", method, x, args.device_budget, args.seed)
                    for x in (grids[method] if args.outer_sweep else (lr,))}
            fold[method] = outs[lr]
            fold[method]["inner_sweep"] = {str(k): v for k, v in sweep.items()}
            if args.outer_sweep:  # analysis: what every lr gives on the test subject
                fold[method]["outer_sweep"] = {str(x): {k: o[k] for k in ("accuracy", "loss")}
                                               for x, o in outs.items()}
            progress(f"device subject {s:2d} {method:10s}: lr {lr:g}, {before:.3f} -> "
                     f"{fold[method]['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)")
        res["folds"][str(s)] = fold
    res["torch_loaded_on_device"] = "torch" in sys.modules
    return res


# ---------------------------------------------------------------------------------------------

def summarize(h: dict[str, Any], dv: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per-subject accuracies, recovered fractions and means."""
    methods = ["backprop", *dv["methods"]]
    per_subject = []
    for fold in h["folds"]:
        dev = dv["folds"][str(fold["subject"])]
        row: dict[str, Any] = {"subject": fold["subject"],
                               "pseudo_target": fold["pseudo_target"],
                               "n_personalize": fold["n_personalize"],
                               "n_held_out": fold["n_held_out"],
                               "before": dev["before"], "before_torch": fold["before_torch"],
                               "pseudo_targets": fold["pseudo_targets"],
                               "pseudo_target_before": dev["inner_before"],
                               "backprop": fold["backprop"]}
        gain_bp = fold["backprop"]["accuracy"] - dev["before"]
        for m in dv["methods"]:
            row[m] = dev[m]
            gain = dev[m]["accuracy"] - dev["before"]
            row[m]["recovered"] = gain / gain_bp if gain_bp > 0 else None
        per_subject.append(row)
    mean = {"before": float(np.mean([r["before"] for r in per_subject]))}
    for m in methods:
        mean[m] = float(np.mean([r[m]["accuracy"] for r in per_subject]))
    gain_bp = mean["backprop"] - mean["before"]
    # recovered fraction of the mean gain: per-subject ratios blow up where backprop gains ~0
    recovered = {m: ((mean[m] - mean["before"]) / gain_bp if gain_bp > 0 else None)
                 for m in dv["methods"]}
    oracle = oracle_shares(per_subject, dv["methods"], mean["before"], mean["backprop"])
    return {
        "subjects": args.subjects, "split": args.split, "budget_forwards": args.budget,
        "device_budget_forwards": args.device_budget,
        "batch_size": BATCH, "window": {"samples": WIN, "stride": STRIDE, "hz": 50},
        "model": "edgelearn.export.zoo.Conv1dClassifier(in_features=6, width=16, classes=7)",
        "accounting": "ZO step = forwards counted in its journal (2 per probe); backprop step "
                      "= 3 forward-equivalents; steps = budget // cost",
        "lr_selection": {"pseudo_targets": args.pseudo_targets, "select": args.select},
        "zo_options": ZO_OPTIONS, "variants": VARIANTS, "grids": h["grids"],
        "hybrid_variants": {k: {"trainable": t, "exact": e, "zo_lr_over_lr": HYBRID_ZO_LR,
                                **more} for k, (t, e, more) in HYBRID_VARIANTS.items()},
        "tpsgd_available": dv["tpsgd_available"],
        "tpsgd_unavailable_reason": dv["tpsgd_unavailable_reason"],
        "torch_loaded_on_device": dv["torch_loaded_on_device"],
        "mean_accuracy": mean, "recovered_fraction_of_mean_gain": recovered,
        **({"oracle_recovered_fraction_of_mean_gain": oracle} if oracle else {}),
        "goal_recovered_0.85": {m: (r is not None and r >= 0.85) for m, r in recovered.items()},
        "goal_hybrid_recovered_0.9": {m: (r is not None and r >= 0.9)
                                      for m, r in recovered.items() if m in HYBRID_VARIANTS},
        "per_subject": per_subject,
    }


def oracle_shares(per_subject: list[dict[str, Any]], methods: list[str], before: float,
                  backprop: float) -> dict[str, float | None]:
    """With --outer-sweep: each method's share of backprop's mean gain when every subject
    gets its best grid lr on its own held-out part (an upper bound of any lr choice from the
    grid; backprop stays at its chosen lr, the ceiling the shares divide by)."""
    gain = backprop - before
    out: dict[str, float | None] = {}
    for m in methods:
        sweeps = [row[m].get("outer_sweep") for row in per_subject]
        if not all(sweeps):
            continue
        best = float(np.mean([max(v["accuracy"] for v in sw.values()) for sw in sweeps]))
        out[m] = (best - before) / gain if gain > 0 else None
    return out


def budget_label(budget: int, device_budget: int) -> str:
    """Forwards per method as the table states them: "3000", or "6000 (backprop 3000)"."""
    return f"{budget}" if device_budget == budget else f"{device_budget} (backprop {budget})"


def table(res: dict[str, Any]) -> str:
    """Held-out accuracy per subject and method, means, and the share of backprop's gain."""
    methods = ["before", "backprop", *res["recovered_fraction_of_mean_gain"]]
    width = max(10, *(len(m) + 2 for m in methods))
    forwards = budget_label(res["budget_forwards"],
                            res.get("device_budget_forwards", res["budget_forwards"]))
    lines = [f"held-out accuracy, {forwards} forwards of {res['batch_size']} per method "
             f"({res['split']} split)",
             "subject" + "".join(f"{m:>{width}s}" for m in methods)]
    for row in res["per_subject"]:
        cells = [row["before"]] + [row[m]["accuracy"] for m in methods[1:]]
        lines.append(f"{row['subject']:7d}" + "".join(f"{v:{width}.3f}" for v in cells))
    lines.append("mean   " + "".join(f"{res['mean_accuracy'][m]:{width}.3f}" for m in methods))
    shares = [f"{m} {'n/a' if r is None else f'{r:.2f}'}"
              for m, r in res["recovered_fraction_of_mean_gain"].items()]
    lines.append("share of backprop's mean gain recovered: " + ", ".join(shares))
    if res.get("oracle_recovered_fraction_of_mean_gain"):
        best = [f"{m} {'n/a' if r is None else f'{r:.2f}'}"
                for m, r in res["oracle_recovered_fraction_of_mean_gain"].items()]
        lines.append("with each subject's best grid lr (--outer-sweep, an upper bound): "
                     + ", ".join(best))
    if not res["tpsgd_available"]:
        lines.append(f"tpsgd not run: {res['tpsgd_unavailable_reason']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default=",".join(map(str, SUBJECTS)),
                   help="comma-separated test subjects (1..10)")
    p.add_argument("--budget", type=int, default=3000,
                   help="forward passes (batches of 32) per personalization run")
    p.add_argument("--device-budget", type=int, default=None,
                   help="forward passes per device-half run (default: --budget; backprop "
                   "keeps --budget)")
    p.add_argument("--quick", action="store_true",
                   help="short settings for tests: few pretraining epochs, one lr per method")
    p.add_argument("--split", choices=("time", "series"), default="time")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs")
    p.add_argument("--out", default="runs/har", help="working directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=None,
                   help="comma-separated device methods to run (default: every one available)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout instead of the table")
    p.add_argument("--zo", default="", help="comma-separated extra ZO optimizers to compare, "
                   f"each on the head and on all weights (zo-readout: the head alone): "
                   f"{', '.join(EXTRA_ZO)} (default: none)")
    p.add_argument("--pseudo-targets", type=int, default=None,
                   help="pseudo-target subjects of each fold's lr sweep (default 2; --quick 1)")
    p.add_argument("--select", choices=("loss", "accuracy"), default="loss",
                   help="the sweep picks the lr of the best mean held-out loss or accuracy "
                   "over the pseudo-targets (default loss)")
    p.add_argument("--outer-sweep", action="store_true",
                   help="also personalize the test subject at every grid lr (analysis)")
    p.add_argument("--device-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.zo = [z for z in args.zo.split(",") if z.strip()]
    if not set(args.zo) <= set(EXTRA_ZO):
        p.error(f"--zo must name optimizers among {', '.join(EXTRA_ZO)}")
    args.subjects = [int(s) for s in args.subjects.split(",") if s.strip()]
    if not args.subjects or not set(args.subjects) <= set(SUBJECTS):
        p.error(f"--subjects must name subjects among {SUBJECTS}")
    if args.device_budget is None:
        args.device_budget = args.budget
    if args.budget < 1 or args.device_budget < 1:
        p.error("--budget and --device-budget must be positive")
    if args.epochs is None:
        args.epochs = 3 if args.quick else 10
    if args.pseudo_targets is None:
        args.pseudo_targets = 1 if args.quick else 2
    if not 1 <= args.pseudo_targets < len(SUBJECTS):
        p.error(f"--pseudo-targets must be 1..{len(SUBJECTS) - 1}")
    out = Path(args.out)
    if args.device_only:
        print(json.dumps(device(args, out)))
        return
    out.mkdir(parents=True, exist_ok=True)
    per = budget_label(args.budget, args.device_budget)
    progress(f"{PROG}: {len(args.subjects)} subject(s), {per} forwards per method; "
             "host half (torch) first, then the device half")
    t0 = time.perf_counter()
    h = host(args, out)
    t1 = time.perf_counter()
    # The device half in a fresh interpreter: only numpy + onnxruntime are imported there.
    dv = run_device_half([
        sys.executable, __file__, "--device-only", "--out", str(out), "--subjects",
        ",".join(map(str, args.subjects)), "--budget", str(args.budget),
        "--device-budget", str(args.device_budget), "--split",
        args.split, "--seed", str(args.seed), "--zo", ",".join(args.zo),
        "--pseudo-targets", str(args.pseudo_targets), "--select", args.select,
        *(["--outer-sweep"] if args.outer_sweep else []),
        *(["--quick"] if args.quick else []),
        *(["--methods", args.methods] if args.methods else [])])
    res = summarize(h, dv, args)
    res["seconds"] = {"host": t1 - t0, "device": time.perf_counter() - t1}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res) if args.json else
          f"{table(res)}\nall figures: {out / 'results.json'}")


if __name__ == "__main__":
    run_cli(PROG, main, child="--device-only" in sys.argv)
