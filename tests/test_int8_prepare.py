"""int8 models made by others: prepare recognises QDQ, weight-only Cast+Mul and MatMulInteger
weights with their scales; zo-scale trains the scales (by role, relative steps), polystep the
int8 weights on their grid, both replay bit-exactly, and bake writes an int8 model of the same
form. Also: polystep's probe budget keeps a step's cost bounded as the trainable set grows.
Generated models and data only (onnx.helper, onnxruntime.quantization): no torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx_models import mlp_onnx, quantize_qdq
from sessions import replay_journal, train

from edgelearn.backends.ort_graph import SESSION_CONFIG
from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.errors import InputError
from edgelearn.model import Model
from edgelearn.optim import make_optimizer
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.parity import tolerance
from edgelearn.prepare import bake_bundle, list_params, prepare_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")
FORMS = ("qdq", "cast_mul", "matmul_integer")
OP = {"qdq": "DequantizeLinear", "cast_mul": "Cast+Mul", "matmul_integer": "MatMulInteger"}


def cast_mul_onnx(path: Path, *, seed: int = 0) -> Path:
    """Weight-only int8 MLP [N, 64] -> [N, 10]: W1 = Cast(q1) * s1 (per column), W2 =
    (Cast(q2) - zp) * s2 (per tensor), as int8 transformers ship their weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 32)) * 0.3).astype(np.float32)
    s1 = (np.abs(w1).max(axis=0) / 127).astype(np.float32)
    q1 = np.clip(np.rint(w1 / s1), -127, 127).astype(np.int8)
    w2 = (rng.standard_normal((32, 10)) * 0.3).astype(np.float32)
    s2 = np.array(np.abs(w2).max() / 120, np.float32)
    q2 = np.clip(np.rint(w2 / s2) + 3, -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (q1, "q1"), (s1, "s1"), (q2, "q2"), (np.array(3.0, np.float32), "zp2"), (s2, "s2"),
        ((rng.standard_normal(10) * 0.1).astype(np.float32), "b2"))]
    nodes = [
        helper.make_node("Cast", ["q1"], ["f1"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f1", "s1"], ["w1"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Cast", ["q2"], ["f2"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["f2", "zp2"], ["c2"]),
        helper.make_node("Mul", ["s2", "c2"], ["w2"]),
        helper.make_node("MatMul", ["a", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "wo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_int8(form: str, tmp: Path, x: np.ndarray) -> Path:
    """The int8 model of `form` (a float MLP quantized by onnxruntime, or built by hand)."""
    if form == "cast_mul":
        return cast_mul_onnx(tmp / "wo.onnx")
    src = mlp_onnx(tmp / "mlp.onnx")
    if form == "qdq":
        return quantize_qdq(src, tmp / "qdq.onnx", x)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(tmp / "dyn.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True)
    return tmp / "dyn.onnx"


def miscalibrated(src: Path, dst: Path, seed: int = 1) -> Path:
    """`src` with every weight scale multiplied by exp(N(0, 0.25^2)): a task zo-scale can fix
    (the labels come from `src`), found by role like prepare does."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    names = {p["quant"]["scale_param"] for p in list_params(src)["params"]
             if p["dtype"] == "int8"}
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        if t.name in names:
            v = numpy_helper.to_array(t)
            v = (v * np.exp(0.25 * rng.standard_normal(v.shape))).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    onnx.save(m, str(dst))
    return dst


@pytest.fixture(scope="module", params=FORMS)
def form(request, tmp_path_factory) -> tuple[str, Path, Dataset]:
    """(form, prepared bundle of the miscalibrated int8 model, data labelled by the original)."""
    tmp = tmp_path_factory.mktemp(request.param)
    x = np.random.default_rng(0).standard_normal((384, 64)).astype(np.float32)
    src = make_int8(request.param, tmp, x[:128])
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0].argmax(axis=1).astype(np.int64)
    bad = miscalibrated(src, tmp / "bad.onnx")
    prepare_onnx(bad, tmp / "bundle")
    return request.param, tmp / "bundle", Dataset(x, y)


def test_prepare_records_int8_weights_and_scales(form) -> None:
    name, path, _ = form
    m = json.loads((path / "manifest.json").read_text())
    params = {p["name"]: p for p in m["params"]}
    int8 = [p for p in params.values() if p["dtype"] == "int8"]
    assert len(int8) >= 2
    for p in int8:
        q = p["quant"]
        assert q["op"] == OP[name]
        assert p["trainable"]  # int8 weights train (polystep) by default
        scale = params[q["scale_param"]]
        assert scale["dtype"] == "float32"
        assert scale["quant"] == {"role": "scale", "of": [p["name"]]} or \
            p["name"] in scale["quant"]["of"]
        assert np.asarray(q["scale"], np.float32).size == int(np.prod(scale["shape"]))
    per_channel = [p for p in int8 if p["quant"]["axis"] is not None]
    assert per_channel  # every form here has a per-channel scale
    assert m["parity"]["onnx"]["worst_err"] <= m["parity"]["onnx"]["bound"]


def test_zo_scale_trains_scales_by_role_and_replays(form, tmp_path) -> None:
    _, path, data = form
    bundle = load_bundle(path)
    before = Model(bundle).evaluate(data)
    res = train(bundle, data, tmp_path / "run", optimizer="zo-scale",
                options={"probes": 2}, steps=100, batch_size=64)  # default lr, eps
    scales = [p for p in bundle.params if (p.quant or {}).get("role") == "scale"]
    assert res["trainable_params"] == sum(p.numel for p in scales)
    after = Model(bundle, weights=res["weights"]).evaluate(data)
    assert after["loss"] < before["loss"], (before, after)
    assert after["accuracy"] >= before["accuracy"], (before, after)
    store, steps = replay_journal(bundle, res["journal"])
    assert steps == 100
    assert store.digest() == res["sha256"]


def test_polystep_trains_int8_on_grid_replays_and_bakes(form, tmp_path) -> None:
    name, path, data = form
    bundle = load_bundle(path)
    res = train(bundle, data, tmp_path / "run", optimizer="polystep", steps=4,
                batch_size=64)  # default radius: 2 quantization steps on the int8 arena
    base = bundle.load_store()
    model = Model(bundle, weights=res["weights"])
    moved = [p.name for p in bundle.params if p.dtype == "int8"
             and not np.array_equal(model.store[p.name], base[p.name])]
    assert moved
    assert all(model.store[n].dtype == np.int8 for n in moved)
    store, _ = replay_journal(bundle, res["journal"])
    assert store.digest() == res["sha256"]
    out = bake_bundle(path, res["weights"], tmp_path / "baked")
    onnx = pytest.importorskip("onnx")
    baked = onnx.load(out["inference"]["onnx"])
    dtypes = {t.name: t.data_type for t in baked.graph.initializer}
    assert all(dtypes[n] == onnx.TensorProto.INT8 for n in moved)  # int8 stays int8
    so = ort.SessionOptions()  # onnxruntime as edgelearn runs it (QDQ as written)
    for k, v in SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(out["inference"]["onnx"], so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": data.x[:64]})[0]
    want = model.predict(data.x[:64])
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want))
    fused = json.loads((tmp_path / "baked" / "manifest.json").read_text())["baked"].get(
        "fused_int8")
    assert (fused is not None) == (name == "qdq")  # only QDQ graphs fuse into int8 kernels


@pytest.mark.parametrize("form", ["qdq"], indirect=True)
def test_default_polystep_radius_follows_the_arena(form, tmp_path) -> None:
    """No --opt radius: int8 weights move by quantization steps and the loss does not rise;
    the header keeps radius null and replay is bit-exact."""
    _, path, data = form
    bundle = load_bundle(path)
    before = Model(bundle).evaluate(data)
    res = train(bundle, data, tmp_path / "run", optimizer="polystep", steps=20, batch_size=64)
    after = Model(bundle, weights=res["weights"]).evaluate(data)
    assert after["loss"] <= before["loss"], (before, after)
    from edgelearn.journal import iter_journal

    header, first = list(iter_journal(Path(res["journal"]), max_records=2))
    assert header["config"]["radius"] is None
    assert first["radius"] == 2.0  # t = 0 of the cosine schedule, in quantization steps
    store, _ = replay_journal(bundle, res["journal"])
    assert store.digest() == res["sha256"]


def test_explicit_radius_and_float_default_are_unchanged() -> None:
    """An explicit radius resolves (and journals) as before; the float default is 0.05."""
    explicit = make_optimizer("polystep", radius=0.05, seed=1)
    assert {k: explicit.config()[k] for k in ("radius", "radius_final", "probe_radius")} == \
        {"radius": 0.05, "radius_final": 0.005, "probe_radius": 0.05}
    default = make_optimizer("polystep", seed=1)
    assert default.config()["radius"] is None
    assert default.schedule(3, "float32") == explicit.schedule(3)
    assert default.schedule(0, "int8")[1:] == (2.0, 2.0)
    a, b = _store(2), _store(2)
    for opt, st in ((default, a), (explicit, b)):
        for _ in range(3):
            opt.step(st, lambda st=st: float((st.flat() ** 2).sum()))
    assert a.digest() == b.digest()


def test_prepare_recognises_qoperator_form(tmp_path) -> None:
    """quantize_static(QOperator): QGemm (com.microsoft) and QLinearMatMul weights + scales."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": x[i : i + 16]} for i in range(0, 64, 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    src = tmp_path / "qop.onnx"
    quantize_static(str(mlp_onnx(tmp_path / "mlp.onnx")), str(src), Reader(),
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    listed = {p["name"]: p for p in list_params(src)["params"]}
    ops = {p["quant"]["op"]: p["quant"]["axis"] for p in listed.values() if p["dtype"] == "int8"}
    assert ops == {"QGemm": 0, "QLinearMatMul": 1}  # Gemm transB=1: rows; MatMul B: columns
    prepare_onnx(src, tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_allclose(Model(bundle).predict(x), want, rtol=0, atol=tolerance(want))
    store = bundle.load_store(trainable="@scale")
    assert store.n_trainable() == 32 + 32 + 10


def test_role_selector_says_what_is_missing(tmp_path) -> None:
    src = mlp_onnx(tmp_path / "mlp.onnx")
    prepare_onnx(src, tmp_path / "b")
    with pytest.raises(InputError, match="no quantization scales"):
        load_bundle(tmp_path / "b").load_store(trainable="@scale")
    with pytest.raises(InputError, match="not one of"):
        load_bundle(tmp_path / "b").load_store(trainable="@weights")


def test_zo_scale_perturbs_each_scale_relative_to_itself() -> None:
    specs = [ParamSpec("w", (2, 3), "int8", False),
             ParamSpec("w.scale", (2,), "float32", True, {"role": "scale", "of": "w"}),
             ParamSpec("b", (2,), "float32", True)]
    s0 = np.array([1e-4, 0.2], np.float32)
    b0 = np.array([0.5, -1.0], np.float32)
    store = ParamStore(specs, values={"w": np.ones((2, 3), np.int8), "w.scale": s0, "b": b0})
    opt = make_optimizer("zo-scale", eps=0.01, noise="rademacher", seed=3)
    seen = []

    def loss() -> float:
        seen.append((store["w.scale"].copy(), store["b"].copy()))
        return float(len(seen))

    opt.step(store, loss)
    s_plus, b_plus = seen[0]
    np.testing.assert_allclose(np.abs(s_plus / s0 - 1), 0.01, rtol=1e-3)  # 1% of each scale
    np.testing.assert_allclose(np.abs(b_plus - b0), 0.01, rtol=1e-3)  # others: plain units


def _store(tensors: int) -> ParamStore:
    specs = [ParamSpec(f"t{i}", (16,), "float32", True) for i in range(tensors)]
    return ParamStore(specs, values={f"t{i}": np.full(16, i, np.float32)
                                     for i in range(tensors)})


def test_polystep_probe_budget_bounds_a_step() -> None:
    small, big = _store(3), _store(100)
    budget = make_optimizer("polystep", seed=0)
    assert budget.probes_per_step(big) == 16 * 8  # 200 particles, 8 move
    assert make_optimizer("polystep", max_particles=None).probes_per_step(big) == 16 * 200
    calls = []
    moved: set[str] = set()
    for _ in range(6):
        prev = big.copy()
        budget.step(big, lambda: calls.append(1) or float(big.flat().sum() ** 2))
        moved |= {n for n in big.names if not np.array_equal(big[n], prev[n])}
        assert len(calls) == 16 * 8
        calls.clear()
    assert len(moved) > 25  # the draw changes every step: all tensors get their turn
    # at or under the budget a step is exactly the unbudgeted one (old journals replay)
    a, b = small.copy(), small.copy()
    for opt, st in ((make_optimizer("polystep", seed=2), a),
                    (make_optimizer("polystep", seed=2, max_particles=None), b)):
        for _ in range(3):
            opt.step(st, lambda st=st: float((st.flat() ** 2).sum()))
    assert a.digest() == b.digest()
    assert budget.chosen(200, 5) == make_optimizer("polystep", seed=0).chosen(200, 5)
    assert budget.chosen(200, 5) != budget.chosen(200, 6)
