"""Export a torch nn.Module to an edgelearn bundle (ONNX + safetensors + manifest).

Every parameter (and every floating-point buffer, e.g. BatchNorm running stats) becomes an ONNX
graph input named exactly like the torch tensor, by exporting
`functional_call(model, params, inputs)` with the dynamo exporter (`optimize=False`). That keeps
every torch name (exporters otherwise merge equal-valued weights such as fresh LayerNorms, or
rename/transpose them) and puts torch-layout weights in the arena; GRU gate reordering happens
inside the graph. The device decides at load time which parameters stay live inputs and bakes
the rest as initializers. Parity (torch vs onnxruntime, live and baked) runs before the bundle
directory appears; a mismatch raises and leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from edgelearn.export.checks import parity_check
from edgelearn.export.common import (
    BATCH,
    ExportError,
    Functional,
    as_tuple,
    collect_params,
    export_onnx_program,
    with_batch,
)
from edgelearn.export.taps import TapsError, check_batch_first, check_records, trace_layers
from edgelearn.export.tflite_export import add_tflite, add_tflite_taps
from torch import nn

from edgelearn.bundle import select_trainable
from edgelearn.bundle_writer import (
    WEIGHTS,
    check_new_dir,
    file_entries,
    new_manifest,
    param_entry,
    publish,
    staging_dir,
    write_manifest,
)
from edgelearn.graph_taps import add_graph_taps
from edgelearn.params import ParamSpec, ParamStore, check_name
from edgelearn.parity import ATOL, RTOL, check_tolerances

__all__ = ["ExportError", "collect_params", "export_bundle", "to_onnx"]

_TORCH_TO_NP = {torch.float32: "float32", torch.int8: "int8", torch.int32: "int32",
                torch.int64: "int64", torch.uint8: "uint8", torch.bool: "bool"}


def to_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
            input_names: list[str], output_names: list[str], path: Path) -> None:
    """Write `model` as ONNX: data inputs with a symbolic batch, then every parameter a graph
    input named exactly like its torch tensor (checked: none merged, renamed or baked).

    Args:
        model: torch module in eval mode.
        inputs: example inputs (batch first).
        params: parameter name -> tensor (`collect_params`), in graph input order.
        input_names / output_names: graph names of the data inputs and the outputs.
        path: the .onnx file to write.
    """
    import onnx

    names = list(params)
    wrapper = Functional(model, names, len(inputs)).eval()
    # torch.export specializes size-1 dims, so trace with a batch of at least 2.
    trace_inputs = tuple(with_batch(x, max(2, x.shape[0]), 0) for x in inputs)
    batch = torch.export.Dim(BATCH, min=1, max=1 << 20)
    dynamic = tuple({0: batch} for _ in inputs) + tuple(None for _ in names)
    export_onnx_program(wrapper, (*trace_inputs, *params.values()), dynamic, path,
                        input_names=[*input_names, *names], output_names=output_names,
                        what="torch -> ONNX export")
    m = onnx.load(str(path))
    for vi in [*m.graph.input, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and vi.name not in params and dims[0].dim_param:
            dims[0].dim_param = BATCH
    _check_param_inputs(m, params)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _check_param_inputs(m: Any, params: dict[str, torch.Tensor]) -> None:
    """Every parameter is a graph input of its torch shape, and none became an initializer."""
    graph_inputs = {i.name: i for i in m.graph.input}
    for name, t in params.items():
        gi = graph_inputs.get(name)
        if gi is None:
            raise ExportError(f"parameter {name!r} did not survive export as a graph input "
                              "(unused by forward, or merged): remove it or use it")
        shape = [d.dim_value for d in gi.type.tensor_type.shape.dim]
        if shape != list(t.shape):
            raise ExportError(f"parameter {name!r} exported as {shape}, torch has {list(t.shape)}")
    clash = {i.name for i in m.graph.initializer} & set(params)
    if clash:
        raise ExportError(f"parameters {sorted(clash)} were baked as initializers")


def _spec_json(name: str, t: torch.Tensor, dynamic: bool) -> dict[str, Any]:
    """The manifest spec of an input/output tensor (dim 0 "batch" when `dynamic`)."""
    if t.dtype not in _TORCH_TO_NP:
        raise ExportError(f"{name!r} has dtype {t.dtype}, which bundles do not support")
    shape: list[int | str] = list(t.shape)
    if dynamic:
        shape[0] = BATCH
    return {"name": name, "shape": shape, "dtype": _TORCH_TO_NP[t.dtype]}


def _versions() -> dict[str, str]:
    """Library versions that wrote the bundle (the manifest's "exporter")."""
    import onnx
    import onnxruntime

    import edgelearn

    out = {"edgelearn": edgelearn.__version__, "torch": torch.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except ImportError:  # pragma: no cover - the dynamo exporter needs it anyway
        pass
    return out


@dataclass
class _Export:
    """One export in progress: the model, its graph names and the options of every step."""

    model: nn.Module
    example: tuple[torch.Tensor, ...]
    ref_out: tuple[torch.Tensor, ...]
    params: dict[str, torch.Tensor]
    chosen: set[str]
    in_names: list[str]
    out_names: list[str]
    task: str
    batch_sizes: list[int]
    atol: float
    rtol: float
    tflite_batch: int

    @property
    def param_names(self) -> set[str]:
        """Names of the model's parameters (the other `params` are buffers)."""
        return {n for n, _ in self.model.named_parameters()}


class _TapsGraph(NamedTuple):
    """model_taps.onnx as written (gm None when not): layer records, why not, the graph
    module returning (output, *taps), tap names in its return order."""

    records: list[dict[str, Any]]
    note: str | None
    gm: Any
    names: list[str]


def _check_options(formats: Sequence[str], task: str) -> None:
    """Refuse unknown formats, a bundle without ONNX and unknown tasks."""
    unknown = set(formats) - {"onnx", "tflite"}
    if unknown:
        raise ExportError(f"formats {sorted(unknown)} are not supported by this exporter yet")
    if "onnx" not in formats:
        raise ExportError(f"formats {list(formats)} lack 'onnx': every bundle carries the ONNX "
                          "model; use e.g. ('onnx', 'tflite')")
    if task not in ("classification", "regression"):
        raise ExportError(f"task must be classification or regression, not {task!r}")


def _io_names(job: _Export, input_names: Sequence[str] | None,
              output_names: Sequence[str] | None) -> None:
    """Set the graph input/output names of `job` (defaults "x"/"logits" or "output")."""
    n_in, n_out = len(job.example), len(job.ref_out)
    job.in_names = list(input_names or (["x"] if n_in == 1 else [f"x{i}" for i in range(n_in)]))
    default_out = ["logits"] if job.task == "classification" else ["output"]
    job.out_names = list(output_names or (default_out if n_out == 1 else
                                          [f"output{i}" for i in range(n_out)]))
    if len(job.in_names) != n_in or len(job.out_names) != n_out:
        raise ExportError("input_names/output_names do not match the model's inputs/outputs")
    for n in [*job.in_names, *job.out_names]:
        check_name(n, "input/output")
        if n in job.params:
            raise ExportError(f"input/output name {n!r} collides with a parameter name")


def _export_taps(job: _Export, tmp: Path, taps: bool | None) -> _TapsGraph:
    """Write model_taps.onnx when asked/possible (see `export_bundle`'s `taps`)."""
    if taps is False:
        return _TapsGraph([], None, None, [])
    try:
        if len(job.example) != 1 or len(job.out_names) != 1:
            raise TapsError("tpsgd taps need a single-input, single-output model")
        gm, records, tap_names = trace_layers(job.model, job.in_names[0])
        check_batch_first(gm.eval(), job.example, [*job.out_names, *tap_names])
        check_records(gm, job.example, records, [*job.out_names, *tap_names])
    except TapsError as e:
        if taps:
            raise
        return _TapsGraph([], str(e), None, [])
    io = {*job.in_names, *job.out_names}
    clash = (set(tap_names) & set(job.params)) | (set(tap_names) & io)
    if clash:
        raise ExportError(f"tap names {sorted(clash)} collide with parameter or I/O names")
    to_onnx(gm.eval(), job.example, job.params, job.in_names, [*job.out_names, *tap_names],
            tmp / "model_taps.onnx")
    for r in records:
        if r["head"]:
            r["preact"] = job.out_names[0]  # the head's pre-activation is the model output
    return _TapsGraph(records, None, gm, tap_names)


def _write_onnx_bundle(job: _Export, tmp: Path, taps: bool | None
                       ) -> tuple[dict[str, Any], _TapsGraph]:
    """Write model.onnx, the taps graph, the weights and the manifest (no parity yet)."""
    to_onnx(job.model, job.example, job.params, job.in_names, job.out_names, tmp / "model.onnx")
    tg = _export_taps(job, tmp, taps)
    specs = [ParamSpec(n, tuple(t.shape), "float32", n in job.chosen)
             for n, t in job.params.items()]
    ParamStore(specs, values={n: t.numpy() for n, t in job.params.items()}).save(tmp / WEIGHTS)
    roles = {"weights": WEIGHTS, "onnx": "model.onnx"}
    if tg.gm is not None:
        roles["onnx_taps"] = "model_taps.onnx"
    param_names = job.param_names
    manifest = new_manifest(
        task=job.task,
        inputs=[_spec_json(n, x, True) for n, x in zip(job.in_names, job.example, strict=True)],
        outputs=[_spec_json(n, y, True) for n, y in zip(job.out_names, job.ref_out, strict=True)],
        params=[param_entry(s, kind="parameter" if s.name in param_names else "buffer")
                for s in specs],
        layers=tg.records, files=file_entries(tmp, roles), exporter=_versions())
    write_manifest(tmp, manifest)
    return manifest, tg


def _check_onnx(job: _Export, tmp: Path, manifest: dict[str, Any], tg: _TapsGraph
                ) -> tuple[float, _TapsGraph]:
    """torch vs onnxruntime on model.onnx (weights live and baked) and the taps graph;
    records manifest["parity"]; returns the model's max abs error and the taps graph kept.

    A layer-taps graph that fails its parity, or none at all, is replaced by a head-only one
    found in model.onnx (`edgelearn.graph_taps`) when that passes its own check; the manifest's
    "taps_unsupported" says why the layer taps are missing."""
    par = parity_check(tmp, job.model, job.example, job.batch_sizes, atol=job.atol,
                       rtol=job.rtol)
    if not par.ok:
        raise ExportError(f"parity check failed: torch vs onnxruntime {par.describe()}; "
                          "no bundle written")
    manifest["parity"] = {"onnx": {**par.to_json(), "batch_sizes": list(job.batch_sizes)}}
    if tg.gm is not None:
        par_taps = parity_check(tmp, tg.gm, job.example, job.batch_sizes, graph="onnx_taps",
                                out_names=[*job.out_names, *tg.names], lives=("*",),
                                seed=2000, atol=job.atol, rtol=job.rtol)
        if par_taps.ok:
            manifest["parity"]["onnx_taps"] = par_taps.to_json()
            return par.max_abs_err, tg
        # the layer taps are left out, never the bundle: the head-only graph may still hold
        tg = _drop_taps(tmp, manifest, f"taps parity failed: torch vs onnxruntime "
                                       f"{par_taps.describe()}")
    if tg.note:  # (taps=False leaves no note: no taps graph of any kind)
        manifest["taps_unsupported"] = tg.note
        why = add_graph_taps(tmp, manifest, feeds=_example_feeds(job), atol=job.atol,
                             rtol=job.rtol)
        if why is not None:
            manifest["taps_unsupported"] = f"{tg.note}; head only: {why}"
    return par.max_abs_err, tg


def _drop_taps(tmp: Path, manifest: dict[str, Any], why: str) -> _TapsGraph:
    """Remove model_taps.onnx and the layer records from a bundle being written."""
    (tmp / "model_taps.onnx").unlink()
    del manifest["files"]["onnx_taps"]
    manifest["layers"] = []
    write_manifest(tmp, manifest)
    return _TapsGraph([], why, None, [])


def _example_feeds(job: _Export) -> dict[str, Any]:
    """The export example as device inputs (name -> numpy array)."""
    return {n: t.detach().cpu().numpy() for n, t in zip(job.in_names, job.example, strict=True)}


def _add_tflite_graphs(job: _Export, tmp: Path, manifest: dict[str, Any],
                       tg: _TapsGraph) -> float | None:
    """model.tflite + model_const.tflite, and model_taps.tflite with taps (tpSGD on LiteRT);
    returns the worst |torch - LiteRT| of the model, None when it could not be converted."""
    err = add_tflite(tmp, job.model, job.example, job.params, job.in_names, job.out_names,
                     manifest, batch=job.tflite_batch, parity_batch_sizes=job.batch_sizes,
                     atol=job.atol, rtol=job.rtol)
    if err is not None and tg.gm is None and "onnx_taps" in manifest["files"]:
        manifest["tflite_taps_skipped"] = ("the head-only taps graph is found in model.onnx: "
                                           "tpsgd runs on onnxruntime")
    if err is not None and tg.gm is not None:
        add_tflite_taps(tmp, tg.gm, job.example, job.params, job.in_names,
                        [*job.out_names, *tg.names], manifest, batch=job.tflite_batch,
                        parity_batch_sizes=job.batch_sizes, atol=job.atol, rtol=job.rtol)
    return err


def _summary(job: _Export, out_dir: Path, manifest: dict[str, Any], err: float
             ) -> dict[str, Any]:
    """The export summary (the CLI's --json object)."""
    optional = {"tflite_skipped": manifest.get("tflite_skipped"),
                "tflite_strategy": manifest.get("tflite", {}).get("strategy"),
                "tflite_taps_skipped": manifest.get("tflite_taps_skipped")}
    return {
        "bundle": str(out_dir),
        "params": sum(int(t.numel()) for t in job.params.values()),
        "trainable_params": sum(int(job.params[n].numel()) for n in job.chosen),
        "formats": ["onnx", "tflite"] if "tflite" in manifest["files"] else ["onnx"],
        "parity_max_abs_err": err,
        **{k: v for k, v in optional.items() if v is not None},
    }


def export_bundle(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    trainable: str | Sequence[str] = "*",
    formats: Sequence[str] = ("onnx",),
    task: str = "classification",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    parity_batch_sizes: Sequence[int] = (1, 3, 8),
    atol: float = ATOL,
    rtol: float = RTOL,
    overwrite: bool = False,
    taps: bool | None = None,
    tflite_batch: int = 32,
) -> dict[str, Any]:
    """Export `model` to a bundle directory; returns a summary (the CLI's --json object).

    Args:
        model: torch module (put in eval mode; dropout/batch-norm use inference behaviour).
        example_inputs: one tensor or a tuple, first dimension = batch (symbolic in the bundle).
        out_dir: bundle directory to create (must not exist unless `overwrite`).
        trainable: glob pattern(s) on parameter names marked trainable in the manifest
            (buffers such as BatchNorm running stats are never trainable).
        formats: model formats to write: "onnx" (always) and optionally "tflite" (litert-torch;
            a model it cannot convert ships ONNX only, with the reason in the manifest's
            "tflite_skipped" and the summary). With taps, "tflite" also writes
            model_taps.tflite (tpSGD on LiteRT; or "tflite_taps_skipped" says why not).
        task: "classification" (first output = logits) or "regression".
        input_names / output_names: graph names (default "x" / "logits" or "output").
        parity_batch_sizes: batch sizes for the torch vs onnxruntime parity check.
        atol / rtol: parity tolerance: every output o of every runtime must satisfy
            max|runtime - torch| <= atol + rtol * max|torch_o| (`edgelearn.parity`).
        overwrite: replace an existing bundle directory.
        taps: also write model_taps.onnx + manifest "layers" for tpSGD (export/taps.py).
            None = when the model's structure supports it (else the manifest says why not),
            True = required (raise TapsError otherwise), False = never.
        tflite_batch: the fixed batch of the TFLite graphs (the device pads / chunks).
    """
    check_tolerances(atol, rtol)
    _check_options(formats, task)
    out_dir = Path(out_dir)
    check_new_dir(out_dir, overwrite=overwrite, error=ExportError)
    model = model.eval()
    example = as_tuple(example_inputs)
    with torch.no_grad():
        ref_out = as_tuple(model(*example))
    params = collect_params(model)
    chosen = select_trainable(sorted(n for n, _ in model.named_parameters()), trainable)
    job = _Export(model, example, ref_out, params, chosen, [], [], task,
                  list(parity_batch_sizes), atol, rtol, tflite_batch)
    _io_names(job, input_names, output_names)
    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        manifest, tg = _write_onnx_bundle(job, tmp, taps)
        err, tg = _check_onnx(job, tmp, manifest, tg)
        if "tflite" in formats:
            tfl_err = _add_tflite_graphs(job, tmp, manifest, tg)
            err = max(err, tfl_err) if tfl_err is not None else err
        write_manifest(tmp, manifest)
        publish(tmp, out_dir)
    return _summary(job, out_dir, manifest, err)
