"""TFLite path: litert-torch export, the LiteRT backend (both weight strategies), three-way
parity torch == onnxruntime == LiteRT, in-place updates, ZO-SGD and tpSGD (model_taps.tflite)
on both backends, and a device process where onnxruntime, onnx and torch cannot be imported."""

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
from sessions import replay_journal, train

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.errors import BundleError
from edgelearn.journal import read_journal
from edgelearn.model import Model
from edgelearn.params import ParamStore
from edgelearn.parity import ATOL, RTOL, tolerance

pytestmark = pytest.mark.torch

ARCHS = ("mlp", "cnn", "gru", "transformer")
STRATEGIES = ("inputs", "rebuild")
TFLITE_BATCH = 8
BATCHES = (1, 5, TFLITE_BATCH, 19)  # padded, exact, chunked with a padded tail


@pytest.fixture(scope="session")
def tfl_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """name -> zoo model exported with formats ("onnx", "tflite"), TFLite batch 8 (ARCHS and
    conv1d, which only the tpSGD tests use)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import ZOO

    root = tmp_path_factory.mktemp("tfl_bundles")
    out = {}
    for name in (*ARCHS, "conv1d"):
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
    p = b.manifest["parity"]["tflite"]
    assert p["bound"] == pytest.approx(ATOL + RTOL * p["scale"])
    assert p["worst_err"] <= p["bound"]
    assert p["max_abs_err"] >= p["worst_err"]  # over every batch (each has its own scale)
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
        np.testing.assert_allclose(out_ort, ref, rtol=0, atol=tolerance(ref))
        for s, m in lite.items():
            out = m.predict(x)
            assert out.shape == ref.shape, s
            assert out.dtype == np.float32
            np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance(ref), err_msg=s)
            np.testing.assert_allclose(out, out_ort, rtol=0, atol=tolerance(out_ort), err_msg=s)


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
    want = torch_forward(ref_module, x)
    np.testing.assert_allclose(after, want, rtol=0, atol=tolerance(want))
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
        want = torch_forward(ref, x)
        np.testing.assert_allclose(model.predict(x), want, rtol=0, atol=tolerance(want))


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
    # tpSGD through model_taps.tflite, and its replay (which re-runs the taps forwards on
    # the backend recorded in the journal header: litert)
    argv_tp = [*argv[:-3], "--optimizer", "tpsgd", "--lr", "0.1", "--out",
               str(tmp_path / "run_tp"), "--json"]
    argv_replay = ["edgelearn", "replay", str(tfl_bundles["mlp"].path),
                   str(tmp_path / "run_tp" / "journal.bin"), "--data", str(data), "--out",
                   str(tmp_path / "replayed.safetensors"), "--json"]
    res = []
    for a in (argv_tp, argv_replay):
        proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT.format(argv=a)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        res.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        assert res[-1]["code"] == 0, proc.stderr
    assert res[0]["out"]["optimizer"] == "tpsgd"
    assert res[0]["out"]["steps"] == 5
    assert res[1]["out"]["sha256"] == res[0]["out"]["sha256"]
    # the same command with the ORT backend fails cleanly there (exit 2, not a traceback)
    argv_ort = [*argv[:-3], "--out", str(tmp_path / "run_ort"), "--json"]
    argv_ort[argv_ort.index("litert")] = "onnxruntime"
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT.format(argv=argv_ort)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          check=False)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 2
    assert "onnxruntime" in proc.stderr


# -- tpSGD on LiteRT: model_taps.tflite -----------------------------------------------------

TAPS_ARCHS = ("mlp", "cnn", "gru", "conv1d")  # the transformer has no layer taps


def _taps_data(arch: str, digits: Dataset, n: int = 300) -> Dataset:
    if arch == "cnn":
        return Dataset(digits.x[:n].reshape(-1, 1, 8, 8), digits.y[:n])
    if arch == "conv1d":  # [N, 100, 6] windows, 7 classes (the HAR example's shape)
        x = np.random.default_rng(0).standard_normal((64, 100, 6)).astype(np.float32)
        return Dataset(x, digits.y[:64] % 7)
    return Dataset(digits.x[:n], digits.y[:n])


@pytest.mark.parametrize("arch", TAPS_ARCHS)
def test_taps_graph_exported_and_matches_ort(tfl_bundles: dict[str, Exported], arch: str) -> None:
    from edgelearn.backends.litert import LiteRTBackend
    from edgelearn.backends.ort import OrtBackend
    from edgelearn.errors import InputError

    b = load_bundle(tfl_bundles[arch].path)
    assert "tflite_taps" in b.files
    assert "tflite_taps_skipped" not in b.manifest
    p = b.manifest["parity"]["tflite_taps"]
    assert p["worst_err"] <= p["bound"] == pytest.approx(ATOL + RTOL * p["scale"])
    for trainable in ("*", ""):  # live weights set per call, frozen ones once at bind
        store = b.load_store(trainable=trainable)
        lite = LiteRTBackend(b, graph="tflite_taps", threads=1)
        lite.bind(store)
        ort = OrtBackend(b, graph="onnx_taps", threads=1)
        ort.bind(store)
        names = [o.name for o in ort.session.get_outputs()]
        assert lite.output_names == names  # the model output, then every tap, same order
        for i, n in enumerate(BATCHES):  # padded rows are cut from every tap, chunks joined
            feeds = {b.inputs[0].name: random_input(tfl_bundles[arch], n, seed=40 + i)}
            got, want = lite.forward(feeds), ort.forward(feeds)
            for name in names:
                assert got[name].shape == want[name].shape, name
                np.testing.assert_allclose(got[name], want[name], rtol=0,
                                           atol=tolerance(want[name]), err_msg=name)
    with pytest.raises(InputError, match="inputs"):
        LiteRTBackend(b, graph="tflite_taps", strategy="rebuild")


@pytest.mark.parametrize("arch", ["mlp", "cnn", "conv1d"])
def test_tpsgd_same_run_on_ort_and_litert(tfl_bundles: dict[str, Exported], digits: Dataset,
                                          tmp_path: Path, arch: str) -> None:
    b = load_bundle(tfl_bundles[arch].path)
    data = _taps_data(arch, digits)
    opts = {"lr": 0.1} if arch == "mlp" else {"lr": 0.05, "hidden_lr": 0.01}
    hidden = {"mlp": "layers.0.weight", "cnn": "conv1.weight", "conv1d": "conv1.weight"}
    res = {}
    for backend in ("onnxruntime", "litert"):
        run = tmp_path / backend
        # batch 13 > the TFLite batch 8: every taps forward runs one full and one padded chunk
        res[backend] = train(b, data, run, optimizer="tpsgd", options=opts, steps=8,
                             batch_size=13, seed=3, backend=backend, threads=1)
        header = read_journal(run / "journal.bin")[0][0]
        assert header.get("taps_backend") == ("litert" if backend == "litert" else None)
        replayed, steps = replay_journal(b, run / "journal.bin", data)  # re-runs its backend
        assert steps == 8
        assert replayed.digest() == res[backend]["sha256"]  # bit-exact on its own
    w = {k: ParamStore.from_file(r["weights"], b.param_specs()) for k, r in res.items()}
    base = b.load_store()
    for name in ("head.weight", hidden[arch]):
        assert not np.array_equal(w["litert"][name], base[name]), name  # hidden layers train
    # float32 taps differ by ~1e-7 between the runtimes; tpSGD's update is linear in them
    np.testing.assert_allclose(w["litert"].flat(), w["onnxruntime"].flat(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "conv1d"])
def test_tpsgd_step_on_litert_matches_torch_reference(tfl_bundles: dict[str, Exported],
                                                      digits: Dataset, arch: str) -> None:
    torch = pytest.importorskip("torch")
    from sessions import taps_evaluate
    from torch_reference import tpsgd_step

    from edgelearn.data import batch_indices
    from edgelearn.optim import make_optimizer
    from edgelearn.optim.tpsgd import projection

    e = tfl_bundles[arch]
    b = load_bundle(e.path)
    data = _taps_data(arch, digits)
    store = b.load_store()
    opt = make_optimizer("tpsgd", lr=0.1, seed=3, target_scale=2.0)
    evaluate = taps_evaluate(b, store, data, opt, batch_size=11, seed=5, backend="litert",
                             threads=1)
    params = {n: torch.from_numpy(np.array(store[n])) for n in store.names}
    taps, _ = evaluate()
    opt.step(store, taps=evaluate)
    idx = batch_indices(len(data), 11, 0, 5)
    layers = b.manifest["layers"]
    classes = b.outputs[0].shape[-1]
    proj = {i: torch.from_numpy(projection(3, i, classes,
                                           int(np.prod(taps[r.get("target", r["output"])]
                                                       .shape[1:])), 2.0))
            for i, r in enumerate(layers[:-1])}
    new = tpsgd_step(e.module, params, layers, proj, torch.from_numpy(data.x[idx]),
                     torch.from_numpy(data.y[idx]), lr=0.1,
                     trainable=set(store.trainable_names))
    assert set(new) == set(store.trainable_names)
    for n, v in new.items():
        np.testing.assert_allclose(store[n], v.numpy(), rtol=0, atol=1e-5, err_msg=n)


def test_unconvertible_taps_graph_is_skipped_with_reason(tmp_path: Path) -> None:
    """litert-torch 0.10 has no lowering for linalg.det: add_tflite_taps writes no file and
    records why (the bundle then ships without the TFLite taps graph)."""
    torch = pytest.importorskip("torch")
    from edgelearn.export.onnx_export import collect_params
    from edgelearn.export.tflite_export import add_tflite_taps

    class DetTap(torch.nn.Module):  # returns (output, tap) like a taps graph module
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x: Any) -> Any:
            h = self.lin(x)
            return h, torch.linalg.det(h.reshape(h.shape[0], 4, 4))

    torch.manual_seed(0)
    gm = DetTap().eval()
    manifest: dict[str, Any] = {"files": {}, "parity": {}}
    err = add_tflite_taps(tmp_path, gm, (torch.randn(1, 16),), collect_params(gm), ["x"],
                          ["output", "lin:det"], manifest, batch=4, parity_batch_sizes=[1],
                          atol=1e-5)
    assert err is None
    assert "_linalg_det" in manifest["tflite_taps_skipped"]
    assert manifest["files"] == {}
    assert "tflite_taps" not in manifest
    assert list(tmp_path.iterdir()) == []


def test_tpsgd_on_litert_refuses_bundle_without_taps_graph(tfl_bundles: dict[str, Exported],
                                                           digits: Dataset,
                                                           tmp_path: Path) -> None:
    import shutil

    from edgelearn.errors import InputError

    copy_dir = tmp_path / "mlp"
    shutil.copytree(tfl_bundles["mlp"].path, copy_dir)
    m = json.loads((copy_dir / "manifest.json").read_text())
    del m["files"]["tflite_taps"], m["tflite_taps"]
    m["tflite_taps_skipped"] = "the converter said no"
    (copy_dir / "manifest.json").write_text(json.dumps(m))
    (copy_dir / "model_taps.tflite").unlink()
    b = load_bundle(copy_dir)
    data = Dataset(digits.x[:40], digits.y[:40])
    with pytest.raises(InputError, match="the converter said no"):
        train(b, data, tmp_path / "r", optimizer="tpsgd", steps=1, backend="litert", threads=1)
    from edgelearn.backends.litert import LiteRTBackend

    with pytest.raises(BundleError, match="the converter said no"):
        LiteRTBackend(b, graph="tflite_taps")
    train(b, data, tmp_path / "r_ort", optimizer="tpsgd", steps=1, threads=1)  # ORT still runs


def test_taps_not_batch_first_are_unsupported(tmp_path: Path) -> None:
    """A layer applied with the batch on dim 1: tpSGD reads dim 0 of every tap as the batch
    (and the fixed-batch TFLite graph pads along it), so the export records no layer taps and
    why; the head's input is batch-first, so the head-only taps found in model.onnx remain."""
    torch = pytest.importorskip("torch")
    from edgelearn.export import export_bundle

    class TimeMajor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 16)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x: Any) -> Any:
            h = torch.relu(self.fc(x.reshape(-1, 8, 8).transpose(0, 1)))  # [8, batch, 16]
            return self.head(h.mean(0))

    torch.manual_seed(0)
    export_bundle(TimeMajor(), torch.randn(1, 64), tmp_path / "tm", formats=("onnx",))
    b = load_bundle(tmp_path / "tm")
    assert "not batch-first" in b.manifest["taps_unsupported"]
    assert [r["name"] for r in b.manifest["layers"]] == ["head"]
    assert "head only" in b.manifest["taps_from"]


# -- bake: the TFLite files of a baked bundle carry the personalized weights ---------------------
def _personalized(e: Exported, path: Path) -> Path:
    store = load_bundle(e.path).load_store()
    rng = np.random.default_rng(0)
    for n in store.trainable_names:
        store[n] += (0.05 * rng.standard_normal(store[n].shape)).astype(np.float32)
    store.save(path)
    return path


def _plain_litert(path: Path, section: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """model_const.tflite run by a bare LiteRT interpreter: data input only, its constants."""
    from ai_edge_litert.interpreter import Interpreter

    content = path.read_bytes()
    it = Interpreter(model_content=content, num_threads=1)
    it.allocate_tensors()
    run = it.get_signature_runner()
    assert set(run.get_input_details()) == {section["inputs"]["x"]}  # no weight inputs
    return run(**{section["inputs"]["x"]: x})[section["outputs"]["logits"]]


def test_bake_writes_personalized_weights_into_tflite(tfl_bundles: dict[str, Exported],
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from edgelearn.cli import main

    e = tfl_bundles["mlp"]
    b = load_bundle(e.path)
    source_const = b.files["tflite_const"].read_bytes()
    weights = _personalized(e, tmp_path / "w.safetensors")
    x = random_input(e, 19, seed=11)  # above the fixed TFLite batch: chunked in the check
    np.savez(tmp_path / "ex.npz", x=x)
    out = tmp_path / "baked"
    assert main(["bake", str(e.path), "--weights", str(weights), "--out", str(out),
                 "--example", str(tmp_path / "ex.npz"), "--json"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert cap.err == ""  # nothing left out
    assert res["skipped"] == {}
    assert res["inference"]["tflite"] == str(out / "model_const.tflite")
    assert set(res["parity"]) == {"inference.onnx", "model.tflite", "model_const.tflite"}
    baked = load_bundle(out)
    assert baked.manifest["baked"]["inference"] == ["inference.onnx", "model_const.tflite"]
    personal = Model(b, weights=weights, threads=1).predict(x[:TFLITE_BATCH])  # ONNX forward
    base = Model(b, threads=1).predict(x[:TFLITE_BATCH])
    got = _plain_litert(out / "model_const.tflite", baked.manifest["tflite"], x[:TFLITE_BATCH])
    np.testing.assert_allclose(got, personal, rtol=0, atol=tolerance(personal))
    assert np.abs(got - base).max() > 1e-2  # not the unpersonalized model
    assert b.files["tflite_const"].read_bytes() == source_const  # the source is untouched
    # the baked bundle on the LiteRT backend, both strategies, with its own base weights
    for s in STRATEGIES:
        m = Model(baked, backend="litert", threads=1, backend_options={"strategy": s})
        np.testing.assert_allclose(m.predict(x[:TFLITE_BATCH]), personal, rtol=0,
                                   atol=tolerance(personal), err_msg=s)


def test_bake_leaves_out_tflite_it_cannot_personalize(tfl_bundles: dict[str, Exported],
                                                      tmp_path: Path) -> None:
    """A constant slot that does not fit: model_const.tflite is left out (the weights-as-inputs
    model.tflite stays, now the bundle's only LiteRT strategy) and the reason is given."""
    import shutil

    from edgelearn.prepare import bake_bundle

    e = tfl_bundles["mlp"]
    src = tmp_path / "mlp"
    shutil.copytree(e.path, src)
    m = json.loads((src / "manifest.json").read_text())
    m["tflite"]["const"]["head.bias"][1] += 4
    (src / "manifest.json").write_text(json.dumps(m))
    weights = _personalized(e, tmp_path / "w.safetensors")
    res = bake_bundle(src, weights, tmp_path / "baked")
    assert set(res["skipped"]) == {"model_const.tflite"}
    assert "'head.bias' does not fit" in res["skipped"]["model_const.tflite"]
    assert "tflite" not in res["inference"]
    baked = load_bundle(tmp_path / "baked")
    assert not (tmp_path / "baked" / "model_const.tflite").exists()
    assert "tflite_const" not in baked.files
    assert baked.manifest["tflite"]["strategy"]["choice"] == "inputs"
    x = random_input(e, 5, seed=2)
    personal = Model(load_bundle(src), weights=weights, threads=1).predict(x)
    np.testing.assert_allclose(Model(baked, backend="litert", threads=1).predict(x), personal,
                               rtol=0, atol=tolerance(personal))


@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["human", "json"])
def test_bake_without_litert_leaves_tflite_out_and_says_so(
        tfl_bundles: dict[str, Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], mode: list[str]) -> None:
    """No LiteRT on the baking machine: the TFLite files cannot be checked, so none ships, and
    stderr says so in every output mode."""
    from edgelearn.cli import main

    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime",
                 "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    e = tfl_bundles["mlp"]
    weights = _personalized(e, tmp_path / "w.safetensors")
    out = tmp_path / "baked"
    assert main(["bake", str(e.path), "--weights", str(weights), "--out", str(out),
                 *mode]) == 0
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert sorted(ln.split()[2] for ln in lines) == ["model.tflite", "model_const.tflite",
                                                     "model_taps.tflite"]
    for ln in lines:
        assert ln.startswith("edgelearn: warning: ")
        assert f"left out of {out}: could not be checked against onnxruntime" in ln
        assert "ai-edge-litert" in ln
    if mode:
        assert set(json.loads(cap.out)["skipped"]) == {"model.tflite", "model_const.tflite",
                                                       "model_taps.tflite"}
    assert not list(out.glob("*.tflite"))
    baked = load_bundle(out)
    assert baked.formats == ["onnx"]
    assert "left out by bake" in baked.manifest["tflite_skipped"]
