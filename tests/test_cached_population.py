"""zo-sgd's probe points on cached frozen-prefix features scored in one runtime call
(`edgelearn.training.cached_population`): the K-candidate suffix graph, runs whose journal
and weights equal the uncached run's (== / bytes), and the probe losses of one call equal to
single forwards (==)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from backbone_models import mobilenet_onnx, transformer_onnx

import edgelearn as el
from edgelearn.optim.base import Population
from edgelearn.prepare import prepare_onnx
from edgelearn.training.cached_population import candidate_name, k_candidate_graph

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", params=["encoder", "cnn"])
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "encoder":  # the suffix pools (shared) before the head (per candidate)
        src = transformer_onnx(d / "m.onnx", tokens=8, dim=32, layers=1)
        prepare_onnx(src, d / "bundle", new_head="hidden:3")
    else:
        src = mobilenet_onnx(d / "m.onnx", size=32, blocks=((1, 16, 1), (6, 24, 2)),
                             features=64)
        prepare_onnx(src, d / "bundle", new_head="features:3")
    return d / "bundle"


def data_for(bundle: Path, n: int = 24) -> el.Dataset:
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(0)
    return el.Dataset(rng.standard_normal((n, *spec.shape[1:])).astype(np.float32),
                      rng.integers(0, 3, n))


def run(bundle: Path, out: Path, cache: bool, probes: int = 1) -> el.RunResult:
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=8, options={"probes": probes})
    rt = el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=cache)
    with el.Session(bundle, out, cfg, rt) as s:
        return s.run(data_for(bundle), 10)


@pytest.mark.parametrize("probes", [1, 3])
def test_one_call_runs_equal_the_uncached_run(bundle: Path, tmp_path: Path,
                                              probes: int) -> None:
    """The cached run scores its 2q probe points in one call per step and writes the same
    journal bytes and weights as the uncached run."""
    cached = run(bundle, tmp_path / "c", True, probes)
    plain = run(bundle, tmp_path / "p", False, probes)
    assert cached.cache["enabled"]
    assert cached.cache["population"] == {"one_call": True}
    assert cached.sha256 == plain.sha256
    assert Path(cached.journal).read_bytes() == Path(plain.journal).read_bytes()


def test_candidate_outputs_equal_single_forwards(bundle: Path, tmp_path: Path) -> None:
    """Each candidate's output of one K-candidate call equals a single suffix forward of
    its weights (==), on a batch size checked before and on one never seen."""
    data = data_for(bundle)
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=8)
    rt = el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=True)
    with el.Session(bundle, tmp_path / "r", cfg, rt) as s:
        s.run(data, 2)
        ev, store = s.evaluator, s.store
        theta = store.flat("float32")
        base = theta.copy()
        rng = np.random.default_rng(1)
        cands = [base + np.float32(0.1) * rng.standard_normal(base.size).astype(np.float32)
                 for _ in range(3)]

        def place(j: int) -> None:
            np.copyto(theta, cands[j])

        def fill(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
            out["float32"][: hi - lo] = cands[lo:hi]

        for n in (8, 5):
            cut = ev.run_prefix(data.x[:n])
            assert ev.candidate_runners(3)
            runner = ev.candidates[3]
            fill({"float32": runner.rows}, 0, 3)
            outs = [np.array(o) for o in runner.outputs(cut)]
            for j in range(3):
                place(j)
                assert np.array_equal(outs[j], ev.suffix.run(cut)), (n, j)
        np.copyto(theta, base)
        losses = ev.forwards(data.x[:8], data.y[:8]).population(Population(3, place, fill))
        single = []
        for j in range(3):
            place(j)
            single.append(ev.forwards(data.x[:8], data.y[:8]).evaluate())
        assert losses == single


def test_k_candidate_graph_shares_the_frozen_part(bundle: Path, tmp_path: Path) -> None:
    """Nodes that read no trainable weight run once; the others once per candidate."""
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=8)
    rt = el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=True)
    with el.Session(bundle, tmp_path / "r", cfg, rt) as s:
        split = s.evaluator.split
    suffix = onnx.load_from_string(split.suffix)
    graph = onnx.load_from_string(k_candidate_graph(split.suffix, split.trainable, 4)).graph
    per = sum(1 for n in suffix.graph.node if set(n.input) & set(split.trainable))
    assert len(graph.node) == len(suffix.graph.node) + 3 * per
    assert [o.name for o in graph.output] == [
        candidate_name(suffix.graph.output[0].name, j) for j in range(4)]
    with pytest.raises(ValueError, match="does not depend"):
        k_candidate_graph(split.suffix, [], 2)
