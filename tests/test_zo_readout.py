"""zo-readout on the shipped demo bundle: torch parity of one step, the exact head gradient
once the probes read every input direction, one population request of K + 1 candidates,
replay sha256 == trained (with the head found in model.onnx when the manifest has no layer
records, and on LiteRT), and the trainable sets and losses it refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from bundle_edit import demo_bundle_without
from sessions import replay_journal, train
from zo_helpers import (
    assert_cached_prefix_run_is_the_plain_one,
    assert_close,
    demo,
    named_noise,
    outputs_of,
    torch_demo_module,
)

import edgelearn as el
from edgelearn.errors import InputError
from edgelearn.graph_taps import head_layers
from edgelearn.journal import read_journal
from edgelearn.losses import cross_entropy
from edgelearn.model import Model
from edgelearn.optim import make_optimizer


def stepped(probes: int, *, lr: float = 0.3, eps: float = 1e-2, seed: int = 5,
            trust: float | None = 1.0):
    """(store before, store after, the step's info, x, y) of one zo-readout step on the demo
    head, each candidate run on its own."""
    bundle, data, _ = demo()
    model = Model(bundle, trainable="head.*")
    store = model.store
    before = {n: np.array(store[n]) for n in store.names}
    x, y = data.x[:32], data.y[:32]
    opt = make_optimizer("zo-readout", lr=lr, eps=eps, probes=probes, seed=seed, trust=trust)
    opt.setup(store, layers=head_layers(bundle), output=bundle.outputs[0].name)
    calls: list[int] = []
    info = opt.step(store, outputs=outputs_of(model, x, y, calls))
    assert calls == [probes + 1]  # one request: theta and its K probes
    assert info.evaluations == probes + 1
    return before, store, info, x, y


@pytest.mark.torch
def test_one_step_matches_torch_reference() -> None:
    import torch
    from torch_reference import zo_readout_step

    lr, eps, k = 0.3, 1e-2, 2
    before, store, _, x, y = stepped(k, lr=lr, eps=eps)
    params = {n: torch.from_numpy(v) for n, v in before.items()}
    module = torch_demo_module()
    module.load_state_dict(params)
    zs = [named_noise(store, (5, 0, j)) for j in range(k)]
    new = zo_readout_step(module, params, zs, torch.from_numpy(x), torch.from_numpy(y),
                          lr=lr, eps=eps)
    for name, ref in new.items():
        assert_close(store[name], ref.numpy())  # the weights, to 1e-6 of their magnitude
        # the update itself: ORT's and torch's float32 logits differ by ~1e-7 of their size
        assert_close(store[name] - before[name], (ref - params[name]).numpy(), rtol=1e-3)
    np.testing.assert_array_equal(store["layers.0.weight"], before["layers.0.weight"])


def test_seven_probes_read_the_head_input_and_step_its_exact_gradient() -> None:
    """10 classes x 7 probes >= 64 inputs: the read is h itself, the step exact SGD (no
    trust region); with one, the same direction scaled to the logits' RMS change `trust`."""
    lr = 0.3
    before, store, info, x, y = stepped(7, lr=lr, trust=None)
    h = np.maximum(x.astype(np.float64) @ before["layers.0.weight"].T.astype(np.float64)
                   + before["layers.0.bias"], 0.0)
    z = h @ before["head.weight"].T.astype(np.float64) + before["head.bias"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    e = p / len(y)
    assert_close(store["head.weight"] - before["head.weight"], -lr * e.T @ h, rtol=1e-4)
    assert_close(store["head.bias"] - before["head.bias"], -lr * e.sum(0), rtol=1e-5)
    assert info.loss == pytest.approx(cross_entropy(z, y), rel=1e-6)
    before, store, _, x, y = stepped(7, lr=lr, trust=0.05)
    dw, db = store["head.weight"] - before["head.weight"], store["head.bias"] - before["head.bias"]
    change = h @ dw.T.astype(np.float64) + db  # the logits' change on the batch
    assert float(np.sqrt(np.mean(change**2))) == pytest.approx(0.05, rel=1e-4)
    scale = float(np.abs(dw).max() / np.abs(lr * e.T @ h).max())
    assert scale < 1
    assert_close(dw, -scale * lr * e.T @ h, rtol=1e-4)


@pytest.mark.parametrize("population", [True, False])
def test_run_replays_bit_exactly(tmp_path, population: bool) -> None:
    bundle, data, _ = demo()
    res = train(bundle, data, tmp_path / "run", steps=30, seed=3, optimizer="zo-readout",
                trainable="head.*", batch_size=32, population=population)
    assert res["population_graph"] is population
    steps = [r for r in read_journal(res["journal"])[0] if r.get("kind") == "step"]
    assert len(steps) == 30
    assert all(r["accepted"] for r in steps)
    assert res["loss_last"] < res["loss_first"]
    store, n = replay_journal(bundle, res["journal"])
    assert n == 30
    assert store.digest() == res["sha256"]


def test_a_bundle_without_layer_records_has_its_head_found_in_the_graph(tmp_path) -> None:
    """No taps graph, no layer records (an exporter that could not trace layers): the head
    comes from model.onnx, `train` picks zo-readout, and the journal replays."""
    bare = el.load_bundle(demo_bundle_without(tmp_path / "b", ("onnx_taps", "tflite_taps")))
    assert "layers" not in bare.manifest
    [head] = head_layers(bare)
    assert head.params == {"weight": "head.weight", "bias": "head.bias"}
    _, data, test = demo()
    cfg = el.TrainConfig(seed=1, batch_size=32, fsync_every=1000)
    with el.Session(bare, tmp_path / "run", cfg) as s:
        before = s.evaluate(test).accuracy
        res = s.run(data, 300)
        after = s.evaluate(test).accuracy
    assert res.optimizer == "zo-readout"
    assert res.chosen_by.startswith("auto: zo-readout")
    assert after > before + 0.2  # 0.43 -> ~0.86 in 900 forwards
    assert el.replay(bare, res.journal).store.digest() == res.sha256


def test_litert_runs_it_and_its_journal_replays(tmp_path) -> None:
    pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT (ai-edge-litert) absent")
    bundle, data, _ = demo()
    kw = {"steps": 6, "seed": 2, "optimizer": "zo-readout", "trainable": "head.*",
          "batch_size": 32, "threads": 1}
    lite = train(bundle, data, tmp_path / "lite", backend="litert", **kw)
    ort = train(bundle, data, tmp_path / "ort", **kw)
    store, n = replay_journal(bundle, lite["journal"])
    assert n == 6
    assert store.digest() == lite["sha256"]
    assert_close(lite["loss_last"], ort["loss_last"], rtol=1e-4)


def test_what_it_cannot_read_is_refused_in_one_line(tmp_path) -> None:
    bundle, data, _ = demo()
    for trainable in ("*", "layers.0.weight"):  # not the head alone
        with pytest.raises(InputError, match="head's weight") as e:
            train(bundle, data, tmp_path / f"t{len(trainable)}", steps=1,
                  optimizer="zo-readout", trainable=trainable)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="not trainable"):
        train(bundle, data, tmp_path / "b", steps=1, optimizer="zo-readout",
              trainable="head.bias")
    with pytest.raises(InputError, match="cross-entropy and mse"):
        train(bundle, data, tmp_path / "er", steps=1, optimizer="zo-readout",
              trainable="head.*", objective="error-rate")
    opt = make_optimizer("zo-readout")
    store = Model(bundle, trainable="head.*").store
    with pytest.raises(InputError, match="head"):  # no setup: a bare step has no geometry
        opt.step(store, outputs=lambda pop: None)
    sig = [dataclasses.replace(layer, activation="sigmoid") for layer in head_layers(bundle)]
    with pytest.raises(InputError, match="activation"):
        opt.setup(store, layers=sig)
    with pytest.raises(InputError, match="linear head"):
        opt.setup(store, layers=[])


def test_a_matmul_head_in_the_in_out_layout_steps_its_exact_gradient(tmp_path, digits) -> None:
    """A prepared third-party graph whose head is MatMul(h, W [in, out]) + b: W is read
    transposed; 3 probes x 10 classes >= 24 inputs read h exactly."""
    from onnx_models import matmul_head_onnx

    from edgelearn.prepare import prepare_onnx

    prepare_onnx(matmul_head_onnx(tmp_path / "mm.onnx"), tmp_path / "b", trainable="cls.*")
    bundle = el.load_bundle(tmp_path / "b")
    model = Model(bundle, trainable="cls.*")
    store = model.store
    w1, w2, b2 = (np.array(store[n], np.float64) for n in ("body.w", "cls.w", "cls.b"))
    x, y = digits.x[:32], digits.y[:32]
    lr = 0.5
    opt = make_optimizer("zo-readout", lr=lr, probes=3, seed=2, trust=None)
    opt.setup(store, layers=head_layers(bundle), output=bundle.outputs[0].name)
    assert opt.head is not None
    assert opt.head.transposed
    opt.step(store, outputs=outputs_of(model, x, y, []))
    h = np.tanh(x.astype(np.float64) @ w1)
    z = h @ w2 + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    e = p / len(y)
    assert_close(store["cls.w"] - w2, -lr * (e.T @ h).T, rtol=1e-4)
    assert_close(store["cls.b"] - b2, -lr * e.sum(0), rtol=1e-5)
    np.testing.assert_array_equal(store["body.w"], w1.astype(np.float32))


@pytest.mark.parametrize("loss", ["cross-entropy", "mse"])
def test_the_read_is_the_exact_gradient_once_the_rows_span_the_inputs(loss: str) -> None:
    """read_coefficients on a linear head in float64: M R equals dl/dW once K C >= D, and
    the projected gradient (G R^+ R) below; M lies on on_grid's grid."""
    from edgelearn.losses import mse
    from edgelearn.optim.zo_readout import read_coefficients

    rng = np.random.default_rng(0)
    b, c, d, eps = 16, 4, 10, 0.5
    h, w, bias = rng.standard_normal((b, d)), rng.standard_normal((c, d)), rng.standard_normal(c)
    y = rng.integers(0, c, b) if loss == "cross-entropy" else rng.standard_normal((b, c))
    loss_fn = cross_entropy if loss == "cross-entropy" else mse
    z = h @ w.T + bias
    resid = z - y if loss == "mse" else None
    if loss == "cross-entropy":
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(b), y] -= 1.0
        e = p / b
    else:
        e = 2.0 * resid / resid.size
    grad = e.T @ h
    for k in (1, 3):  # 4 rows of 10 inputs: a projection; 12 rows: all of them
        u = rng.choice([-1.0, 1.0], size=(k, c, d))
        beta = rng.choice([-1.0, 1.0], size=(k, c))
        out = np.stack([z, *(z + eps * (h @ u[j].T + beta[j]) for j in range(k))])
        rows = u.reshape(k * c, d)
        m, gb, value = read_coefficients(out, y, loss_fn, rows, beta, eps)
        assert m.dtype == np.float32
        want = grad if k * c >= d else grad @ np.linalg.pinv(rows) @ rows
        assert_close(m.astype(np.float64) @ rows, want, rtol=1e-6)
        assert_close(gb, e.sum(0), rtol=1e-12)
        assert value == pytest.approx(loss_fn(z, y), rel=1e-12)
        # a binding trust region: the outputs' exact change, in logits or RMS errors (mse)
        m, gb, _ = read_coefficients(out, y, loss_fn, rows, beta, eps, limit=0.01)
        unit = np.sqrt(value) if loss == "mse" else 1.0
        change = h @ rows.T @ m.astype(np.float64).T + gb
        assert np.sqrt(np.mean(change**2)) / unit == pytest.approx(0.01, rel=1e-5)


def test_cached_prefix_and_plain_forwards_give_the_same_run(tmp_path) -> None:
    assert_cached_prefix_run_is_the_plain_one(tmp_path, "zo-readout", {})


def test_tampered_records_are_refused_on_replay(tmp_path) -> None:
    import base64
    import json

    bundle, data, _ = demo()
    res = train(bundle, data, tmp_path / "run", steps=2, seed=3, optimizer="zo-readout",
                trainable="head.*", batch_size=32)
    rec = next(r for r in read_journal(res["journal"])[0] if r.get("kind") == "step")
    rec = {k: v for k, v in rec.items() if k != "kind"}
    nan = base64.b64encode(np.full(200, np.nan, "<f4").tobytes()).decode()
    short = base64.b64encode(np.zeros(3, "<f4").tobytes()).decode()
    for bad in ({"m": nan}, {"m": short}, {"gb": short}, {"m": "not base64!"},
                {"m": None}, {"eps": 0.5}, {"seeds": [[3, 0, 1], [3, 0, 0]]}):
        store = Model(bundle, trainable="head.*").store
        opt = make_optimizer("zo-readout", seed=3)
        opt.setup(store, layers=head_layers(bundle), output=bundle.outputs[0].name)
        with pytest.raises(InputError):
            opt.replay(store, json.loads(json.dumps({**rec, **bad})))
