"""prepare (inference ONNX -> bundle) and bake (weights -> plain inference.onnx), no torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from onnx_models import embedder_onnx, mlp_onnx, package_model, quantize_qdq
from sessions import train

from edgelearn.backends.ort_graph import SESSION_CONFIG
from edgelearn.bundle import load_bundle
from edgelearn.cli import main
from edgelearn.data import Dataset
from edgelearn.model import Model
from edgelearn.parity import ATOL, RTOL, tolerance
from edgelearn.prepare import ModelError, bake_bundle, list_params, prepare_onnx

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")



def within_recorded_bound(bundle_dir: Path, err: float) -> bool:
    """The manifest's parity bound is atol + rtol * the output's scale, and err is within it."""
    p = json.loads((bundle_dir / "manifest.json").read_text())["parity"]["onnx"]
    assert (p["atol"], p["rtol"]) == (ATOL, RTOL)
    assert p["bound"] == pytest.approx(ATOL + RTOL * p["scale"])
    return p["max_abs_err"] == err and p["worst_err"] <= p["bound"]


def run_plain(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A plain onnxruntime session, nothing from edgelearn in between."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    """A generated third-party-style inference MLP in its own directory."""
    (tmp_path / "src").mkdir()
    return mlp_onnx(tmp_path / "src" / "mlp.onnx")


# -- list / prepare round trip ------------------------------------------------------------------
def test_list_shows_weights_and_keeps_constants(mlp: Path) -> None:
    res = list_params(mlp)
    by = {p["name"]: p for p in res["params"]}
    assert set(by) == {"fc1.weight", "fc1.bias", "mix.weight", "fc2.weight", "fc2.bias", "gain"}
    assert by["fc1.weight"]["shape"] == [32, 64]
    assert by["fc1.weight"]["bytes"] == 32 * 64 * 4
    assert by["mix.weight"]["consumers"] == ["MatMul"]  # shared by two nodes: one parameter
    assert by["gain"]["where"] == "constant"
    assert res["inputs"] == [{"name": "x", "shape": ["batch", 64], "dtype": "float32"}]
    assert res["total_params"] == sum(p["numel"] for p in res["params"])


@pytest.mark.parametrize("ir_version", [3, 8])
def test_prepare_round_trip_equals_original(tmp_path: Path, digits: Dataset,
                                            ir_version: int) -> None:
    (tmp_path / "src").mkdir()
    src = mlp_onnx(tmp_path / "src" / "mlp.onnx", ir_version=ir_version)
    res = prepare_onnx(src, tmp_path / "b", trainable="fc2.*")
    assert res["trainable_params"] == 32 * 10 + 10
    assert within_recorded_bound(tmp_path / "b", res["parity_max_abs_err"])
    bundle = load_bundle(tmp_path / "b")
    ref = run_plain(src, {"x": digits.x})[0]
    for live in ("*", "", None):
        out = Model(bundle, trainable=live).predict(digits.x)
        np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance(ref))
    # the scalar and the int64 shape constant stay initializers of model.onnx
    import onnx

    m = onnx.load(str(tmp_path / "b" / "model.onnx"))
    assert {t.name for t in m.graph.initializer} == {"half", "shape"}
    assert "gain" in {i.name for i in m.graph.input}


def test_bake_equals_bundle_with_trained_weights(tmp_path: Path, mlp: Path,
                                                 digits: Dataset) -> None:
    prepare_onnx(mlp, tmp_path / "b", trainable="fc2.*,fc1.bias")
    bundle = load_bundle(tmp_path / "b")
    run = train(bundle, digits, tmp_path / "run", steps=20, batch_size=32,
                options={"lr": 1e-2, "eps": 1e-3})
    res = bake_bundle(tmp_path / "b", run["weights"], tmp_path / "baked")
    inference = Path(res["inference"]["onnx"])
    plain = run_plain(inference, {"x": digits.x})[0]
    personal = Model(bundle, weights=run["weights"]).predict(digits.x)
    base = Model(bundle).predict(digits.x)
    np.testing.assert_allclose(plain, personal, rtol=0, atol=tolerance(personal))
    assert res["parity_max_abs_err"] <= res["parity"]["inference.onnx"]["bound"]
    assert res["skipped"] == {}  # no TFLite files in a prepared bundle
    assert np.abs(plain - base).max() > 1e-4  # the trained weights really are in there
    import onnx

    m = onnx.load(str(inference))
    assert [i.name for i in m.graph.input] == ["x"]
    # the baked directory is itself a bundle whose base weights are the personalized ones
    again = load_bundle(tmp_path / "baked")
    np.testing.assert_array_equal(Model(again).predict(digits.x[:8]), personal[:8])


def test_zo_personalizes_new_head_on_embedding_model(tmp_path: Path, digits: Dataset) -> None:
    src = embedder_onnx(tmp_path / "emb.onnx")
    res = prepare_onnx(src, tmp_path / "b", new_head="tokens:10", seed=1)
    assert res["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
    assert res["trainable_params"] == 10 * 16 + 10
    assert within_recorded_bound(tmp_path / "b", res["parity_max_abs_err"])
    bundle = load_bundle(tmp_path / "b")
    before = Model(bundle).evaluate(digits)
    run = train(bundle, digits, tmp_path / "run", steps=300, batch_size=64,
                options={"lr": 0.05, "eps": 1e-2, "probes": 2})
    after = Model(bundle, weights=run["weights"]).evaluate(digits)
    assert after["loss"] < before["loss"] - 0.3, (before, after)
    assert after["accuracy"] > before["accuracy"] + 0.2, (before, after)


def test_int8_qdq_weights_recognised_with_scales(tmp_path: Path, mlp: Path,
                                                 digits: Dataset) -> None:
    pytest.importorskip("onnxruntime.quantization")
    q = quantize_qdq(mlp, tmp_path / "mlp_int8.onnx", digits.x[:256])
    listed = {p["name"]: p for p in list_params(q)["params"]}
    int8 = [p for p in listed.values() if p["dtype"] == "int8"]
    assert int8
    assert all(p["quant"]["op"] == "DequantizeLinear" for p in int8)
    assert all(listed[p["quant"]["scale_param"]]["quant"]["role"] == "scale" for p in int8)
    int32 = [p["name"] for p in listed.values() if p["dtype"] == "int32"]  # biases: frozen
    with pytest.raises(Exception, match="quantized"):
        prepare_onnx(q, tmp_path / "nope", trainable=int32[0])
    res = prepare_onnx(q, tmp_path / "b", new_head="logits:3")
    assert res["frozen_quantized"] == []
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    quant = {p["name"]: p for p in manifest["params"] if "quant" in p}
    assert quant
    assert all(not p["trainable"] for p in quant.values())
    some = next(p for p in quant.values() if p["dtype"] == "int8")["quant"]
    assert isinstance(some["scale"], (float, list))
    assert "zero_point" in some
    # onnxruntime as edgelearn runs it: QDQ as written (a default session fuses QDQ groups
    # into int8 kernels that round their requantization differently; see ort_graph)
    so = ort.SessionOptions()
    for k, v in SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    ref = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": digits.x[:64]})[0]
    w = load_bundle(tmp_path / "b").load_store()
    expect = ref @ w["head.weight"].T + w["head.bias"]
    out = Model(load_bundle(tmp_path / "b")).predict(digits.x[:64])
    np.testing.assert_allclose(out, expect, rtol=0, atol=tolerance(expect))


def test_external_data_inside_directory_is_supported(tmp_path: Path, mlp: Path,
                                                     digits: Dataset) -> None:
    import onnx

    m = onnx.load(str(mlp))
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save(m, str(d / "m.onnx"), save_as_external_data=True, location="m.data",
              size_threshold=0)
    res = prepare_onnx(d / "m.onnx", tmp_path / "b")
    assert within_recorded_bound(tmp_path / "b", res["parity_max_abs_err"])
    ref = run_plain(mlp, {"x": digits.x[:32]})[0]
    np.testing.assert_allclose(Model(load_bundle(tmp_path / "b")).predict(digits.x[:32]), ref,
                               rtol=0, atol=tolerance(ref))


# -- hostile input ------------------------------------------------------------------------------
def _external(tmp_path: Path, mlp: Path, location: str) -> Path:
    import onnx

    m = onnx.load(str(mlp))
    t = next(t for t in m.graph.initializer if t.name == "fc1.weight")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    t.external_data.add(key="location", value=location)
    d = tmp_path / "hostile"
    d.mkdir(exist_ok=True)
    onnx.save(m, str(d / "m.onnx"))
    return d / "m.onnx"


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_escaping_directory_is_refused(tmp_path: Path, mlp: Path,
                                                     location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 32 * 64 * 4)
    path = _external(tmp_path, mlp, location)
    with pytest.raises(ModelError, match="external data"):
        prepare_onnx(path, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_external_data_symlink_leaving_directory_is_refused(tmp_path: Path, mlp: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 32 * 64 * 4)
    path = _external(tmp_path, mlp, "w.bin")
    os.symlink(tmp_path / "secret.bin", path.parent / "w.bin")
    with pytest.raises(ModelError, match="outside the model's directory"):
        list_params(path)


def test_external_data_too_short_is_refused(tmp_path: Path, mlp: Path) -> None:
    path = _external(tmp_path, mlp, "w.bin")
    (path.parent / "w.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ModelError, match="does not hold"):
        list_params(path)


@pytest.mark.parametrize(("dims", "match"), [([1 << 40, 1 << 20], "declares"),
                                             ([1000, 64], "stores"), ([-3, 64], "invalid")])
def test_absurd_shapes_are_refused(tmp_path: Path, mlp: Path, dims: list[int],
                                   match: str) -> None:
    import onnx

    m = onnx.load(str(mlp))
    t = next(t for t in m.graph.initializer if t.name == "fc1.weight")
    del t.dims[:]
    t.dims.extend(dims)
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match=match):
        prepare_onnx(tmp_path / "bad.onnx", tmp_path / "b")


def test_garbage_and_tflite_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\xff\x00not a model" * 10)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        list_params(tmp_path / "junk.onnx")
    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    with pytest.raises(ModelError, match=r"\.tflite models yet"):
        prepare_onnx(tmp_path / "m.tflite", tmp_path / "b")


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_prepare_list_bake(tmp_path: Path, mlp: Path, digits: Dataset,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", str(mlp), "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed["params"]) == 6
    assert main(["prepare", str(mlp), "--list"]) == 0
    assert "fc1.weight" in capsys.readouterr().out
    out = tmp_path / "b"
    assert main(["prepare", str(mlp), "--out", str(out), "--trainable", "fc2.*", "--rtol",
                 "2e-5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads((out / "manifest.json").read_text())["parity"]["onnx"]["rtol"] == 2e-5
    assert res["bundle"] == str(out)
    assert res["trainable_params"] == 330
    np.savez(tmp_path / "ex.npz", x=digits.x[:4])
    assert main(["bake", str(out), "--weights", str(out / "weights.safetensors"),
                 "--out", str(tmp_path / "baked"), "--example", str(tmp_path / "ex.npz"),
                 "--rtol", "1e-4", "--json"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert cap.err == ""  # nothing left out: no warning
    assert res["bundle"] == str(tmp_path / "baked")
    assert res["parity"]["inference.onnx"]["rtol"] == 1e-4
    assert (tmp_path / "baked" / "inference.onnx").is_file()
    code = main(["prepare", str(mlp), "--out", str(tmp_path / "c"), "--trainable", "nope*"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("edgelearn: error: ")
    assert "nope*" in err
    assert main(["bake", str(out), "--weights", str(out / "weights.safetensors"),
                 "--out", str(out)]) == 2
    assert "new directory" in capsys.readouterr().err


# -- real models from PyPI packages (skipped unless the package is installed) -------------------
REAL = {
    "wakeword_hey_jarvis": ({"x.1": np.random.default_rng(0).standard_normal(
        (1, 16, 96)).astype(np.float32)}, None),
    "silero_vad": ({"input": (np.random.default_rng(0).standard_normal((1, 512)) * 0.1).astype(
        np.float32), "sr": np.array(16000, np.int64), "state": np.zeros((2, 1, 128),
                                                                        np.float32)}, None),
    "ocr_direction_cls": (None, None),
    "wakeword_embedding": (None, "conv2d_19:4"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_package_model_round_trip(tmp_path: Path, name: str) -> None:
    src = package_model(name)
    if src is None:
        pytest.skip(f"package for {name} not installed")
    example, head = REAL[name]
    res = prepare_onnx(src, tmp_path / "b", example=example, new_head=head)
    assert within_recorded_bound(tmp_path / "b", res["parity_max_abs_err"])
    store = load_bundle(tmp_path / "b").load_store()
    for n in store.trainable_names:
        store[n] += np.float32(0.01)
    store.save(tmp_path / "w.safetensors")
    baked = bake_bundle(tmp_path / "b", tmp_path / "w.safetensors", tmp_path / "baked",
                        example=example)
    assert baked["parity_max_abs_err"] <= baked["parity"]["inference.onnx"]["bound"]
