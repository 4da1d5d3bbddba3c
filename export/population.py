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

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgelearn.export.onnx_export import ExportError, _as_tuple, _with_batch, collect_params
from torch import nn
from torch.func import functional_call, vmap

from edgelearn.bundle import MANIFEST, Bundle, sha256_file
from edgelearn.parity import ATOL, RTOL, compare, worst

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
    import onnx
    import onnxruntime as ort

    bundle_dir = Path(bundle_dir)
    bundle = Bundle(bundle_dir)
    if any(p.dtype != "float32" for p in bundle.params):
        raise ExportError("population graphs are exported for float32 bundles only")
    model = model.eval()
    example = _as_tuple(example_inputs)
    params = collect_params(model)
    pop = [p.name for p in bundle.params if p.trainable]
    frozen = [n for n in params if n not in pop]
    if not pop:
        raise ExportError("the bundle has no trainable parameters to batch")
    k = 3
    wrapper = _PopFunctional(model, pop, frozen, len(example)).eval()
    trace_inputs = tuple(_with_batch(x, max(2, x.shape[0]), 0) for x in example)
    pop_vals = tuple(params[n].unsqueeze(0).repeat(k, *[1] * params[n].ndim) for n in pop)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    kdim = torch.export.Dim("population", min=2, max=1 << 16)
    dyn = (*({0: batch} for _ in example), *({0: kdim} for _ in pop), *(None for _ in frozen))
    names = [t.name for t in bundle.inputs]
    out_names = [t.name for t in bundle.outputs]
    path = bundle_dir / POP_FILE
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, (*trace_inputs, *pop_vals,
                                               *(params[n] for n in frozen)),
                                     dynamic_shapes=(dyn,))
            torch.onnx.export(ep, (), str(path), input_names=[*names, *pop, *frozen],
                              output_names=out_names, dynamo=True, optimize=False,
                              external_data=False, verbose=False)
        m = onnx.load(str(path))
        onnx.checker.check_model(m)
        # Parity: K random candidates (base + noise) scored at once vs one by one in torch.
        gen = torch.Generator().manual_seed(0)
        cands = [{n: params[n] + 0.01 * torch.randn(params[n].shape, generator=gen)
                  for n in pop} for _ in range(4)]
        xs = tuple(_with_batch(x, 5, 3000) for x in example)
        feeds = {n: x.numpy() for n, x in zip(names, xs, strict=True)}
        feeds.update({n: np.stack([c[n].numpy() for c in cands]) for n in pop})
        feeds.update({n: params[n].numpy() for n in frozen})
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(out_names, feeds)
        results = []
        with torch.no_grad():
            for j, c in enumerate(cands):
                ref = _as_tuple(functional_call(model, {**params, **c}, xs))
                results.append(compare(
                    {n: o[j] for n, o in zip(out_names, got, strict=True)},
                    {n: r.numpy() for n, r in zip(out_names, ref, strict=False)},
                    atol=atol, rtol=rtol, where=f"candidate {j} of {len(cands)}"))
        par = worst(results, atol=atol, rtol=rtol)
    except ExportError:
        raise
    except Exception as e:  # torch.export / onnx raise many types
        path.unlink(missing_ok=True)
        raise ExportError(f"population export failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not par.ok:
        path.unlink(missing_ok=True)
        raise ExportError(f"population parity failed: onnxruntime population graph vs torch "
                          f"{par.describe()}")
    err = par.max_abs_err
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["files"]["onnx_population"] = {"path": POP_FILE, "size": path.stat().st_size,
                                            "sha256": sha256_file(path)}
    manifest["population"] = {"params": pop, "parity_max_abs_err": err}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {"population_params": pop, "parity_max_abs_err": err}
