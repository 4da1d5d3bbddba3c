"""TFLite path: litert-torch export, the LiteRT backend (both weight strategies), three-way
parity torch == onnxruntime == LiteRT, in-place updates, ZO-SGD on both backends, and a device
process where onnxruntime, onnx and torch cannot be imported."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Exported, load_store_into_torch, torch_forward

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.errors import BundleError
from edgelearn.journal import read_journal
from edgelearn.model import Model
from edgelearn.params import ParamStore
from edgelearn.train import replay_journal, train

pytestmark = pytest.mark.torch

ARCHS = ("mlp", "cnn", "gru", "transformer")
STRATEGIES = ("inputs", "rebuild")
TFLITE_BATCH = 8
BATCHES = (1, 5, TFLITE_BATCH, 19)  # padded, exact, chunked with a padded tail


@pytest.fixture(scope="session")
def tfl_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """name -> zoo model exported with formats ("onnx", "tflite"), TFLite batch 8."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from export import export_bundle
    from export.zoo import ZOO

    root = tmp_path_factory.mktemp("tfl_bundles")
    out = {}
    for name in ARCHS:
        factory, shape = ZOO[name]
        torch.manual_seed(0)
        module = factory()
        summary = export_bundle(module, torch.randn(1, *shape), root / name,
                                formats=("onnx", "tflite"), tflite_batch=TFLITE_BATCH)
        out[name] = Exported(root / name, module.eval(), (1, *shape), summary)
    return out


def random_input(e: Exported, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *e.example_shape[1:])).astype(np.float32)


def litert(e: Exported, strategy: str, trainable: Any = "*") -> Model:
    return Model(load_bundle(e.path), backend="litert", trainable=trainable, threads=1,
                 backend_options={"strategy": strategy})


@pytest.mark.parametrize("arch", ARCHS)
def test_manifest_and_summary(tfl_bundles: dict[str, Exported], arch: str) -> None:
    e = tfl_bundles[arch]
    b = load_bundle(e.path)
    assert b.formats == ["onnx", "tflite"]
    assert e.summary["formats"] == ["onnx", "tflite"]
    sec = b.manifest["tflite"]
    assert sec["batch"] == TFLITE_BATCH
    assert set(sec["params"]) == {p.name for p in b.params} == set(sec["const"])
    assert sec["strategy"]["choice"] in STRATEGIES
    assert b.manifest["parity"]["tflite"]["max_abs_err"] <= 1e-5
    for role in ("tflite", "tflite_const"):
        assert b.manifest["files"][role]["size"] == b.files[role].stat().st_size
    # every const slot holds exactly the parameter's base bytes, 64-byte aligned
    raw = b.files["tflite_const"].read_bytes()
    store = b.load_store()
    for name, (off, n) in sec["const"].items():
        assert off % 64 == 0
        assert raw[off : off + n] == store[name].tobytes()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("trainable", ["*", ()], ids=["live", "frozen"])
def test_three_way_parity(tfl_bundles: dict[str, Exported], arch: str, trainable: Any) -> None:
    e = tfl_bundles[arch]
    ort = Model(load_bundle(e.path), trainable=trainable, threads=1)
    lite = {s: litert(e, s, trainable) for s in STRATEGIES}
    for i, b in enumerate(BATCHES):
        x = random_input(e, b, seed=i)
        ref = torch_forward(e.module, x)
        out_ort = ort.predict(x)
        np.testing.assert_allclose(out_ort, ref, rtol=0, atol=1e-5)
        for s, m in lite.items():
            out = m.predict(x)
            assert out.shape == ref.shape, s
            assert out.dtype == np.float32
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5, err_msg=s)
            np.testing.assert_allclose(out, out_ort, rtol=0, atol=1e-5, err_msg=s)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_in_place_update_parity(tfl_bundles: dict[str, Exported], arch: str,
                                strategy: str) -> None:
    e = tfl_bundles[arch]
    model = litert(e, strategy)
    backend = model.backend
    x = random_input(e, 5, seed=7)
    before = model.predict(x)
    rebuilds = backend.rebuilds
    before_again = model.predict(x)  # unchanged weights: no rebuild, same outputs
    assert backend.rebuilds == rebuilds
    np.testing.assert_array_equal(before_again, before)

    rng = np.random.default_rng(1)
    for name in model.store.trainable_names:
        model.store[name] += (0.01 * rng.standard_normal(model.store[name].shape)).astype(
            np.float32)
    after = model.predict(x)
    assert model.backend is backend  # no reload from disk, same backend object
    assert float(np.max(np.abs(after - before))) > 1e-4
    if strategy == "rebuild":
        assert backend.rebuilds == rebuilds + 1
    ref_module = copy.deepcopy(e.module)
    load_store_into_torch(ref_module, model.store)
    np.testing.assert_allclose(after, torch_forward(ref_module, x), rtol=0, atol=1e-5)
    # restoring through the flat arena view restores the outputs
    model.store.flat()[:] = load_bundle(e.path).load_store(trainable="*").flat()
    np.testing.assert_allclose(model.predict(x), before, rtol=0, atol=1e-6)


def test_head_only_update_seen(tfl_bundles: dict[str, Exported]) -> None:
    """CNN with frozen convs: only head weights change; both strategies follow them."""
    e = tfl_bundles["cnn"]
    x = random_input(e, 12, seed=3)
    for s in STRATEGIES:
        model = litert(e, s, trainable="head.*")
        model.store["head.weight"] *= np.float32(0.5)
        model.store["head.bias"] += np.float32(0.25)
        ref = copy.deepcopy(e.module)
        load_store_into_torch(ref, model.store)
        np.testing.assert_allclose(model.predict(x), torch_forward(ref, x), rtol=0, atol=1e-5)


def test_onnx_only_bundle_refused(bundles: dict[str, Exported]) -> None:
    with pytest.raises(BundleError, match="no TFLite model"):
        Model(load_bundle(bundles["mlp"].path), backend="litert")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_zo_sgd_same_run_on_ort_and_litert(tfl_bundles: dict[str, Exported], digits: Dataset,
                                           tmp_path: Path, strategy: str) -> None:
    e = tfl_bundles["mlp"]
    b = load_bundle(e.path)
    data = Dataset(digits.x[:400], digits.y[:400])
    # ZO divides loss differences by 2*eps: backend float noise (~1e-7 in the loss) becomes
    # ~1e-7/eps in g and lr*1e-7/eps per step in the weights. eps 1e-2, lr 1e-2 keeps 15 steps
    # well below the 1e-5 written below (eps 1e-3, lr 5e-2 drifts ~4e-4 apart: measured).
    opts = {"lr": 1e-2, "eps": 1e-2}
    res = {}
    for backend in ("onnxruntime", "litert"):
        run = tmp_path / backend
        kw: dict[str, Any] = {}
        if backend == "litert":
            kw = {"backend_options": {"strategy": strategy}}
        res[backend] = train(b, data, run, options=opts, steps=15, batch_size=TFLITE_BATCH,
                             seed=3, backend=backend, threads=1, **kw)
        replayed, steps = replay_journal(b, run / "journal.bin")
        assert steps == 15
        assert replayed.digest() == res[backend]["sha256"]  # bit-exact on its own
    recs = {k: [r for r in read_journal(Path(v["journal"]))[0] if r.get("kind") == "step"]
            for k, v in res.items()}
    g = {k: np.array([r["g"] for r in v], np.float64) for k, v in recs.items()}
    np.testing.assert_allclose(g["litert"], g["onnxruntime"], rtol=0, atol=1e-3)
    w = {k: ParamStore.from_file(r["weights"], b.param_specs()) for k, r in res.items()}
    base = b.load_store()
    assert not np.array_equal(w["litert"].flat(), base.flat())  # it trained
    np.testing.assert_allclose(w["litert"].flat(), w["onnxruntime"].flat(), rtol=0, atol=1e-5)


DEVICE_SCRIPT = """
import io, json, sys, contextlib, runpy
for m in ("onnxruntime", "onnx", "torch", "onnxscript", "litert_torch", "jax"):
    sys.modules[m] = None  # a device with numpy + ai-edge-litert only
argv = {argv!r}
buf = io.StringIO()
sys.argv = argv
try:
    with contextlib.redirect_stdout(buf):
        runpy.run_module("edgelearn.cli", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "out": json.loads(buf.getvalue()),
                   "litert": "ai_edge_litert.interpreter" in sys.modules}}))
"""


def test_device_with_only_numpy_and_litert(tfl_bundles: dict[str, Exported], digits: Dataset,
                                           tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=digits.x[:200], y=digits.y[:200])
    argv = ["edgelearn", "train", str(tfl_bundles["mlp"].path), "--data", str(data),
            "--steps", "5", "--backend", "litert", "--out", str(tmp_path / "run"), "--json"]
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT.format(argv=argv)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 0, proc.stderr
    assert out["litert"] is True
    assert out["out"]["steps"] == 5
    assert np.isfinite(out["out"]["loss_last"])
    # the same command with the ORT backend fails cleanly there (exit 2, not a traceback)
    argv_ort = [*argv[:-3], "--out", str(tmp_path / "run_ort"), "--json"]
    argv_ort[argv_ort.index("litert")] = "onnxruntime"
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT.format(argv=argv_ort)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          check=False)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 2
    assert "onnxruntime" in proc.stderr
