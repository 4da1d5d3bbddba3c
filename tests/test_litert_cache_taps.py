"""Frozen-prefix caching of tpSGD / hybrid taps forwards on LiteRT: model_taps.tflite split on
the device with the taps a step reads as outputs; runs and replays stay bit-identical to the
uncached LiteRT taps run; the cut is reported; no frozen prefix trains uncached with the
reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgelearn as el
from edgelearn.cli import main
from edgelearn.demo import DATA, demo_data

pytest.importorskip("ai_edge_litert")

DEMO = DATA / "demo"  # ships model_taps.tflite (batch 32), head trainable
#: hybrid with ZO tensors: the head bias by ZO (2 taps forwards), the weight exactly
HYBRID = {"exact": "head.weight", "zo_lr": 0.05, "eps": 1e-2}


def data(n: int = 40) -> el.Dataset:
    train, _, _ = demo_data()
    return el.Dataset(train.x[:n], train.y[:n])


def run(bundle: Path, out: Path, optimizer: str, cache: bool, d: el.Dataset, *,
        batch: int = 16, steps: int = 12, trainable: str | None = None) -> el.RunResult:
    cfg = el.TrainConfig(optimizer=optimizer, batch_size=batch, trainable=trainable,
                         options=HYBRID if optimizer == "hybrid" else {})
    rt = el.RuntimeConfig(backend="litert", device=None, prefix_cache=cache)
    with el.Session(bundle, out, cfg, rt) as s:
        return s.run(d, steps)


def same_run(a: el.RunResult, b: el.RunResult) -> bool:
    """Same weights (sha256 of the arena and of the file) and the same journal bytes."""
    return (a.sha256 == b.sha256 and Path(a.journal).read_bytes() == Path(b.journal).read_bytes()
            and Path(a.weights).read_bytes() == Path(b.weights).read_bytes())


@pytest.mark.parametrize(("optimizer", "batch"), [("tpsgd", 16), ("tpsgd", 40),
                                                  ("hybrid", 16)])
def test_cached_litert_taps_run_is_bit_identical(tmp_path: Path, optimizer: str,
                                                 batch: int) -> None:
    """Batch 16 is zero-padded to the TFLite batch 32, batch 40 runs as 32 + a padded 8; the
    head's input (a tap) comes from the cache; replays (cached or not) reproduce the run."""
    d = data()
    cached = run(DEMO, tmp_path / "c", optimizer, True, d, batch=batch)
    plain = run(DEMO, tmp_path / "p", optimizer, False, d, batch=batch)
    rep = cached.cache
    assert rep is not None
    assert rep["enabled"], rep
    assert (rep["backend"], rep["strategy"], rep["graph"]) == ("litert", "inputs",
                                                               "tflite_taps")
    assert rep["cut"] == ["layers.0:out"]
    assert rep["taps_cached"] == ["layers.0:out"]
    assert rep["prefix_nodes"] == 3  # FULLY_CONNECTED, ADD, RELU of the frozen layer
    assert rep["suffix_nodes"] == 2  # the head's FULLY_CONNECTED + ADD
    assert rep["row_bytes"] == 4 * 64
    assert rep["cached_examples"] == 40
    assert rep["hits"] > 0
    assert plain.cache is None
    assert same_run(cached, plain)
    assert cached.loss_first != cached.loss_last  # it did train
    bundle = el.load_bundle(DEMO)
    assert el.replay(bundle, cached.journal, data=d).sha256 == plain.sha256
    assert el.replay(bundle, plain.journal, data=d, prefix_cache=True).sha256 \
        == plain.sha256


def test_resume_replays_through_the_litert_taps_cache(tmp_path: Path) -> None:
    from edgelearn.training.litert_cached import LiteRTCachedTapsEvaluator

    d = data()
    plain = run(DEMO, tmp_path / "p", "tpsgd", False, d)
    run(DEMO, tmp_path / "half", "tpsgd", True, d, steps=5)
    with el.Session.resume(tmp_path / "half") as s:
        assert isinstance(s.evaluator, LiteRTCachedTapsEvaluator)
        resumed = s.run(d, 12)
    assert same_run(resumed, plain)


def test_no_frozen_prefix_trains_uncached_with_the_reason(tmp_path: Path) -> None:
    d = data()
    cached = run(DEMO, tmp_path / "c", "tpsgd", True, d, trainable="*", steps=4)
    plain = run(DEMO, tmp_path / "p", "tpsgd", False, d, trainable="*", steps=4)
    assert cached.cache == {"enabled": False, "graph": "tflite_taps",
                            "reason": "the first trainable weight is read by the first layer: "
                                      "no frozen prefix"}
    assert same_run(cached, plain)


def test_moved_cut_and_taps_the_suffix_does_not_read() -> None:
    """A refused cut moves up (the head's input is then computed, and output, by the suffix);
    a tap above the cut that no suffix op reads is still a cut tensor; every tap of the split
    halves == the whole taps graph's."""
    from edgelearn.backends import make_backend
    from edgelearn.backends.litert_split import (
        LiteRTTapsSplitPlanner,
        PrefixRunner,
        TapsSuffixRunner,
    )

    bundle = el.load_bundle(DEMO)
    store = bundle.load_store()
    x = data(5).x
    whole_be = make_backend("litert", bundle, threads=1, graph="tflite_taps")
    whole_be.bind(store)
    whole = whole_be.forward({"x": x})
    planner = LiteRTTapsSplitPlanner(bundle, store, taps=["logits", "layers.0:out",
                                                          "layers.0:pre"])
    first = planner.split()
    assert not isinstance(first, str), first
    assert sorted(first.cut.tensors) == ["layers.0:out", "layers.0:pre"]
    moved = LiteRTTapsSplitPlanner(bundle, store, taps=["logits", "layers.0:out"]).split(
        after={"layers.0:out"})
    assert not isinstance(moved, str), moved
    assert "layers.0:out" not in moved.cut.tensors
    for split in (first, moved):
        feeds = dict(zip(split.cut.tensors, PrefixRunner(split, store, 1).run(
            list(split.cut.tensors), {"x": x}), strict=True))
        taps = {**feeds, **TapsSuffixRunner(split, store, 1).run_all(feeds)}
        for name in ("logits", "layers.0:out"):
            assert np.array_equal(taps[name], whole[name]), name


def test_cli_info_train_json_and_no_cache(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    d = data()
    np.savez(tmp_path / "d.npz", x=d.x, y=d.y)
    assert main(["info", str(DEMO), "--json"]) in (0, None)
    taps = json.loads(capsys.readouterr().out)["cache_litert"]["taps"]
    assert taps["enabled"], taps
    assert (taps["backend"], taps["cut"]) == ("litert", ["layers.0:out"])
    outs = []
    for extra in ([], ["--no-cache"]):
        main(["train", str(DEMO), "--data", str(tmp_path / "d.npz"), "--steps", "5",
              "--optimizer", "tpsgd", "--backend", "litert",
              "--out", str(tmp_path / f"r{len(extra)}"), "--json", *extra])
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["cache"]["cut"] == ["layers.0:out"]
    assert outs[0]["cache"]["graph"] == "tflite_taps"
    assert outs[1]["cache"] is None
    assert outs[0]["sha256"] == outs[1]["sha256"]
    assert main(["info", str(DEMO)]) in (0, None)
    assert "prefix cache (litert tpsgd, hybrid): yes: cut at layers.0:out" \
        in capsys.readouterr().out


def test_a_taps_cut_that_fails_its_check_is_refused(tmp_path: Path) -> None:
    """A split whose prefix does not compute what the whole taps graph does (its frozen first
    layer from other weights) fails the bit-identity check, naming the taps at fault."""
    from edgelearn.backends.litert_split import LiteRTTapsSplitPlanner
    from edgelearn.training.litert_cached import LiteRTCachedTapsEvaluator

    cfg = el.TrainConfig(optimizer="tpsgd")
    rt = el.RuntimeConfig(backend="litert", device=None, prefix_cache=True)
    with el.Session(DEMO, tmp_path / "r", cfg, rt) as s:
        ev = s.evaluator
        assert isinstance(ev, LiteRTCachedTapsEvaluator)
        other = s.store.copy()
        other["layers.0.bias"] = other["layers.0.bias"] + np.float32(1e-3)
        split = LiteRTTapsSplitPlanner(el.load_bundle(DEMO), other, taps=ev.taps).split()
        # "inputs": the prefix's frozen parameters are set from the store it is given
        bad = LiteRTCachedTapsEvaluator(ev.taps_plain, split, other, input_name="x",
                                        taps=ev.taps, threads=1, providers=(),
                                        capacity=1 << 20).mismatch(data(5).x)
    assert bad is not None
    assert "differ from the whole taps graph's" in bad[0]
    assert bad[1] == {"layers.0:out"}


@pytest.fixture(scope="module")
def exported_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo CNN exported with TFLite batch 4 (taps graph included), head-only trainable."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import ZOO

    root = tmp_path_factory.mktemp("cnn_tfl_taps")
    factory, shape = ZOO["cnn"]
    torch.manual_seed(0)
    export_bundle(factory(), torch.randn(1, *shape), root / "float", trainable="head.*",
                  formats=("onnx", "tflite"), tflite_batch=4)
    return root / "float"


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["tpsgd", "hybrid"])
def test_exported_cnn_taps_are_bit_identical(exported_cnn: Path, tmp_path: Path,
                                             optimizer: str) -> None:
    """Conv backbone (TFLite layout transposes, folded batch norm) cut before the head;
    batch 6 on the TFLite batch 4: a full chunk and a padded one."""
    bundle = el.load_bundle(exported_cnn)
    assert "tflite_taps" in bundle.files, bundle.manifest.get("tflite_taps_skipped")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, *bundle.inputs[0].shape[1:])).astype(np.float32)
    d = el.Dataset(x, rng.integers(0, 10, 24))
    cached = run(exported_cnn, tmp_path / "c", optimizer, True, d, batch=6, steps=10)
    plain = run(exported_cnn, tmp_path / "p", optimizer, False, d, batch=6, steps=10)
    rep = cached.cache
    assert rep["enabled"], rep
    assert rep["graph"] == "tflite_taps"
    assert rep["prefix_nodes"] > 10
    assert rep["suffix_nodes"] <= 3  # the head
    assert rep["taps_cached"] == rep["cut"]  # the head's input, cached
    assert rep["cached_examples"] == 24
    assert same_run(cached, plain)
    assert el.replay(bundle, cached.journal, data=d).sha256 == plain.sha256
