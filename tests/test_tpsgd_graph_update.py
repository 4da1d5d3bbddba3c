"""tpSGD's head update inside the runtime call (`head_update="graph"`,
`edgelearn.graph_update`): parity with the numpy update and torch autograd, runs that replay
bit-exactly, the option recorded only when set, and clear refusals / fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from backbone_models import transformer_onnx

import edgelearn as el
from edgelearn import graph_update
from edgelearn.errors import InputError
from edgelearn.layers import Layer, parse_layers
from edgelearn.optim.tpsgd import head_grad
from edgelearn.parity import compare
from edgelearn.prepare import prepare_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ATOL, RTOL = 1e-6, 1e-5  # float32 G vs numpy's float64-then-rounded G


def head_suffix(layout: str, n_in: int = 6, n_out: int = 3) -> bytes:
    """A minimal taps suffix: x [N, in] -> z = x W(^T) + b, W and b graph inputs."""
    from onnx import TensorProto, helper

    w_shape = [n_out, n_in] if layout == "out_in" else [n_in, n_out]
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"]) if layout == "out_in"
             else helper.make_node("Identity", ["W"], ["Wt"]),
             helper.make_node("MatMul", ["x", "Wt"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["z"])]
    g = helper.make_graph(nodes, "head", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", n_in]),
        helper.make_tensor_value_info("W", TensorProto.FLOAT, w_shape),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [n_out])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", n_out])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def head_layer(layout: str) -> Layer:
    return Layer(name="head", kind="linear", head=True, params={"weight": "W", "bias": "b"},
                 activation="none", input="x", preact="z", output=None, weight_layout=layout)


def graph_step(layout: str, loss: str, lr: float = 0.1, seed: int = 0, version: int = 2
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feeds, graph outputs) of one graph head update (form `version`) on random data."""
    rng = np.random.default_rng(seed)
    model = graph_update.build(head_suffix(layout), head_layer(layout), ["W", "b"], loss,
                               version)
    n = 8
    w = rng.standard_normal((3, 6) if layout == "out_in" else (6, 3)).astype(np.float32)
    y = (rng.integers(0, 3, n) if loss == "cross-entropy"
         else rng.standard_normal((n, 3)).astype(np.float32))
    feeds = {"x": rng.standard_normal((n, 6)).astype(np.float32), "W": w,
             "b": rng.standard_normal(3).astype(np.float32)}
    if version == 1:
        feeds.update({graph_update.Y: y, graph_update.LR: np.asarray(lr, np.float32)})
    else:
        feeds.update(graph_update.feeds(loss, y, lr, 3))
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(names, feeds), strict=True))
    return {**feeds, graph_update.Y: y, graph_update.LR: np.asarray(lr, np.float32)}, out


@pytest.mark.parametrize("version", graph_update.VERSIONS)
@pytest.mark.parametrize("loss", ["cross-entropy", "mse"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_graph_update_matches_numpy(layout: str, loss: str, version: int) -> None:
    """Either form's loss and updated weights equal tpSGD's numpy rule within float
    tolerance (scaled by the update's magnitude: the update, not the weights, is compared)."""
    feeds, out = graph_step(layout, loss, version=version)
    value, g = head_grad(out["z"], feeds[graph_update.Y], loss)
    x, lr = feeds["x"], np.float32(feeds[graph_update.LR])
    dw = g.T @ x if layout == "out_in" else x.T @ g
    want = {"dW": lr * dw, "db": lr * g.sum(0), "loss": np.array([value])}
    got = {"dW": feeds["W"] - out[graph_update.output_name("weight")],
           "db": feeds["b"] - out[graph_update.output_name("bias")].reshape(3),
           "loss": out[graph_update.LOSS].reshape(1)}
    p = compare(got, want, atol=ATOL, rtol=RTOL)
    assert p.ok, p.describe()
    assert np.abs(want["dW"]).max() > 1e-3  # the step is not trivially zero


def test_form2_is_leaner_than_form1() -> None:
    """Form 2 runs fewer nodes than form 1 and outputs only the logits, loss and weights."""
    suffix = head_suffix("out_in")
    forms = {v: onnx.load_from_string(graph_update.build(suffix, head_layer("out_in"),
                                                         ["W", "b"], "cross-entropy", v))
             for v in graph_update.VERSIONS}
    appended = {v: len(m.graph.node) - 3 for v, m in forms.items()}  # the head is 3 nodes
    assert appended == {1: 11, 2: 9}  # form 2: 8 nodes and G's Transpose
    assert [o.name for o in forms[2].graph.output] == [
        "z", graph_update.LOSS, graph_update.output_name("weight"),
        graph_update.output_name("bias")]
    with pytest.raises(ValueError, match="form 3"):
        graph_update.build(suffix, head_layer("out_in"), ["W", "b"], "cross-entropy", 3)


@pytest.mark.torch
@pytest.mark.parametrize("version", graph_update.VERSIONS)
@pytest.mark.parametrize("loss", ["cross-entropy", "mse"])
def test_graph_update_matches_torch_autograd(loss: str, version: int) -> None:
    """Either form's step is one SGD step of torch autograd on the head's true loss."""
    torch = pytest.importorskip("torch")
    feeds, out = graph_step("out_in", loss, seed=1, version=version)
    w = torch.tensor(feeds["W"], requires_grad=True)
    b = torch.tensor(feeds["b"], requires_grad=True)
    z = torch.tensor(feeds["x"]) @ w.T + b
    y = torch.tensor(feeds[graph_update.Y])
    value = (torch.nn.functional.cross_entropy(z, y) if loss == "cross-entropy"
             else torch.nn.functional.mse_loss(z, y))
    value.backward()
    lr = float(feeds[graph_update.LR])
    want = {"W": (w - lr * w.grad).detach().numpy(), "b": (b - lr * b.grad).detach().numpy(),
            "loss": np.array([value.item()])}
    got = {"W": out[graph_update.output_name("weight")],
           "b": out[graph_update.output_name("bias")].reshape(3),
           "loss": out[graph_update.LOSS].reshape(1)}
    p = compare(got, want, atol=ATOL, rtol=RTOL)
    assert p.ok, p.describe()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("enc")
    src = transformer_onnx(d / "enc.onnx", tokens=8, dim=32, layers=1)
    prepare_onnx(src, d / "bundle", new_head="hidden:3")
    return d / "bundle"


def data_for(bundle: Path, n: int = 24) -> el.Dataset:
    spec = el.load_bundle(bundle).inputs[0]
    rng = np.random.default_rng(0)
    return el.Dataset(rng.standard_normal((n, *spec.shape[1:])).astype(np.float32),
                      rng.integers(0, 3, n))


def run(bundle: Path, out: Path, mode: str | None, data: el.Dataset, *, cache: bool = True,
        steps: int = 10, options_extra: dict | None = None, **kw) -> el.RunResult:
    options = {**({} if mode is None else {"head_update": mode}), **(options_extra or {})}
    cfg = el.TrainConfig(optimizer="tpsgd", batch_size=8, options=options, **kw)
    rt = el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=cache)
    with el.Session(bundle, out, cfg, rt) as s:
        return s.run(data, steps)


def header(result: el.RunResult) -> dict:
    from edgelearn.journal import iter_journal

    return next(iter_journal(Path(result.journal)))


def weights(bundle: Path, result: el.RunResult) -> dict[str, np.ndarray]:
    store = el.load_bundle(bundle).load_store()
    store.load(result.weights)
    return {n: np.array(store[n]) for n in ("head.weight", "head.bias")}


def test_graph_run_replays_and_tracks_numpy(encoder: Path, tmp_path: Path) -> None:
    """A head-only run on a prepared transformer: graph mode trains (loss falls), replays
    bit-exactly (sha256 ==) through the same graph, records its mode in the header, stays
    within float tolerance of the numpy run; a numpy journal keeps its old header."""
    data = data_for(encoder)
    g = run(encoder, tmp_path / "g", "graph", data)
    n = run(encoder, tmp_path / "n", None, data)
    assert g.cache["head_update"] == {"mode": "graph", "graph": graph_update.VERSION}
    assert header(g)["config"]["head_update"] == "graph"
    assert header(g)["config"]["head_graph"] == graph_update.VERSION
    assert "head_update" not in json.dumps(header(n))
    assert "head_graph" not in json.dumps(header(n))
    assert el.replay(el.load_bundle(encoder), g.journal, data=data).sha256 == g.sha256
    assert el.replay(el.load_bundle(encoder), n.journal, data=data).sha256 == n.sha256
    assert g.sha256 != n.sha256  # the floats differ: that is why the mode is recorded
    gw, nw = weights(encoder, g), weights(encoder, n)
    base = el.load_bundle(encoder).load_store()
    for name in ("head.weight", "head.bias"):
        moved = nw[name] - base[name]
        p = compare({name: gw[name] - base[name]}, {name: moved}, atol=ATOL, rtol=1e-4)
        assert p.ok, p.describe()
        assert np.abs(moved).max() > 1e-3


def test_refusals_and_auto_fallback(encoder: Path, tmp_path: Path) -> None:
    """graph without the prefix cache, or when more than the head trains: a clear InputError;
    auto there falls back to numpy (the run equals the numpy one)."""
    from edgelearn.demo import demo_data

    data = data_for(encoder)
    with pytest.raises(InputError, match=r"head_update='graph'.*prefix cache.*off"):
        run(encoder, tmp_path / "a", "graph", data, cache=False)
    assert not (tmp_path / "a" / "journal.bin").exists()  # refused before the run opened
    demo, ddata = Path(el.__file__).parent / "data" / "demo", demo_data()[0]
    with pytest.raises(InputError, match=r"head_update='graph'.*no frozen prefix"):
        run(demo, tmp_path / "b", "graph", ddata, steps=2, trainable="*")
    auto = run(demo, tmp_path / "c", "auto", ddata, steps=4, trainable="*")
    assert auto.sha256 == run(demo, tmp_path / "d", None, ddata, steps=4, trainable="*").sha256
    b = el.load_bundle(demo)
    layers = parse_layers(b.manifest, set(b.load_store().specs))
    why = graph_update.why_not(layers, ["layers.0.weight", "head.weight"], ["head.weight"])
    assert why is not None
    assert "head-only" in why
    assert graph_update.why_not(layers, ["head.weight"], ["head.weight"]) is None


def test_exporter_head_only_graph_run(tmp_path: Path) -> None:
    """The shipped demo bundle (exporter taps; the head's input is a cached cut tensor):
    graph mode runs and replays bit-exactly."""
    from edgelearn.demo import demo_data

    demo, data = Path(el.__file__).parent / "data" / "demo", demo_data()[0]
    g = run(demo, tmp_path / "g", "graph", data, steps=6, trainable="head.*")
    assert g.cache["head_update"] == {"mode": "graph", "graph": graph_update.VERSION}
    assert el.replay(el.load_bundle(demo), g.journal, data=data).sha256 == g.sha256


def test_mse_head_graph_run_replays(encoder: Path, tmp_path: Path) -> None:
    """head_loss mse with target vectors: the graph run trains, records finite losses and
    replays bit-exactly."""
    data = data_for(encoder)
    targets = np.eye(3, dtype=np.float32)[data.y]
    vec = el.Dataset(data.x, targets)
    cfg = el.TrainConfig(optimizer="tpsgd", batch_size=8,
                         options={"head_update": "graph", "head_loss": "mse"})
    rt = el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=True)
    with el.Session(encoder, tmp_path / "m", cfg, rt) as s:
        r = s.run(vec, 8)
    assert r.cache["head_update"] == {"mode": "graph", "graph": graph_update.VERSION}
    assert r.loss_last is not None
    assert r.loss_last < r.loss_first
    assert el.replay(el.load_bundle(encoder), r.journal, data=vec).sha256 == r.sha256


def without_head_graph(journal: str, out: Path) -> Path:
    """A copy of `journal` whose header lacks "head_graph": a journal recorded before the
    option existed (the run beside it: its samples, if any, are not needed here)."""
    from edgelearn.journal import Journal, iter_journal

    out.mkdir()
    with Journal(out / "journal.bin") as j:
        for rec in iter_journal(Path(journal)):
            if rec.get("kind") == "header":
                rec = {**rec, "config": {k: v for k, v in rec["config"].items()
                                         if k != "head_graph"}}
            j.append(rec)
    return out / "journal.bin"


def test_form1_journals_replay_with_form1(encoder: Path, tmp_path: Path) -> None:
    """A graph journal written before form 2 (no head_graph in its header) replays with
    form 1, bit-exactly; form 1 can still be asked for; both forms track each other."""
    from edgelearn.optim.tpsgd import TPSGDOptions

    data = data_for(encoder)
    old = run(encoder, tmp_path / "old", None, data, options_extra={"head_update": "graph",
                                                                    "head_graph": 1})
    assert old.cache["head_update"] == {"mode": "graph", "graph": 1}
    legacy = without_head_graph(old.journal, tmp_path / "legacy")
    assert TPSGDOptions.from_config("tpsgd", header_of(legacy)["config"]).head_graph == 1
    assert el.replay(el.load_bundle(encoder), legacy, data=data).sha256 == old.sha256
    new = run(encoder, tmp_path / "new", "graph", data)
    for name, w in weights(encoder, new).items():
        p = compare({name: w}, {name: weights(encoder, old)[name]}, atol=ATOL, rtol=RTOL)
        assert p.ok, p.describe()
    assert TPSGDOptions.from_config("tpsgd", {}).head_graph == graph_update.VERSION


def header_of(journal: Path) -> dict:
    from edgelearn.journal import iter_journal

    return next(iter_journal(journal))


def test_cli_graph_without_cache_is_one_line(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    """`train --opt head_update=graph --no-cache`: one error line, exit 2, nothing written
    (the run used to open and fail at its first step)."""
    from edgelearn.cli import main
    from edgelearn.demo import demo_data

    data = demo_data()[0]
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    demo = Path(el.__file__).parent / "data" / "demo"
    code = main(["train", str(demo), "--data", str(tmp_path / "d.npz"), "--steps", "2",
                 "--out", str(tmp_path / "r"), "--optimizer", "tpsgd", "--trainable",
                 "head.*", "--opt", "head_update=graph", "--no-cache"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("edgelearn: error: "), err
    assert "head_update='graph'" in err
    assert "prefix cache is off" in err
    assert "Traceback" not in out + err
    assert not (tmp_path / "r").exists()


def test_live_graph_steps_of_several_sizes_replay(encoder: Path, tmp_path: Path) -> None:
    """Live samples and batches of different sizes (content keys, recorded samples): the form-2
    runner re-binds per batch size, and resuming the run replays it bit-exactly."""
    data = data_for(encoder)
    cfg = el.TrainConfig(optimizer="tpsgd", record_samples=True,
                         options={"head_update": "graph"})
    rt = el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=True)
    sizes = [1, 4, 1, 3, 4, 4, 1]
    with el.Session(encoder, tmp_path / "live", cfg, rt) as s:
        at = 0
        for n in sizes:
            s.step((data.x[at:at + n], data.y[at:at + n]) if n > 1 else (data.x[at], data.y[at]))
            at = (at + n) % 16
        assert s.evaluator.cache_report()["head_update"] == {"mode": "graph", "graph": 2}
        digest = s.digest()
    assert digest != el.load_bundle(encoder).load_store().digest()  # the head moved
    replayed = el.replay(el.load_bundle(encoder), tmp_path / "live" / "journal.bin")
    assert (replayed.steps, replayed.sha256) == (len(sizes), digest)
    with el.Session.resume(tmp_path / "live") as s:
        s.step((data.x[0], data.y[0]))  # opens the run: replays the recorded steps first
        assert s.optimizer.t == len(sizes) + 1
