"""Frozen-prefix caching: the automatic cut, the feature cache, and runs that stay
bit-identical to the uncached run (fixed data sets and live samples), no torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from backbone_models import mobilenet_onnx, transformer_onnx

import edgelearn as el
from edgelearn.cli import main
from edgelearn.prefix_cache import FeatureCache, plan_split
from edgelearn.prepare import prepare_onnx
from edgelearn.training.cached_evaluator import CachedEvaluator

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


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


def data_for(bundle: Path, n: int = 24, seed: int = 0) -> el.Dataset:
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.shape[1:])).astype(np.float32)
    return el.Dataset(x, rng.integers(0, 3, n))


def run(bundle: Path, out: Path, optimizer: str, cache: bool, steps: int = 12,
        **rt) -> el.RunResult:
    cfg = el.TrainConfig(optimizer=optimizer, batch_size=8)
    with el.Session(bundle, out, cfg, el.RuntimeConfig(backend="onnxruntime", device=None,
                                                       prefix_cache=cache, **rt)) as s:
        return s.run(data_for(bundle), steps)


def same_run(a: el.RunResult, b: el.RunResult) -> bool:
    """Same weights (sha256 of the arena and of the file) and the same journal bytes."""
    return (a.sha256 == b.sha256 and Path(a.journal).read_bytes() == Path(b.journal).read_bytes()
            and Path(a.weights).read_bytes() == Path(b.weights).read_bytes())


@pytest.mark.parametrize("optimizer", ["zo-sgd", "polystep"])
def test_cached_run_is_bit_identical(cnn: Path, tmp_path: Path, optimizer: str) -> None:
    cached = run(cnn, tmp_path / "c", optimizer, True)
    plain = run(cnn, tmp_path / "p", optimizer, False)
    assert cached.cache is not None
    assert cached.cache["enabled"], cached.cache
    assert cached.cache["cut"] == ["features"]
    assert cached.cache["prefix_nodes"] > 10
    assert cached.cache["cached_examples"] == 24
    assert cached.cache["hits"] > 0
    assert cached.cache["bytes"] == 24 * 64 * 4
    assert plain.cache is None
    assert same_run(cached, plain)
    assert cached.loss_first != cached.loss_last  # it did train


def test_memory_plan_is_the_uncached_runs(cnn: Path, tmp_path: Path) -> None:
    """Under a budget the cache takes what the plan leaves: same batch, same run."""
    cached = run(cnn, tmp_path / "c", "zo-sgd", True, memory_budget_mb=8192)
    plain = run(cnn, tmp_path / "p", "zo-sgd", False, memory_budget_mb=8192)
    assert cached.memory_plan["batch_size"] == plain.memory_plan["batch_size"]
    assert 0 < cached.cache["capacity_bytes"] < 8192 << 20
    assert same_run(cached, plain)


def test_encoder_cut_is_checked(encoder: Path, tmp_path: Path) -> None:
    """The cut passes the runtime check (or moved above the tensor that failed it)."""
    cached = run(encoder, tmp_path / "c", "zo-sgd", True)
    assert cached.cache["enabled"], cached.cache
    for refused in cached.cache["refused_cuts"]:  # e.g. a ReduceMean onnxruntime sums
        assert not set(refused["cut"]) & set(cached.cache["cut"])  # per batch size
    assert same_run(cached, run(encoder, tmp_path / "p", "zo-sgd", False))


def test_live_steps_are_bit_identical(cnn: Path, tmp_path: Path) -> None:
    """Samples fed one at a time (content keys); repeats hit the cache."""
    data = data_for(cnn, n=6)
    digests, reports = [], []
    for cache in (True, False):
        rt = el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=cache)
        with el.Session(cnn, tmp_path / str(cache), el.TrainConfig(optimizer="zo-sgd"), rt) as s:
            for t in range(12):
                s.step((data.x[t % 6], data.y[t % 6]))
            digests.append(s.digest())
            reports.append(s.evaluator.cache_report())
    assert digests[0] == digests[1]
    assert reports[0]["cached_examples"] == 6
    assert reports[0]["hits"] >= 6


def test_feature_cache_spills_and_recomputes(cnn: Path, tmp_path: Path) -> None:
    b = el.load_bundle(cnn)
    store = b.load_store()
    frozen = {n: store[n] for n, s in store.specs.items() if not s.trainable}
    split = plan_split(b.files["onnx"], frozen, store.trainable_names, ["x"], "logits")
    assert not isinstance(split, str)
    rng = np.random.default_rng(1)

    def compute(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"features": x.reshape(len(x), -1)[:, :64] * 2}

    x = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    want = compute(x)["features"]
    for spill, kept in ((tmp_path, 6), (None, 2)):
        cache = FeatureCache(split.cut, capacity=2 * split.cut.row_bytes, spill=spill)
        for _ in range(2):
            got = cache.features(list(range(6)), x, compute)["features"]
            assert np.array_equal(got, want)
        rep = cache.report()
        assert rep["cached_examples"] == kept
        assert rep["bytes"] == 2 * 64 * 4
        assert (tmp_path / "prefix_cache.bin").exists() == (spill is not None)
        cache.close()
    assert not (tmp_path / "prefix_cache.bin").exists()


def test_no_cut_when_the_first_layer_trains(cnn: Path, tmp_path: Path) -> None:
    with el.Session(cnn, tmp_path / "r", el.TrainConfig(optimizer="zo-sgd", trainable="*"),
                    el.RuntimeConfig(backend="onnxruntime", device=None)) as s:
        rep = s.evaluator.cache_report()
        assert not isinstance(s.evaluator, CachedEvaluator)
    assert rep is not None
    assert rep["enabled"] is False
    assert rep["reason"] == ("the first trainable weight is read by the first layer: no "
                             "frozen prefix")


def test_cache_needs_a_model_on_a_splitting_backend() -> None:
    from edgelearn.training.cached_evaluator import cached_or_plain
    from edgelearn.training.evaluators import LossEvaluator
    from edgelearn.training.timing import Timers

    for backend, why in (("other", "onnxruntime and litert only"),
                         ("litert", "no model to run")):  # LiteRT: tests/test_litert_cache.py
        plain = LossEvaluator(None, None, None, Timers())
        assert cached_or_plain(None, plain, backend=backend, threads=None, capacity=0) is plain
        assert why in plain.cache_report()["reason"]


def test_cli_info_train_and_no_cache(cnn: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = data_for(cnn)
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    assert main(["info", str(cnn), "--json"]) in (0, None)
    info = json.loads(capsys.readouterr().out)
    assert info["cache"]["enabled"]
    assert info["cache"]["cut"] == ["features"]
    outs = []
    for extra in ([], ["--no-cache"]):
        main(["train", str(cnn), "--data", str(tmp_path / "d.npz"), "--steps", "5",
              "--out", str(tmp_path / f"r{len(extra)}"), "--json", "--optimizer", "zo-sgd",
              *extra])
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["cache"]["cut"] == ["features"]
    assert outs[0]["cache"]["cached_examples"]
    assert outs[1]["cache"] is None
    assert outs[0]["sha256"] == outs[1]["sha256"]



def test_spilled_run_is_bit_identical(cnn: Path, tmp_path: Path) -> None:
    """Features past the memory bound go to the run directory's spill file, then away."""
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=8)
    rt = el.RuntimeConfig(backend="onnxruntime", device=None)
    with el.Session(cnn, tmp_path / "s", cfg, rt) as s:
        s.evaluator.cache.max_rows = 5  # as a tight memory budget would leave
        res = s.run(data_for(cnn), 12)
        assert (tmp_path / "s" / "prefix_cache.bin").is_file()
    assert not (tmp_path / "s" / "prefix_cache.bin").exists()
    assert res.cache["cached_examples"] == 24
    assert res.cache["spilled_examples"] == 19
    assert same_run(res, run(cnn, tmp_path / "p", "zo-sgd", False))
