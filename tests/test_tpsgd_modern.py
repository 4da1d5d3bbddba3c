"""tpSGD on modern layers (LayerNorm, GELU/SiLU/ReLU6/hardswish, residual adds, depthwise and
grouped convs, global pooling) and head-only taps found in any ONNX graph (prepared bundles,
untraceable backbones, layer taps that fail parity)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx_models import embedder_onnx, matmul_head_onnx, mlp_onnx
from sessions import taps_evaluate, train

from edgelearn.bundle import Bundle
from edgelearn.data import Dataset, batch_indices
from edgelearn.layers import act_grad, conv1d_grads, conv2d_grads, linear_grads, ln_backward
from edgelearn.optim import make_optimizer
from edgelearn.optim.tpsgd import projection
from edgelearn.parity import tolerance

MODERN = ["gelu", "gelu_tanh", "silu", "relu6", "hardswish"]


def _close(got: np.ndarray, want: np.ndarray, what: str = "") -> float:
    """Assert |got - want| <= 1e-5 + 1e-5 * max|want| (float32 sums in another order)."""
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert got.shape == want.shape, what
    assert err <= tolerance(want), f"{what}: {err:.3g} > {tolerance(want):.3g}"
    return err


# -- per-layer parity: numpy local gradient == torch autograd of the same local loss ------------
@pytest.mark.torch
@pytest.mark.parametrize("act", MODERN)
@pytest.mark.parametrize("norm", ["none", "ln"])
def test_linear_norm_activation_gradient_matches_autograd(act: str, norm: str) -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    w = (rng.standard_normal((9, 12)) * 0.5).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)
    g0, b0 = (1 + 0.3 * rng.standard_normal(9)).astype(np.float32), rng.standard_normal(
        9).astype(np.float32)
    t = rng.standard_normal((16, 9)).astype(np.float32) * 3
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    tg, tbe = torch.tensor(g0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    raw = torch.from_numpy(x) @ tw.T + tb
    pre = f.layer_norm(raw, (9,), tg, tbe, eps=1e-5) if norm == "ln" else raw
    fn = {"gelu": f.gelu, "gelu_tanh": lambda v: f.gelu(v, approximate="tanh"), "silu": f.silu,
          "relu6": f.relu6, "hardswish": f.hardswish}[act]
    a = fn(pre * 4)  # * 4: pre-activations reach every branch (relu6 > 6, hardswish > 3)
    loss = 0.5 * ((a - torch.from_numpy(t)) ** 2).sum() / 16
    want = torch.autograd.grad(loss, [tw, tb, tg, tbe], allow_unused=True)
    z, av = (pre * 4).detach().numpy(), a.detach().numpy()
    d = act_grad(act, z, av, (av - t) / np.float32(16)) * np.float32(4)
    grads = {}
    if norm == "ln":
        d, grads = ln_backward(raw.detach().numpy(), 1e-5, 1, g0, d)
    grads.update({"w": linear_grads(x, d)["weight"], "b": linear_grads(x, d)["bias"]})
    _close(grads["w"], want[0].numpy(), "weight")
    _close(grads["b"], want[1].numpy(), "bias")
    if norm == "ln":
        _close(grads["weight"], want[2].numpy(), "ln weight")
        _close(grads["bias"], want[3].numpy(), "ln bias")


@pytest.mark.torch
@pytest.mark.parametrize(("cin", "cout", "groups", "dims"),
                         [(6, 6, 6, 2), (6, 12, 3, 2), (4, 8, 2, 1), (5, 10, 5, 1)])
def test_grouped_and_depthwise_conv_gradients_match_autograd(cin, cout, groups, dims) -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(2)
    shape = (3, cin, 7, 6) if dims == 2 else (3, cin, 11)
    x = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    k = (3, 3) if dims == 2 else (3,)
    w = (rng.standard_normal((cout, cin // groups, *k)) * 0.3).astype(np.float32)
    tw, tb = torch.tensor(w, requires_grad=True), torch.zeros(cout, requires_grad=True)
    conv = f.conv2d if dims == 2 else f.conv1d
    z = conv(torch.from_numpy(x), tw, tb, stride=2, padding=1, groups=groups)
    t = rng.standard_normal(tuple(z.shape)).astype(np.float32)
    gw, gb = torch.autograd.grad(0.5 * ((z - torch.from_numpy(t)) ** 2).sum() / 3, [tw, tb])
    d = (z.detach().numpy() - t) / np.float32(3)
    if dims == 2:
        g = conv2d_grads(x, d, k, stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=groups)
    else:
        g = conv1d_grads(x, d, 3, stride=2, padding=1, dilation=1, groups=groups)
    _close(g["weight"], gw.numpy(), "weight")
    _close(g["bias"], gb.numpy(), "bias")


# -- exported modern nets: layer records and one full step == torch reference ------------------
def _res_mlp():
    import torch
    from torch import nn

    class ResMLP(nn.Module):
        """Linear -> LayerNorm -> GELU, two residual blocks (ReLU6; none), SiLU, head."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.ln1 = nn.Linear(64, 32), nn.LayerNorm(32)
            self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 32)
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.gelu(self.ln1(self.fc1(x)))
            h = h + nn.functional.relu6(self.fc2(h))
            h = h + self.fc3(h)  # a transformer MLP's second projection: no activation
            return self.head(nn.functional.silu(h))

    torch.manual_seed(0)
    return ResMLP()


def _dw_cnn():
    import torch
    from torch import nn

    class DWNet(nn.Module):
        """MobileNet-style: stem, depthwise 3x3, pointwise 1x1 linear bottleneck + residual,
        grouped conv, hardswish, global average pooling, head."""

        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
            self.pw, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
            self.gc = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
            self.head = nn.Linear(16, 10)
            for bn in (self.bn0, self.bn1, self.bn2):  # non-trivial eval statistics
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = nn.functional.relu6(self.bn0(self.stem(x)))
            h = nn.functional.relu6(self.bn1(self.dw(s)))
            h = s + self.bn2(self.pw(h))
            h = nn.functional.hardswish(self.gc(h))
            h = nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
            return self.head(h)

    torch.manual_seed(1)
    return DWNet()


@pytest.fixture(scope="module")
def modern(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    torch = pytest.importorskip("torch")
    from edgelearn.export import export_bundle

    root = tmp_path_factory.mktemp("modern")
    out = {}
    for name, make, shape in (("resmlp", _res_mlp, (4, 64)), ("dwcnn", _dw_cnn, (4, 1, 8, 8))):
        module = make().eval()
        export_bundle(module, torch.randn(*shape), root / name)
        out[name] = (root / name, module)
    return out


@pytest.mark.torch
@pytest.mark.slow  # two exports (~60 s on a busy 2-core host)
def test_modern_layers_are_recorded(modern) -> None:
    res = Bundle(modern["resmlp"][0]).manifest
    assert "taps_unsupported" not in res
    assert [(r["name"], r["activation"]) for r in res["layers"]] == [
        ("fc1", "gelu"), ("fc2", "relu6"), ("fc3", "none"), ("head", "none")]
    assert res["layers"][0]["ln"] == {"eps": 1e-5, "dims": 1, "weight": "ln1.weight",
                                      "bias": "ln1.bias"}
    assert res["layers"][1]["post"] == [{"op": "add"}]
    assert res["layers"][2]["post"] == [{"op": "add"}]
    cnn = Bundle(modern["dwcnn"][0]).manifest
    assert "taps_unsupported" not in cnn
    by = {r["name"]: r for r in cnn["layers"]}
    assert [by[n].get("groups", 1) for n in ("stem", "dw", "pw", "gc")] == [1, 8, 1, 4]
    assert by["pw"]["activation"] == "none"
    assert by["pw"]["post"] == [{"op": "add"}]
    assert by["gc"]["activation"] == "hardswish"
    assert by["gc"]["post"] == [{"op": "mean", "dims": [2, 3], "keepdim": True},
                                {"op": "reshape"}]
    for m in (res, cnn):
        p = m["parity"]["onnx_taps"]
        assert p["max_abs_err"] <= p["bound"]


def _taps_shape(bundle: Bundle, store, x: np.ndarray, tap: str) -> int:
    from edgelearn.backends.ort import OrtBackend

    be = OrtBackend(bundle, graph="onnx_taps", threads=1)
    be.bind(store)
    return int(np.prod(be.forward({bundle.inputs[0].name: x[:1]})[tap].shape[1:]))


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize(("name", "local_loss"), [("resmlp", "mse"), ("resmlp", "l1"),
                                                  ("dwcnn", "mse")])
def test_modern_full_step_matches_torch_reference(modern, digits, name, local_loss) -> None:
    torch = pytest.importorskip("torch")
    from torch_reference import tpsgd_step

    path, module = modern[name]
    bundle = Bundle(path)
    x = digits.x[:64] if name == "resmlp" else digits.x[:64].reshape(-1, 1, 8, 8)
    data = Dataset(x, digits.y[:64])
    store = bundle.load_store()
    opt = make_optimizer("tpsgd", lr=0.1, seed=3, local_loss=local_loss, target_scale=2.0)
    evaluate = taps_evaluate(bundle, store, data, opt, batch_size=16, seed=5, threads=1)
    params = {n: torch.from_numpy(np.array(store[n])) for n in store.names}
    opt.step(store, taps=evaluate)
    idx = batch_indices(len(data), 16, 0, 5)
    layers = bundle.manifest["layers"]
    proj = {i: torch.from_numpy(projection(3, i, 10, _taps_shape(
        bundle, store, x, r.get("target", r["output"])), 2.0)) for i, r in enumerate(layers[:-1])}
    new = tpsgd_step(module, params, layers, proj, torch.from_numpy(x[idx]),
                     torch.from_numpy(data.y[idx]), lr=0.1, trainable=set(store.trainable_names),
                     local_loss=local_loss, skips={"pw": "dw"})
    assert set(new) == set(store.trainable_names)
    for n, v in new.items():
        err = _close(np.asarray(store[n]), v.numpy(), n)
        print(f"{name} {local_loss} {n}: |device - torch| {err:.2e}")  # the figure, with -s


@pytest.mark.torch
@pytest.mark.slow
def test_modern_nets_train_under_tpsgd(modern, digits, tmp_path: Path) -> None:
    path, _ = modern["resmlp"]
    data = Dataset(digits.x[:400], digits.y[:400])
    res = train(Bundle(path), data, tmp_path / "r", optimizer="tpsgd",
                options={"lr": 0.1, "hidden_lr": 0.01}, steps=60, batch_size=32, threads=1)
    from edgelearn.model import Model

    before = Model(Bundle(path)).predict(data.x).argmax(1)
    after = Model(Bundle(path), weights=res["weights"]).predict(data.x).argmax(1)
    assert (after == data.y).mean() > max((before == data.y).mean() + 0.3, 0.5)


# -- head-only taps from the ONNX graph ---------------------------------------------------------
def _head_step_parity(bundle: Bundle, data: Dataset, w: str, b: str, layout: str) -> None:
    """One tpsgd step on the bundle == SGD on the head's exact cross-entropy gradient."""
    from edgelearn.backends.ort import OrtBackend

    store = bundle.load_store()
    opt = make_optimizer("tpsgd", lr=0.5, seed=0)
    evaluate = taps_evaluate(bundle, store, data, opt, batch_size=32, seed=1, threads=1)
    idx = batch_indices(len(data), 32, 0, 1)
    be = OrtBackend(bundle, graph="onnx_taps", threads=1)
    be.bind(store)
    rec = bundle.manifest["layers"][0]
    taps = be.forward({"x": data.x[idx]})
    h = data.x[idx] if rec["input"] == "x" else taps[rec["input"]]
    z = taps[rec["preact"]].astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(32), data.y[idx]] -= 1
    gw = (p / 32).T @ h.astype(np.float64)
    want_w = np.asarray(store[w], np.float64) - 0.5 * (gw if layout == "out_in" else gw.T)
    want_b = np.asarray(store[b], np.float64) - 0.5 * (p / 32).sum(0)
    opt.step(store, taps=evaluate)
    _close(np.asarray(store[w]), want_w, w)
    _close(np.asarray(store[b]), want_b, b)


def test_prepared_bundles_get_head_taps_and_train_head_only(tmp_path: Path, digits) -> None:
    from edgelearn.prepare import prepare_onnx

    (tmp_path / "src").mkdir()
    data = Dataset(digits.x[:256], digits.y[:256])
    cases = [(mlp_onnx(tmp_path / "src" / "mlp.onnx"), {"trainable": "fc2.*"},
              "fc2.weight", "fc2.bias", "out_in"),
             (matmul_head_onnx(tmp_path / "src" / "mm.onnx"), {"trainable": "cls.*"},
              "cls.w", "cls.b", "in_out"),
             (embedder_onnx(tmp_path / "src" / "emb.onnx"), {"new_head": "tokens:10"},
              "head.weight", "head.bias", "out_in")]
    for i, (src, kw, w, b, layout) in enumerate(cases):
        prepare_onnx(src, tmp_path / f"b{i}", **kw)
        bundle = Bundle(tmp_path / f"b{i}")
        layers = bundle.manifest["layers"]
        assert [(r["params"], r["weight_layout"]) for r in layers] == [
            ({"weight": w, "bias": b}, layout)], src.name
        assert "head only" in bundle.manifest["taps_from"]
        _head_step_parity(bundle, data, w, b, layout)
    # the CLI: train --optimizer tpsgd --trainable 'head.*' on the prepared embedder
    from edgelearn.cli import main

    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    code = main(["train", str(tmp_path / "b2"), "--data", str(tmp_path / "d.npz"),
                 "--optimizer", "tpsgd", "--trainable", "head.*", "--steps", "150",
                 "--lr", "0.5", "--out", str(tmp_path / "run"), "--json", "--threads", "1"])
    assert code == 0
    from edgelearn.model import Model

    b2 = Bundle(tmp_path / "b2")
    before = (Model(b2).predict(data.x).argmax(1) == data.y).mean()
    after = (Model(b2, weights=tmp_path / "run" / "weights.safetensors").predict(
        data.x).argmax(1) == data.y).mean()
    assert after > before + 0.3, (before, after)


def test_graphs_without_a_linear_head_say_why(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgelearn.prepare import prepare_onnx

    w = numpy_helper.from_array(np.ones((64, 10), np.float32), "w")
    shared = [helper.make_node("MatMul", ["x", "w"], ["m"]),
              helper.make_node("MatMul", ["m", "w2"], ["logits"])]
    for name, nodes, inits in (
            ("softmax", [helper.make_node("MatMul", ["x", "w"], ["m"]),
                         helper.make_node("Softmax", ["m"], ["logits"])], [w]),
            ("tied", [*shared, helper.make_node("Add", ["w2", "w2"], ["unused"])],
             [w, numpy_helper.from_array(np.ones((10, 10), np.float32), "w2")])):
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  str(tmp_path / f"{name}.onnx"))
        prepare_onnx(tmp_path / f"{name}.onnx", tmp_path / name)
        m = Bundle(tmp_path / name).manifest
        assert "onnx_taps" not in m["files"]
        assert not m.get("layers")
        assert {"softmax": "Softmax", "tied": "tied"}[name] in m["taps_unsupported"]


@pytest.mark.torch
def test_layer_taps_that_fail_parity_leave_a_head_only_bundle(tmp_path: Path) -> None:
    """tanh taps differ between torch and onnxruntime by float32 ulps; the logits of a zero
    head do not (0 * h + b is exact): at a tolerance below one ulp only the taps fail."""
    torch = pytest.importorskip("torch")
    from edgelearn.export import export_bundle
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 3))
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    summary = export_bundle(model, torch.randn(4, 64), tmp_path / "b", atol=0.0,
                            rtol=1e-9)
    m = Bundle(tmp_path / "b").manifest
    assert m["taps_unsupported"].startswith("taps parity failed: torch vs onnxruntime")
    assert [r["name"] for r in m["layers"]] == ["2"]
    assert m["layers"][0]["head"]
    assert "onnx_taps" in m["files"]
    assert summary["bundle"] == str(tmp_path / "b")
    json.dumps(m)  # the reason is plain text in the manifest


def test_new_layer_fields_are_validated() -> None:
    from edgelearn.errors import BundleError
    from edgelearn.layers import parse_layers

    base = {"name": "c", "kind": "conv2d", "head": False, "activation": "gelu",
            "params": {"weight": "c.weight"}, "input": "x", "preact": "p", "output": "o",
            "raw": "r", "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
    ok = parse_layers({"layers": [{**base, "groups": 4, "ln": {"eps": 1e-5, "dims": 1}}]},
                      {"c.weight"})[0]
    assert (ok.groups, ok.ln, ok.weight_layout) == (4, {"eps": 1e-5, "dims": 1}, "out_in")
    for bad in ({"groups": 0}, {"groups": "4"}, {"weight_layout": "in_out"},
                {"ln": {"eps": 1e-5, "dims": 9}}, {"ln": {"eps": 1e-5, "dims": 1, "x": 1}},
                {"ln": {"eps": 1e-5, "dims": 1}, "raw": None},
                {"ln": {"eps": 1e-5, "dims": 1, "weight": "nope"}},
                {"post": [{"op": "add", "k": 1}], "target": "t"},
                {"post": [{"op": "add"}, {"op": "maxpool", "dims": 2, "kernel": [2, 2],
                                          "stride": [2, 2]}], "target": "t"},
                {"activation": "swish"}):
        with pytest.raises(BundleError):
            parse_layers({"layers": [{**base, **bad}]}, {"c.weight"})


def test_info_says_what_head_only_taps_train(tmp_path: Path) -> None:
    from edgelearn.capabilities import optimizer_support
    from edgelearn.prepare import prepare_onnx

    (tmp_path / "src").mkdir()
    prepare_onnx(mlp_onnx(tmp_path / "src" / "m.onnx"), tmp_path / "b", trainable="fc2.*")
    tp = optimizer_support(Bundle(tmp_path / "b"))["tpsgd"]
    assert tp["supported"]
    assert "head only" in tp["how"]
    assert "fc2.weight, fc2.bias" in tp["how"]
