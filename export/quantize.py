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
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgelearn.export.onnx_export import ExportError, _as_tuple, export_bundle, parity_check
from torch import nn

from edgelearn.bundle import MANIFEST, Bundle, select_trainable, sha256_file
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.parity import ATOL, RTOL, check_tolerances, worst

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
    example = _as_tuple(example_inputs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    pats = [quantize] if isinstance(quantize, str) else list(quantize)
    qnames = [n for n, p in model.named_parameters()
              if p.ndim >= 2 and any(fnmatch.fnmatchcase(n, pat) for pat in pats)]
    if not qnames:
        raise ExportError(f"quantize pattern(s) {pats} match no >= 2-D parameter")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fp = tmp / "fp32"
        export_bundle(model, example, fp, task=task, parity_batch_sizes=parity_batch_sizes,
                      atol=atol, rtol=rtol)
        fb = Bundle(fp)
        manifest = json.loads((fp / MANIFEST).read_text())
        values = {n: np.array(v) for n, v in fb.load_store().state().items()}
        quant: dict[str, tuple[np.ndarray, np.ndarray]] = {
            n: quantize_per_channel(values[n]) for n in qnames}
        bundle_dir = tmp / "bundle"
        bundle_dir.mkdir()
        shutil.copy(fp / "model.onnx", bundle_dir / "model.onnx")
        _rewrite_qdq(bundle_dir / "model.onnx", qnames, {n: len(s) for n, (_, s) in
                                                          quant.items()})
        entries: list[dict[str, Any]] = []
        new_values: dict[str, np.ndarray] = {}
        for p in manifest["params"]:
            n = p["name"]
            if n in quant:
                q, s = quant[n]
                new_values[n], new_values[f"{n}.scale"] = q, s
                entries.append({**p, "dtype": "int8", "quant": {
                    "scale": s.tolist(), "zero_point": 0, "axis": 0, "scale_param": f"{n}.scale",
                    "scheme": "symmetric per-channel", "qmin": -QMAX, "qmax": QMAX}})
                entries.append({"name": f"{n}.scale", "shape": [len(s)], "dtype": "float32",
                                "trainable": False, "kind": "quant_scale",
                                "quant": {"role": "scale", "of": n}})
            else:
                new_values[n] = values[n]
                entries.append(p)
        chosen = select_trainable([e["name"] for e in entries], trainable)
        for e in entries:
            e["trainable"] = e["name"] in chosen and e.get("kind") != "buffer"
        specs = [ParamSpec(e["name"], tuple(e["shape"]), e["dtype"], e["trainable"])
                 for e in entries]
        ParamStore(specs, values=new_values).save(bundle_dir / "weights.safetensors")
        manifest["params"] = entries
        manifest["files"] = {
            role: {"path": f, "size": (bundle_dir / f).stat().st_size,
                   "sha256": sha256_file(bundle_dir / f)}
            for role, f in (("weights", "weights.safetensors"), ("onnx", "model.onnx"))}
        manifest["quantization"] = {"format": "onnx-qdq", "weights": "int8 symmetric "
                                    "per-channel (axis 0)", "activations": "float32"}
        manifest.pop("parity", None)
        (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        ref = fake_quant_model(model, {n: torch.from_numpy(s) for n, (_, s) in quant.items()})
        par = worst([parity_check(bundle_dir, ref, example, parity_batch_sizes, live=live,
                                  atol=atol, rtol=rtol, seed=2000) for live in ("*", "")])
        if not par.ok:
            raise ExportError(f"int8 parity check failed: torch fake-quant vs onnxruntime QDQ "
                              f"{par.describe()}; no bundle written")
        err = par.max_abs_err
        manifest["parity"] = {"onnx": {**par.to_json(), "reference":
                                       "torch fake_quantize_per_channel_affine",
                                       "batch_sizes": list(parity_batch_sizes)}}
        if "tflite" in formats:
            from edgelearn.export.tflite_export import add_tflite

            tfl_err = add_tflite(
                bundle_dir, model, example,
                {e["name"]: torch.from_numpy(new_values[e["name"]]) for e in entries},
                [t["name"] for t in manifest["inputs"]], [t["name"] for t in manifest["outputs"]],
                manifest, batch=tflite_batch, parity_batch_sizes=list(parity_batch_sizes),
                atol=atol, rtol=rtol, quant={n: f"{n}.scale" for n in qnames}, reference=ref)
            if tfl_err is not None:
                err = max(err, tfl_err)
                manifest["quantization"]["tflite"] = ("int8 weight inputs dequantized in-graph: "
                                                      "float(W) * W.scale (CAST + MUL)")
        (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.chmod(bundle_dir, 0o755)
        os.replace(bundle_dir, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "bundle": str(out_dir),
        "params": sum(int(v.size) for v in new_values.values()),
        "trainable_params": sum(int(new_values[n].size) for n in chosen),
        "quantized": qnames,
        "formats": ["onnx", "tflite"] if "tflite" in manifest["files"] else ["onnx"],
        "parity_max_abs_err": err,
        **({"tflite_skipped": manifest["tflite_skipped"]} if "tflite_skipped" in manifest
           else {}),
    }
