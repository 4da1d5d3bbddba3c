"""Frozen-prefix caching on LiteRT: the TFLite flatbuffer split on device (no converter, no
torch), runs bit-identical to the uncached LiteRT run for both weight strategies, padded and
chunked batches, live steps, spills; `info` / `train --json` report the cut; a cut that fails
its check or a graph with no frozen prefix trains uncached with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgelearn as el
from edgelearn.cli import main
from edgelearn.demo import DATA, demo_data

pytest.importorskip("ai_edge_litert")

DEMO = DATA / "demo"  # ships model.tflite + model_const.tflite (batch 32), head trainable
STRATEGIES = ("inputs", "rebuild")


def data(n: int = 40) -> el.Dataset:
    train, _, _ = demo_data()
    return el.Dataset(train.x[:n], train.y[:n])


def runtime(strategy: str, cache: bool, **kw) -> el.RuntimeConfig:
    return el.RuntimeConfig(backend="litert", device=None, prefix_cache=cache,
                            backend_options={"strategy": strategy}, **kw)


def run(bundle: Path, out: Path, strategy: str, cache: bool, *, optimizer: str = "zo-sgd",
        batch: int = 16, steps: int = 12, trainable: str | None = None,
        **kw) -> el.RunResult:
    cfg = el.TrainConfig(optimizer=optimizer, batch_size=batch, trainable=trainable)
    with el.Session(bundle, out, cfg, runtime(strategy, cache, **kw)) as s:
        return s.run(data(), steps)


def same_run(a: el.RunResult, b: el.RunResult) -> bool:
    """Same weights (sha256 of the arena and of the file) and the same journal bytes."""
    return (a.sha256 == b.sha256 and Path(a.journal).read_bytes() == Path(b.journal).read_bytes()
            and Path(a.weights).read_bytes() == Path(b.weights).read_bytes())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("optimizer", "batch"), [("zo-sgd", 16), ("zo-sgd", 40),
                                                  ("polystep", 16)])
def test_cached_litert_run_is_bit_identical(tmp_path: Path, strategy: str, optimizer: str,
                                            batch: int) -> None:
    """Batch 16 is zero-padded to the TFLite batch 32, batch 40 runs as 32 + a padded 8."""
    cached = run(DEMO, tmp_path / "c", strategy, True, optimizer=optimizer, batch=batch)
    plain = run(DEMO, tmp_path / "p", strategy, False, optimizer=optimizer, batch=batch)
    rep = cached.cache
    assert rep is not None
    assert rep["enabled"], rep
    assert (rep["backend"], rep["strategy"]) == ("litert", strategy)
    assert len(rep["cut"]) == 1
    assert rep["prefix_nodes"] >= 2  # the frozen first layer: FULLY_CONNECTED + RELU at least
    assert rep["row_bytes"] == 4 * 64  # one example's hidden activations (64 float32)
    assert rep["cached_examples"] == 40
    assert rep["hits"] > 0
    assert plain.cache is None
    assert same_run(cached, plain)
    assert cached.loss_first != cached.loss_last  # it did train


def test_live_steps_are_bit_identical(tmp_path: Path) -> None:
    """Samples fed one at a time (content keys): repeats hit the cache, same digest."""
    d = data(6)
    digests, reports = [], []
    for cache in (True, False):
        with el.Session(DEMO, tmp_path / str(cache), el.TrainConfig(optimizer="zo-sgd"),
                        runtime("rebuild", cache)) as s:
            for t in range(12):
                s.step((d.x[t % 6], d.y[t % 6]))
            digests.append(s.digest())
            reports.append(s.evaluator.cache_report())
    assert digests[0] == digests[1]
    assert reports[0]["cached_examples"] == 6
    assert reports[0]["hits"] >= 6


def test_spilled_and_budgeted_runs_are_bit_identical(tmp_path: Path) -> None:
    """Features past the memory bound spill to the run directory; under a memory budget the
    plan (batch size) is the uncached run's."""
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=16)
    with el.Session(DEMO, tmp_path / "s", cfg, runtime("inputs", True)) as s:
        s.evaluator.cache.max_rows = 5  # as a tight memory budget would leave
        spilled = s.run(data(), 12)
        assert (tmp_path / "s" / "prefix_cache.bin").is_file()
    assert not (tmp_path / "s" / "prefix_cache.bin").exists()
    assert spilled.cache["spilled_examples"] == 35
    plain = run(DEMO, tmp_path / "p", "inputs", False)
    assert same_run(spilled, plain)
    budget = run(DEMO, tmp_path / "b", "inputs", True, memory_budget_mb=8192)
    plain_b = run(DEMO, tmp_path / "pb", "inputs", False, memory_budget_mb=8192)
    assert budget.memory_plan["batch_size"] == plain_b.memory_plan["batch_size"]
    assert 0 < budget.cache["capacity_bytes"] < 8192 << 20
    assert same_run(budget, plain_b)


def test_no_frozen_prefix_trains_uncached_with_the_reason(tmp_path: Path) -> None:
    res = run(DEMO, tmp_path / "r", "inputs", True, trainable="*", steps=3)
    assert res.cache == {"enabled": False, "reason": "the first trainable weight is read by "
                         "the first layer: no frozen prefix"}
    plan = el.tools.cache_plan(el.load_bundle(DEMO), trainable="*", backend="litert")
    assert plan["enabled"] is False
    assert "no frozen prefix" in plan["reason"]


def test_a_cut_that_fails_its_check_is_refused(tmp_path: Path) -> None:
    """A split whose prefix does not compute what the whole model does (here: its frozen
    first layer from other weights) fails the bit-identity check, with the reason."""
    from edgelearn.backends.litert_split import LiteRTSplitPlanner
    from edgelearn.training.litert_cached import LiteRTCachedEvaluator

    with el.Session(DEMO, tmp_path / "r", el.TrainConfig(optimizer="zo-sgd"),
                    runtime("rebuild", True)) as s:
        ev = s.evaluator
        store = s.store
        other = store.copy()
        other["layers.0.bias"] = other["layers.0.bias"] + np.float32(1e-3)
        split = LiteRTSplitPlanner(el.load_bundle(DEMO), other, strategy="rebuild",
                                   output=ev.plain.model.output_name).split()
        bad = LiteRTCachedEvaluator(ev.plain, split, store, threads=1, providers=(),
                                    capacity=1 << 20).mismatch(data(5).x)
    assert bad is not None
    assert "differs from the whole graph's" in bad[0]


def test_cli_info_train_json_and_no_cache(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    d = data()
    np.savez(tmp_path / "d.npz", x=d.x, y=d.y)
    assert main(["info", str(DEMO), "--json"]) in (0, None)
    info = json.loads(capsys.readouterr().out)
    lite = info["cache_litert"]
    assert lite["enabled"], lite
    assert lite["backend"] == "litert"
    assert lite["prefix_nodes"] >= 2
    assert len(lite["cut"]) == 1
    outs = []
    for extra in ([], ["--no-cache"]):
        main(["train", str(DEMO), "--data", str(tmp_path / "d.npz"), "--steps", "5",
              "--optimizer", "zo-sgd", "--backend", "litert",
              "--out", str(tmp_path / f"r{len(extra)}"), "--json", *extra])
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["cache"]["cut"] == lite["cut"]
    assert outs[0]["cache"]["cached_examples"]
    assert outs[1]["cache"] is None
    assert outs[0]["sha256"] == outs[1]["sha256"]
    assert main(["info", str(DEMO)]) in (0, None)
    assert "prefix cache (litert): yes" in capsys.readouterr().out


@pytest.fixture(scope="module")
def exported_cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The zoo CNN exported with TFLite batch 4, head-only trainable: float and int8."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from edgelearn.export import export_bundle
    from edgelearn.export.quantize import export_int8_bundle
    from edgelearn.export.zoo import ZOO

    root = tmp_path_factory.mktemp("cnn_tfl")
    factory, shape = ZOO["cnn"]
    torch.manual_seed(0)
    module = factory()
    example = torch.randn(1, *shape)
    export_bundle(module, example, root / "float", trainable="head.*",
                  formats=("onnx", "tflite"), tflite_batch=4)
    export_int8_bundle(module, example, root / "int8", formats=("onnx", "tflite"),
                       tflite_batch=4)
    return {"float": root / "float", "int8": root / "int8"}


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["float", "int8"])
def test_exported_cnn_head_is_bit_identical(exported_cnn: dict[str, Path], tmp_path: Path,
                                            strategy: str, kind: str) -> None:
    """Conv backbone (TFLite layout transposes, folded batch norm) cut before the head;
    batch 6 on the TFLite batch 4: a full chunk and a padded one; int8 head weights live."""
    bundle = exported_cnn[kind]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, *el.load_bundle(bundle).inputs[0].shape[1:]))
    d = el.Dataset(x.astype(np.float32), rng.integers(0, 10, 24))
    res = []
    for cache in (True, False):
        cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=6, trainable="head.*")
        with el.Session(bundle, tmp_path / str(cache), cfg, runtime(strategy, cache)) as s:
            res.append(s.run(d, 10))
    rep = res[0].cache
    assert rep["enabled"], rep
    assert rep["prefix_nodes"] > 20
    assert rep["suffix_nodes"] <= 5  # the head (+ its int8 dequantization)
    assert rep["cached_examples"] == 24
    assert same_run(res[0], res[1])


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_input_model_is_bit_identical(tmp_path: Path, strategy: str) -> None:
    """Two float inputs merged before the head (exported with litert-torch): the cut holds
    the merged features; cached == uncached for zo-sgd and polystep."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from edgelearn.export import export_bundle

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(4, 16)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.a(x)) + torch.relu(self.b(z)))

    torch.manual_seed(0)
    bundle = tmp_path / "b"
    export_bundle(TwoInputs().eval(), (torch.randn(2, 8), torch.randn(2, 4)), bundle,
                  trainable="head.*", formats=("onnx", "tflite"), input_names=["x", "z"],
                  tflite_batch=8)
    rng = np.random.default_rng(0)
    d = el.Dataset({"x": rng.standard_normal((20, 8)).astype(np.float32),
                    "z": rng.standard_normal((20, 4)).astype(np.float32)},
                   rng.integers(0, 3, 20))
    for optimizer in ("zo-sgd", "polystep"):
        res = []
        for cache in (True, False):
            cfg = el.TrainConfig(optimizer=optimizer, batch_size=6)
            with el.Session(bundle, tmp_path / f"{optimizer}{cache}", cfg,
                            runtime(strategy, cache)) as s:
                res.append(s.run(d, 8))
        rep = res[0].cache
        assert rep["enabled"], rep
        assert rep["cached_examples"] == 20
        assert same_run(res[0], res[1])
        assert res[0].loss_first != res[0].loss_last


def test_refused_tensors_move_the_cut_up() -> None:
    """`split(after=...)`: the producers of refused cut tensors run in the suffix."""
    from edgelearn.backends.litert_split import LiteRTSplitPlanner

    bundle = el.load_bundle(DEMO)
    planner = LiteRTSplitPlanner(bundle, bundle.load_store(), strategy="inputs",
                                 output=bundle.outputs[0].name)
    first = planner.split()
    moved = planner.split(after=first.cut.tensors)
    assert not isinstance(moved, str), moved
    assert not set(moved.cut.tensors) & set(first.cut.tensors)
    assert moved.cut.prefix_nodes < first.cut.prefix_nodes
    assert moved.cut.suffix_nodes > first.cut.suffix_nodes


def test_graphs_with_several_subgraphs_are_not_split() -> None:
    import flatbuffers

    from edgelearn.errors import EdgelearnError
    from edgelearn.tflite_graph import TfliteGraph, schema

    model = schema().ModelT.InitFromPackedBuf(bytearray((DEMO / "model.tflite").read_bytes()))
    model.subgraphs.append(model.subgraphs[0])  # as a WHILE body or a composite would add
    builder = flatbuffers.Builder(1 << 16)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    with pytest.raises(EdgelearnError, match="2 subgraphs"):
        TfliteGraph(bytes(builder.Output()))
