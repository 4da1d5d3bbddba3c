"""int8 export: a bundle whose weights are int8 graph inputs feeding ONNX DequantizeLinear (QDQ).

The float model is exported first (`export_bundle`, with its own torch vs onnxruntime parity),
then each selected weight W (>= 2-D, default every `*.weight`) is quantized symmetrically per
output channel (axis 0): s_c = max|W_c| / 127, q = clip(round(W / s_c), -127, 127) as int8,
zero point 0. In the graph, the float input W becomes an int8 input W (same torch name, so it
lives in the int8 arena and is bound zero-copy like any weight) and every consumer reads
`DequantizeLinear(W, W.scale, W.zero_point, axis=0)` instead. `W.scale` is itself a float32
parameter (graph input; baked as an initializer when frozen, trainable for zo-scale); the zero
point stays a graph constant. The manifest records for W: quant = {scale, zero_point, axis,
scale_param} and for W.scale: quant = {role: "scale", of: W}.

This is weight-only QDQ (activations stay float32): what on-device ZO training of int8 weights
needs. With formats ("onnx", "tflite") the bundle also carries int8 TFLite graphs
(export/tflite_export.py): W an int8 input dequantized in-graph as float(W) * W.scale. Parity
reference: the torch model with each W replaced by
`torch.fake_quantize_per_channel_affine(W, s, 0, 0, -127, 127)` (the exporter checks it; the
tests check outputs agree within one output quantization step).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgelearn.export.checks import parity_check
from edgelearn.export.common import ExportError, as_tuple
from edgelearn.export.onnx_export import export_bundle
from edgelearn.export.tflite_export import add_tflite
from torch import nn

from edgelearn.bundle import Bundle, select_trainable
from edgelearn.bundle_writer import (
    WEIGHTS,
    check_new_dir,
    file_entries,
    publish,
    read_manifest,
    staging_dir,
    write_manifest,
)
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.parity import ATOL, RTOL, check_tolerances

QMAX = 127


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 quantization.

    Args:
        w: float32 weight [C, ...].
    Returns: (q int8 [C, ...] in [-127, 127], scale float32 [C] > 0).
    """
    flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(flat > 0, flat / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -QMAX, QMAX)
    return q.astype(np.int8), scale


def fake_quant_model(model: nn.Module, scales: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` whose weights in `scales` are torch fake-quantized per channel."""
    import copy

    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, s in scales.items():
            p = ref.get_parameter(name)
            p.copy_(torch.fake_quantize_per_channel_affine(
                p, s, torch.zeros_like(s, dtype=torch.int32), 0, -QMAX, QMAX))
    return ref


def _rewrite_qdq(path: Path, names: Sequence[str], channels: dict[str, int]) -> None:
    """int8 inputs + DequantizeLinear for each weight in `names`; consumers read the dq value."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inputs = {i.name: i for i in g.input}
    for name in names:
        dq = f"{name}.dq"
        for node in g.node:
            for k, nm in enumerate(node.input):
                if nm == name:
                    node.input[k] = dq
        inputs[name].type.tensor_type.elem_type = TensorProto.INT8
        c = channels[name]
        g.input.append(helper.make_tensor_value_info(f"{name}.scale", TensorProto.FLOAT, [c]))
        g.initializer.append(numpy_helper.from_array(np.zeros(c, np.int8), f"{name}.zero_point"))
        g.node.insert(0, helper.make_node("DequantizeLinear",
                                          [name, f"{name}.scale", f"{name}.zero_point"], [dq],
                                          name=f"{name}.dequantize", axis=0))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


@dataclass
class _Int8:
    """An int8 bundle being written: its manifest and weights, and the quantized weights."""

    manifest: dict[str, Any]
    values: dict[str, np.ndarray]
    chosen: set[str]
    scales: dict[str, np.ndarray]


def _quantized_names(model: nn.Module, quantize: str | Sequence[str]) -> list[str]:
    """The >= 2-D parameters matching the glob(s) `quantize`."""
    pats = [quantize] if isinstance(quantize, str) else list(quantize)
    qnames = [n for n, p in model.named_parameters()
              if p.ndim >= 2 and any(fnmatch.fnmatchcase(n, pat) for pat in pats)]
    if not qnames:
        raise ExportError(f"quantize pattern(s) {pats} match no >= 2-D parameter")
    return qnames


def _int8_params(params: list[dict[str, Any]], quant: dict[str, tuple[np.ndarray, np.ndarray]],
                 values: dict[str, np.ndarray]
                 ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Manifest entries and values of the int8 bundle: each quantized W becomes int8 (with
    its quant record) followed by its float32 `W.scale`; other parameters are unchanged."""
    entries: list[dict[str, Any]] = []
    new_values: dict[str, np.ndarray] = {}
    for p in params:
        n = p["name"]
        if n not in quant:
            new_values[n] = values[n]
            entries.append(p)
            continue
        q, s = quant[n]
        new_values[n], new_values[f"{n}.scale"] = q, s
        entries.append({**p, "dtype": "int8", "quant": {
            "scale": s.tolist(), "zero_point": 0, "axis": 0, "scale_param": f"{n}.scale",
            "scheme": "symmetric per-channel", "qmin": -QMAX, "qmax": QMAX}})
        entries.append({"name": f"{n}.scale", "shape": [len(s)], "dtype": "float32",
                        "trainable": False, "kind": "quant_scale",
                        "quant": {"role": "scale", "of": n}})
    return entries, new_values


def _write_int8(fp: Path, bundle_dir: Path, qnames: list[str],
                trainable: str | Sequence[str]) -> _Int8:
    """Write the int8 bundle (QDQ model.onnx, weights, manifest without parity) into
    `bundle_dir` from the float32 bundle `fp`."""
    manifest = read_manifest(fp)
    values = {n: np.array(v) for n, v in Bundle(fp).load_store().state().items()}
    quant = {n: quantize_per_channel(values[n]) for n in qnames}
    bundle_dir.mkdir()
    shutil.copy(fp / "model.onnx", bundle_dir / "model.onnx")
    _rewrite_qdq(bundle_dir / "model.onnx", qnames, {n: len(s) for n, (_, s) in quant.items()})
    entries, new_values = _int8_params(manifest["params"], quant, values)
    chosen = select_trainable([e["name"] for e in entries], trainable)
    for e in entries:
        e["trainable"] = e["name"] in chosen and e.get("kind") != "buffer"
    specs = [ParamSpec(e["name"], tuple(e["shape"]), e["dtype"], e["trainable"])
             for e in entries]
    ParamStore(specs, values=new_values).save(bundle_dir / WEIGHTS)
    manifest["params"] = entries
    manifest["files"] = file_entries(bundle_dir, {"weights": WEIGHTS, "onnx": "model.onnx"})
    manifest["quantization"] = {"format": "onnx-qdq", "weights": "int8 symmetric "
                                "per-channel (axis 0)", "activations": "float32"}
    manifest.pop("parity", None)
    write_manifest(bundle_dir, manifest)
    return _Int8(manifest, new_values, chosen, {n: s for n, (_, s) in quant.items()})


def _add_int8_tflite(bundle_dir: Path, model: nn.Module, example: tuple[torch.Tensor, ...],
                     q: _Int8, ref: nn.Module, *, batch: int, batch_sizes: list[int],
                     atol: float, rtol: float) -> float | None:
    """The int8 TFLite graphs (`add_tflite` with in-graph dequantization); returns the worst
    |torch fake-quant - LiteRT|, None when litert-torch cannot convert the model."""
    m = q.manifest
    err = add_tflite(
        bundle_dir, model, example, {e["name"]: torch.from_numpy(q.values[e["name"]])
                                     for e in m["params"]},
        [t["name"] for t in m["inputs"]], [t["name"] for t in m["outputs"]], m, batch=batch,
        parity_batch_sizes=batch_sizes, atol=atol, rtol=rtol,
        quant={n: f"{n}.scale" for n in q.scales}, reference=ref)
    if err is not None:
        m["quantization"]["tflite"] = ("int8 weight inputs dequantized in-graph: "
                                       "float(W) * W.scale (CAST + MUL)")
    return err


def export_int8_bundle(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    quantize: str | Sequence[str] = "*.weight",
    trainable: str | Sequence[str] = "*",
    task: str = "classification",
    parity_batch_sizes: Sequence[int] = (1, 3, 8),
    atol: float = ATOL,
    rtol: float = RTOL,
    overwrite: bool = False,
    formats: Sequence[str] = ("onnx",),
    tflite_batch: int = 32,
) -> dict[str, Any]:
    """Export `model` with int8 QDQ weights; returns the export summary (+ "quantized").

    Args:
        model: torch module (eval mode is set).
        example_inputs: example batch (first dim = batch).
        out_dir: bundle directory to create.
        quantize: glob(s) of >= 2-D parameters to quantize (matching 1-D ones are skipped).
        trainable: glob(s) over the bundle's parameter names (including the `W.scale` ones)
            marked trainable in the manifest.
        task: "classification" or "regression".
        parity_batch_sizes: batch sizes of the parity check.
        atol / rtol: per output, |torch fake-quant - runtime int8| <= atol + rtol * max|torch|
            (`edgelearn.parity`; the float export and the TFLite graphs use the same).
        overwrite: replace an existing bundle.
        formats: "onnx" (always) and optionally "tflite" (int8 inputs dequantized in-graph; a
            model litert-torch cannot convert ships ONNX only, reason in "tflite_skipped").
        tflite_batch: the fixed batch of the TFLite graphs (the device pads / chunks).
    """
    check_tolerances(atol, rtol)
    if set(formats) - {"onnx", "tflite"} or "onnx" not in formats:
        raise ExportError(f"formats {list(formats)}: int8 bundles support ('onnx',) or "
                          "('onnx', 'tflite')")
    model = model.eval()
    example = as_tuple(example_inputs)
    out_dir = Path(out_dir)
    check_new_dir(out_dir, overwrite=overwrite, error=ExportError)
    qnames = _quantized_names(model, quantize)
    sizes = list(parity_batch_sizes)
    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        export_bundle(model, example, tmp / "fp32", task=task, parity_batch_sizes=sizes,
                      atol=atol, rtol=rtol)
        bundle_dir = tmp / "bundle"
        q = _write_int8(tmp / "fp32", bundle_dir, qnames, trainable)
        ref = fake_quant_model(model, {n: torch.from_numpy(s) for n, s in q.scales.items()})
        par = parity_check(bundle_dir, ref, example, sizes, seed=2000, atol=atol, rtol=rtol)
        if not par.ok:
            raise ExportError(f"int8 parity check failed: torch fake-quant vs onnxruntime QDQ "
                              f"{par.describe()}; no bundle written")
        err = par.max_abs_err
        q.manifest["parity"] = {"onnx": {**par.to_json(), "reference":
                                         "torch fake_quantize_per_channel_affine",
                                         "batch_sizes": sizes}}
        if "tflite" in formats:
            tfl_err = _add_int8_tflite(bundle_dir, model, example, q, ref, batch=tflite_batch,
                                       batch_sizes=sizes, atol=atol, rtol=rtol)
            err = max(err, tfl_err) if tfl_err is not None else err
        write_manifest(bundle_dir, q.manifest)
        publish(bundle_dir, out_dir)
    return {
        "bundle": str(out_dir),
        "params": sum(int(v.size) for v in q.values.values()),
        "trainable_params": sum(int(q.values[n].size) for n in q.chosen),
        "quantized": qnames,
        "formats": ["onnx", "tflite"] if "tflite" in q.manifest["files"] else ["onnx"],
        "parity_max_abs_err": err,
        **({"tflite_skipped": q.manifest["tflite_skipped"]}
           if "tflite_skipped" in q.manifest else {}),
    }
