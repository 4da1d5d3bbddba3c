"""tpSGD: per-layer gradient parity with torch autograd, full-step parity, learning, replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sessions import replay_journal, taps_evaluate, train

from edgelearn.bundle import Bundle
from edgelearn.data import Dataset, batch_indices
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.layers import (
    act_grad,
    bn_backward,
    conv1d_grads,
    conv2d_grads,
    gru_grads,
    linear_grads,
    parse_layers,
    post_backward,
)
from edgelearn.model import Model
from edgelearn.optim import make_optimizer
from edgelearn.optim.tpsgd import projection

ATOL = 1e-5  # float32 gradients of O(1) values, numpy vs torch summation order

# -- per-layer parity: numpy local gradient == torch autograd of the same local loss ------------


def _local_mse(a, t, n):
    return 0.5 * ((a - t) ** 2).sum() / n


@pytest.mark.torch
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
def test_linear_local_gradient_matches_autograd(act: str) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    w = (rng.standard_normal((7, 12)) * 0.3).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    t = rng.standard_normal((16, 7)).astype(np.float32)
    fn = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act]
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    tz = torch.from_numpy(x) @ tw.T + tb
    ta = fn(tz)
    gw, gb = torch.autograd.grad(_local_mse(ta, torch.from_numpy(t), 16), [tw, tb])
    z, a = tz.detach().numpy(), ta.detach().numpy()
    g = linear_grads(x, act_grad(act, z, a, (a - t) / np.float32(16)))
    np.testing.assert_allclose(g["weight"], gw.numpy(), atol=ATOL)
    np.testing.assert_allclose(g["bias"], gb.numpy(), atol=ATOL)


@pytest.mark.torch
@pytest.mark.parametrize(("stride", "padding", "dilation", "bn"),
                         [((1, 1), (1, 1), (1, 1), False), ((2, 1), (0, 2), (1, 2), True),
                          ((2, 2), (1, 1), (1, 1), True)])
def test_conv2d_local_gradient_matches_autograd(stride, padding, dilation, bn) -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(1)
    # scaled so that gradients are O(1): ATOL is then meaningful for float32 sums
    x = (rng.standard_normal((2, 3, 9, 8)) * 0.2).astype(np.float32)
    w = (rng.standard_normal((5, 3, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(5) * 0.1).astype(np.float32)
    mean, var = rng.standard_normal(5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(
        np.float32)
    gamma, beta = rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(
        np.float32)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    tg, tbe = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    raw = f.conv2d(torch.from_numpy(x), tw, tb, stride=stride, padding=padding,
                   dilation=dilation)
    pre = f.batch_norm(raw, torch.from_numpy(mean), torch.from_numpy(var), tg, tbe,
                       training=False, eps=1e-5) if bn else raw
    a = torch.relu(pre)
    t = a.detach() + torch.from_numpy((rng.standard_normal(a.shape) * 0.1).astype(np.float32))
    wrt = [tw, tb, tg, tbe] if bn else [tw, tb]
    ref = torch.autograd.grad(_local_mse(a, t, 2), wrt)
    an, tn = a.detach().numpy(), t.numpy()
    d = act_grad("relu", pre.detach().numpy(), an, (an - tn) / np.float32(2))
    if bn:
        d, gbn = bn_backward(raw.detach().numpy(), mean, var, 1e-5, gamma, d)
    g = conv2d_grads(x, d, (3, 3), stride=stride, padding=padding, dilation=dilation)
    assert np.abs(ref[0].numpy()).max() > 0.01  # not a vacuous comparison
    np.testing.assert_allclose(g["weight"], ref[0].numpy(), atol=ATOL)
    np.testing.assert_allclose(g["bias"], ref[1].numpy(), atol=ATOL)
    if bn:
        np.testing.assert_allclose(gbn["weight"], ref[2].numpy(), atol=ATOL)
        np.testing.assert_allclose(gbn["bias"], ref[3].numpy(), atol=ATOL)


@pytest.mark.torch
@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 0, 1), (2, 0, 1), (2, 2, 2)])
def test_conv1d_local_gradient_matches_autograd(stride, padding, dilation) -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 4, 23)) * 0.3).astype(np.float32)
    w = (rng.standard_normal((6, 4, 5)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(6) * 0.1).astype(np.float32)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    pre = f.conv1d(torch.from_numpy(x), tw, tb, stride=stride, padding=padding,
                   dilation=dilation)
    a = torch.relu(pre)
    t = torch.from_numpy(rng.standard_normal(a.shape).astype(np.float32))
    ref = torch.autograd.grad(_local_mse(a, t, 3), [tw, tb])
    an = a.detach().numpy()
    d = act_grad("relu", pre.detach().numpy(), an, (an - t.numpy()) / np.float32(3))
    g = conv1d_grads(x, d, 5, stride=stride, padding=padding, dilation=dilation)
    assert g["weight"].shape == w.shape
    assert np.abs(ref[0].numpy()).max() > 0.01  # not a vacuous comparison
    np.testing.assert_allclose(g["weight"], ref[0].numpy(), atol=ATOL)
    np.testing.assert_allclose(g["bias"], ref[1].numpy(), atol=ATOL)


@pytest.mark.torch
def test_gru_local_gradient_matches_autograd() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 6, batch_first=True)
    x = torch.randn(3, 7, 5)
    out, _ = gru(x)
    t = torch.randn(3, 6)
    loss = _local_mse(out[:, -1], t, 3)
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    ref = torch.autograd.grad(loss, [getattr(gru, n) for n in names])
    p = {n: getattr(gru, n).detach().numpy() for n in names}
    hs = out.detach().numpy()
    g = gru_grads(x.numpy(), hs, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                  p["bias_hh_l0"], (hs[:, -1] - t.numpy()) / np.float32(3))
    for k, r in zip(["weight_ih", "weight_hh", "bias_ih", "bias_hh"], ref, strict=True):
        np.testing.assert_allclose(g[k], r.numpy(), atol=ATOL, err_msg=k)


# -- exporter: taps graph and layer records ---------------------------------------------------


_POOL2 = {"op": "maxpool", "dims": 2, "kernel": [2, 2], "stride": [2, 2]}


@pytest.mark.torch
@pytest.mark.parametrize("post", [
    [_POOL2],
    [{"op": "maxpool", "dims": 2, "kernel": [3, 2], "stride": [1, 2]}, {"op": "reshape"}],
    [{"op": "avgpool", "dims": 2, "kernel": [2, 3], "stride": [2, 1]}],
    [{"op": "mean", "dims": [2, 3], "keepdim": True}, {"op": "reshape"}],
    [{"op": "avgpool", "dims": 2, "kernel": [2, 2], "stride": [1, 1]}, _POOL2],
    [{"op": "maxpool", "dims": 1, "kernel": [3], "stride": [2]},
     {"op": "mean", "dims": [2], "keepdim": False}],
    # windows that tile the map (the fast path), with and without a cut-off border
    [{"op": "avgpool", "dims": 2, "kernel": [2, 3], "stride": [2, 3]}],
    [{"op": "maxpool", "dims": 1, "kernel": [2], "stride": [2]}, {"op": "reshape"}],
    [{"op": "maxpool", "dims": 2, "kernel": [3, 3], "stride": [3, 3]}],
])
def test_post_ops_backward_matches_autograd(post) -> None:
    """Pooling after a layer: numpy backward == autograd, ties routed as torch routes them."""
    torch = pytest.importorskip("torch")
    from torch_reference import _post

    rng = np.random.default_rng(1)
    shape = (4, 3, 7, 9) if post[0]["dims"] == 2 or post[0]["op"] == "mean" else (4, 3, 11)
    # relu-like maps: many exact zeros and repeated values make ties in most windows
    a = np.maximum(np.round(rng.standard_normal(shape), 1), 0).astype(np.float32)
    ta = torch.from_numpy(a).requires_grad_(True)
    out = _post({"post": post}, ta)
    d = torch.from_numpy(rng.standard_normal(tuple(out.shape)).astype(np.float32))
    (g,) = torch.autograd.grad((out * d).sum(), [ta])
    ops = parse_layers({"layers": [{"name": "l", "kind": "linear", "params": {},
                                    "activation": "relu", "post": post, "target": "t"}]},
                       set())[0].post
    got = post_backward(ops, a, d.numpy().reshape(-1))
    assert got.shape == a.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, g.numpy(), atol=1e-6, rtol=1e-5)


def test_post_records_are_validated() -> None:
    from edgelearn.errors import BundleError

    base = {"name": "l", "kind": "linear", "params": {}, "activation": "relu", "target": "t"}
    for post in ([], [{"op": "maxpool", "dims": 3, "kernel": [2], "stride": [2]}],
                 [{"op": "maxpool", "dims": 2, "kernel": [0, 2], "stride": [2, 2]}],
                 [{"op": "reshape"}, _POOL2], [{"op": "mean", "dims": [0], "keepdim": True}],
                 [{"op": "gather"}], "maxpool", [_POOL2] * 9):
        with pytest.raises(BundleError, match="post ops"):
            parse_layers({"layers": [{**base, "post": post}]}, set())
    with pytest.raises(BundleError, match="post ops"):
        parse_layers({"layers": [{**base, "post": [_POOL2], "target": None}]}, set())
    # ops that do not fit the tapped maps: a clear error, not a numpy crash
    a = np.ones((2, 3, 4, 4), np.float32)
    for post, d in (([{"op": "maxpool", "dims": 2, "kernel": [5, 5], "stride": [5, 5]}],
                     np.ones(6, np.float32)),
                    ([_POOL2], np.ones(7, np.float32)),
                    ([{"op": "mean", "dims": [5], "keepdim": False}], np.ones(6, np.float32)),
                    ([{"op": "maxpool", "dims": 1, "kernel": [2], "stride": [2]}],
                     np.ones(24, np.float32))):
        ops = parse_layers({"layers": [{**base, "post": post}]}, set())[0].post
        with pytest.raises(BundleError, match="post op"):
            post_backward(ops, a, d)


@pytest.mark.torch
def test_taps_export_records_layers(bundles) -> None:
    for name, kinds in (("mlp", ["linear", "linear"]), ("cnn", ["conv2d", "conv2d", "linear"]),
                        ("gru", ["gru", "linear"]), ("conv1d", ["conv1d", "conv1d", "linear"])):
        b = Bundle(bundles[name].path)
        assert "onnx_taps" in b.files
        layers = b.manifest["layers"]
        assert [r["kind"] for r in layers] == kinds
        assert [r["head"] for r in layers] == [False] * (len(kinds) - 1) + [True]
        taps_parity = b.manifest["parity"]["onnx_taps"]
        assert taps_parity["max_abs_err"] <= taps_parity["bound"]
    # each hidden layer's own pooling is recorded, ending at the next layer's input tap
    cnn = Bundle(bundles["cnn"].path).manifest["layers"]
    pool = {"op": "maxpool", "dims": 2, "kernel": [2, 2], "stride": [2, 2]}
    assert cnn[0]["post"] == [pool]
    assert cnn[0]["target"] == cnn[1]["input"]
    assert cnn[1]["post"] == [pool, {"op": "reshape"}]
    assert cnn[1]["target"] == cnn[2]["input"]
    c1d = Bundle(bundles["conv1d"].path).manifest["layers"]
    assert "post" not in c1d[0]  # relu feeds conv2 directly
    assert c1d[1]["post"] == [{"op": "mean", "dims": [2], "keepdim": False}]
    # a structure tpsgd cannot split into layers still exports, the manifest says why, and
    # its head alone gets a taps graph found in model.onnx (edgelearn.graph_taps)
    m = Bundle(bundles["transformer"].path).manifest
    assert [(r["name"], r["head"]) for r in m["layers"]] == [("head", True)]
    assert "tpsgd" in m["taps_unsupported"]
    assert "head only" in m["taps_from"]


def _digits_for(name: str, digits: Dataset) -> Dataset:
    if name == "cnn":
        return Dataset(digits.x.reshape(-1, 1, 8, 8), digits.y)
    if name == "gru":  # any [N, 12, 6] sequence works for parity
        x = np.random.default_rng(0).standard_normal((64, 12, 6)).astype(np.float32)
        return Dataset(x, digits.y[:64] % 6)
    if name == "conv1d":  # [N, 100, 6] windows, 7 classes (the HAR example's shape)
        x = np.random.default_rng(0).standard_normal((64, 100, 6)).astype(np.float32)
        return Dataset(x, digits.y[:64] % 7)
    return digits


# -- one full step on device == torch reference step ------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize(("name", "local_loss", "target_on"),
                         [("mlp", "mse", "pooled"), ("cnn", "mse", "pooled"),
                          ("cnn", "l1", "pooled"), ("cnn", "drtp", "activation"),
                          ("gru", "mse", "pooled"), ("conv1d", "mse", "pooled"),
                          ("conv1d", "l1", "activation")])
def test_full_step_matches_torch_reference(name: str, local_loss: str, target_on: str, bundles,
                                           digits: Dataset) -> None:
    torch = pytest.importorskip("torch")
    from torch_reference import tpsgd_step

    ex = bundles[name]
    bundle = Bundle(ex.path)
    data = _digits_for(name, digits)
    store = bundle.load_store()
    opt = make_optimizer("tpsgd", lr=0.1, seed=3, local_loss=local_loss, target_on=target_on,
                         target_scale=2.0)
    evaluate = taps_evaluate(bundle, store, data, opt, batch_size=16, seed=5, threads=1)
    params = {n: torch.from_numpy(np.array(store[n])) for n in store.names}
    opt.step(store, taps=evaluate)
    idx = batch_indices(len(data), 16, 0, 5)
    layers = bundle.manifest["layers"]
    classes = bundle.outputs[0].shape[-1]
    proj = {}
    for i, r in enumerate(layers[:-1]):
        point = r["target"] if target_on == "pooled" and "target" in r else r["output"]
        width = (r["hidden"] if r["kind"] == "gru" else
                 int(np.prod(_tap_shape(bundle, store, data, point))))
        proj[i] = torch.from_numpy(projection(3, i, classes, width, 2.0))
    new = tpsgd_step(ex.module, params, layers, proj, torch.from_numpy(data.x[idx]),
                     torch.from_numpy(data.y[idx]), lr=0.1, trainable=set(store.trainable_names),
                     local_loss=local_loss, target_on=target_on)
    assert set(new) == {n for n in store.trainable_names}
    for n, v in new.items():
        np.testing.assert_allclose(store[n], v.numpy(), atol=ATOL, err_msg=n)


def _tap_shape(bundle: Bundle, store, data: Dataset, tap: str) -> tuple[int, ...]:
    from edgelearn.backends.ort import OrtBackend

    be = OrtBackend(bundle, graph="onnx_taps", threads=1)
    be.bind(store)
    return be.forward({bundle.inputs[0].name: data.x[:1]})[tap].shape[1:]


# -- learning --------------------------------------------------------------------------------


# CNN: batch-norm affine parameters frozen (training them locally slowed learning, measured)
@pytest.mark.parametrize(("name", "lr", "glob", "floor"),
                         [("mlp", 0.1, None, 0.75), ("cnn", 0.05, "conv*,head.*", 0.7)])
def test_learns_digits_from_scratch(name, lr, glob, floor, bundles, digits, tmp_path) -> None:
    data = _digits_for(name, digits)
    train_set, test_set = Dataset(data.x[:1400], data.y[:1400]), Dataset(data.x[1400:],
                                                                         data.y[1400:])
    bundle = Bundle(bundles[name].path)
    before = Model(bundle, trainable=()).evaluate(test_set)["accuracy"]
    res = train(bundle, train_set, tmp_path / "run", optimizer="tpsgd", options={"lr": lr},
                steps=300, batch_size=32, threads=1, trainable=glob)
    after = Model(bundle, trainable=(), weights=res["weights"]).evaluate(test_set)["accuracy"]
    assert after > floor > before + 0.1  # chance is 0.1


# -- contract-equivalent tests (the shared suite gives only losses; tpsgd needs taps) ---------


def _run(bundle, data, out, steps, **kw):
    return train(bundle, data, out, optimizer="tpsgd", options={"lr": 0.1}, steps=steps,
                 batch_size=32, threads=1, **kw)


@pytest.mark.torch
def test_deterministic_resume_and_replay(bundles, digits, tmp_path: Path) -> None:
    bundle = Bundle(bundles["mlp"].path)
    full = _run(bundle, digits, tmp_path / "a", 30)
    again = _run(bundle, digits, tmp_path / "b", 30)
    assert full["sha256"] == again["sha256"]  # deterministic given the data order
    # N + N == 2N: interrupted at 15 (checkpoint at 10, records 11..15 re-run on resume)
    _run(bundle, digits, tmp_path / "c", 15, checkpoint_every=10)
    resumed = _run(bundle, digits, tmp_path / "c", 30, checkpoint_every=10)
    assert resumed["resumed_from"] == 15
    assert resumed["sha256"] == full["sha256"]
    # replay from base weights + journal + the same data
    store, steps = replay_journal(bundle, tmp_path / "a" / "journal.bin", digits)
    assert steps == 30
    assert store.digest() == full["sha256"]
    with pytest.raises(InputError, match="--data"):
        replay_journal(bundle, tmp_path / "a" / "journal.bin")
    other = Dataset(digits.x[::-1].copy(), digits.y[::-1].copy())
    with pytest.raises(InputError, match="sha256"):
        replay_journal(bundle, tmp_path / "a" / "journal.bin", other)
    header = json.dumps(bundle.manifest["layers"])
    assert "layers.0" in header


def test_state_round_trip_and_errors(bundles, digits) -> None:
    opt = make_optimizer("tpsgd", lr=0.1, seed=2)
    state = opt.state_dict()
    assert state["config"]["lr"] == 0.1
    other = make_optimizer("tpsgd", lr=0.2, seed=2)
    with pytest.raises(InputError, match="lr"):
        other.load_state_dict(state)
    opt.t = 7
    fresh = make_optimizer("tpsgd", lr=0.1, seed=2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.t == 7
    with pytest.raises(EdgelearnError, match="ask/tell"):
        opt.ask(None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="hidden_lr"):
        make_optimizer("tpsgd", hidden_lr=-1.0)
    with pytest.raises(InputError, match="local_loss"):
        make_optimizer("tpsgd", local_loss="hinge")
    np.testing.assert_array_equal(projection(1, 2, 3, 4, 1.0), projection(1, 2, 3, 4, 1.0))


def test_frozen_layers_stay_and_bundles_without_taps_are_refused(bundles, digits, tmp_path) -> None:
    bundle = Bundle(bundles["cnn"].path)
    data = _digits_for("cnn", digits)
    res = train(bundle, data, tmp_path / "r", optimizer="tpsgd", options={"lr": 0.01},
                steps=3, trainable="conv2.*,bn2.*,head.*", threads=1)
    base, after = bundle.load_store(), Model(bundle, weights=res["weights"]).store
    np.testing.assert_array_equal(after["conv1.weight"], base["conv1.weight"])
    # hidden_lr 0: only the head moves
    res0 = train(bundle, data, tmp_path / "h", optimizer="tpsgd",
                 options={"lr": 0.01, "hidden_lr": 0.0}, steps=3, threads=1)
    after0 = Model(bundle, weights=res0["weights"]).store
    np.testing.assert_array_equal(after0["conv2.weight"], base["conv2.weight"])
    assert not np.array_equal(after0["head.weight"], base["head.weight"])
    assert not np.array_equal(after["conv2.weight"], base["conv2.weight"])
    tbundle = Bundle(bundles["transformer"].path)
    x = np.zeros((4, 10, 8), np.float32)
    with pytest.raises(InputError, match="no layer record owns them"):  # head-only taps
        train(tbundle, Dataset(x, np.zeros(4, np.int64)), tmp_path / "t",
              optimizer="tpsgd", steps=1)


def test_layer_records_naming_absent_taps_are_refused(bundles, digits, tmp_path) -> None:
    import shutil

    from edgelearn.errors import BundleError

    copy = tmp_path / "cnn"
    shutil.copytree(bundles["cnn"].path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["layers"][0]["target"] = "not-a-tap"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not-a-tap"):
        train(Bundle(copy), _digits_for("cnn", digits), tmp_path / "r", optimizer="tpsgd",
              steps=1, threads=1)
    assert not (tmp_path / "r" / "journal.bin").exists()


def test_cli_train_and_replay_with_data(capsys, bundles, digits_npz, tmp_path) -> None:
    from edgelearn.cli import main

    b, run = str(bundles["mlp"].path), str(tmp_path / "run")
    assert main(["train", b, "--data", str(digits_npz), "--optimizer", "tpsgd", "--steps", "5",
                 "--lr", "0.1", "--out", run, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["optimizer"] == "tpsgd"
    assert res["steps"] == 5
    journal = str(tmp_path / "run" / "journal.bin")
    assert main(["replay", b, journal, "--out", str(tmp_path / "w.safetensors"), "--json"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["replay", b, journal, "--data", str(digits_npz), "--out",
                 str(tmp_path / "w.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == res["sha256"]


def test_taps_of_frozen_layers_are_not_computed(bundles, digits) -> None:
    """Frozen layers' taps leave the graph (so the runtime can fuse them); the step still runs."""
    bundle = Bundle(bundles["cnn"].path)
    data = _digits_for("cnn", digits)
    layers = bundle.manifest["layers"]
    store = bundle.load_store(trainable="conv2.*,head.*")
    opt = make_optimizer("tpsgd", lr=0.01)
    taps, _ = taps_evaluate(bundle, store, data, opt, batch_size=8, seed=0, threads=1)()
    conv1_only = {layers[0][k] for k in ("preact", "output", "raw")}
    assert not conv1_only & set(taps)
    assert {layers[1][k] for k in ("input", "preact", "output", "target")} <= set(taps)
    assert layers[1]["raw"] not in taps  # bn2 frozen: a fixed scale, its input is not needed
    before = np.array(store["conv2.weight"])
    opt.step(store, taps=taps_evaluate(bundle, store, data, opt, batch_size=8, seed=0, step=1,
                                  threads=1))
    assert not np.array_equal(store["conv2.weight"], before)


def test_journal_headers_from_before_target_on_replay_with_activation_targets() -> None:
    from edgelearn.training.header import optimizer_from_header

    old = {"optimizer": "tpsgd", "config": {"seed": 0, "lr": 0.1, "local_loss": "mse",
                                            "target_scale": 1.0, "head_loss": "cross-entropy",
                                            "hidden_lr": None}}
    assert optimizer_from_header(old).options.target_on == "activation"
    new = make_optimizer("tpsgd", lr=0.1)
    again = optimizer_from_header({"optimizer": "tpsgd", "config": new.config()})
    assert again.config() == new.config()
    assert again.options.target_on == "pooled"


def test_bad_targets_are_refused_before_the_run_starts(bundles, digits, tmp_path) -> None:
    bundle = Bundle(bundles["mlp"].path)
    x = digits.x[:8]
    for y, match in ((np.full(8, -1), ">= 0"), (np.zeros((8, 3), np.float32), "integer class"),
                     (np.full(8, 10), "up to 10")):
        with pytest.raises(InputError, match=match):
            train(bundle, Dataset(x, y), tmp_path / "r", optimizer="tpsgd", steps=1, threads=1)
        assert not (tmp_path / "r" / "journal.bin").exists()
    with pytest.raises(InputError, match="shaped like the output"):
        train(bundle, Dataset(x, np.zeros((8, 3), np.float32)), tmp_path / "m",
              optimizer="tpsgd", options={"head_loss": "mse"}, steps=1, threads=1)
