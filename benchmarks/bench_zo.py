"""ZO-SGD benchmark: memory and step time of `edgelearn train` vs inference, MeZO and Adam.

Usage:
    python benchmarks/bench_zo.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_zo.py --quick    # short run (< 60 s)

Prints ONE JSON object on stdout at the end; progress goes to stderr. It never asserts: every
figure is measured in this run and every comparison is a ratio of two figures measured side by
side in this same run (same machine, same bundle, same batch of 32).

Sections of the JSON:
  rss            peak RSS of `edgelearn train --optimizer zo-sgd` vs `edgelearn eval` (separate
                 CLI subprocesses, so each process has its own peak), full / head-only trainable,
                 restore policy auto (drift above 16 MiB) vs copy.
  step_time      in-process `opt.step(store, evaluate)` vs `model.predict(xb)`, interleaved,
                 medians; with a per-step breakdown (noise / elementwise / forwards / rest) and
                 micro-benchmarks of `Noise(kind).fill` and `ZOSGD._combine`.
  torch_mezo     MeZO step written in plain torch (princeton-nlp/MeZO large_models/trainer.py
                 style: torch.manual_seed + torch.normal per parameter, +1/-2/+1 scaling,
                 regenerate z for the update), in a torch-only subprocess.
  torch_adam     forward + backward + Adam step in plain torch, in its own subprocess (own peak).
Measurements that need torch run in child processes so that torch's OpenMP threads never
compete with onnxruntime for the 2 cores while edgelearn is being timed (and vice versa).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIG = {"in_features": 1024, "hidden": [2048, 2048, 2048], "classes": 10}
QUICK_BIG = {"in_features": 512, "hidden": [1024, 1024], "classes": 10}
SMALL = {"in_features": 64, "hidden": [64], "classes": 10}  # zoo mlp 64-64-10
BATCH = 32
SEED = 0


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(f"[bench_zo {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def peak_rss_mb() -> float:
    """Peak RSS of this process so far, MiB (ru_maxrss).

    Caveat (Linux): ru_maxrss survives fork/vfork + exec, so a child reports at least the RSS
    its parent had when it spawned it. That is why this parent process stays small (no torch,
    no onnxruntime imported; `parent_peak_rss_mb`) and children also report VmHWM.
    """
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def vm_hwm_mb() -> float | None:
    """Peak RSS of this process image from /proc/self/status VmHWM (reset by exec), MiB."""
    from edgelearn.osutil import proc_status_mb  # children only: they import edgelearn anyway

    return proc_status_mb("VmHWM")


def med_ms(xs: list[float]) -> float | None:
    """Median of seconds, in ms."""
    return round(1e3 * statistics.median(xs), 4) if xs else None


def ratio(a: float | None, b: float | None, nd: int = 3) -> float | None:
    """a / b rounded, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, nd)


def machine_info() -> dict[str, Any]:
    """CPU and library versions (read from package metadata: nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ver("onnxruntime"),
        "onnx": ver("onnx"),
        "torch": ver("torch"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


# -- setup: bundles and data ----------------------------------------------------------------
def child_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Export the bundles in a child, so the parent never holds torch (see peak_rss_mb)."""
    return setup(Path(args.data), json.loads(args.cfg), int(args.paths))


def setup(work: Path, big: dict[str, Any], n_examples: int) -> dict[str, Any]:
    """Export the big and the small MLP once and write the synthetic data files."""
    import torch
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import MLP

    paths: dict[str, Any] = {}
    for name, cfg in (("big", big), ("small", SMALL)):
        out = work / f"mlp_{name}"
        torch.manual_seed(SEED)
        model = MLP(cfg["in_features"], tuple(cfg["hidden"]), cfg["classes"])
        t0 = time.perf_counter()
        res = export_bundle(model, torch.randn(1, cfg["in_features"]), out)
        log(f"exported {name} MLP ({res['params']} params) in {time.perf_counter() - t0:.1f} s")
        paths[f"bundle_{name}"] = str(out)
        paths[f"params_{name}"] = res["params"]
        rng = np.random.default_rng(SEED)
        x = rng.standard_normal((n_examples, cfg["in_features"]), dtype=np.float32)
        y = rng.integers(0, cfg["classes"], n_examples).astype(np.int64)
        data = work / f"data_{name}.npz"
        np.savez(data, x=x, y=y)
        paths[f"data_{name}"] = str(data)
    return paths


# -- section 1: CLI subprocesses ------------------------------------------------------------
def run_json(cmd: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run a command that prints one JSON object on stdout; never raises."""
    t0 = time.perf_counter()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s", "cmd": cmd}
    wall = time.perf_counter() - t0
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"rc {p.returncode}: {p.stderr.strip()[-600:]}", "cmd": cmd}
    if p.returncode != 0 and "error" not in res:
        res["error"] = f"rc {p.returncode}: {p.stderr.strip()[-600:]}"
    res["wall_s"] = round(wall, 2)
    return res


def cli(*args: str) -> list[str]:
    """argv of `python -m edgelearn.cli ...`."""
    return [sys.executable, "-m", "edgelearn.cli", *args]


def section_rss(paths: dict[str, str], work: Path, steps: int) -> dict[str, Any]:
    """Peak RSS: train (zo-sgd) vs eval on the same bundle and data, each its own process."""
    bundle, data = paths["bundle_big"], paths["data_big"]
    out: dict[str, Any] = {"batch_size": BATCH, "steps": steps}
    base = run_json([sys.executable, "-c",
                     "import json, resource, numpy, onnxruntime, edgelearn.cli, "
                     "edgelearn.training, edgelearn.model; print(json.dumps({'peak_rss_mb': "
                     "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"])
    out["import_only_peak_rss_mb"] = base.get("peak_rss_mb")
    runs = {
        "eval": cli("eval", bundle, "--data", data, "--batch-size", str(BATCH), "--json"),
        "train_auto": cli("train", bundle, "--data", data, "--optimizer", "zo-sgd",
                          "--steps", str(steps), "--batch-size", str(BATCH),
                          "--out", str(work / "run_auto"), "--json"),
        "train_copy": cli("train", bundle, "--data", data, "--optimizer", "zo-sgd",
                          "--steps", str(steps), "--batch-size", str(BATCH), "--restore",
                          "copy", "--out", str(work / "run_copy"), "--json"),
        "train_head": cli("train", bundle, "--data", data, "--optimizer", "zo-sgd",
                          "--steps", str(steps), "--batch-size", str(BATCH), "--trainable",
                          "head.*", "--out", str(work / "run_head"), "--json"),
    }
    for name, cmd in runs.items():
        log(f"rss: {name}")
        res = run_json(cmd)
        keep = ("peak_rss_mb", "step_ms_median", "forward_ms_median", "trainable_params",
                "loss_first", "loss_last", "n", "loss", "seconds", "wall_s", "error")
        out[name] = {k: res[k] for k in keep if k in res}
    ev = out["eval"].get("peak_rss_mb")
    for name in ("train_auto", "train_copy", "train_head"):
        out[f"ratio_{name}_over_eval"] = ratio(out[name].get("peak_rss_mb"), ev)
    # The restore policy zo-sgd "auto" picks, by its own rule (also confirmed in-process).
    from edgelearn.optim.zo_sgd import AUTO_COPY_MAX_BYTES

    n_train = out["train_auto"].get("trainable_params")
    if isinstance(n_train, int):
        out["auto_policy"] = "copy" if 4 * n_train <= AUTO_COPY_MAX_BYTES else "drift"
        out["trainable_mib"] = round(4 * n_train / (1 << 20), 2)
    n_head = out["train_head"].get("trainable_params")
    if isinstance(n_head, int):
        out["head_auto_policy"] = "copy" if 4 * n_head <= AUTO_COPY_MAX_BYTES else "drift"
    out["note"] = ("eval bakes every weight into the graph (trainable=()); train binds the "
                   "trainable weights as graph inputs (IOBinding, zero-copy) and bakes the rest")
    return out


# -- section 2: in-process step vs forward (child, no torch) ----------------------------------
def time_step_vs_forward(bundle_dir: str, data: str, *, trainable: Any, restore: str,
                         steps: int, warmup: int, noise: str = "rademacher",
                         chunk: int | None = None, breakdown_steps: int = 0) -> dict[str, Any]:
    """Interleave `model.predict(xb)` and `opt.step(store, evaluate)`; medians in ms."""
    from edgelearn.bundle import load_bundle
    from edgelearn.losses import cross_entropy
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer
    from edgelearn.rng import DEFAULT_CHUNK

    bundle = load_bundle(bundle_dir)
    model = Model(bundle, trainable=trainable)
    store = model.store
    with np.load(data) as f:
        xb, yb = f["x"][:BATCH].copy(), f["y"][:BATCH].copy()
    opt = make_optimizer("zo-sgd", lr=1e-4, eps=1e-3, restore=restore, noise=noise,
                         seed=SEED, chunk=chunk or DEFAULT_CHUNK)

    def evaluate() -> float:
        return cross_entropy(model.predict(xb), yb)

    t_fwd: list[float] = []
    t_step: list[float] = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        model.predict(xb)
        t1 = time.perf_counter()
        opt.step(store, evaluate)
        t2 = time.perf_counter()
        if i >= warmup:
            t_fwd.append(t1 - t0)
            t_step.append(t2 - t1)
    auto = make_optimizer("zo-sgd", restore="auto", seed=SEED)
    auto._prepare(store)  # type: ignore[attr-defined]  # fixes the policy, touches no weight
    res: dict[str, Any] = {
        "auto_policy": auto.policy,  # type: ignore[attr-defined]
        "trainable_params": store.n_trainable("float32"),
        "trainable_mib": round(store.flat("float32").nbytes / (1 << 20), 2),
        "restore_requested": restore, "policy": opt.policy, "noise": noise,  # type: ignore[attr-defined]
        "chunk": chunk or DEFAULT_CHUNK,
        "steps_timed": steps,
        "forward_ms": med_ms(t_fwd), "step_ms": med_ms(t_step),
    }
    res["step_over_forward"] = ratio(res["step_ms"], res["forward_ms"])
    if breakdown_steps:
        res["breakdown"] = breakdown(model, opt, store, evaluate, breakdown_steps)
    return res


def breakdown(model: Any, opt: Any, store: Any, evaluate: Callable[[], float],
              steps: int) -> dict[str, Any]:
    """Per-step split of opt.step: noise fill, elementwise passes, forwards, the rest.

    Wraps the optimizer instance's `noise.fill` and `_combine` and the evaluate callback with
    timers (instance attributes only; the library code is unchanged).
    """
    acc = {"fill": 0.0, "combine": 0.0, "forward": 0.0, "fill_calls": 0, "combine_calls": 0}
    noise, real_fill, real_combine = opt.noise, opt.noise.fill, opt._combine

    def fill(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        r = real_fill(*a, **k)
        acc["fill"] += time.perf_counter() - t0
        acc["fill_calls"] += 1
        return r

    def combine(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        r = real_combine(*a, **k)
        acc["combine"] += time.perf_counter() - t0
        acc["combine_calls"] += 1
        return r

    def timed_eval() -> float:
        t0 = time.perf_counter()
        r = evaluate()
        acc["forward"] += time.perf_counter() - t0
        return r

    noise.fill, opt._combine = fill, combine
    rows: list[dict[str, float]] = []
    try:
        for _ in range(steps):
            for k in acc:
                acc[k] = 0 if k.endswith("calls") else 0.0
            t0 = time.perf_counter()
            opt.step(store, timed_eval)
            total = time.perf_counter() - t0
            rows.append({
                "total": total, "noise_fill": acc["fill"],
                "elementwise": acc["combine"] - acc["fill"],
                "forwards_and_loss": acc["forward"],
                "other": total - acc["combine"] - acc["forward"],
                "fill_calls": acc["fill_calls"], "combine_calls": acc["combine_calls"],
            })
    finally:
        del noise.fill, opt._combine  # back to the class attributes
    out: dict[str, Any] = {}
    for key in ("total", "noise_fill", "elementwise", "forwards_and_loss", "other"):
        out[f"{key}_ms"] = med_ms([r[key] for r in rows])
    tot = out["total_ms"] or 1.0
    for key in ("noise_fill", "elementwise", "forwards_and_loss", "other"):
        out[f"{key}_share"] = round((out[f"{key}_ms"] or 0.0) / tot, 3)
    out["fill_calls_per_step"] = rows[-1]["fill_calls"] if rows else None
    out["combine_calls_per_step"] = rows[-1]["combine_calls"] if rows else None
    out["note"] = ("elementwise = _combine time minus the noise fills inside it (multiply by "
                   "coef, add src, per chunk); other = python bookkeeping, np.copyto of the copy "
                   "policy, generator dialogue")
    return out


def noise_micro(n: int, reps: int) -> dict[str, Any]:
    """Noise(kind).fill over n elements (as _combine does it: 64 Ki chunks) + combine passes."""
    from edgelearn.optim.zo_sgd import ZOSGD
    from edgelearn.rng import DEFAULT_CHUNK, Noise, noise_chunks

    out: dict[str, Any] = {"n": n, "chunk": DEFAULT_CHUNK, "reps": reps}
    buf = np.empty(n, np.float32)

    def best_med(fn: Callable[[], None]) -> float | None:
        fn()  # warm
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return med_ms(ts)

    for kind in ("rademacher", "gaussian", "pool"):
        noise = Noise(kind, pool_size=1 << 22, pool_seed=SEED)
        # gaussian is ~100x slower than the others here: one chunk size is enough
        for chunk in ((DEFAULT_CHUNK,) if kind == "gaussian"
                      else (DEFAULT_CHUNK, 1 << 18, 1 << 20)):
            def fill_all(noise: Noise = noise, chunk: int = chunk) -> None:
                for a, b in noise_chunks(n, chunk):
                    noise.fill(buf[a:b], run_seed=SEED, step=1, probe=0, start=a)

            out[f"fill_{kind}_chunk{chunk}_ms"] = best_med(fill_all)
    theta = np.random.default_rng(SEED).standard_normal(n, dtype=np.float32)
    e32 = np.float32(1e-3)
    for kind in ("rademacher", "gaussian", "pool"):
        for chunk in ((DEFAULT_CHUNK,) if kind == "gaussian" else (DEFAULT_CHUNK, 1 << 20)):
            opt = ZOSGD(noise=kind, chunk=chunk, seed=SEED)

            def comb(opt: ZOSGD = opt) -> None:
                opt._combine(theta, theta, [(e32, (SEED, 1, 0))])

            out[f"combine_{kind}_chunk{chunk}_ms"] = best_med(comb)
    # The elementwise passes alone (noise precomputed): same per-chunk ops as _combine.
    z = np.where(np.arange(n) % 3 == 0, -1.0, 1.0).astype(np.float32)
    acc = np.empty(DEFAULT_CHUNK, np.float32)

    def passes() -> None:
        for a, b in noise_chunks(n, DEFAULT_CHUNK):
            ac = acc[: b - a]
            np.multiply(z[a:b], e32, out=ac)
            np.add(theta[a:b], ac, out=theta[a:b])

    out["elementwise_only_chunk65536_ms"] = best_med(passes)
    def one_pass() -> None:
        np.add(theta, z, out=theta)

    out["memory_pass_theta_plus_z_ms"] = best_med(one_pass)
    out["copyto_ms"] = best_med(lambda: np.copyto(buf, theta))
    out.update(proto_cached_bits(theta, best_med))
    return out


def proto_cached_bits(theta: np.ndarray, best_med: Callable[[Callable[[], None]], Any]) -> dict:
    """What-if for the hot path (not library code): Rademacher bits drawn ONCE per step.

    The step regenerates the same z 3 (copy) or 4 (drift) times, and every 64 Ki chunk builds a
    new Philox, advances it and expands bits through uint8 -> float32 (+-1) -> * coef. Here the
    Philox words of one probe (n/64 uint64 = n/8 bytes, 1.3 MB for 10.5 M weights) are drawn
    once, and each pass computes coef * z as bits * (2 coef) - coef (exact in float32) per
    256 Ki-element chunk. Checked bit-identical to `ZOSGD._combine` on the same inputs.
    """
    from edgelearn.optim.zo_sgd import ZOSGD
    from edgelearn.rng import noise_chunks, philox_key

    n = theta.size
    key3 = (SEED, 2, 0)
    coef = np.float32(-3.0e-4)
    chunk = 1 << 18  # 1 MiB of float32: stays in L2
    acc = np.empty(chunk, np.float32)
    state: dict[str, np.ndarray] = {}

    def draw() -> None:
        state["w"] = np.random.Philox(key=philox_key(*key3)).random_raw(-(-n // 64))

    def one_pass(dst: np.ndarray, src: np.ndarray) -> None:
        w8 = state["w"].astype("<u8", copy=False).view(np.uint8)
        two = np.float32(2.0) * coef
        for a, b in noise_chunks(n, chunk):  # chunk is a multiple of 64: word aligned
            m = b - a
            bits = np.unpackbits(w8[a // 8 : (b + 7) // 8], bitorder="little")[:m]
            ac = acc[:m]
            np.multiply(bits, two, out=ac, dtype=np.float32)
            np.subtract(ac, coef, out=ac)
            np.add(src[a:b], ac, out=dst[a:b])

    ref = np.empty_like(theta)
    ZOSGD(noise="rademacher", seed=SEED)._combine(ref, theta, [(coef, key3)])
    draw()
    mine = np.empty_like(theta)
    one_pass(mine, theta)
    work = theta.copy()
    return {
        "proto_cached_bits_identical_to_combine": bool(
            np.array_equal(ref.view(np.uint32), mine.view(np.uint32))),
        "proto_draw_bits_once_ms": best_med(draw),
        "proto_pass_from_cached_bits_chunk256K_ms": best_med(lambda: one_pass(work, work)),
    }


def child_zo(args: argparse.Namespace) -> dict[str, Any]:
    """Section 2 (edgelearn only; this process never imports torch)."""
    paths = json.loads(Path(args.paths).read_text())
    steps, warmup = args.timed_steps, args.warmup
    res: dict[str, Any] = {}
    # (name, model, trainable, restore, noise, chunk, main): main configurations get all timed
    # steps and a per-step breakdown; variants (what-if measurements) get half the steps.
    configs = [
        ("big_full_drift", "big", None, "drift", "rademacher", None, True),
        ("big_full_copy", "big", None, "copy", "rademacher", None, True),
        ("big_head_auto", "big", "head.*", "auto", "rademacher", None, True),
        ("small_full_auto", "small", None, "auto", "rademacher", None, True),
        ("big_full_drift_chunk1M", "big", None, "drift", "rademacher", 1 << 20, False),
        ("big_full_copy_chunk1M", "big", None, "copy", "rademacher", 1 << 20, False),
        ("big_full_drift_gaussian", "big", None, "drift", "gaussian", None, False),
        ("big_full_drift_pool", "big", None, "drift", "pool", None, False),
    ]
    if args.quick:
        configs = [c for c in configs if c[6]]
    for name, which, trainable, restore, noise, chunk, main in configs:
        log(f"step_time: {name}")
        res[name] = time_step_vs_forward(
            paths[f"bundle_{which}"], paths[f"data_{which}"], trainable=trainable,
            restore=restore, warmup=warmup if noise != "gaussian" else 1,
            steps=steps if main else (3 if noise == "gaussian" else max(5, steps // 2)),
            noise=noise, chunk=chunk, breakdown_steps=max(5, steps // 3) if main else 0)
    log("step_time: noise micro-benchmarks")
    n_big = res["big_full_drift"]["trainable_params"]
    res["noise_micro"] = noise_micro(n_big, reps=3 if args.quick else 7)
    res["peak_rss_mb_child"] = peak_rss_mb()
    res["vm_hwm_mb_child"] = vm_hwm_mb()
    return res


# -- sections 3 and 4: torch children ------------------------------------------------------------
def torch_model(cfg: dict[str, Any]) -> Any:
    """The same MLP architecture in plain torch (edgelearn.export.zoo.MLP), seeded as the bundle."""
    import torch
    from edgelearn.export.zoo import MLP

    torch.manual_seed(SEED)
    return MLP(cfg["in_features"], tuple(cfg["hidden"]), cfg["classes"])


def torch_batch(data: str) -> tuple[Any, Any]:
    """First batch of the data file as torch tensors."""
    import torch

    with np.load(data) as f:
        return torch.from_numpy(f["x"][:BATCH].copy()), torch.from_numpy(f["y"][:BATCH].copy())


def child_torch_mezo(args: argparse.Namespace) -> dict[str, Any]:
    """MeZO step in plain torch on CPU, the way princeton-nlp/MeZO large_models/trainer.py does.

    Per step: a fresh seed; for every parameter torch.manual_seed(seed) then z = N(0, 1) of its
    shape, theta <- theta + s * eps * z (out of place, as `param.data = param.data + ...`) with
    s = +1, -2, +1 around two no-grad forwards; then the update regenerates z from the same
    seed: theta <- theta - lr * (g * z + wd * theta) (weight decay term skipped for biases).
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    cfg = json.loads(args.cfg)
    model = torch_model(cfg).eval()
    xb, yb = torch_batch(args.data)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    eps, lr, wd = 1e-3, 1e-4, 0.0
    seeds = np.random.default_rng(SEED)

    def loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(xb), yb))

    def perturb(seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for _, p in named:
            z = torch.normal(mean=0.0, std=1.0, size=p.data.size(), dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    def step() -> float:
        seed = int(seeds.integers(1_000_000_000))
        perturb(seed, 1.0)
        l1 = loss()
        perturb(seed, -2.0)
        l2 = loss()
        perturb(seed, 1.0)
        g = (l1 - l2) / (2 * eps)
        torch.manual_seed(seed)
        for name, p in named:
            z = torch.normal(mean=0.0, std=1.0, size=p.data.size(), dtype=p.data.dtype)
            if "bias" not in name:
                p.data = p.data - lr * (g * z + wd * p.data)
            else:
                p.data = p.data - lr * (g * z)
        return (l1 + l2) / 2

    t_fwd: list[float] = []
    t_step: list[float] = []
    for i in range(args.warmup + args.timed_steps):
        t0 = time.perf_counter()
        loss()
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        if i >= args.warmup:
            t_fwd.append(t1 - t0)
            t_step.append(t2 - t1)
    # Noise alone: torch.normal over every parameter once (one of the 4 regenerations).
    t_noise: list[float] = []
    for _ in range(max(3, args.timed_steps // 5)):
        t0 = time.perf_counter()
        torch.manual_seed(1)
        for _, p in named:
            torch.normal(mean=0.0, std=1.0, size=p.data.size(), dtype=p.data.dtype)
        t_noise.append(time.perf_counter() - t0)
    res = {"threads": torch.get_num_threads(), "steps_timed": args.timed_steps,
           "forward_ms": med_ms(t_fwd), "step_ms": med_ms(t_step),
           "normal_fill_all_params_ms": med_ms(t_noise),
           "params": sum(p.numel() for _, p in named), "peak_rss_mb": peak_rss_mb(),
           "vm_hwm_mb": vm_hwm_mb()}
    res["step_over_forward"] = ratio(res["step_ms"], res["forward_ms"])
    return res


def child_torch_adam(args: argparse.Namespace) -> dict[str, Any]:
    """forward + backward + Adam step in plain torch (own process, so its own peak RSS)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    cfg = json.loads(args.cfg)
    model = torch_model(cfg)
    xb, yb = torch_batch(args.data)
    t_fwd: list[float] = []
    with torch.no_grad():
        for _ in range(5):
            t0 = time.perf_counter()
            model(xb)
            t_fwd.append(time.perf_counter() - t0)
    rss_inference = peak_rss_mb()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    t_step: list[float] = []
    for i in range(args.warmup + args.timed_steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        if i >= args.warmup:
            t_step.append(t1 - t0)
    return {"threads": torch.get_num_threads(), "steps_timed": args.timed_steps,
            "step_ms": med_ms(t_step), "forward_ms_no_grad": med_ms(t_fwd),
            "peak_rss_mb_after_inference": rss_inference, "peak_rss_mb": peak_rss_mb(),
            "vm_hwm_mb": vm_hwm_mb(),
            "params": sum(p.numel() for p in model.parameters())}


def child_cmd(kind: str, args: argparse.Namespace, **extra: str) -> list[str]:
    """argv to re-run this script as a child measurement."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--timed-steps", str(args.timed_steps), "--warmup", str(args.warmup)]
    if args.quick:
        cmd.append("--quick")
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", v]
    return cmd


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (< 60 s), smaller big model")
    p.add_argument("--steps", type=int, default=None,
                   help="train --steps and eval forwards for the RSS runs (default 50, quick 10)")
    p.add_argument("--timed-steps", type=int, default=None,
                   help="timed steps per in-process configuration (default 30, quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup steps (default 3)")
    p.add_argument("--workdir", default=None, help="keep bundles/runs here (default: temp dir)")
    p.add_argument("--child", default=None,
                   choices=["setup", "zo", "torch-mezo", "torch-adam"],
                   help=argparse.SUPPRESS)
    p.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.quick else 50
    if args.timed_steps is None:
        args.timed_steps = 6 if args.quick else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one child measurement) and print one JSON object."""
    args = parse_args(argv)
    if args.child:
        fn = {"setup": child_setup, "zo": child_zo, "torch-mezo": child_torch_mezo,
              "torch-adam": child_torch_adam}[args.child]
        try:
            res = fn(args)
        except Exception as e:  # a child reports, never crashes the whole benchmark
            res = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res))
        return 0

    t_start = time.perf_counter()
    big = QUICK_BIG if args.quick else BIG
    result: dict[str, Any] = {"benchmark": "bench_zo", "quick": args.quick,
                              "machine": machine_info(), "model_big": big, "model_small": SMALL,
                              "batch_size": BATCH}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_zo_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"work dir {work}; exporting bundles (child)")
        cfg = json.dumps(big)
        paths = run_json(child_cmd("setup", args, cfg=cfg, data=str(work),
                                   paths=str(BATCH * args.steps)))
        if "error" in paths:
            raise RuntimeError(f"setup failed: {paths['error']}")
        result["params_big"], result["params_small"] = paths["params_big"], paths["params_small"]
        (work / "paths.json").write_text(json.dumps(paths))

        result["rss"] = section_rss(paths, work, args.steps)

        log("step_time (child, no torch)")
        result["step_time"] = run_json(child_cmd("zo", args, paths=str(work / "paths.json")))
        log("torch MeZO (child)")
        result["torch_mezo"] = run_json(child_cmd("torch-mezo", args, cfg=cfg,
                                                  data=paths["data_big"]))
        log("torch Adam (child)")
        result["torch_adam"] = run_json(child_cmd("torch-adam", args, cfg=cfg,
                                                  data=paths["data_big"]))
        result["summary"] = summarize(result)
    except Exception as e:  # report what was measured so far instead of crashing
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["parent_peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=1))
    return 0


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios, next to the goals they are checked against."""
    rss, st = r.get("rss", {}), r.get("step_time", {})
    mezo, adam = r.get("torch_mezo", {}), r.get("torch_adam", {})
    big_auto = st.get("big_full_drift", {}) if rss.get("auto_policy") == "drift" \
        else st.get("big_full_copy", {})
    el_step = big_auto.get("step_ms")
    s: dict[str, Any] = {
        "rss_train_over_eval": rss.get("ratio_train_auto_over_eval"),
        "rss_train_copy_over_eval": rss.get("ratio_train_copy_over_eval"),
        "rss_train_head_over_eval": rss.get("ratio_train_head_over_eval"),
        "goal_rss_train_over_eval_max": 1.10,
        "step_over_forward_big_drift": st.get("big_full_drift", {}).get("step_over_forward"),
        "step_over_forward_big_copy": st.get("big_full_copy", {}).get("step_over_forward"),
        "step_over_forward_big_head": st.get("big_head_auto", {}).get("step_over_forward"),
        "step_over_forward_small": st.get("small_full_auto", {}).get("step_over_forward"),
        "goal_step_over_forward_max": 2.3,
        "edgelearn_step_ms_big_auto": el_step,
        "torch_mezo_step_ms": mezo.get("step_ms"),
        "torch_mezo_over_edgelearn_step": ratio(mezo.get("step_ms"), el_step),
        "goal_torch_mezo_over_edgelearn_min": 10.0,
        "torch_forward_ms": mezo.get("forward_ms"),
        "ort_forward_ms": big_auto.get("forward_ms"),
        "torch_adam_step_ms": adam.get("step_ms"),
        "edgelearn_train_cli_step_ms": rss.get("train_auto", {}).get("step_ms_median"),
        "torch_adam_over_edgelearn_step": ratio(adam.get("step_ms"), el_step),
        "torch_adam_peak_rss_mb": adam.get("peak_rss_mb"),
        "edgelearn_train_peak_rss_mb": rss.get("train_auto", {}).get("peak_rss_mb"),
        "torch_adam_over_edgelearn_train_rss": ratio(
            adam.get("peak_rss_mb"), rss.get("train_auto", {}).get("peak_rss_mb")),
    }
    return s


if __name__ == "__main__":
    sys.exit(main())
