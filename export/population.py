"""Population graph: one ONNX call scores K candidate weight sets on the same batch.

`add_population_graph` adds `model_pop.onnx` to a float32 bundle: the model wrapped in
`torch.func.vmap` over its trainable parameters, which become graph inputs with a leading
population dimension K ([K, *shape]; frozen parameters keep their shape and are baked on the
device). Output o has shape [K, *o.shape]. The manifest gains files.onnx_population and
`population: {"params": [...]}` (the parameters that carry the K dimension, in order); the
device uses the graph only when its trainable set is exactly that list. Parity: row k of the
population output equals the single-candidate forward of candidate k (checked before the
manifest is rewritten).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgelearn.export.checks import torch_parity
from edgelearn.export.common import (
    BATCH,
    ExportError,
    as_tuple,
    collect_params,
    describe_error,
    export_onnx_program,
    with_batch,
)
from torch import nn
from torch.func import functional_call, vmap

from edgelearn.bundle import Bundle
from edgelearn.bundle_writer import add_file, read_manifest, write_manifest
from edgelearn.parity import ATOL, RTOL, Parity, worst

POP_FILE = "model_pop.onnx"


class _PopFunctional(nn.Module):
    """forward(*inputs, *pop_params, *frozen) -> vmap over pop_params of the model."""

    def __init__(self, model: nn.Module, pop: list[str], frozen: list[str], n_inputs: int):
        super().__init__()
        self.model, self.pop, self.frozen, self.n_inputs = model, pop, frozen, n_inputs

    def forward(self, *args: torch.Tensor) -> Any:
        inputs = args[: self.n_inputs]
        pop = args[self.n_inputs : self.n_inputs + len(self.pop)]
        frozen = dict(zip(self.frozen, args[self.n_inputs + len(self.pop) :], strict=True))

        def one(*p: torch.Tensor) -> Any:
            return functional_call(self.model, {**frozen, **dict(zip(self.pop, p,
                                                                      strict=True))}, inputs)

        return vmap(one)(*pop)


class _Population:
    """The population graph being exported: which parameters get the K dimension."""

    def __init__(self, model: nn.Module, example: tuple[torch.Tensor, ...], bundle: Bundle):
        self.model, self.example = model, example
        self.params = collect_params(model)
        self.pop = [p.name for p in bundle.params if p.trainable]
        self.frozen = [n for n in self.params if n not in self.pop]
        self.in_names = [t.name for t in bundle.inputs]
        self.out_names = [t.name for t in bundle.outputs]

    def export(self, path: Path, k: int = 3) -> None:
        """Write the vmapped graph (traced with `k` candidates; K is symbolic) to `path`."""
        import onnx

        wrapper = _PopFunctional(self.model, self.pop, self.frozen, len(self.example)).eval()
        trace_inputs = tuple(with_batch(x, max(2, x.shape[0]), 0) for x in self.example)
        pop_vals = tuple(self.params[n].unsqueeze(0).repeat(k, *[1] * self.params[n].ndim)
                         for n in self.pop)
        batch = torch.export.Dim(BATCH, min=1, max=1 << 20)
        kdim = torch.export.Dim("population", min=2, max=1 << 16)
        dyn = (*({0: batch} for _ in self.example), *({0: kdim} for _ in self.pop),
               *(None for _ in self.frozen))
        export_onnx_program(wrapper, (*trace_inputs, *pop_vals,
                                      *(self.params[n] for n in self.frozen)), dyn, path,
                            input_names=[*self.in_names, *self.pop, *self.frozen],
                            output_names=self.out_names, what="population export")
        onnx.checker.check_model(onnx.load(str(path)))

    def parity(self, path: Path, *, atol: float, rtol: float, candidates: int = 4) -> Parity:
        """Row j of one onnxruntime call scoring `candidates` random weight sets (base +
        noise) vs torch's single forward of candidate j, on one random batch of 5."""
        import onnxruntime as ort

        gen = torch.Generator().manual_seed(0)
        cands = [{n: self.params[n] + 0.01 * torch.randn(self.params[n].shape, generator=gen)
                  for n in self.pop} for _ in range(candidates)]
        weights = {n: np.stack([c[n].numpy() for c in cands]) for n in self.pop}
        weights.update({n: self.params[n].numpy() for n in self.frozen})
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def row(j: int) -> Any:
            def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                got = sess.run(self.out_names, {**feeds, **weights})
                return {n: o[j] for n, o in zip(self.out_names, got, strict=True)}
            return run

        def single(c: dict[str, torch.Tensor]) -> Any:
            return lambda *xs: functional_call(self.model, {**self.params, **c}, xs)

        return worst([torch_parity(row(j), single(c), self.example, self.in_names,
                                   self.out_names, [5], seed=3000,
                                   where=f"candidate {j} of {len(cands)}", atol=atol, rtol=rtol)
                      for j, c in enumerate(cands)], atol=atol, rtol=rtol)


def add_population_graph(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    bundle_dir: str | os.PathLike,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict[str, Any]:
    """Write the population graph of a float32 bundle exported from `model`.

    Args:
        model: the torch module the bundle was exported from.
        example_inputs: example batch.
        bundle_dir: the bundle (its manifest's trainable parameters get the K dimension).
        atol / rtol: per output, |population row - torch single forward| <= atol + rtol *
            max|torch| (`edgelearn.parity`).
    Returns: {"population_params", "parity_max_abs_err"}.
    """
    bundle_dir = Path(bundle_dir)
    bundle = Bundle(bundle_dir)
    if any(p.dtype != "float32" for p in bundle.params):
        raise ExportError("population graphs are exported for float32 bundles only")
    job = _Population(model.eval(), as_tuple(example_inputs), bundle)
    if not job.pop:
        raise ExportError("the bundle has no trainable parameters to batch")
    path = bundle_dir / POP_FILE
    try:
        job.export(path)
        par = job.parity(path, atol=atol, rtol=rtol)
    except Exception as e:  # torch.export / onnx / onnxruntime raise many types
        path.unlink(missing_ok=True)
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"population export failed: {describe_error(e)}") from e
    if not par.ok:
        path.unlink(missing_ok=True)
        raise ExportError(f"population parity failed: onnxruntime population graph vs torch "
                          f"{par.describe()}")
    manifest = read_manifest(bundle_dir)
    add_file(manifest, bundle_dir, "onnx_population", POP_FILE)
    manifest["population"] = {"params": job.pop, "parity_max_abs_err": par.max_abs_err}
    write_manifest(bundle_dir, manifest)
    return {"population_params": job.pop, "parity_max_abs_err": par.max_abs_err}
