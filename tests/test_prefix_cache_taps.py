"""Frozen-prefix caching of taps forwards (tpSGD, hybrid): runs, replays and resumes stay
bit-identical to the uncached run; the cut is reported; a failed check falls back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from backbone_models import mobilenet_onnx, transformer_onnx
from onnx_models import embedder_onnx

import edgelearn as el
from edgelearn.cli import main
from edgelearn.prepare import prepare_onnx
from edgelearn.training.cached_taps import CachedTapsEvaluator

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

DEMO = Path(el.__file__).parent / "data" / "demo"
#: hybrid with ZO tensors: the head bias by ZO (2 taps forwards), the weight exactly
HYBRID = {"exact": "head.weight", "zo_lr": 0.05, "eps": 1e-2}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cnn")
    src = mobilenet_onnx(d / "cnn.onnx", size=32, blocks=((1, 16, 1), (6, 24, 2)),
                         features=64)
    prepare_onnx(src, d / "bundle", new_head="features:3")
    return d / "bundle"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("enc")
    src = transformer_onnx(d / "enc.onnx", tokens=8, dim=32, layers=1)
    prepare_onnx(src, d / "bundle", new_head="hidden:3")
    return d / "bundle"


def data_for(bundle: Path, n: int = 24, seed: int = 0, classes: int = 3) -> el.Dataset:
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.shape[1:])).astype(np.float32)
    return el.Dataset(x, rng.integers(0, classes, n))


def config(optimizer: str, **kw) -> el.TrainConfig:
    options = HYBRID if optimizer == "hybrid" else {}
    return el.TrainConfig(optimizer=optimizer, batch_size=8, options=options, **kw)


def runtime(cache: bool) -> el.RuntimeConfig:
    return el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=cache)


def run(bundle: Path, out: Path, optimizer: str, cache: bool, data: el.Dataset,
        steps: int = 12, **kw) -> el.RunResult:
    with el.Session(bundle, out, config(optimizer, **kw), runtime(cache)) as s:
        return s.run(data, steps)


def same_run(a: el.RunResult, b: el.RunResult) -> bool:
    """Same weights (sha256 of the arena and of the file) and the same journal bytes."""
    return (a.sha256 == b.sha256 and Path(a.journal).read_bytes() == Path(b.journal).read_bytes()
            and Path(a.weights).read_bytes() == Path(b.weights).read_bytes())


@pytest.mark.parametrize("optimizer", ["tpsgd", "hybrid"])
def test_cached_taps_run_is_bit_identical(cnn: Path, tmp_path: Path, optimizer: str) -> None:
    """A prepared CNN backbone + new head: cached == uncached, and replay (uncached) and a
    resume in a cached session (which replays through the cache) reproduce it."""
    data = data_for(cnn)
    cached = run(cnn, tmp_path / "c", optimizer, True, data)
    plain = run(cnn, tmp_path / "p", optimizer, False, data)
    rep = cached.cache
    assert rep is not None
    assert rep["enabled"], rep
    assert rep["graph"] == "onnx_taps"
    assert rep["cut"] == ["features"]
    assert rep["taps_cached"] == ["features"]  # the head's input comes from the cache
    assert rep["prefix_nodes"] > 10
    assert rep["suffix_nodes"] == 1
    assert rep["cached_examples"] == 24
    assert rep["hits"] > 0
    assert plain.cache is None
    assert same_run(cached, plain)
    assert cached.loss_first != cached.loss_last  # it did train
    bundle = el.load_bundle(cnn)
    assert el.replay(bundle, cached.journal, data=data).sha256 == plain.sha256
    assert el.replay(bundle, plain.journal, data=data, prefix_cache=True).sha256 \
        == plain.sha256
    half = tmp_path / "half"
    run(cnn, half, optimizer, True, data, steps=5)
    with el.Session.resume(half) as s:  # replays 5 steps through the cached evaluator
        assert isinstance(s.evaluator, CachedTapsEvaluator)
        resumed = s.run(data, 12)
    assert same_run(resumed, plain)


def test_hybrid_probes_share_one_lookup(cnn: Path, tmp_path: Path) -> None:
    """The hybrid's 2 taps forwards per step look the batch up once: 8 examples a step."""
    data = data_for(cnn)
    res = run(cnn, tmp_path / "c", "hybrid", True, data, steps=6)
    assert res.cache["hits"] + res.cache["misses"] == 6 * 8


def test_encoder_taps_cut_moves_above_a_refused_one(encoder: Path, tmp_path: Path) -> None:
    """A prepared transformer: the pooled head input fails the row check (onnxruntime sums a
    batch of one in another order), so the cut moves above the pooling, which then runs in
    the suffix with the head; still bit-identical."""
    data = data_for(encoder)
    cached = run(encoder, tmp_path / "c", "tpsgd", True, data)
    rep = cached.cache
    assert rep["enabled"], rep
    for refused in rep["refused_cuts"]:
        assert not set(refused["cut"]) & set(rep["cut"])
        assert refused["reason"]
    assert same_run(cached, run(encoder, tmp_path / "p", "tpsgd", False, data))


def test_demo_bundle_exporter_taps(tmp_path: Path) -> None:
    """The shipped demo bundle (exported from torch, model_taps.onnx with layer taps): a
    head-only tpSGD run caches the hidden layer's output, bit-identically."""
    from edgelearn.demo import demo_data

    data = demo_data()[0]
    cached = run(DEMO, tmp_path / "c", "tpsgd", True, data, trainable="head.*")
    assert cached.cache["enabled"], cached.cache
    assert cached.cache["cut"] == ["layers.0:out"]
    assert same_run(cached, run(DEMO, tmp_path / "p", "tpsgd", False, data,
                                trainable="head.*"))


@pytest.mark.parametrize("optimizer", ["tpsgd", "hybrid"])
def test_two_input_text_head(tmp_path: Path, optimizer: str) -> None:
    """int64 ids + mask, a masked-mean head: the sequence dim is symbolic (no probe batch at
    setup), so the first real batch's check decides; identical either way."""
    src = embedder_onnx(tmp_path / "enc.onnx", int_inputs=True)
    bundle = tmp_path / "b"
    el.tools.prepare(src, bundle, new_head="tokens:2", pool="masked-mean",
                     mask="attention_mask")
    rng = np.random.default_rng(0)
    mask = (np.arange(6)[None, :] < rng.integers(2, 7, 24)[:, None]).astype(np.int64)
    ids = rng.integers(3, 9, (24, 6)) * mask
    data = el.Dataset({"input_ids": ids, "attention_mask": mask}, rng.integers(0, 2, 24))
    cached = run(bundle, tmp_path / "c", optimizer, True, data, steps=10)
    assert cached.cache["enabled"], cached.cache
    assert cached.cache["taps_cached"] == cached.cache["cut"]  # the pooled head input
    assert cached.cache["cached_examples"] == 24
    assert same_run(cached, run(bundle, tmp_path / "p", optimizer, False, data, steps=10))


def test_failed_first_batch_check_falls_back(cnn: Path, tmp_path: Path) -> None:
    """Features that do not reproduce the whole taps graph turn the cache off with the
    reason; the run then goes on uncached, with the uncached run's results."""
    data = data_for(cnn)
    with el.Session(cnn, tmp_path / "c", config("tpsgd"), runtime(True)) as s:
        ev = s.evaluator
        assert isinstance(ev, CachedTapsEvaluator)
        x = data.x[:8]
        feeds = ev.run_prefix(x)
        feeds["features"] = feeds["features"] + np.float32(1e-3)
        ev._check(x, feeds)  # as on a first real batch whose features came out wrong
        res = s.run(data, 12)
    assert res.cache["enabled"] is False
    assert "differ from the whole taps graph" in res.cache["reason"]
    assert same_run(res, run(cnn, tmp_path / "p", "tpsgd", False, data))


def test_no_taps_cut_when_the_first_layer_trains(tmp_path: Path) -> None:
    with el.Session(DEMO, tmp_path / "r", config("tpsgd", trainable="*"), runtime(True)) as s:
        rep = s.evaluator.cache_report()
    assert rep["enabled"] is False
    assert rep["reason"] == ("the first trainable weight is read by the first layer: no "
                             "frozen prefix")


def test_cli_info_train_and_no_cache(cnn: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = data_for(cnn)
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    assert main(["info", str(cnn), "--json"]) in (0, None)
    info = json.loads(capsys.readouterr().out)
    assert info["cache"]["taps"]["enabled"], info["cache"]
    assert info["cache"]["taps"]["cut"] == ["features"]
    outs = []
    for extra in ([], ["--no-cache"]):
        main(["train", str(cnn), "--data", str(tmp_path / "d.npz"), "--steps", "5",
              "--optimizer", "tpsgd", "--out", str(tmp_path / f"r{len(extra)}"), "--json",
              *extra])
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["cache"]["cut"] == ["features"]
    assert outs[0]["cache"]["cached_examples"]
    assert outs[1]["cache"] is None
    assert outs[0]["sha256"] == outs[1]["sha256"]
    journals = [(tmp_path / f"r{i}" / "journal.bin").read_bytes() for i in (0, 1)]
    assert journals[0] == journals[1]


@pytest.mark.torch
@pytest.mark.slow  # a torch export: 9-24 s on the 2-core machine
def test_exported_hidden_layer_taps(tmp_path: Path) -> None:
    """An exported MLP training its last hidden layer and head: the hidden layer's input is
    the cut (cached), its pre-activation and output come from the suffix."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import MLP

    torch.manual_seed(0)
    module = MLP(in_features=16, hidden=(24, 12), classes=4)
    export_bundle(module, torch.randn(1, 16), tmp_path / "b", trainable="layers.1.*,head.*")
    bundle = tmp_path / "b"
    data = data_for(bundle, classes=4)
    cached = run(bundle, tmp_path / "c", "tpsgd", True, data)
    rep = cached.cache
    assert rep["enabled"], rep
    assert len(rep["cut"]) == 1
    assert rep["taps_cached"] == rep["cut"]  # layers.1's input
    assert rep["suffix_nodes"] >= 3
    assert same_run(cached, run(bundle, tmp_path / "p", "tpsgd", False, data))


def test_live_tpsgd_steps_and_resume(cnn: Path, tmp_path: Path) -> None:
    """Samples fed one at a time (content keys, recorded samples): cached == uncached, and
    reopening the cached run replays the recorded samples through the cache."""
    data = data_for(cnn, n=6)
    digests = []
    for cache in (True, False):
        cfg = config("tpsgd", record_samples=True)
        with el.Session(cnn, tmp_path / str(cache), cfg, runtime(cache)) as s:
            for t in range(10):
                s.step((data.x[t % 6], data.y[t % 6]))
            digests.append(s.digest())
            if cache:
                assert s.evaluator.cache_report()["cached_examples"] == 6
    assert digests[0] == digests[1]
    with el.Session.resume(tmp_path / "True") as s:
        assert isinstance(s.evaluator, CachedTapsEvaluator)
        s.step((data.x[0], data.y[0]))  # opens the run: replays 10 steps first
        assert s.optimizer.t == 11
        again = s.digest()
    with el.Session.resume(tmp_path / "False") as s:
        s.step((data.x[0], data.y[0]))
        assert s.digest() == again
