"""What a bundle can be trained with: optimizers and backends it supports, and why not.

Read from the manifest alone (no runtime is imported; a bundle without layer records has its
model.onnx parsed for its linear head where onnx is installed): which graphs the exporter
wrote and, for those it left out, the reason it recorded (`taps_unsupported`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle


def _reason(bundle: Bundle, key: str, default: str) -> str:
    why = bundle.manifest.get(key)
    return str(why) if why else default


def backend_support(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """backend -> {"supported", "model" (file) or "why"} for onnxruntime and litert."""
    res: dict[str, dict[str, Any]] = {"onnxruntime": (
        {"supported": True, "model": "model.onnx"} if "onnx" in bundle.files else
        {"supported": False, "why": "no model.onnx"})}
    if "tflite" in bundle.files:
        sec = bundle.manifest.get("tflite") or {}
        res["litert"] = {"supported": True, "model": "model.tflite",
                         "strategy": (sec.get("strategy") or {}).get("choice"),
                         "tflite_batch": sec.get("batch")}
    else:
        res["litert"] = {"supported": False, "why": "no model.tflite (" + _reason(
            bundle, "tflite_skipped", "exported without --formats onnx,tflite") + ")"}
    return res


def _tpsgd(bundle: Bundle) -> dict[str, Any]:
    if "onnx_taps" not in bundle.files:
        return {"supported": False, "why": "no taps graph (" + _reason(
            bundle, "taps_unsupported", "exported without taps") + ")"}
    res: dict[str, Any] = {"supported": True, "backends": ["onnxruntime"],
                           "how": "one taps-graph forward per step"}
    if bundle.manifest.get("taps_from"):  # head-only taps found in the ONNX graph
        head = ((bundle.manifest.get("layers") or [{}])[-1].get("params") or {}).values()
        res.update(how=f"one taps-graph forward per step ({bundle.manifest['taps_from']}): "
                       f"exact update of {', '.join(head)}",
                   layers_why=_reason(bundle, "taps_unsupported", "prepared ONNX model"))
    if "tflite_taps" in bundle.files:
        res["backends"].append("litert")
    elif "tflite" in bundle.files:
        res["litert_why"] = "no model_taps.tflite (" + _reason(
            bundle, "tflite_taps_skipped", "exported before TFLite taps graphs") + ")"
    return res


def _polystep(bundle: Bundle) -> dict[str, Any]:
    res: dict[str, Any] = {"supported": True}
    if "onnx_population" in bundle.files:
        params = (bundle.manifest.get("population") or {}).get("params") or []
        res.update(fast_path=True, population_params=list(params),
                   how="fast path on onnxruntime: model_pop.onnx scores a step's candidates "
                       f"in one call when exactly {', '.join(params)} train")
    else:
        res.update(fast_path=False, how="one forward per candidate",
                   why_no_fast_path="no model_pop.onnx (edgelearn.export.population."
                                    "add_population_graph writes one)")
    return res


def _zo_scale(bundle: Bundle) -> dict[str, Any]:
    scales = [p.name for p in bundle.params if (p.quant or {}).get("role") == "scale"]
    if not scales:
        return {"supported": False, "why": "no int8 weights with quantization scales ("
                "export --quantize int8 writes them; prepare finds them in int8 models)"}
    return {"supported": True, "how": f"trains the {len(scales)} quantization scale tensors"}


def _hybrid(bundle: Bundle) -> dict[str, Any]:
    taps = _tpsgd(bundle)
    if not taps["supported"]:
        return taps
    return {**taps, "how": "exact updates where the taps reach, ZO on the other weights, two "
                           "taps-graph forwards per step"}


def _float_zo(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """The loss-only ZO optimizers over float32 weights (any graph)."""
    if not any(p.dtype == "float32" for p in bundle.params):
        return {n: {"supported": False, "why": "no float32 parameters"}
                for n in ("zo-sgd", "adamezo", "fzoo", "lozo", "zo-gn")}
    params = (bundle.manifest.get("population") or {}).get("params") or []
    pop = f"one model_pop.onnx call when exactly {', '.join(params)} train" \
        if "onnx_population" in bundle.files else "no model_pop.onnx: one forward each"
    return {
        "zo-sgd": {"supported": True, "how": "two forwards per probe, any graph"},
        "adamezo": {"supported": True, "how": "two forwards per probe, any graph"},
        "fzoo": {"supported": True, "how": f"K + 1 forwards per step ({pop})"},
        "lozo": {"supported": True, "how": "two forwards per step: one stacked run of a "
                 "low-rank graph on onnxruntime where the perturbed weights feed MatMul/Gemm, "
                 "dense probes elsewhere; in a run the update passes over the weights once "
                 "every nu steps"},
        "zo-gn": {"supported": True, "how": f"K + 2 forwards per step (K + 1 outputs in {pop}"
                  "); losses cross-entropy and mse"},
    }


def _zo_readout(bundle: Bundle) -> dict[str, Any]:
    from edgelearn.graph_taps import head_layers
    from edgelearn.optim.zo_readout import readable_head

    head = readable_head(head_layers(bundle), bundle.outputs[0].name)
    if isinstance(head, str):
        return {"supported": False, "why": head}
    return {"supported": True, "how": "K + 1 forwards per step (one population request); "
            f"trains the linear head alone ({', '.join(head.params.values())}); losses "
            "cross-entropy and mse"}


def optimizer_support(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """optimizer -> {"supported", "how" | "why", ...} for every registered optimizer.

    Args:
        bundle: a loaded bundle (only its manifest and file list are read).
    """
    from edgelearn.optim import REGISTRY

    known = {
        **_float_zo(bundle),
        "tpsgd": _tpsgd(bundle),
        "hybrid": _hybrid(bundle),
        "polystep": _polystep(bundle),
        "zo-scale": _zo_scale(bundle),
        "zo-readout": _zo_readout(bundle),
    }
    return {name: known.get(name, {"supported": None, "why": "not described"})
            for name in sorted(REGISTRY)}


def bundle_support(bundle: Bundle) -> dict[str, Any]:
    """{"optimizers": optimizer_support, "backends": backend_support} of a bundle."""
    return {"optimizers": optimizer_support(bundle), "backends": backend_support(bundle)}


def describe(bundle: Bundle) -> dict[str, Any]:
    """What a bundle holds and can train with: `Bundle.info()` plus "support"
    (`bundle_support`) and "files_mb" (file name -> size in MiB); the `info --json` object.

    Unstable (`el.describe`): the keys follow `edgelearn info --json` and may grow.

    Args:
        bundle: a loaded bundle.
    """
    info = bundle.info()
    info["support"] = bundle_support(bundle)
    info["files_mb"] = {p.name: p.stat().st_size / (1 << 20) for p in bundle.files.values()}
    return info
