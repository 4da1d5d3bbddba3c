"""What a ZO step costs beyond its forwards: the ratios of issue 16, side by side in one run.

Usage:
    python benchmarks/bench_zo_cost.py            # a few minutes on 2 shared cores
    python benchmarks/bench_zo_cost.py --quick    # shorter (fewer rounds, a 3.2M MLP)
    python benchmarks/bench_zo_cost.py --before REF --overhead-only   # before/after, ~1 min

Prints ONE JSON object on stdout (progress on stderr); never asserts. Every ratio is of two
figures measured in this run, interleaved in rounds (A, B, A, B, ...) and reduced by medians,
so a machine whose speed drifts (shared cores) moves both sides alike.

  demo_head     the shipped demo bundle, head trainable, zo-sgd as `edgelearn demo` runs it
                (probes 4, batch 32) through `Session.run`, against one forward of the model
                (`predict`) on the same batch. Two ways of scoring the 8 probe points: one
                population-graph call ("population") and one runtime call each ("per_probe").
                "probes1": the same with probes 1 (a step of two forwards, zo-sgd's default).
                Python overhead per step = a step of the run loop (optimizer, evaluator,
                journal append without fsync, batch sha256, result) minus the time spent inside
                the runtime's run calls (timed around the session object).
  big_full      a 12.6M-parameter MLP (2048-2048-2048-2048-10), every weight trainable,
                zo-sgd probes 1, restore auto (drift), batch 32: `opt.step` vs `predict`, with
                the elementwise passes threaded (default) and on one thread, interleaved;
                then, in rounds of their own (interleaved, they slowed the others), threaded
                on a session whose onnxruntime workers busy-wait after each run ("spinning":
                onnxruntime's default; edgelearn turns it off, as its workers then hold the
                cores the passes need right after each forward).
  big_full_lozo the same model and batch, lozo (rank 2, nu 50, edgelearn/optim/lozo.py):
                both probes scored by the low-rank graph in one stacked run (the weights
                untouched), stepped as a `Session` run steps it (defer=True: the update waits
                in the pending low-rank sum and passes over the weights once a period, when V
                changes): blocks of nu forwards and nu steps plus that pass, interleaved.
                The pass uses update engine auto, lozo's default (onnxruntime's Gemm, checked
                to give numpy's bits); big_full_lozo_numpy: the numpy row-block engine;
                big_full_lozo_per_step: every step passes over the weights (`opt.step`
                without defer), one step and one forward interleaved.
  torch_mezo    MeZO's algorithm in plain torch on the same model, batch and probes
                (benchmarks/bench_zo.py's torch child), in its own process, run before, amid
                and after the big_full rounds (pooled: median of the runs' medians).
  overhead      per-step Python overhead on the demo head, this tree ("after") and, with
                --before REF, the tree of git ref REF ("before", extracted with git archive),
                each in 4 child processes (2 with --quick), rounds interleaved A, B, B, A, ...:
                `opt.step` of zo-sgd with its default options (probes 1, as `edgelearn bench`
                steps it; keys step_*) and with the demo's (probes 4; keys 4step_*), one
                forward (`predict`), their ratio, the time inside the runtime's run calls and
                the overhead (step - runtime). The steps are timed bare, and the runtime in
                separate steps through timing proxies around the session objects (the proxies
                cost a step some microseconds themselves, reported as *step_timed_ms, so they
                would count as overhead if both came from the same steps). The same for a
                step of the run loop (`Session.run`, probes 4, journal append, batch digest;
                timed with the proxies in place).
The summary's python_overhead_ms_per_step is the overhead section's (probes 1; the goal's
0.1 ms), with probes 4 and the run loop's beside it.
Torch runs only in child processes (the export and the MeZO baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
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
BIG = {"in_features": 2048, "hidden": [2048, 2048, 2048], "classes": 10}
QUICK_BIG = {"in_features": 1024, "hidden": [1024, 1024, 1024], "classes": 10}
BATCH = 32
DEMO_OPTIONS = {"lr": 0.01, "eps": 1e-3, "probes": 4}
#: untimed steps at the start of each big-MLP variant's turn (`section_big`)
SETTLE_STEPS = 2


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(f"[bench_zo_cost {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def clock() -> np.ndarray:
    """(wall seconds, CPU seconds of this process): CPU time barely moves when other
    processes take the cores, so its ratios hold on a loaded machine where wall ratios drift."""
    return np.array([time.perf_counter(), time.process_time()])


def med_ms(xs: list[float]) -> float | None:
    """Median of seconds, in ms (None when empty)."""
    return round(1e3 * statistics.median(xs), 4) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 3 decimals, None when either is missing."""
    return None if a is None or not b else round(a / b, 3)


class TimedSession:
    """Proxy of a runtime session object that adds the time of its run calls to `seconds`."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.seconds = inner, np.zeros(2)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not name.startswith("run"):
            return attr

        def timed(*a: Any, **k: Any) -> Any:
            t0 = clock()
            try:
                return attr(*a, **k)
            finally:
                self.seconds += clock() - t0
        return timed


# -- demo head ---------------------------------------------------------------------------------
def demo_session(work: Path, population: bool, options: dict[str, Any] | None = None) -> Any:
    """A Session on the shipped demo bundle as `edgelearn demo` trains zo-sgd (no fsync);
    `options`: zo-sgd's (None: the demo's)."""
    import edgelearn as el

    bundle = Path(el.__file__).resolve().parent / "data" / "demo"
    opts = DEMO_OPTIONS if options is None else options
    cfg = el.TrainConfig(optimizer="zo-sgd", options=opts, trainable="head.*",
                         batch_size=BATCH, population=population, fsync_every=1 << 30,
                         checkpoint_every=1 << 30)
    # one runtime thread: a 4.8k-parameter model gains nothing from more, and on shared cores
    # a second ORT thread makes every call wait for a free core
    name = ("pop" if population else "single") + ("" if options is None else "_own")
    return el.Session(bundle, work / name, cfg, el.RuntimeConfig(threads=1))


def demo_round(s: Any, data: Any, xb: np.ndarray, steps: int, acc: dict[str, list[float]]
               ) -> None:
    """`steps` more steps of s.run, then `steps` forwards; per-step figures into acc.

    A step of the loop is the time between two consecutive `on_step` callbacks (the next
    batch, the optimizer step with its forwards, the journal append, the callbacks)."""
    import edgelearn as el

    timed = [o for o in (s.model.backend, getattr(s.evaluator, "pop_eval", None)) if o]
    proxies = [TimedSession(o.session) for o in timed]
    marks: list[tuple[np.ndarray, np.ndarray]] = []

    class Mark(el.Callback):
        def on_step(self, session: Any, result: Any) -> None:
            marks.append((clock(), sum((p.seconds for p in proxies), np.zeros(2))))

    for o, p in zip(timed, proxies, strict=True):
        o.session = p
    try:
        s.run(data, s.steps_done + steps, callbacks=[Mark()])
    finally:
        for o, p in zip(timed, proxies, strict=True):
            o.session = p._inner
    for (t0, r0), (t1, r1) in itertools.pairwise(marks):
        for i, kind in enumerate(("", "cpu_")):
            acc[f"{kind}loop_step"].append(t1[i] - t0[i])
            acc[f"{kind}runtime"].append(r1[i] - r0[i])
            acc[f"{kind}overhead"].append((t1[i] - t0[i]) - (r1[i] - r0[i]))
    acc["opt_step"].append(s.timers.step.median_ms() / 1e3)
    for _ in range(steps):
        t1 = clock()
        s.model.predict(xb)
        d = clock() - t1
        acc["forward"].append(d[0])
        acc["cpu_forward"].append(d[1])


def section_demo(rounds: int, steps: int) -> dict[str, Any]:
    """Demo head: population vs per-probe scoring, interleaved rounds."""
    from edgelearn.demo import demo_data

    train = demo_data()[0]
    xb = np.ascontiguousarray(train.x[:BATCH])
    out: dict[str, Any] = {"options": DEMO_OPTIONS, "batch_size": BATCH, "steps_per_round": steps,
                           "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"population": demo_session(Path(tmp), True),
                    "per_probe": demo_session(Path(tmp), False),
                    "probes1": demo_session(Path(tmp), True, {"lr": 0.01, "eps": 1e-3})}
        fields = [f"{c}{f}" for c in ("", "cpu_")
                  for f in ("loop_step", "runtime", "overhead", "forward")] + ["opt_step"]
        accs = {k: {f: [] for f in fields} for k in sessions}
        try:
            for r in range(rounds + 1):  # round 0 warms up
                for name, s in sessions.items():
                    acc = accs[name] if r else {k: [] for k in accs[name]}
                    demo_round(s, train, xb, steps, acc)
        finally:
            for s in sessions.values():
                s.close()
        for name, s in sessions.items():
            out[name] = summarize_demo(accs[name], s.evaluator.population_graph)
    return out


def summarize_demo(acc: dict[str, list[float]], population_graph: bool) -> dict[str, Any]:
    """Medians (ms) and the ratios of one demo configuration."""
    res: dict[str, Any] = {"population_graph": population_graph}
    for k, v in acc.items():
        res[f"{k}_ms"] = med_ms(v)
    res["step_over_forward"] = ratio(res["opt_step_ms"], res["forward_ms"])
    res["loop_step_over_forward"] = ratio(res["loop_step_ms"], res["forward_ms"])
    res["cpu_loop_step_over_forward"] = ratio(res["cpu_loop_step_ms"], res["cpu_forward_ms"])
    res["python_overhead_ms_per_step"] = res.pop("overhead_ms")
    res["cpu_python_overhead_ms_per_step"] = res.pop("cpu_overhead_ms")
    return res


# -- before / after: per-step overhead on the demo head -----------------------------------------
#: one child per tree: reads a count per line on stdin, runs a round, prints one JSON line
OVERHEAD_CHILD = r"""
import itertools, json, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np
import edgelearn as el
from edgelearn.demo import demo_data

def clock():
    return np.array([time.perf_counter(), time.process_time()])

class Timed:
    def __init__(self, inner): self._inner, self.seconds = inner, np.zeros(2)
    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not name.startswith("run"): return attr
        def timed(*a, **k):
            t0 = clock()
            try: return attr(*a, **k)
            finally: self.seconds += clock() - t0
        return timed

def session(work, options):
    cfg = el.TrainConfig(optimizer="zo-sgd", options=options, trainable="head.*", batch_size=32,
                         fsync_every=1 << 30, checkpoint_every=1 << 30)
    s = el.Session(Path(el.__file__).resolve().parent / "data" / "demo", work, cfg,
                   el.RuntimeConfig(threads=1))
    owners = [o for o in (s.model.backend, getattr(s.evaluator, "pop_eval", None)) if o]
    proxies = [Timed(o.session) for o in owners]

    def timing(on):  # the proxies in place (runtime timed) or out (nothing added to a step)
        for o, p in zip(owners, proxies):
            o.session = p if on else p._inner
    timing(True)
    return s, lambda: sum((p.seconds for p in proxies), np.zeros(2)), timing

train = demo_data()[0]
x, y = np.ascontiguousarray(train.x[:32]), train.y[:32]
work = Path(tempfile.mkdtemp())
demo_options = json.loads(sys.argv[1])
steppers = {"": session(work / "one", {}), "4": session(work / "four", demo_options)}
loop, rt_loop, _ = session(work / "loop", demo_options)
fws = {k: s.evaluator.forwards(x, y) for k, (s, _, _) in steppers.items()}
keys = [f"{k}{p}" for p in ("step", "step_timed", "step_runtime") for k in steppers] + [
    "forward", "loop_step", "loop_runtime"]

def steps(tag, n, res):
    s, rt, timing = steppers[tag]
    fw = fws[tag]
    timing(False)  # steps as a user runs them: no proxy between the step and the runtime
    for _ in range(n):
        t0 = clock()
        s.optimizer.step(s.store, fw.evaluate, fw.population)
        res[tag + "step"].append(clock() - t0)
    timing(True)  # the same steps again, the time inside the runtime's run calls taken
    for _ in range(n):
        r0, t0 = rt(), clock()
        s.optimizer.step(s.store, fw.evaluate, fw.population)
        res[tag + "step_timed"].append(clock() - t0)
        res[tag + "step_runtime"].append(rt() - r0)

one = steppers[""][0]
for line in sys.stdin:
    n, res = int(line), {k: [] for k in keys}
    for tag in steppers:
        steps(tag, n, res)
    for _ in range(n):
        t0 = clock()
        one.model.predict(x)
        res["forward"].append(clock() - t0)
    marks = []
    class Mark(el.Callback):
        def on_step(self, session, result): marks.append((clock(), rt_loop()))
    loop.run(train, loop.steps_done + n + 1, callbacks=[Mark()])
    for (t0, r0), (t1, r1) in itertools.pairwise(marks):
        res["loop_step"].append(t1 - t0)
        res["loop_runtime"].append(r1 - r0)
    print(json.dumps({f"{c}{k}": statistics.median(float(v[i]) for v in res[k])
                      for k in keys for i, c in enumerate(("", "cpu_"))}), flush=True)
"""


def overhead_child(tree: Path) -> subprocess.Popen[str]:
    """The overhead child running edgelearn from `tree` (its own PYTHONPATH and cwd)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, "-c", OVERHEAD_CHILD, json.dumps(DEMO_OPTIONS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=tree, env=env)


def section_overhead(before: str | None, rounds: int, steps: int, children: int = 4
                     ) -> dict[str, Any]:
    """Demo-head step, forward, ratio and overhead for this tree and (optionally) REF's,
    each in `children` child processes, rounds interleaved; medians over every child's."""
    trees = {"after": ROOT}
    work = Path(tempfile.mkdtemp(prefix="bench_zo_cost_before_"))
    try:
        if before:
            arch = subprocess.run(["git", "-C", str(ROOT), "archive", before, "edgelearn"],
                                  check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(work)], input=arch, check=True)
            trees = {"before": work, "after": ROOT}
        # several children per tree: a process's own luck (where its arrays and code land
        # in the caches) moved one child's figures by 20-40% between otherwise equal runs
        kids = [(name, overhead_child(t)) for _ in range(children) for name, t in trees.items()]
        acc: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
        for r in range(rounds + 1):  # round 0 warms up
            for name, kid in (kids if r % 2 else kids[::-1]):
                assert kid.stdin is not None
                assert kid.stdout is not None
                kid.stdin.write(f"{steps}\n")
                kid.stdin.flush()
                row = json.loads(kid.stdout.readline())
                if r:
                    acc[name].append(row)
        for _, kid in kids:
            kid.communicate("")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"ref_before": before, "rounds": rounds, "children": children,
                           "steps_per_round": steps,
                           "step_options": "zo-sgd defaults (probes 1)",
                           "step4_options": DEMO_OPTIONS, "loop_options": DEMO_OPTIONS}
    for name, rows in acc.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        res: dict[str, Any] = {}
        for c, t in itertools.product(("", "cpu_"), ("", "4")):
            if f"{c}{t}step" not in med:  # a child from before the probes-4 rows
                continue
            res.update({
                f"{c}{t}step_ms": med_ms([med[f"{c}{t}step"]]),
                f"{c}{t}step_over_forward": ratio(med[f"{c}{t}step"], med[f"{c}forward"]),
                f"{c}{t}step_runtime_ms": med_ms([med[f"{c}{t}step_runtime"]]),
                f"{c}{t}step_overhead_ms": med_ms([med[f"{c}{t}step"]
                                                   - med[f"{c}{t}step_runtime"]]),
                # the step with the timing proxies in place: what they add themselves
                f"{c}{t}step_timed_ms": med_ms([med[f"{c}{t}step_timed"]])})
        for c in ("", "cpu_"):
            res.update({
                f"{c}forward_ms": med_ms([med[f"{c}forward"]]),
                f"{c}loop_step_ms": med_ms([med[f"{c}loop_step"]]),
                f"{c}loop_step_over_forward": ratio(med[f"{c}loop_step"], med[f"{c}forward"]),
                f"{c}loop_overhead_ms": med_ms([med[f"{c}loop_step"]
                                                - med[f"{c}loop_runtime"]])})
        out[name] = res
    return out


# -- big MLP -----------------------------------------------------------------------------------
def export_big(work: Path, cfg: dict[str, Any]) -> Path:
    """Export the big MLP in a torch child process (this process never imports torch)."""
    code = ("import sys, json, torch; from edgelearn.export import export_bundle; "
            "from edgelearn.export.zoo import MLP; c = json.loads(sys.argv[2]); "
            "torch.manual_seed(0); m = MLP(c['in_features'], tuple(c['hidden']), c['classes']); "
            "export_bundle(m, torch.randn(1, c['in_features']), sys.argv[1])")
    out = work / "mlp_big"
    subprocess.run([sys.executable, "-c", code, str(out), json.dumps(cfg)], check=True,
                   capture_output=True, cwd=ROOT)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, cfg["in_features"]), dtype=np.float32)
    np.savez(work / "data_big.npz", x=x, y=rng.integers(0, cfg["classes"], BATCH))
    return out


def section_big(bundle_dir: Path, data: Path, rounds: int, steps: int,
                between: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Full-weight zo-sgd step vs forward on the big MLP: the elementwise passes threaded
    and on one thread, interleaved in rounds, each against forwards of the same session;
    `between()` runs before the first, the middle and after the last round (the MeZO child).
    Then, in rounds of its own, threaded on a session whose onnxruntime workers spin after
    each run ("spinning", onnxruntime's default, edgelearn's before it turned spinning off):
    interleaved, its workers slowed the threaded steps after it (the 2-core box, 8 rounds
    of 4 steps: 17.6-22.4 ms at each position of a turn, against 18.3-18.7 ms from the
    second step on without the spinning session). Each turn starts with SETTLE_STEPS untimed
    steps: a run steps one optimizer on one model, and right after a switch the steps are
    slower (the first threaded step of a turn 21.9 ms, then 18.3-18.7)."""
    from edgelearn.bundle import load_bundle
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer

    bundle = load_bundle(bundle_dir)
    model = Model(bundle)
    with np.load(data) as f:
        xb, yb = f["x"], f["y"]
    opts = {"lr": 1e-4, "eps": 1e-3, "seed": 0}
    variants = {"threaded": (model, make_optimizer("zo-sgd", **opts)),
                "one_thread": (model, make_optimizer("zo-sgd", **opts, threads=1))}
    times: dict[str, list[np.ndarray]] = {k: [] for k in ("threaded", "one_thread", "spinning",
                                                          "forward", "forward_spinning")}
    for r in range(rounds + 1):  # round 0 warms up
        if r in (1, rounds // 2 + 1):
            between()
        big_round(variants, xb, yb, steps, times if r else None)
    between()
    spin_model = None
    with contextlib.suppress(Exception):  # a tree without the option: no variant
        spin_model = Model(bundle, backend_options={"spinning": True})
    if spin_model is not None:
        spinning = {"spinning": (spin_model, make_optimizer("zo-sgd", **opts))}
        for r in range(rounds + 1):
            big_round(spinning, xb, yb, steps, times if r else None)
        variants.update(spinning)
    return summarize_big(model.store.n_trainable("float32"),
                         {k: opt for k, (_, opt) in variants.items()}, times)


def big_round(variants: dict[str, tuple[Any, Any]], xb: np.ndarray, yb: np.ndarray,
              steps: int, times: dict[str, list[np.ndarray]] | None) -> None:
    """One turn of each variant: SETTLE_STEPS untimed steps, then `steps` timed steps each
    after a timed forward (into `times` unless None: a warm-up round)."""
    from edgelearn.losses import cross_entropy

    for name, (m, opt) in variants.items():
        for i in range(SETTLE_STEPS + steps):
            t0 = clock()
            m.predict(xb)
            t1 = clock()
            opt.step(m.store, lambda m=m: cross_entropy(m.predict(xb), yb))
            if times is not None and i >= SETTLE_STEPS:
                times["forward_spinning" if name == "spinning" else "forward"].append(t1 - t0)
                times[name].append(clock() - t1)


def summarize_big(params: int, variants: dict[str, Any], times: dict[str, list[np.ndarray]]
                  ) -> dict[str, Any]:
    """Medians (ms) and step / forward ratios of the big-MLP section."""
    res: dict[str, Any] = {"params": params, "batch_size": BATCH, "probes": 1,
                           "policy": variants["threaded"].policy}
    for fw in ("forward", "forward_spinning"):
        res[f"{fw}_ms"] = med_ms([t[0] for t in times[fw]])
        res[f"cpu_{fw}_ms"] = med_ms([t[1] for t in times[fw]])
    for name in variants:
        fw = "forward_spinning" if name == "spinning" else "forward"
        for i, kind in enumerate(("", "cpu_")):
            res[f"{kind}step_ms_{name}"] = med_ms([t[i] for t in times[name]])
            res[f"{kind}step_over_forward_{name}"] = ratio(res[f"{kind}step_ms_{name}"],
                                                          res[f"{kind}{fw}_ms"])
    pass_ = getattr(variants["threaded"], "_pass", None)
    res["threads"] = pass_.threads if pass_ is not None else 1
    return res


def section_big_lozo(bundle_dir: Path, data: Path, rounds: int, steps: int,
                     rank: int = 2, update: str = "auto", defer: bool = True
                     ) -> dict[str, Any]:
    """Full-weight lozo step vs forward on the big MLP: the probes scored by the low-rank
    graph through the evaluator a run uses (`make_evaluator`).

    defer (as a `Session` run steps): rounds of `nu` forwards then `nu` steps with
    defer=True and one `settle` (the pass over the weights a period needs), both timed as a
    block and divided by `nu`. Without: each step settles its own update (as `opt.step`
    without defer), interleaved one forward, one step, `steps` a round, as `section_big`."""
    from edgelearn.bundle import load_bundle
    from edgelearn.losses import cross_entropy
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer
    from edgelearn.training.evaluators import make_evaluator

    bundle = load_bundle(bundle_dir)
    model = Model(bundle)
    with np.load(data) as f:
        xb, yb = f["x"], f["y"]
    opt = make_optimizer("lozo", lr=1e-4, eps=1e-3, rank=rank, seed=0, update=update)
    ev = make_evaluator(bundle, model.store, opt, backend="onnxruntime", model=model,
                        loss_fn=cross_entropy)
    fw = ev.forwards(xb, yb)
    block = opt.options.nu if defer else 1
    times: dict[str, list[np.ndarray]] = {"forward": [], "step": []}
    for r in range(rounds + 1):  # round 0 warms up
        for _ in range(1 if defer else steps):
            t0 = clock()
            for _ in range(block):
                model.predict(xb)
            t1 = clock()
            for _ in range(block):
                opt.step(model.store, fw.evaluate, fw.population, defer=defer)
            opt.settle(model.store)
            if r:
                times["forward"].append((t1 - t0) / block)
                times["step"].append((clock() - t1) / block)
    ev.close()
    res: dict[str, Any] = {"params": model.store.n_trainable("float32"), "batch_size": BATCH,
                           "rank": rank, "nu": opt.options.nu, "update": update,
                           "defer": defer,
                           "graph": getattr(ev, "lowrank_info", {}).get("graph", False),
                           "threads": opt.threads}
    for i, kind in enumerate(("", "cpu_")):
        res[f"{kind}forward_ms"] = med_ms([t[i] for t in times["forward"]])
        res[f"{kind}step_ms"] = med_ms([t[i] for t in times["step"]])
        res[f"{kind}step_over_forward"] = ratio(res[f"{kind}step_ms"], res[f"{kind}forward_ms"])
    return res


def torch_mezo(cfg: dict[str, Any], data: Path, steps: int) -> dict[str, Any]:
    """bench_zo.py's plain-torch MeZO child on the same model, batch and probes."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_zo.py"), "--child", "torch-mezo",
           "--cfg", json.dumps(cfg), "--data", str(data), "--timed-steps", str(steps),
           "--warmup", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": p.stderr.strip()[-400:]}


def pooled_mezo(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The MeZO child's runs (before, amid, after our rounds): medians of their medians."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1] if runs else {"error": "not run"}
    out = dict(ok[-1])
    for k in ("step_ms", "forward_ms"):
        out[k] = round(statistics.median(r[k] for r in ok), 4)
        out[f"{k}_runs"] = [r[k] for r in ok]
    out["step_over_forward"] = ratio(out["step_ms"], out["forward_ms"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every section and print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, a smaller big MLP")
    p.add_argument("--before", metavar="REF", help="git ref to measure the demo-head overhead "
                   "of side by side with this tree (section overhead)")
    p.add_argument("--overhead-only", action="store_true",
                   help="run only the before/after overhead section")
    args = p.parse_args(argv)
    rounds = 3 if args.quick else 7
    cfg = QUICK_BIG if args.quick else BIG
    res: dict[str, Any] = {"benchmark": "bench_zo_cost", "quick": args.quick, "model_big": cfg}
    log("demo head overhead, before / after")
    res["overhead"] = section_overhead(args.before, rounds + 1, 200, 2 if args.quick else 4)
    if args.overhead_only:
        print(json.dumps(res, indent=1))
        return 0
    log("demo head")
    res["demo_head"] = section_demo(rounds, 100)
    work = Path(tempfile.mkdtemp(prefix="bench_zo_cost_"))
    try:
        log("exporting the big MLP (torch child)")
        bundle = export_big(work, cfg)
        log("big MLP full-weight steps, torch MeZO (child) before, amid and after them")
        mezo: list[dict[str, Any]] = []
        res["big_full"] = section_big(
            bundle, work / "data_big.npz", rounds, 3,
            lambda: mezo.append(torch_mezo(cfg, work / "data_big.npz", rounds)))
        res["torch_mezo"] = pooled_mezo(mezo)
        log("big MLP full-weight lozo steps (low-rank probes in the graph)")
        res["big_full_lozo"] = section_big_lozo(bundle, work / "data_big.npz", rounds, 3)
        res["big_full_lozo_per_step"] = section_big_lozo(bundle, work / "data_big.npz", rounds,
                                                         3, defer=False)
        res["big_full_lozo_numpy"] = section_big_lozo(bundle, work / "data_big.npz", rounds, 3,
                                                      update="numpy")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["summary"] = summary(res)
    print(json.dumps(res, indent=1))
    return 0


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The four headline ratios next to their goals (issue 16)."""
    demo, big, mezo = res["demo_head"], res.get("big_full", {}), res.get("torch_mezo", {})
    after = res.get("overhead", {}).get("after", {})
    get: Callable[[str], Any] = big.get
    return {
        "demo_head_step_over_forward": demo["population"]["step_over_forward"],
        "demo_head_step_over_forward_per_probe": demo["per_probe"]["step_over_forward"],
        "demo_head_step_over_forward_probes1": demo["probes1"]["step_over_forward"],
        "goal_demo_head_step_over_forward_max": 5.0,
        "big_full_step_over_forward": get("step_over_forward_threaded"),
        "big_full_step_over_forward_one_thread": get("step_over_forward_one_thread"),
        "big_full_cpu_step_over_forward": get("cpu_step_over_forward_threaded"),
        "goal_big_full_step_over_forward_max": 2.5,
        "big_full_lozo_step_over_forward": res.get("big_full_lozo", {}).get(
            "step_over_forward"),
        "big_full_lozo_cpu_step_over_forward": res.get("big_full_lozo", {}).get(
            "cpu_step_over_forward"),
        "big_full_lozo_per_step_step_over_forward": res.get("big_full_lozo_per_step", {}).get(
            "step_over_forward"),
        "big_full_lozo_numpy_step_over_forward": res.get("big_full_lozo_numpy", {}).get(
            "step_over_forward"),
        "big_full_lozo_rank": res.get("big_full_lozo", {}).get("rank"),
        "big_full_step_over_forward_spinning": get("step_over_forward_spinning"),
        "torch_mezo_step_over_ours": ratio(mezo.get("step_ms"), get("step_ms_threaded")),
        "torch_mezo_step_over_ours_spinning": ratio(mezo.get("step_ms"),
                                                    get("step_ms_spinning")),
        "goal_torch_mezo_step_over_ours_min": 10.0,
        # `opt.step` minus the runtime's calls (section overhead): probes 1 (zo-sgd's default)
        # and 4 (the demo's); the run loop's (journal, digests, callbacks) beside them
        "python_overhead_ms_per_step": after.get("step_overhead_ms"),
        "python_overhead_ms_per_step_probes4": after.get("4step_overhead_ms"),
        "cpu_python_overhead_ms_per_step": after.get("cpu_step_overhead_ms"),
        "goal_python_overhead_ms_per_step_max": 0.1,
        "loop_python_overhead_ms_per_step": demo["population"]["python_overhead_ms_per_step"],
    }


if __name__ == "__main__":
    sys.exit(main())
