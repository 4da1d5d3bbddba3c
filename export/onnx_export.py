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

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from edgelearn.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, select_trainable, sha256_file
from edgelearn.errors import EdgelearnError
from edgelearn.model import Model
from edgelearn.params import ParamSpec, ParamStore, check_name
from edgelearn.parity import ATOL, RTOL, Parity, check_tolerances, compare, worst

BATCH = "batch"
_TORCH_TO_NP = {torch.float32: "float32", torch.int8: "int8", torch.int32: "int32",
                torch.int64: "int64", torch.uint8: "uint8", torch.bool: "bool"}


class ExportError(EdgelearnError):
    """The model cannot be exported faithfully (unsupported op, parity mismatch, ...)."""


class _Functional(nn.Module):
    """forward(*inputs, *params) = functional_call(model, params, inputs)."""

    def __init__(self, model: nn.Module, names: list[str], n_inputs: int):
        super().__init__()
        self.model = model
        self.names = names
        self.n_inputs = n_inputs

    def forward(self, *args: torch.Tensor) -> Any:
        inputs, params = args[: self.n_inputs], args[self.n_inputs :]
        return functional_call(self.model, dict(zip(self.names, params, strict=False)), inputs)


def collect_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers by torch name (tied parameters appear once)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        out[name] = p.detach()
    for name, b in model.named_buffers():
        if b.is_floating_point():
            out[name] = b.detach()
    for name, t in out.items():
        check_name(name)
        if t.dtype != torch.float32:
            raise ExportError(f"parameter {name!r} is {t.dtype}; export float32 models")
    return out


def _as_tuple(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _with_batch(x: torch.Tensor, b: int, seed: int) -> torch.Tensor:
    """A random tensor like `x` with batch size `b` (same dtype, value scale ~ N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    if x.is_floating_point():
        return torch.randn((b, *x.shape[1:]), generator=g, dtype=x.dtype)
    hi = int(x.max().item()) + 1 if x.numel() else 2
    return torch.randint(0, max(hi, 2), (b, *x.shape[1:]), generator=g, dtype=x.dtype)


def _to_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
             input_names: list[str], output_names: list[str], path: Path) -> None:
    import onnx

    names = list(params)
    wrapper = _Functional(model, names, len(inputs)).eval()
    # torch.export specializes size-1 dims, so trace with a batch of at least 2.
    trace_inputs = tuple(_with_batch(x, max(2, x.shape[0]), 0) for x in inputs)
    batch = torch.export.Dim(BATCH, min=1, max=1 << 20)
    dynamic = tuple({0: batch} for _ in inputs) + tuple(None for _ in names)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, (*trace_inputs, *params.values()),
                                     dynamic_shapes=(dynamic,))
            torch.onnx.export(ep, (), str(path), input_names=[*input_names, *names],
                              output_names=output_names, dynamo=True, optimize=False,
                              external_data=False, verbose=False)
    except Exception as e:  # torch.export / onnx exporter raise many types
        raise ExportError(f"torch -> ONNX export failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    m = onnx.load(str(path))
    for vi in [*m.graph.input, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and vi.name not in params and dims[0].dim_param:
            dims[0].dim_param = BATCH
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
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _spec_json(name: str, t: torch.Tensor, dynamic: bool) -> dict[str, Any]:
    if t.dtype not in _TORCH_TO_NP:
        raise ExportError(f"{name!r} has dtype {t.dtype}, which bundles do not support")
    shape: list[int | str] = list(t.shape)
    if dynamic:
        shape[0] = BATCH
    return {"name": name, "shape": shape, "dtype": _TORCH_TO_NP[t.dtype]}


def _versions() -> dict[str, str]:
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


def torch_parity(run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                 reference: nn.Module, example: tuple[torch.Tensor, ...],
                 in_names: Sequence[str], out_names: Sequence[str],
                 batch_sizes: Sequence[int], *, seed: int, where: str, atol: float = ATOL,
                 rtol: float = RTOL) -> Parity:
    """A device run vs torch on random inputs of several batch sizes (`edgelearn.parity`).

    Args:
        run: device forward, input name -> array in, output name -> array out.
        reference: the torch module the device must match (eval mode); returns the outputs
            in `out_names` order.
        example: example inputs (dtype/shape template, batch first).
        in_names / out_names: the bundle's input and output names.
        batch_sizes: batch sizes to try; batch i draws its inputs from seed `seed + i`.
        where: what runs (e.g. "onnxruntime, weights live"), for the error message.
        atol / rtol: per output, |device - torch| <= atol + rtol * max|torch|.
    """
    results = []
    for i, b in enumerate(batch_sizes):
        xs = tuple(_with_batch(x, b, seed + i) for x in example)
        with torch.no_grad():
            ref = _as_tuple(reference(*xs))
        got = run({n: x.numpy() for n, x in zip(in_names, xs, strict=True)})
        at = f"{where}, batch {b}"
        if len(ref) != len(out_names):
            results.append(Parity(False, float("inf"), atol, rtol, where=at, problem=(
                f"torch returned {len(ref)} outputs, the bundle names {len(out_names)}")))
        want = {n: r.numpy() for n, r in zip(out_names, ref, strict=False)}
        results.append(compare(got, want, atol=atol, rtol=rtol, where=at))
    return worst(results, atol=atol, rtol=rtol)


def parity_check(bundle_dir: Path, model: nn.Module, example: tuple[torch.Tensor, ...],
                 batch_sizes: Sequence[int], *, live: str | None, backend: str = "onnxruntime",
                 backend_options: dict[str, Any] | None = None, atol: float = ATOL,
                 rtol: float = RTOL, seed: int = 1000) -> Parity:
    """torch vs a device backend over random inputs of several batch sizes.

    Args:
        bundle_dir: the (temporary) bundle directory.
        model: the torch model (reference) in eval mode.
        example: example inputs (dtype/shape template).
        batch_sizes: batch sizes to try.
        live: trainable glob for the device session ("*" = all weights live inputs,
            "" = all baked).
        backend / backend_options: the device backend to compare ("onnxruntime", "litert").
        atol / rtol: tolerance per output, see `edgelearn.parity.compare`.
        seed: seed of the first batch's random inputs.
    """
    bundle = Bundle(bundle_dir)
    dev = Model(bundle, backend=backend, trainable=live, threads=1,
                backend_options=backend_options)
    how = (backend_options or {}).get("strategy")
    where = f"{backend}{f' {how}' if how else ''}, weights {'live' if live else 'baked'}"
    return torch_parity(dev.backend.forward, model, example, [t.name for t in bundle.inputs],
                        [t.name for t in bundle.outputs], batch_sizes, seed=seed, where=where,
                        atol=atol, rtol=rtol)


def _export_taps(model: nn.Module, example: tuple[torch.Tensor, ...],
                 params: dict[str, torch.Tensor], in_names: list[str], out_names: list[str],
                 tmp: Path, taps: bool | None
                 ) -> tuple[list[dict[str, Any]], str | None, Any, list[str]]:
    """Write model_taps.onnx when asked/possible; returns (layer records, reason if not, gm,
    tap names in gm's return order after the model output)."""
    from edgelearn.export.taps import TapsError, check_batch_first, trace_layers

    if taps is False:
        return [], None, None, []
    try:
        if len(example) != 1 or len(out_names) != 1:
            raise TapsError("tpsgd taps need a single-input, single-output model")
        gm, records, tap_names = trace_layers(model, in_names[0])
        check_batch_first(gm.eval(), example, [*out_names, *tap_names])
    except TapsError as e:
        if taps:
            raise
        return [], str(e), None, []
    clash = (set(tap_names) & set(params)) | (set(tap_names) & {*in_names, *out_names})
    if clash:
        raise ExportError(f"tap names {sorted(clash)} collide with parameter or I/O names")
    _to_onnx(gm.eval(), example, params, in_names, [*out_names, *tap_names],
             tmp / "model_taps.onnx")
    for r in records:
        if r["head"]:
            r["preact"] = out_names[0]  # the head's pre-activation is the model output
    return records, None, gm, tap_names


def taps_parity_check(bundle_dir: Path, gm: nn.Module, example: tuple[torch.Tensor, ...],
                      batch_sizes: Sequence[int], *, atol: float = ATOL,
                      rtol: float = RTOL) -> Parity:
    """torch vs onnxruntime over every output of the taps graph (all weights live)."""
    from edgelearn.backends.ort import OrtBackend

    bundle = Bundle(bundle_dir)
    store = bundle.load_store(trainable="*")
    dev = OrtBackend(bundle, graph="onnx_taps", threads=1)
    dev.bind(store)
    names = [o.name for o in dev.session.get_outputs()]
    return torch_parity(dev.forward, gm, example, [t.name for t in bundle.inputs], names,
                        batch_sizes, seed=2000, where="onnxruntime taps graph", atol=atol,
                        rtol=rtol)


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
    unknown = set(formats) - {"onnx", "tflite"}
    if unknown:
        raise ExportError(f"formats {sorted(unknown)} are not supported by this exporter yet")
    if "onnx" not in formats:
        raise ExportError(f"formats {list(formats)} lack 'onnx': every bundle carries the ONNX "
                          "model; use e.g. ('onnx', 'tflite')")
    if task not in ("classification", "regression"):
        raise ExportError(f"task must be classification or regression, not {task!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    model = model.eval()
    example = _as_tuple(example_inputs)
    params = collect_params(model)
    param_names = {n for n, _ in model.named_parameters()}
    chosen = select_trainable(sorted(param_names), trainable)
    in_names = list(input_names or (["x"] if len(example) == 1 else
                                    [f"x{i}" for i in range(len(example))]))
    with torch.no_grad():
        ref_out = _as_tuple(model(*example))
    default_out = ["logits"] if task == "classification" else ["output"]
    out_names = list(output_names or (default_out if len(ref_out) == 1 else
                                      [f"output{i}" for i in range(len(ref_out))]))
    if len(in_names) != len(example) or len(out_names) != len(ref_out):
        raise ExportError("input_names/output_names do not match the model's inputs/outputs")
    for n in [*in_names, *out_names]:
        check_name(n, "input/output")
        if n in params:
            raise ExportError(f"input/output name {n!r} collides with a parameter name")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _to_onnx(model, example, params, in_names, out_names, tmp / "model.onnx")
        layers, taps_note, taps_gm, tap_names = _export_taps(model, example, params, in_names,
                                                             out_names, tmp, taps)
        specs = [ParamSpec(n, tuple(t.shape), "float32", n in chosen) for n, t in params.items()]
        store = ParamStore(specs, values={n: t.numpy() for n, t in params.items()})
        store.save(tmp / "weights.safetensors")
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": task,
            "inputs": [_spec_json(n, x, True) for n, x in zip(in_names, example, strict=False)],
            "outputs": [_spec_json(n, y, True) for n, y in zip(out_names, ref_out, strict=False)],
            "params": [
                {"name": s.name, "shape": list(s.shape), "dtype": s.dtype,
                 "trainable": s.trainable, "kind": "parameter" if s.name in param_names
                 else "buffer"}
                for s in specs
            ],
            "layers": layers,
            "files": {
                role: {"path": fname, "size": (tmp / fname).stat().st_size,
                       "sha256": sha256_file(tmp / fname)}
                for role, fname in (("weights", "weights.safetensors"), ("onnx", "model.onnx"),
                                    ("onnx_taps", "model_taps.onnx"))
                if (tmp / fname).is_file()
            },
            "exporter": _versions(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        par = worst([parity_check(tmp, model, example, parity_batch_sizes, live=live,
                                  atol=atol, rtol=rtol) for live in ("*", "")])
        if not par.ok:
            raise ExportError(f"parity check failed: torch vs onnxruntime {par.describe()}; "
                              "no bundle written")
        err = par.max_abs_err
        manifest["parity"] = {"onnx": {**par.to_json(),
                                       "batch_sizes": list(parity_batch_sizes)}}
        if taps_note:
            manifest["taps_unsupported"] = taps_note
        if taps_gm is not None:
            par_taps = taps_parity_check(tmp, taps_gm, example, parity_batch_sizes, atol=atol,
                                         rtol=rtol)
            if not par_taps.ok:
                raise ExportError(f"taps parity failed: torch vs onnxruntime "
                                  f"{par_taps.describe()}; no bundle written")
            manifest["parity"]["onnx_taps"] = par_taps.to_json()
        tfl_err = None
        if "tflite" in formats:
            from edgelearn.export.tflite_export import add_tflite

            tfl_err = add_tflite(tmp, model, example, params, in_names, out_names, manifest,
                                 batch=tflite_batch, parity_batch_sizes=list(parity_batch_sizes),
                                 atol=atol, rtol=rtol)
            if tfl_err is not None:
                err = max(err, tfl_err)
            if tfl_err is not None and taps_gm is not None:  # tpSGD on the LiteRT backend
                from edgelearn.export.tflite_export import add_tflite_taps

                add_tflite_taps(tmp, taps_gm, example, params, in_names,
                                [*out_names, *tap_names], manifest, batch=tflite_batch,
                                parity_batch_sizes=list(parity_batch_sizes), atol=atol,
                                rtol=rtol)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a bundle is meant to be copied and shared
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(int(t.numel()) for t in params.values())
    return {
        "bundle": str(out_dir),
        "params": total,
        "trainable_params": sum(int(params[n].numel()) for n in chosen),
        "formats": ["onnx", "tflite"] if "tflite" in manifest["files"] else ["onnx"],
        "parity_max_abs_err": err,
        **({"tflite_skipped": manifest["tflite_skipped"]} if "tflite_skipped" in manifest
           else {}),
        **({"tflite_strategy": manifest["tflite"]["strategy"]} if "tflite" in manifest
           else {}),
        **({"tflite_taps_skipped": manifest["tflite_taps_skipped"]}
           if "tflite_taps_skipped" in manifest else {}),
    }
