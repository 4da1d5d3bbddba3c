"""Frozen-prefix caching benchmark: head-only step time cached vs uncached, side by side.

Usage:
    python benchmarks/bench_prefix_cache.py            # MiniLM-L3-sized encoder, 128px CNN
    python benchmarks/bench_prefix_cache.py --quick    # smaller backbones (< 30 s)
    python benchmarks/bench_prefix_cache.py --only cnn --no-tpsgd   # the 128px CNN, zo-sgd

Two backbones are generated as ONNX (no torch, tests/backbone_models.py) and prepared with
a new 2-class head (`prepare --new-head`): a pre-LN transformer encoder (3 layers, hidden
384, 12 heads, 32 tokens: MiniLM-L3's shape) and a MobileNetV2-like CNN (128x128 input,
inverted residual blocks, 1280 pooled features). On each, two sessions train the head only
with zo-sgd on the same data (batch 32, threads 1): one with the prefix cache, one with
`prefix_cache=False`; their steps are interleaved in chunks (`Session.run` continues a run),
so both see the same machine load. Reported per backbone:
  step_ms_uncached / step_ms_cached_warm: medians of the optimizer step (StepResult.seconds;
      warm: after the first chunk, when every example is cached);
  loop_step_ms_cached_warm: median wall time between consecutive steps of a cached
      `Session.run` (after the first chunk): the optimizer step plus the loop's own work
      (batch, its journaled identity, journal append, callbacks);
      loop_overhead_ms = loop_step_ms_cached_warm - step_ms_cached_warm;
  speedup: uncached / cached warm (goal >= 50);
  head_forward_ms: one forward of the head alone (the head-alone bundle's Model.predict on
      a batch of cached features), interleaved with the steps; step_per_head_forward =
      step_ms_cached_warm / head_forward_ms (goal <= 2; a zo-sgd step scores its
      `evaluations_per_step` probe points in one call of the K-candidate suffix graph,
      edgelearn.training.cached_population; the cache report's "population");
  head_alone_step_ms: a zo-sgd step on a bundle that is only the head (its input is the cut
      tensor, fed the cached features): the floor any caching can reach;
      step_per_head_alone_step = step_ms_cached_warm / head_alone_step_ms;
  session_setup_ms_cached / _uncached: Session() construction (the cached one splits the
      graph and checks the cut on a probe batch);
  identical: a cached run of as many steps as the uncached one ends with the same weights
      sha256 and the same journal bytes;
  live_*: one sample per `Session.step` (keys are a sha256 per sample), batch 1.
And a tpSGD row per backbone (`tpsgd`): the same head trained with tpsgd (one taps forward
of model_taps.onnx per step, its head-only taps graph found in the ONNX graph), cached (the
taps graph's suffix on cached features) vs uncached, interleaved the same way:
  step_ms_uncached / step_ms_cached_warm / speedup as above;
  head_forward_ms: the head-alone bundle's forward on cached features, interleaved;
  step_per_head_forward = step_ms_cached_warm / head_forward_ms (a tpSGD step is ONE taps
      forward plus the head's exact gradient in numpy);
  identical: a cached tpsgd run of as many steps as the uncached one ends with the same
      weights sha256 and journal bytes, and an uncached replay of it gives the same sha256.
And a `tpsgd-graph` row: cached tpsgd with head_update "graph" (the head's exact update
inside the suffix's onnxruntime call: edgelearn.graph_update's form 2, run with every array
bound once by edgelearn.training.head_runner) vs "numpy", interleaved with head-alone
forwards:
  step_ms_graph / step_ms_numpy: medians of warm steps (StepResult.seconds: the feature
      lookup, the one runtime call and the copy of the updated head into the arena);
      head_forward_ms as above;
  step_per_head_forward_graph / _numpy = step_ms / head_forward_ms (goal <= 2);
  head_update: the graph run's cache report entry ({"mode": "graph", "graph": 2});
      replay_identical: el.replay of the graph run (which re-runs the same graph) gives the
      same sha256.
Prints ONE JSON object on stdout; progress on stderr. It never asserts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from backbone_models import mobilenet_onnx, transformer_onnx  # noqa: E402

import edgelearn as el  # noqa: E402

BATCH = 32
N = 64
MOBILENET_V2 = ((1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 64, 2),
                (6, 64, 1), (6, 96, 1), (6, 160, 2), (6, 320, 1))


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(f"[bench_prefix_cache {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def backbones(tmp: Path, quick: bool) -> dict[str, tuple[Path, str]]:
    """name -> (generated ONNX backbone, its feature output)."""
    if quick:
        enc = transformer_onnx(tmp / "enc.onnx", tokens=16, dim=128, heads=4, layers=2)
        cnn = mobilenet_onnx(tmp / "cnn.onnx", size=64, width=16, blocks=MOBILENET_V2[:6],
                             features=256)
    else:
        enc = transformer_onnx(tmp / "enc.onnx", tokens=32, dim=384, heads=12, layers=3)
        cnn = mobilenet_onnx(tmp / "cnn.onnx", size=128, width=32, blocks=MOBILENET_V2,
                             features=1280)
    return {"transformer": (enc, "hidden"), "cnn": (cnn, "features")}


class StepTimes(el.Callback):
    """Records each step's optimizer time (seconds) and forwards, and the wall time between
    consecutive steps of one `Session.run` (the whole loop step: batch, step, journal)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.evaluations: list[int] = []
        self.loop: list[float] = []
        self._last: float | None = None

    def on_start(self, session: el.Session, steps: int) -> None:
        self._last = None  # the first step of a run also pays the run's setup

    def on_step(self, session: el.Session, result: el.StepResult) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.loop.append(now - self._last)
        self._last = now
        self.seconds.append(result.seconds)
        self.evaluations.append(result.evaluations)


def head_bundle(session: el.Session, out: Path) -> Path:
    """The head alone as a bundle: the cached run's suffix graph with its weights inside,
    prepared like any model (its input is the cut tensor)."""
    import onnx
    from onnx import numpy_helper

    split = session.evaluator.split  # Unstable internals: a CachedEvaluator here
    model = onnx.load_from_string(split.suffix)
    keep = [i for i in model.graph.input if i.name not in split.trainable]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name in split.trainable:
        model.graph.initializer.append(numpy_helper.from_array(session.store[name], name))
    onnx.save(model, str(out.with_suffix(".onnx")))
    el.tools.prepare(out.with_suffix(".onnx"), out, trainable="head.*")
    return out


def live_steps(bundle: Path, data: el.Dataset, tmp: Path, name: str) -> dict[str, float]:
    """Single samples fed with `Session.step` (content keys: a sha256 per sample): median
    step of a second pass over 16 samples (all cached) vs uncached steps."""
    out = {}
    for cache, n in ((True, 32), (False, 6)):
        times = StepTimes()
        rt = el.RuntimeConfig(backend="onnxruntime", device=None, threads=1,
                              prefix_cache=cache)
        cfg = el.TrainConfig(optimizer="zo-sgd", fsync_every=1 << 20)  # not the default tpsgd:
        # a live tpsgd run must record its samples
        with el.Session(bundle, tmp / f"{name}_live_{cache}", cfg, rt, callbacks=[times]) as s:
            for t in range(n):
                s.step((data.x[t % 16], data.y[t % 16]))
        out["cached" if cache else "uncached"] = median_ms(times.seconds[16:] if cache
                                                           else times.seconds)
    return {"live_step_ms_cached_warm": out["cached"], "live_step_ms_uncached": out["uncached"],
            "live_speedup": out["uncached"] / out["cached"]}


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def compare(name: str, src: Path, output: str, tmp: Path, chunks: int, slow: int,
            fast: int) -> dict[str, Any]:
    """Prepare a head on `src`; train it cached, uncached and as a head-alone bundle on the
    cached features, interleaved in chunks (`slow` uncached steps, `fast` others each)."""
    bundle = tmp / f"{name}_bundle"
    el.tools.prepare(src, bundle, new_head=f"{output}:2")
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(0)
    data = el.Dataset(rng.standard_normal((N, *spec.shape[1:])).astype(np.float32),
                      rng.integers(0, 2, N))
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=BATCH, fsync_every=1 << 20)

    def session(b: Path, run: str, cache: bool) -> el.Session:
        return el.Session(b, tmp / f"{name}_{run}", cfg, el.RuntimeConfig(
            backend="onnxruntime", device=None, threads=1, prefix_cache=cache))

    setup = {}
    for c in ("cached", "uncached"):  # a cached session splits and checks its cut here
        t0 = time.perf_counter()
        session(bundle, f"setup_{c}", c == "cached").close()
        setup[c] = 1e3 * (time.perf_counter() - t0)
    sessions = {"cached": session(bundle, "cached", True),
                "uncached": session(bundle, "uncached", False)}
    ev = sessions["cached"].evaluator
    feats = el.Dataset(ev.run_prefix(data.x)[ev.split.cut.tensors[0]], data.y)
    head = head_bundle(sessions["cached"], tmp / f"{name}_head")
    sessions["head_alone"] = session(head, "head_alone", False)  # not the bundle dir
    head_model = sessions["head_alone"].model  # Unstable internals: the bound head
    times = {k: StepTimes() for k in sessions}
    fwd: list[float] = []
    results: dict[str, Any] = {}
    for k in range(1, chunks + 1):
        for c, s in sessions.items():
            n = slow if c == "uncached" else fast
            results[c] = s.run(data if c != "head_alone" else feats, k * n,
                               callbacks=[times[c]])
        for _ in range(20):
            t0 = time.perf_counter()
            head_model.predict(feats.x[:BATCH])
            fwd.append(time.perf_counter() - t0)
        log(f"{name}: chunk {k}: step cached {1e3 * times['cached'].seconds[-1]:.3f} ms, "
            f"uncached {1e3 * times['uncached'].seconds[-1]:.1f} ms, head alone "
            f"{1e3 * times['head_alone'].seconds[-1]:.3f} ms")
    r_u = results["uncached"]
    for s in sessions.values():
        s.close()
    with session(bundle, "cached_check", True) as s:  # same steps as the uncached run
        r_c = s.run(data, r_u.steps)
    warm = times["cached"].seconds[fast:]  # after the first chunk: every example cached
    cached, uncached = median_ms(warm), median_ms(times["uncached"].seconds)
    loop = median_ms(times["cached"].loop[fast - 1:])  # fast - 1 intervals per chunk
    alone, head_fwd = median_ms(times["head_alone"].seconds), median_ms(fwd)
    n_eval = statistics.median(times["cached"].evaluations)
    return {
        "input": list(spec.shape), "cut": r_c.cache["cut"],
        "prefix_nodes": r_c.cache["prefix_nodes"], "suffix_nodes": r_c.cache["suffix_nodes"],
        "cached_examples": results["cached"].cache["cached_examples"],
        "cache_bytes": results["cached"].cache["bytes"],
        "refused_cuts": r_c.cache["refused_cuts"], "population": r_c.cache.get("population"),
        "step_ms_uncached": uncached, "step_ms_cached_warm": cached,
        "step_ms_cached_first_chunk": median_ms(times["cached"].seconds[:fast]),
        "loop_step_ms_cached_warm": loop, "loop_overhead_ms": loop - cached,
        "speedup": uncached / cached, "forward_ms_uncached": r_u.forward_ms_median,
        "head_forward_ms": head_fwd, "head_alone_step_ms": alone,
        "evaluations_per_step": n_eval, "step_per_head_forward": cached / head_fwd,
        "step_per_head_alone_step": cached / alone,
        "session_setup_ms_cached": setup["cached"],
        "session_setup_ms_uncached": setup["uncached"],
        "identical": r_c.sha256 == r_u.sha256 and Path(r_c.journal).read_bytes()
        == Path(r_u.journal).read_bytes(), "identical_steps": r_u.steps,
        **live_steps(bundle, data, tmp, name),
    }


def compare_tpsgd(name: str, tmp: Path, chunks: int, slow: int, fast: int
                  ) -> dict[str, Any]:
    """tpsgd on the bundle and head-alone bundle `compare` prepared: cached vs uncached steps
    and head-alone forwards, interleaved in chunks."""
    bundle = tmp / f"{name}_bundle"
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(0)  # the same data as `compare`
    data = el.Dataset(rng.standard_normal((N, *spec.shape[1:])).astype(np.float32),
                      rng.integers(0, 2, N))
    cfg = el.TrainConfig(optimizer="tpsgd", batch_size=BATCH, fsync_every=1 << 20)

    def session(run: str, cache: bool) -> el.Session:
        return el.Session(bundle, tmp / f"{name}_tpsgd_{run}", cfg, el.RuntimeConfig(
            backend="onnxruntime", device=None, threads=1, prefix_cache=cache))

    sessions = {"cached": session("cached", True), "uncached": session("uncached", False)}
    ev = sessions["cached"].evaluator  # Unstable internals: a CachedTapsEvaluator here
    head = el.tools.Model(el.load_bundle(tmp / f"{name}_head"), backend="onnxruntime",
                          threads=1)
    cut = ev.split.cut.tensors[0] if hasattr(ev, "split") else None
    feats = ev.run_prefix(data.x[:BATCH])[cut] if cut == head.input_name else None
    times = {k: StepTimes() for k in sessions}
    fwd: list[float] = []
    results: dict[str, Any] = {}
    for k in range(1, chunks + 1):
        for c, s in sessions.items():
            results[c] = s.run(data, k * (slow if c == "uncached" else fast),
                               callbacks=[times[c]])
        for _ in range(20 if feats is not None else 0):
            t0 = time.perf_counter()
            head.predict(feats)
            fwd.append(time.perf_counter() - t0)
        log(f"{name} tpsgd: chunk {k}: step cached {1e3 * times['cached'].seconds[-1]:.3f} "
            f"ms, uncached {1e3 * times['uncached'].seconds[-1]:.1f} ms")
    r_u = results["uncached"]
    for s in sessions.values():
        s.close()
    with session("cached_check", True) as s:
        r_c = s.run(data, r_u.steps)
    replayed = el.replay(el.load_bundle(bundle), r_c.journal, data=data)
    cached, uncached = median_ms(times["cached"].seconds[fast:]), median_ms(
        times["uncached"].seconds)
    loop = median_ms(times["cached"].loop[fast - 1:])
    head_fwd = median_ms(fwd) if fwd else None
    return {
        "cache": {k: r_c.cache.get(k) for k in ("enabled", "reason", "cut", "taps_cached",
                                                "prefix_nodes", "suffix_nodes")},
        "step_ms_uncached": uncached, "step_ms_cached_warm": cached,
        "loop_step_ms_cached_warm": loop, "loop_overhead_ms": loop - cached,
        "speedup": uncached / cached, "head_forward_ms": head_fwd,
        "step_per_head_forward": cached / head_fwd if head_fwd else None,
        "identical": r_c.sha256 == r_u.sha256 == replayed.sha256
        and Path(r_c.journal).read_bytes() == Path(r_u.journal).read_bytes(),
        "identical_steps": r_u.steps,
    }


def compare_tpsgd_graph(name: str, tmp: Path, chunks: int, steps: int) -> dict[str, Any]:
    """Cached tpsgd steps with the head update in the graph vs in numpy, and head-alone
    forwards, interleaved in chunks (on the bundles `compare` prepared)."""
    bundle = tmp / f"{name}_bundle"
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(0)  # the same data as `compare`
    data = el.Dataset(rng.standard_normal((N, *spec.shape[1:])).astype(np.float32),
                      rng.integers(0, 2, N))

    def session(mode: str) -> el.Session:
        cfg = el.TrainConfig(optimizer="tpsgd", batch_size=BATCH, fsync_every=1 << 20,
                             options={"head_update": mode})
        return el.Session(bundle, tmp / f"{name}_tpgraph_{mode}", cfg, el.RuntimeConfig(
            backend="onnxruntime", device=None, threads=1, prefix_cache=True))

    sessions = {m: session(m) for m in ("graph", "numpy")}
    ev = sessions["graph"].evaluator  # Unstable internals: a CachedTapsEvaluator here
    head = el.tools.Model(el.load_bundle(tmp / f"{name}_head"), backend="onnxruntime",
                          threads=1)
    feeds = ev.run_prefix(data.x[:BATCH])
    feats = feeds.get(head.input_name)
    times = {k: StepTimes() for k in sessions}
    fwd: list[float] = []
    results: dict[str, Any] = {}
    for k in range(1, chunks + 1):
        for m, s in sessions.items():
            results[m] = s.run(data, k * steps, callbacks=[times[m]])
        for _ in range(20 if feats is not None else 0):
            t0 = time.perf_counter()
            head.predict(feats)
            fwd.append(time.perf_counter() - t0)
    for s in sessions.values():
        s.close()
    replayed = el.replay(el.load_bundle(bundle), results["graph"].journal, data=data)
    head_fwd = median_ms(fwd) if fwd else None
    out: dict[str, Any] = {"head_update": results["graph"].cache.get("head_update"),
                           "head_forward_ms": head_fwd,
                           "replay_identical": replayed.sha256 == results["graph"].sha256}
    for m in sessions:
        ms = median_ms(times[m].seconds[steps:])
        out[f"step_ms_{m}"] = ms
        out[f"step_per_head_forward_{m}"] = ms / head_fwd if head_fwd else None
    log(f"{name} tpsgd-graph: {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller backbones, fewer steps")
    ap.add_argument("--only", choices=("transformer", "cnn"), help="one backbone only")
    ap.add_argument("--no-tpsgd", action="store_true", help="skip the tpsgd rows")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_prefix_cache_"))
    try:
        out: dict[str, Any] = {"batch": BATCH, "examples": N, "optimizer": "zo-sgd",
                               "threads": 1, "quick": args.quick}
        for name, (src, output) in backbones(tmp, args.quick).items():
            if args.only not in (None, name):
                continue
            out[name] = compare(name, src, output, tmp, chunks=4, slow=3 if args.quick else 2,
                                fast=25)
            if not args.no_tpsgd:
                out[name]["tpsgd"] = compare_tpsgd(name, tmp, chunks=4,
                                                   slow=3 if args.quick else 2, fast=25)
                out[name]["tpsgd-graph"] = compare_tpsgd_graph(name, tmp, chunks=4, steps=25)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
