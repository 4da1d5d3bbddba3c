"""`edgelearn bench`: forward and optimizer-step timing and memory of a bundle on this device.

Everything is measured side by side in one process, interleaved (round after round: one
forward of each variant, then one step of each optimizer, so a slow moment of the machine
hits all alike), on example inputs: a batch of a data file (`data=`) or random inputs of the
bundle's declared shapes (symbolic non-batch dims, e.g. a sequence length, from `shapes=`,
`--shape NAME=DIMS`; integer inputs get 0, and 1 for inputs named "mask"): a
baked session (all weights initializers: plain inference), a live session (trainable
weights bound as inputs: what training runs), and one step of each registered optimizer that
runs on the bundle (tpSGD through the taps graph, PolyStep through the population graph when
there is one). Medians after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn.bundle import Bundle
from edgelearn.capabilities import optimizer_support
from edgelearn.data import Dataset
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.inputs import Inputs, has_batch_axis
from edgelearn.losses import default_loss, get_loss
from edgelearn.model import Model
from edgelearn.optim import REGISTRY, make_optimizer
from edgelearn.osutil import peak_rss_mb

if TYPE_CHECKING:
    from edgelearn.training import RuntimeConfig


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    """Median wall time of `fn()` over `runs` calls after `warmup` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _input_shape(spec: Any, batch_size: int, shapes: Mapping[str, Sequence[int]]
                 ) -> list[int]:
    """The example shape of one input: --shape given (with or without the batch dim), else
    the declared dims with the batch -> batch_size (InputError for other symbolic dims)."""
    dims = list(spec.shape)
    given = shapes.get(spec.name)
    if given is not None:
        given = list(given)
        if len(given) == len(dims) - 1:
            given = [batch_size, *given]
        if len(given) != len(dims):
            raise InputError(f"--shape {spec.name}: {given} does not have rank {len(dims)} "
                             f"(the model declares {dims})")
        return given
    if dims and has_batch_axis(spec):  # a batch fixed at 1 runs one example at a time
        dims[0] = batch_size
    if any(isinstance(d, str) for d in dims):
        raise InputError(f"input {spec.name!r} has symbolic dims {list(spec.shape)}: pass "
                         f"--shape {spec.name}=D1,D2,... or --data with example inputs")
    return dims


def random_batch(bundle: Bundle, batch_size: int, seed: int = 0,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[Inputs, np.ndarray]:
    """Random inputs of the declared shapes (`shapes`: input name -> dims for symbolic ones)
    and random targets for the task; a dict for multi-input models."""
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0xBE])))
    xs = {}
    for spec in bundle.inputs:
        shape, dt = _input_shape(spec, batch_size, shapes or {}), np.dtype(spec.dtype)
        if dt.kind == "f":
            xs[spec.name] = rng.standard_normal(shape).astype(dt)
        else:  # id 0 exists in every vocabulary; masks all ones (real ids: --data)
            xs[spec.name] = np.full(shape, int("mask" in spec.name.lower()), dt)
    x: Inputs = xs[bundle.inputs[0].name] if len(xs) == 1 else xs
    out = bundle.outputs[0].shape
    if default_loss(bundle.task, bundle.outputs) == "bce":
        return x, rng.integers(0, 2, batch_size)
    if bundle.task == "classification":
        y = rng.integers(0, out[-1] if isinstance(out[-1], int) else 2, batch_size)
    else:
        y = rng.standard_normal((batch_size, *[d for d in out[1:] if isinstance(d, int)]))
        y = y.astype(np.float32)
    return x, y


def interleaved_ms(fns: Mapping[str, Callable[[], object]], counts: Mapping[str, int],
                   warmup: int = 2) -> dict[str, float]:
    """Median ms of each fn, timed round-robin: round i calls every fn whose count > i.

    Args:
        fns: name -> callable. counts: name -> timed calls. warmup: untimed rounds first.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(max(counts.values(), default=0)):
        for k, fn in fns.items():
            if i < counts[k]:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items() if v}


def _step_timer(bundle: Bundle, live: Model, name: str, x: Inputs, y: np.ndarray, *,
                backend: str, threads: int | None) -> Callable[[], object]:
    """One `step()` of optimizer `name` on (x, y), fed the way training feeds it (the
    training evaluator: tpSGD one taps-graph forward, PolyStep the population graph when the
    bundle has one for the trainable set, every other optimizer the plain loss)."""
    from edgelearn.training.evaluators import make_evaluator

    opt = make_optimizer(name)
    # raises InputError saying why when the bundle cannot run the optimizer's forwards
    evaluator = make_evaluator(bundle, live.store, opt, backend=backend, threads=threads,
                               model=live,
                               loss_fn=get_loss(default_loss(bundle.task, bundle.outputs)))
    evaluator.check_targets(y)
    fw = evaluator.forwards(x, y)
    return lambda: opt.step(live.store, fw.evaluate, fw.population, taps=fw.taps,
                            outputs=fw.outputs)


def run_bench(bundle: Bundle, *, batch_size: int = 32, trainable: str | None = None,
              backend: str = "onnxruntime", threads: int | None = None, runs: int = 30,
              steps: int = 20, data: Dataset | None = None,
              shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """The `bench --json` object: forward_ms (baked), forward_live_ms, step_ms per optimizer
    (a float in ms, or "n/a: why" for an optimizer this bundle or backend cannot run).

    Args:
        data: examples: the first batch (seeded order) is the input (None: random inputs).
        shapes: input name -> dims for inputs with symbolic dims (random inputs only).
    """
    if data is not None:
        x, y = data.batch_at(0, batch_size, 0)
        batch_size = len(y)
    else:
        x, y = random_batch(bundle, batch_size, shapes=shapes)
    baked = Model(bundle, backend=backend, trainable=(), threads=threads)
    live = Model(bundle, backend=backend, trainable=trainable, threads=threads)
    fns: dict[str, Callable[[], object]] = {"baked": lambda: baked.predict(x),
                                            "live": lambda: live.predict(x)}
    counts = {"baked": runs, "live": runs}
    step_ms: dict[str, float | str] = {}
    support = optimizer_support(bundle)
    for name in sorted(REGISTRY):
        if support.get(name, {}).get("supported") is False:
            step_ms[name] = f"n/a: not for this bundle: {support[name]['why']}"
            continue
        try:
            fns[name] = _step_timer(bundle, live, name, x, y, backend=backend, threads=threads)
            fns[name]()  # a step that cannot run says so here, not inside the timed rounds
            counts[name] = steps
        except (EdgelearnError, NotImplementedError) as e:
            fns.pop(name, None)
            step_ms[name] = f"n/a: {e}"
    timed = interleaved_ms(fns, counts)
    fwd_baked, fwd_live = timed.pop("baked"), timed.pop("live")
    step_ms = {name: timed.get(name, step_ms.get(name, "n/a")) for name in sorted(REGISTRY)}
    return {
        "bundle": str(bundle.path), "backend": backend, "batch_size": batch_size,
        "trainable_params": live.store.n_trainable("float32"),
        "inputs": {k: list(v.shape) for k, v in
                   (x.items() if isinstance(x, Mapping) else [(bundle.inputs[0].name, x)])},
        "forward_ms": fwd_baked, "forward_live_ms": fwd_live,
        "live_over_baked": fwd_live / fwd_baked,
        "step_ms": step_ms,
        "step_over_forward_live": {k: v / fwd_live for k, v in step_ms.items()
                                   if isinstance(v, float)},
        "peak_rss_mb": peak_rss_mb(),
    }


def bench(bundle: Bundle, runtime: RuntimeConfig | None = None, *, batch_size: int = 32,
          trainable: str | None = None, runs: int = 30, steps: int = 20,
          data: Dataset | None = None, shapes: Mapping[str, Sequence[int]] | None = None
          ) -> dict[str, Any]:
    """`run_bench` on the backend and threads `runtime` resolves to for this bundle.

    Unstable (`el.tools.bench`): the result keys follow `bench --json` and may change.

    Args:
        bundle: a loaded bundle.
        runtime: backend, threads or device profile (default: this machine's profile).
        batch_size: examples per forward and per step.
        trainable: glob(s) of parameters to train (None = the manifest's).
        runs: timed forwards per variant.
        steps: timed steps per optimizer.
        data: example inputs (its first batch); shapes: input name -> dims for symbolic
            dims of random inputs (`--shape`).
    """
    from edgelearn.training import RuntimeConfig

    rt = (runtime or RuntimeConfig()).resolve(bundle)
    return run_bench(bundle, batch_size=batch_size, trainable=trainable, backend=rt.backend,
                     threads=rt.threads, runs=runs, steps=steps, data=data, shapes=shapes)
