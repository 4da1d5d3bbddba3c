"""int8 TFLite: int8 weights as int8 TFLite inputs dequantized in-graph, three-way parity torch
fake-quant == onnxruntime QDQ == LiteRT, in-place int8 edits seen by both LiteRT strategies,
and int8 optimizers (PolyStep, zo-scale) training on --backend litert, replayed bit-exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Exported, pretrain_on_digits
from sessions import replay_journal, train

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.model import Model
from edgelearn.parity import ATOL, RTOL, tolerance

pytestmark = pytest.mark.torch

STRATEGIES = ("inputs", "rebuild")
TFLITE_BATCH = 8
QUANTIZED = {"mlp": ("layers.0.weight", "head.weight"),
             "cnn": ("conv1.weight", "conv2.weight", "head.weight")}


@pytest.fixture(scope="module")
def int8_tfl(digits: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """name -> int8 bundle with formats ("onnx", "tflite"); the MLP briefly trained on digits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from edgelearn.export.quantize import export_int8_bundle
    from edgelearn.export.zoo import ZOO

    root = tmp_path_factory.mktemp("int8_tfl")
    out = {}
    for name in QUANTIZED:
        factory, shape = ZOO[name]
        torch.manual_seed(0)
        module = factory()
        if name == "mlp":
            pretrain_on_digits(module, digits)
        summary = export_int8_bundle(module, torch.randn(1, *shape), root / name,
                                     formats=("onnx", "tflite"), tflite_batch=TFLITE_BATCH)
        out[name] = Exported(root / name, module.eval(), (1, *shape), summary)
    return out


def litert(e: Exported, strategy: str, trainable: Any = "*") -> Model:
    return Model(load_bundle(e.path), backend="litert", trainable=trainable, threads=1,
                 backend_options={"strategy": strategy})


def random_input(e: Exported, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *e.example_shape[1:])).astype(np.float32)


@pytest.mark.parametrize("arch", list(QUANTIZED))
def test_int8_tflite_manifest_and_int8_inputs(int8_tfl: dict[str, Exported], arch: str) -> None:
    from ai_edge_litert.interpreter import Interpreter

    e = int8_tfl[arch]
    b = load_bundle(e.path)
    assert b.formats == ["onnx", "tflite"] == e.summary["formats"]
    assert sorted(e.summary["quantized"]) == sorted(QUANTIZED[arch])
    sec = b.manifest["tflite"]
    assert set(sec["params"]) == {p.name for p in b.params} == set(sec["const"])
    p = b.manifest["parity"]["tflite"]
    assert p["bound"] == pytest.approx(ATOL + RTOL * p["scale"])
    assert p["worst_err"] <= p["bound"]
    assert p["max_abs_err"] >= p["worst_err"]  # over every batch (each has its own scale)
    assert "tflite" in b.manifest["quantization"]
    it = Interpreter(model_path=str(b.files["tflite"]))
    details = it.get_signature_runner().get_input_details()
    for w in QUANTIZED[arch]:
        assert details[sec["params"][w]]["dtype"] == np.int8
        assert details[sec["params"][f"{w}.scale"]]["dtype"] == np.float32
    # the rebuild file holds every int8 weight's exact arena bytes at its recorded offset
    raw = b.files["tflite_const"].read_bytes()
    store = b.load_store()
    for name, (off, n) in sec["const"].items():
        assert off % 64 == 0
        assert raw[off : off + n] == np.ascontiguousarray(store[name]).tobytes()


@pytest.mark.parametrize("arch", list(QUANTIZED))
@pytest.mark.parametrize("live", ["*", ""], ids=["live", "baked"])
def test_int8_three_way_parity(int8_tfl: dict[str, Exported], arch: str, live: str) -> None:
    """torch fake-quant == ORT QDQ == LiteRT int8 within one output quantization step (and in
    fact float32-close), at padded, exact and chunked batch sizes."""
    import torch
    from edgelearn.export.quantize import fake_quant_model

    e = int8_tfl[arch]
    b = load_bundle(e.path)
    store = b.load_store()
    ref_model = fake_quant_model(e.module, {w: torch.from_numpy(np.array(store[f"{w}.scale"]))
                                            for w in QUANTIZED[arch]})
    ort = Model(b, trainable=live, threads=1)
    for bsz in (3, TFLITE_BATCH, 19):
        x = random_input(e, bsz, seed=bsz)
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(x)).numpy()
        step = np.abs(ref).max() / 127
        out_ort = ort.predict(x)
        for s in STRATEGIES:
            out = litert(e, s, live).predict(x)
            assert np.abs(out - ref).max() <= step
            np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance(ref), err_msg=s)
            np.testing.assert_allclose(out, out_ort, rtol=0, atol=tolerance(out_ort), err_msg=s)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_int8_in_place_edit_seen_by_litert(int8_tfl: dict[str, Exported], strategy: str) -> None:
    e = int8_tfl["mlp"]
    model = litert(e, strategy, trainable="head.weight")
    ort = Model(load_bundle(e.path), trainable="head.weight", threads=1)
    x = random_input(e, 5, seed=1)
    before = model.predict(x)
    rebuilds = model.backend.rebuilds
    for m in (model, ort):
        m.store["head.weight"][0, :] = 127
    after = model.predict(x)
    assert model.store["head.weight"].dtype == np.int8
    assert not np.allclose(before[:, 0], after[:, 0])
    np.testing.assert_array_equal(before[:, 1:], after[:, 1:])
    want = ort.predict(x)
    np.testing.assert_allclose(after, want, rtol=0, atol=tolerance(want))
    if strategy == "rebuild":
        assert model.backend.rebuilds == rebuilds + 1


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("opt", "trainable", "options"), [
    ("polystep", "head.weight", {"rank": 16, "radius": 2.0, "total_steps": 40}),
    ("zo-scale", None, {"relative": False, "lr": 1e-5, "eps": 1e-4, "probes": 2}),
])
def test_int8_optimizer_trains_on_litert_and_replays(int8_tfl: dict[str, Exported],
                                                     digits: Dataset, tmp_path: Path, opt: str,
                                                     trainable: str | None,
                                                     options: dict[str, Any],
                                                     strategy: str) -> None:
    e = int8_tfl["mlp"]
    bundle = load_bundle(e.path)
    # A new user: shifted pixels (PolyStep on the int8 head) or faint strokes (zo-scale).
    x = digits.x[1000:1400]
    if opt == "polystep":
        x = np.roll(x.reshape(-1, 8, 8), 1, axis=2).reshape(-1, 64)
    else:
        x = x * np.float32(0.4)
    data = Dataset(np.ascontiguousarray(x, np.float32), digits.y[1000:1400])
    before = Model(bundle).evaluate(data)["loss"]
    res = train(bundle, data, tmp_path / "run", optimizer=opt, trainable=trainable,
                options=options, steps=40, batch_size=64, backend="litert", threads=1,
                backend_options={"strategy": strategy})
    live = trainable or "*.scale"
    after = Model(bundle, trainable=live, weights=res["weights"], backend="litert",
                  threads=1).evaluate(data)["loss"]
    assert after < 0.8 * before, (before, after)
    store, steps = replay_journal(bundle, res["journal"])
    assert steps == 40
    assert store.digest() == res["sha256"]  # bit-exact on its own


def test_unconvertible_int8_model_ships_onnx_only(tmp_path: Path) -> None:
    """litert-torch 0.10 has no lowering for linalg.det: the int8 bundle keeps ONNX, says why,
    and the litert backend refuses it with that reason."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from edgelearn.export.quantize import export_int8_bundle

    from edgelearn.errors import BundleError

    class Det(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x: Any) -> Any:
            h = self.lin(x)
            return torch.linalg.det(h.reshape(h.shape[0], 4, 4)).unsqueeze(1) * h

    torch.manual_seed(0)
    s = export_int8_bundle(Det(), torch.randn(1, 16), tmp_path / "det",
                           formats=("onnx", "tflite"), tflite_batch=4)
    assert s["formats"] == ["onnx"]
    assert "aten._linalg_det" in s["tflite_skipped"]
    b = load_bundle(tmp_path / "det")
    assert b.formats == ["onnx"]
    assert b.manifest["tflite_skipped"] == s["tflite_skipped"]
    assert not (tmp_path / "det" / "model.tflite").exists()
    assert b.params[0].dtype == "int8"
    with pytest.raises(BundleError, match="_linalg_det"):
        Model(b, backend="litert")
    Model(b).predict(np.ones((2, 16), np.float32))  # the ONNX int8 model still runs


def test_bake_writes_int8_weights_into_tflite(int8_tfl: dict[str, Exported],
                                              tmp_path: Path) -> None:
    """bake on an int8 TFLite bundle: the personalized int8 weights land in the constant slots
    of model_const.tflite, which a bare LiteRT interpreter then runs as the personalized
    model (== onnxruntime QDQ on bundle + weights, != the base model)."""
    from ai_edge_litert.interpreter import Interpreter

    from edgelearn.prepare import bake_bundle

    e = int8_tfl["mlp"]
    b = load_bundle(e.path)
    store = b.load_store()
    store["head.weight"][:, :8] = np.int8(-100)  # on the int8 grid, far from the trained one
    store.save(tmp_path / "w.safetensors")
    res = bake_bundle(e.path, tmp_path / "w.safetensors", tmp_path / "baked")
    assert res["skipped"] == {}
    sec = load_bundle(tmp_path / "baked").manifest["tflite"]
    content = (tmp_path / "baked" / "model_const.tflite").read_bytes()
    it = Interpreter(model_content=content, num_threads=1)
    it.allocate_tensors()
    x = random_input(e, TFLITE_BATCH, seed=4)
    got = it.get_signature_runner()(**{sec["inputs"]["x"]: x})[sec["outputs"]["logits"]]
    personal = Model(b, weights=tmp_path / "w.safetensors", threads=1).predict(x)
    np.testing.assert_allclose(got, personal, rtol=0, atol=tolerance(personal))
    assert np.abs(got - Model(b, threads=1).predict(x)).max() > 1e-2
