"""Export a torch model to TFLite with litert-torch (host side) for the device's `litert` backend.

Up to three flatbuffers go into the bundle, all with torch-layout parameters named like the torch
tensors (through `torch.func.functional_call`, as for ONNX):
  model.tflite        every parameter is a model input (set_tensor per forward: always
                      correct, but XNNPACK does not take ops whose weights are inputs)
  model_const.tflite  the same graph with every parameter a constant tensor whose bytes sit
                      at a recorded offset of the file, 64-byte aligned. The device patches
                      those bytes from the arena and re-creates an XNNPACK interpreter from the
                      in-memory model (XNNPACK packs constants when it is created, so patching
                      a live interpreter would be silently ignored).
  model_taps.tflite   (bundles with layer taps) tpSGD's taps graph (export/taps.py), returning
                      the model output and every tap, parameters as inputs like model.tflite;
                      the manifest's "tflite_taps" section maps each tap to its signature
                      output, and torch == LiteRT is checked on every tap before writing.
int8 bundles (export/quantize.py): each quantized weight W is an int8 input (or constant) and
W.scale a float32 one; the graph dequantizes in-graph, W = float(W) * W.scale[:, None, ...]
(litert-torch lowers it to CAST + RESHAPE + MUL), so the device binds the int8 arena as is.
litert-torch 0.10 cannot lower a symbolic batch dimension, and its graphs carry static reshape
shapes (resize_tensor_input fails for CNN/GRU/transformer), so every file has a fixed batch;
the device pads smaller batches and chunks larger ones (every zoo model is per-example in eval
mode, which the parity check over several batch sizes verifies).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgelearn.export.checks import parity_check
from edgelearn.export.common import ExportError, Functional, describe_error, with_batch
from torch import nn

from edgelearn.bundle import Bundle
from edgelearn.bundle_writer import add_file, write_manifest
from edgelearn.errors import EdgelearnError
from edgelearn.model import Model
from edgelearn.parity import ATOL, RTOL

TFLITE_ALIGN = 64
#: The litert weight strategies the exporter checks and times (the faster one is recorded).
STRATEGIES_HOST = ("inputs", "rebuild")


class TfliteExportError(EdgelearnError):
    """litert-torch cannot convert the model (the bundle then carries ONNX only)."""


def _import_litert_torch() -> Any:
    try:
        import litert_torch
    except ImportError as e:
        raise TfliteExportError(
            f"TFLite export needs litert-torch ({e}); pip install 'edgelearn[export-tflite]'"
        ) from None
    return litert_torch


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


class _Dequantized(nn.Module):
    """forward(*inputs, *params): functional_call with each int8 W read as float(W) * scale."""

    def __init__(self, model: nn.Module, names: list[str], n_inputs: int,
                 quant: dict[str, str]) -> None:
        super().__init__()
        self.model, self.names, self.n_inputs, self.quant = model, names, n_inputs, quant

    def forward(self, *args: torch.Tensor) -> Any:
        from torch.func import functional_call

        inputs, vals = args[: self.n_inputs], args[self.n_inputs :]
        ps = dict(zip(self.names, vals, strict=True))
        for w, s in self.quant.items():
            q, scale = ps[w], ps.pop(s)
            ps[w] = q.to(torch.float32) * scale.reshape(-1, *([1] * (q.ndim - 1)))
        return functional_call(self.model, ps, inputs)


def convert(model: nn.Module, example: tuple[torch.Tensor, ...],
            params: dict[str, torch.Tensor], *, batch: int,
            quant: dict[str, str] | None = None) -> bytes:
    """Flatbuffer of functional_call(model, params, inputs) with every parameter an input.

    Args:
        model: torch module in eval mode.
        example: example inputs (their batch dim is replaced by `batch`).
        params: parameter name -> tensor (float32; int8 for quantized weights), in the order
            they become inputs.
        batch: the fixed batch size of the TFLite graph.
        quant: int8 weight name -> its float32 scale parameter's name (both in `params`);
            None = a float model.
    Returns: the serialized model (signature "serving_default", inputs args_0..args_{n-1}).
    """
    litert_torch = _import_litert_torch()
    wrapper = (_Dequantized(model, list(params), len(example), quant) if quant else
               Functional(model, list(params), len(example))).eval()
    xs = tuple(with_batch(x, batch, 0) for x in example)
    try:
        # litert-torch prints progress on stdout; `export --json` owns stdout.
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            edge = litert_torch.convert(wrapper, (*xs, *params.values()))
            return bytes(edge.model_content())  # prints "Write Model to Bytes" too
    except Exception as e:  # the converter raises many types (jax, MLIR, torch.export)
        raise TfliteExportError(f"litert-torch cannot convert this model: "
                                f"{describe_error(e, limit=200)}") from e


def signature_io(model_bytes: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(signature input name -> tensor index, signature output name -> tensor index)."""
    schema = _schema()
    m = schema.Model.GetRootAs(model_bytes, 0)
    if m.SignatureDefsLength() != 1:
        raise TfliteExportError(f"expected one signature, the model has {m.SignatureDefsLength()}")
    sig = m.SignatureDefs(0)
    ins = {sig.Inputs(i).Name().decode(): sig.Inputs(i).TensorIndex()
           for i in range(sig.InputsLength())}
    outs = {sig.Outputs(i).Name().decode(): sig.Outputs(i).TensorIndex()
            for i in range(sig.OutputsLength())}
    return ins, outs


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class _AlignedBufferT:
    """A flatbuffer Buffer whose data vector starts on a TFLITE_ALIGN boundary."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def Pack(self, builder: Any) -> int:
        schema = _schema()
        n = len(self.data)
        builder.StartVector(1, n, TFLITE_ALIGN)
        builder.head -= n
        builder.Bytes[builder.head : builder.head + n] = self.data
        vec = builder.EndVector(n) if _end_vector_takes_len(builder) else builder.EndVector()
        schema.BufferStart(builder)
        schema.BufferAddData(builder, vec)
        return schema.BufferEnd(builder)


def _end_vector_takes_len(builder: Any) -> bool:
    import inspect

    return len(inspect.signature(builder.EndVector).parameters) >= 1


def bake_constants(model_bytes: bytes, values: dict[str, np.ndarray],
                   input_of: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The model with the inputs of `values` turned into constant tensors holding them.

    Args:
        model_bytes: flatbuffer whose parameters are signature inputs.
        values: parameter name -> array (torch layout and dtype, as the input expects).
        input_of: parameter name -> signature input name.
    Returns: (flatbuffer, parameter name -> (byte offset, nbytes) of its data in the file).
    """
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    sig = model.signatureDefs[0]
    sub = model.subgraphs[sig.subgraphIndex]
    by_name = {_text(tm.name): tm.tensorIndex for tm in sig.inputs}
    baked: dict[int, str] = {}
    for pname, arr in values.items():
        tidx = by_name[input_of[pname]]
        tensor = sub.tensors[tidx]
        if list(tensor.shape) != list(arr.shape):
            raise TfliteExportError(f"{pname!r}: TFLite input shape {list(tensor.shape)} != "
                                    f"{list(arr.shape)}")
        model.buffers.append(_AlignedBufferT(np.ascontiguousarray(arr).tobytes()))
        tensor.buffer = len(model.buffers) - 1
        baked[tidx] = pname
    sub.inputs = [i for i in sub.inputs if i not in baked]
    sig.inputs = [tm for tm in sig.inputs if tm.tensorIndex not in baked]
    builder = flatbuffers.Builder(1 << 16)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out = bytes(builder.Output())
    # Locate every baked buffer's data in the serialized file (absolute offsets).
    m = schema.Model.GetRootAs(out, 0)
    s = m.Subgraphs(sig.subgraphIndex)
    offsets: dict[str, tuple[int, int]] = {}
    for tidx, pname in baked.items():
        buf = m.Buffers(s.Tensors(tidx).Buffer())
        o = buf._tab.Offset(4)  # field `data`
        start, n = buf._tab.Vector(o), buf._tab.VectorLen(o)
        if start % TFLITE_ALIGN or out[start : start + n] != values[pname].tobytes():
            raise TfliteExportError(f"{pname!r}: baked weight bytes not found aligned in place")
        offsets[pname] = (start, n)
    return out, offsets


def write_tflite(model: nn.Module, example: tuple[torch.Tensor, ...],
                 params: dict[str, torch.Tensor], in_names: list[str], out_names: list[str],
                 out_dir: Path, *, batch: int,
                 quant: dict[str, str] | None = None) -> dict[str, Any]:
    """Write model.tflite and model_const.tflite into `out_dir`; returns the manifest section.

    The section maps bundle names to TFLite signature names: {"batch", "inputs": {data name:
    sig name}, "outputs": {...}, "params": {param name: sig name}, "const": {param name:
    [offset, nbytes]}}.
    """
    raw, section = _convert_mapped(model, example, params, in_names, out_names, batch=batch,
                                   quant=quant)
    const, offsets = bake_constants(raw, {n: t.numpy() for n, t in params.items()},
                                    section["params"])
    (out_dir / "model.tflite").write_bytes(raw)
    (out_dir / "model_const.tflite").write_bytes(const)
    return {**section, "const": {n: list(v) for n, v in offsets.items()}}


def _convert_mapped(model: nn.Module, example: tuple[torch.Tensor, ...],
                    params: dict[str, torch.Tensor], in_names: list[str], out_names: list[str],
                    *, batch: int, quant: dict[str, str] | None = None
                    ) -> tuple[bytes, dict[str, Any]]:
    """`convert`, then check and map its signature: (flatbuffer, {"batch", "inputs",
    "outputs", "params"}: bundle name -> signature name)."""
    raw = convert(model, example, params, batch=batch, quant=quant)
    ins, outs = signature_io(raw)
    n_in = len(example)
    input_of = {n: f"args_{n_in + j}" for j, n in enumerate(params)}
    data_of = {n: f"args_{i}" for i, n in enumerate(in_names)}
    missing = sorted((set(input_of.values()) | set(data_of.values())) - set(ins))
    if missing:
        raise TfliteExportError(f"the converted model lacks inputs {missing}")
    if len(outs) != len(out_names):
        raise TfliteExportError(f"the converted model has {len(outs)} outputs, "
                                f"expected {len(out_names)}")
    # litert-torch names the i-th returned tensor output_i; the parity check then confirms
    # every name maps to the tensor torch returns in that position.
    out_of = {n: f"output_{i}" for i, n in enumerate(out_names)}
    if set(out_of.values()) != set(outs):
        raise TfliteExportError(f"unexpected TFLite output names {sorted(outs)}")
    return raw, {"batch": batch, "inputs": data_of, "outputs": out_of, "params": input_of}


def _time_strategy(bundle_dir: Path, example: tuple[torch.Tensor, ...], strategy: str,
                   batch: int, reps: int) -> float:
    """Median ms of (perturb every weight in place, forward) on the device backend."""
    import time

    dev = Model(Bundle(bundle_dir), backend="litert", trainable="*", threads=1,
                backend_options={"strategy": strategy})
    feeds = {t.name: with_batch(x, batch, 7).numpy()
             for t, x in zip(dev.bundle.inputs, example, strict=True)}
    flat = dev.store.flat()
    times = []
    for i in range(reps + 1):
        flat[:1] += np.float32(1e-3 if i % 2 else -1e-3)  # a change: "rebuild" must rebuild
        t0 = time.perf_counter()
        dev.backend.forward(feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times[1:]))


def add_tflite(bundle_dir: Path, model: nn.Module, example: tuple[torch.Tensor, ...],
               params: dict[str, torch.Tensor], in_names: list[str], out_names: list[str],
               manifest: dict[str, Any], *, batch: int, parity_batch_sizes: list[int],
               atol: float = ATOL, rtol: float = RTOL, timing_reps: int = 10,
               quant: dict[str, str] | None = None,
               reference: nn.Module | None = None) -> float | None:
    """Add the TFLite files to a bundle being exported and update `manifest` in place.

    Conversion failures are recorded as manifest["tflite_skipped"] (the bundle keeps ONNX
    only) and return None; a parity failure raises (a converter that silently computes
    something else must not ship). Otherwise returns the worst |torch - LiteRT| over both
    strategies and `parity_batch_sizes` (plus one batch above the fixed TFLite batch, which
    runs chunked; tolerance atol + rtol * max|torch| per output, `edgelearn.parity`), and
    records which strategy was faster here. For an int8 bundle, `quant`
    maps each int8 weight to its scale parameter (see `convert`) and `reference` is the torch
    model the device must match (the fake-quantized one).
    """
    try:
        section = write_tflite(model, example, params, in_names, out_names, bundle_dir,
                               batch=batch, quant=quant)
    except TfliteExportError as e:
        for f in ("model.tflite", "model_const.tflite"):
            (bundle_dir / f).unlink(missing_ok=True)
        manifest["tflite_skipped"] = str(e)
        return None
    add_file(manifest, bundle_dir, "tflite", "model.tflite")
    add_file(manifest, bundle_dir, "tflite_const", "model_const.tflite")
    manifest["tflite"] = section
    manifest["exporter"]["litert_torch"] = _import_litert_torch().__version__
    write_manifest(bundle_dir, manifest)
    sizes = [*parity_batch_sizes, batch + 3]
    par = parity_check(bundle_dir, reference or model, example, sizes, backend="litert",
                       strategies=STRATEGIES_HOST, atol=atol, rtol=rtol)
    if not par.ok:
        raise ExportError(f"parity check failed: torch vs LiteRT {par.describe()}; no bundle "
                          "written (export with formats=('onnx',) to ship ONNX only)")
    ms = {s: _time_strategy(bundle_dir, example, s, batch, timing_reps) for s in STRATEGIES_HOST}
    section["strategy"] = {"choice": min(ms, key=ms.__getitem__), "forward_ms": ms,
                           "measured": f"exporter host, batch {batch}, 1 thread"}
    manifest["parity"]["tflite"] = {**par.to_json(), "batch_sizes": sizes}
    return par.max_abs_err


def add_tflite_taps(bundle_dir: Path, gm: nn.Module, example: tuple[torch.Tensor, ...],
                    params: dict[str, torch.Tensor], in_names: list[str], out_names: list[str],
                    manifest: dict[str, Any], *, batch: int, parity_batch_sizes: list[int],
                    atol: float = ATOL, rtol: float = RTOL) -> float | None:
    """Add model_taps.tflite (tpSGD's taps graph, every parameter an input) to a bundle being
    exported and update `manifest` in place.

    Args:
        bundle_dir: the (temporary) bundle directory.
        gm: the taps GraphModule of edgelearn.export.taps.trace_layers (returns (output, *taps)).
        example / params / in_names: as for `add_tflite`.
        out_names: the model output name(s), then every tap name, in gm's return order.
        manifest: the manifest being written (gets files["tflite_taps"], a "tflite_taps"
            section mapping every output/tap name to its signature output, and the parity).
        batch: fixed batch of the graph (the same as model.tflite's).
        parity_batch_sizes / atol / rtol: as for `add_tflite`.
    Returns the worst |torch - LiteRT| over every tap, or None when litert-torch cannot convert
    the taps graph or it fails its parity (the bundle then ships without it; the reason is in
    manifest["tflite_taps_skipped"]).
    """
    path = bundle_dir / "model_taps.tflite"
    try:
        raw, section = _convert_mapped(gm, example, params, in_names, out_names, batch=batch)
    except TfliteExportError as e:
        path.unlink(missing_ok=True)
        manifest["tflite_taps_skipped"] = str(e)
        return None
    path.write_bytes(raw)
    add_file(manifest, bundle_dir, "tflite_taps", path.name)
    manifest["tflite_taps"] = section
    write_manifest(bundle_dir, manifest)
    sizes = [*parity_batch_sizes, batch + 3]
    par = parity_check(bundle_dir, gm, example, sizes, backend="litert", graph="tflite_taps",
                       out_names=out_names, seed=3000, atol=atol, rtol=rtol)
    if not par.ok:  # the taps graph is left out, never the bundle (tpSGD then runs on ORT)
        path.unlink()
        del manifest["files"]["tflite_taps"], manifest["tflite_taps"]
        manifest["tflite_taps_skipped"] = f"taps parity failed: torch vs LiteRT {par.describe()}"
        write_manifest(bundle_dir, manifest)
        return None
    manifest["parity"]["tflite_taps"] = {**par.to_json(), "batch_sizes": sizes}
    return par.max_abs_err
