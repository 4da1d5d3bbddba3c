"""`edgelearn bench`: forward and optimizer-step timing and memory of a bundle on this device.

Everything is measured side by side in one process on random inputs of the bundle's declared
shape: a baked session (all weights initializers: plain inference), a live session (trainable
weights bound as inputs: what training runs), and one step of each registered optimizer that
runs on the bundle (tpSGD through the taps graph, PolyStep through the population graph when
there is one). Medians after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn.bundle import Bundle
from edgelearn.capabilities import optimizer_support
from edgelearn.errors import EdgelearnError, InputError
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


def random_batch(bundle: Bundle, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 inputs of the declared shape and random targets for the task."""
    spec = bundle.inputs[0]
    if any(isinstance(d, str) for d in spec.shape[1:]):
        raise InputError(f"input {spec.name!r} has symbolic non-batch dims {list(spec.shape)}; "
                         "bench needs fixed shapes")
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0xBE])))
    x = rng.standard_normal((batch_size, *spec.shape[1:])).astype(np.dtype(spec.dtype))
    out = bundle.outputs[0].shape
    if bundle.task == "classification":
        y = rng.integers(0, out[-1] if isinstance(out[-1], int) else 2, batch_size)
    else:
        y = rng.standard_normal((batch_size, *[d for d in out[1:] if isinstance(d, int)]))
        y = y.astype(np.float32)
    return x, y


def _step_timer(bundle: Bundle, live: Model, name: str, x: np.ndarray, y: np.ndarray, *,
                backend: str, threads: int | None) -> Callable[[], object]:
    """One `step()` of optimizer `name` on (x, y), fed the way training feeds it (the
    training evaluator: tpSGD one taps-graph forward, PolyStep the population graph when the
    bundle has one for the trainable set, every other optimizer the plain loss)."""
    from edgelearn.training.evaluators import make_evaluator

    opt = make_optimizer(name)
    # raises InputError saying why when the bundle cannot run the optimizer's forwards
    evaluator = make_evaluator(bundle, live.store, opt, backend=backend, threads=threads,
                               model=live, loss_fn=get_loss(default_loss(bundle.task)))
    evaluator.check_targets(y)
    fw = evaluator.forwards(x, y)
    return lambda: opt.step(live.store, fw.evaluate, fw.population, taps=fw.taps)


def run_bench(bundle: Bundle, *, batch_size: int = 32, trainable: str | None = None,
              backend: str = "onnxruntime", threads: int | None = None, runs: int = 30,
              steps: int = 20) -> dict[str, Any]:
    """The `bench --json` object: forward_ms (baked), forward_live_ms, step_ms per optimizer
    (a float in ms, or "n/a: why" for an optimizer this bundle or backend cannot run)."""
    if len(bundle.inputs) != 1:
        raise InputError("bench supports single-input bundles")
    x, y = random_batch(bundle, batch_size)
    baked = Model(bundle, backend=backend, trainable=(), threads=threads)
    live = Model(bundle, backend=backend, trainable=trainable, threads=threads)
    fwd_baked = median_ms(lambda: baked.predict(x), runs)
    fwd_live = median_ms(lambda: live.predict(x), runs)
    step_ms: dict[str, float | str] = {}
    support = optimizer_support(bundle)
    for name in sorted(REGISTRY):
        if support.get(name, {}).get("supported") is False:
            step_ms[name] = f"n/a: not for this bundle: {support[name]['why']}"
            continue
        try:
            step_ms[name] = median_ms(_step_timer(bundle, live, name, x, y, backend=backend,
                                                  threads=threads), steps, warmup=2)
        except (EdgelearnError, NotImplementedError) as e:
            step_ms[name] = f"n/a: {e}"
    return {
        "bundle": str(bundle.path), "backend": backend, "batch_size": batch_size,
        "trainable_params": live.store.n_trainable("float32"),
        "forward_ms": fwd_baked, "forward_live_ms": fwd_live,
        "live_over_baked": fwd_live / fwd_baked,
        "step_ms": step_ms,
        "step_over_forward_live": {k: v / fwd_live for k, v in step_ms.items()
                                   if isinstance(v, float)},
        "peak_rss_mb": peak_rss_mb(),
    }


def bench(bundle: Bundle, runtime: RuntimeConfig | None = None, *, batch_size: int = 32,
          trainable: str | None = None, runs: int = 30, steps: int = 20) -> dict[str, Any]:
    """`run_bench` on the backend and threads `runtime` resolves to for this bundle.

    Unstable (`el.tools.bench`): the result keys follow `bench --json` and may change.

    Args:
        bundle: a loaded bundle.
        runtime: backend, threads or device profile (default: this machine's profile).
        batch_size: examples per forward and per step.
        trainable: glob(s) of parameters to train (None = the manifest's).
        runs: timed forwards per variant.
        steps: timed steps per optimizer.
    """
    from edgelearn.training import RuntimeConfig

    rt = (runtime or RuntimeConfig()).resolve(bundle)
    return run_bench(bundle, batch_size=batch_size, trainable=trainable, backend=rt.backend,
                     threads=rt.threads, runs=runs, steps=steps)
