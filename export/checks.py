"""Exporter parity: a bundle being written, run on a device backend, vs the torch model.

Every exporter check (model.onnx, the taps graph, the TFLite graphs, int8 and population
graphs) runs `torch_parity`: random inputs of several batch sizes through the device and
through torch, compared by `edgelearn.parity.compare` (per output, |device - torch| <= atol +
rtol * max|torch|). `parity_check` builds the device side from the bundle directory for every
weight mode (live inputs / baked) and backend strategy asked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgelearn.export.common import as_tuple, with_batch

from edgelearn.backends import make_backend
from edgelearn.bundle import Bundle
from edgelearn.parity import ATOL, RTOL, Parity, compare, worst

#: Weight modes a bundle is checked in: every weight a live input ("*"), every weight baked ("").
LIVE_MODES = ("*", "")


def torch_parity(run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                 reference: Callable[..., Any], example: tuple[torch.Tensor, ...],
                 in_names: Sequence[str], out_names: Sequence[str],
                 batch_sizes: Sequence[int], *, seed: int, where: str, atol: float = ATOL,
                 rtol: float = RTOL) -> Parity:
    """A device run vs torch on random inputs of several batch sizes (`edgelearn.parity`).

    Args:
        run: device forward, input name -> array in, output name -> array out.
        reference: the torch module (eval mode) or function the device must match; returns
            the outputs in `out_names` order.
        example: example inputs (dtype/shape template, batch first).
        in_names / out_names: the bundle's input and output names.
        batch_sizes: batch sizes to try; batch i draws its inputs from seed `seed + i`.
        where: what runs (e.g. "onnxruntime, weights live"), for the error message.
        atol / rtol: per output, |device - torch| <= atol + rtol * max|torch|.
    """
    results = []
    for i, b in enumerate(batch_sizes):
        xs = tuple(with_batch(x, b, seed + i) for x in example)
        with torch.no_grad():
            ref = as_tuple(reference(*xs))
        got = run({n: x.numpy() for n, x in zip(in_names, xs, strict=True)})
        at = f"{where}, batch {b}"
        if len(ref) != len(out_names):
            results.append(Parity(False, float("inf"), atol, rtol, where=at, problem=(
                f"torch returned {len(ref)} outputs, the bundle names {len(out_names)}")))
        want = {n: r.numpy() for n, r in zip(out_names, ref, strict=False)}
        results.append(compare(got, want, atol=atol, rtol=rtol, where=at))
    return worst(results, atol=atol, rtol=rtol)


def _device_forward(bundle: Bundle, backend: str, graph: str | None, strategy: str | None,
                    live: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The forward of one graph of `bundle` on `backend`, weights matching `live` live."""
    options: dict[str, Any] = {"threads": 1}
    if graph is not None:
        options["graph"] = graph
    if strategy is not None:
        options["strategy"] = strategy
    dev = make_backend(backend, bundle, **options)
    dev.bind(bundle.load_store(trainable=live))
    return dev.forward


def parity_check(bundle_dir: Path, model: Callable[..., Any], example: tuple[torch.Tensor, ...],
                 batch_sizes: Sequence[int], *, backend: str = "onnxruntime",
                 graph: str | None = None, out_names: Sequence[str] | None = None,
                 lives: Sequence[str] = LIVE_MODES, strategies: Sequence[str | None] = (None,),
                 seed: int = 1000, atol: float = ATOL, rtol: float = RTOL) -> Parity:
    """torch vs a device backend over random inputs of several batch sizes: the worst of
    every weight mode in `lives` x backend strategy in `strategies`.

    Args:
        bundle_dir: the (temporary) bundle directory, its manifest already written.
        model: the torch model (reference) in eval mode.
        example: example inputs (dtype/shape template).
        batch_sizes: batch sizes to try.
        backend: the device backend ("onnxruntime", "litert").
        graph: which graph of the bundle (the backend's `graph` option; None: the model).
        out_names: the graph's output names in `model`'s return order (None: the bundle's).
        lives: trainable globs for the device session ("*": all weights live inputs, "":
            all baked).
        strategies: litert weight strategies ("inputs", "rebuild"); None = backend default.
        seed: seed of the first batch's random inputs.
        atol / rtol: tolerance per output, see `edgelearn.parity.compare`.
    """
    bundle = Bundle(bundle_dir)
    names = list(out_names) if out_names is not None else [t.name for t in bundle.outputs]
    results = []
    for strategy in strategies:
        for live in lives:
            what = " ".join(w for w in (backend, strategy, graph) if w)
            results.append(torch_parity(
                _device_forward(bundle, backend, graph, strategy, live), model, example,
                [t.name for t in bundle.inputs], names, batch_sizes, seed=seed,
                where=f"{what}, weights {'live' if live else 'baked'}", atol=atol, rtol=rtol))
    return worst(results, atol=atol, rtol=rtol)
