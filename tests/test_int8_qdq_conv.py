"""A QDQ conv net quantized by onnxruntime (uint8 activations, int8 per-channel weights) with its
scales trainable: prepare's parity holds, zo-scale trains the scales, replay is bit-exact and
bake writes a model that computes what was trained.

Why this needed care: with its scales constant onnxruntime fuses DQ -> Conv -> Q into
QLinearConv; with the scales as graph inputs (a prepared bundle's live parameters) it runs
DequantizeLinear and a float Conv. On x64 CPUs without VNNI the fused u8s8 kernel sums u8 x s8
pairs in saturating int16 (measured here: 1.05 off on outputs of 4.6); every edgelearn session
sets `session.x64quantprecision` (`edgelearn.backends.ort_graph.SESSION_CONFIG`), and the two
paths then agree. Generated models and data only: no torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sessions import replay_journal, train

from edgelearn.backends.ort_graph import SESSION_CONFIG
from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.model import Model
from edgelearn.parity import tolerance
from edgelearn.prepare import bake_bundle, list_params, prepare_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")
onnx = pytest.importorskip("onnx")


def conv_qdq(tmp: Path, *, seed: int = 0) -> Path:
    """Conv(3 -> 8, 3x3) + Relu quantized static QDQ from random calibration data."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp / "conv.onnx"))
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": x[i : i + 8]} for i in range(0, 32, 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(tmp / "conv.onnx"), str(tmp / "q.onnx"), Reader(),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    return tmp / "q.onnx"


def _run(path: Path, feeds: dict[str, np.ndarray], config: dict[str, str]) -> np.ndarray:
    so = ort.SessionOptions()
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_fused_int8_conv_equals_the_float_path_with_edgelearns_session_config(tmp_path) -> None:
    """The cause, pinned: the fused kernel (scales constant) and DequantizeLinear + float Conv
    (what live scales run) agree once x64quantprecision is set, on every CPU."""
    src = conv_qdq(tmp_path)
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    fused = _run(src, feeds, SESSION_CONFIG)
    unfused = _run(src, feeds, {**SESSION_CONFIG, "session.disable_quant_qdq": "1"})
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=tolerance(unfused))


def miscalibrated(src: Path, dst: Path, seed: int = 1) -> Path:
    """`src` with each int8 weight's scale times exp(N(0, 0.3^2)) (found by role)."""
    from onnx import numpy_helper

    m = onnx.load(str(src))
    names = {p["quant"]["scale_param"] for p in list_params(src)["params"]
             if p["dtype"] == "int8"}
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        if t.name in names:
            v = numpy_helper.to_array(t)
            v = (v * np.exp(0.3 * rng.standard_normal(v.shape))).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    onnx.save(m, str(dst))
    return dst


def test_qdq_conv_scales_train_replay_and_bake(tmp_path) -> None:
    src = conv_qdq(tmp_path)
    x = np.random.default_rng(2).standard_normal((256, 3, 8, 8)).astype(np.float32)
    data = Dataset(x, _run(src, {"x": x}, SESSION_CONFIG))  # targets: the original model
    bad = miscalibrated(src, tmp_path / "bad.onnx")
    res = prepare_onnx(bad, tmp_path / "b", trainable="@scale", task="regression")
    assert res["parity_max_abs_err"] <= 1e-5  # live scales vs the original's fused kernels
    bundle = load_bundle(tmp_path / "b")
    scales = [p for p in bundle.params if p.trainable]
    assert scales
    assert all((p.quant or {}).get("role") == "scale" for p in scales)
    before = Model(bundle).evaluate(data)
    run = train(bundle, data, tmp_path / "run", optimizer="zo-scale",
                options={"probes": 2}, steps=60, batch_size=32)
    model = Model(bundle, weights=run["weights"])
    after = model.evaluate(data)
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    store, steps = replay_journal(bundle, run["journal"])
    assert steps == 60
    assert store.digest() == run["sha256"]
    out = bake_bundle(tmp_path / "b", run["weights"], tmp_path / "baked")
    baked = onnx.load(out["inference"]["onnx"])
    assert "DequantizeLinear" in {n.op_type for n in baked.graph.node}  # same QDQ form
    # the baked model (scales constant: fused int8 kernels) computes what was trained
    got = _run(Path(out["inference"]["onnx"]), {"x": x[:64]}, SESSION_CONFIG)
    want = model.predict(x[:64])
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want))
