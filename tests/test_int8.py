"""int8 bundles: QDQ export parity vs torch fake-quant, int8 weights live in place, PolyStep on
the int8 grid (rounding, saturation), zo-scale on the per-channel scales, replay bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import pretrain_on_digits
from sessions import replay_journal, train

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.losses import cross_entropy
from edgelearn.model import Model
from edgelearn.optim import make_optimizer
from edgelearn.parity import tolerance

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def int8_mlp(digits, tmp_path_factory) -> tuple[Path, object]:
    """zoo MLP trained briefly by backprop on digits, exported as an int8 QDQ bundle."""
    import torch
    from edgelearn.export.quantize import export_int8_bundle
    from edgelearn.export.zoo import MLP

    torch.manual_seed(0)
    module = pretrain_on_digits(MLP(), digits)
    path = tmp_path_factory.mktemp("int8") / "mlp"
    export_int8_bundle(module, torch.randn(1, 64), path)
    return path, module.eval()


def test_manifest_and_arena(int8_mlp) -> None:
    path, _ = int8_mlp
    b = load_bundle(path)
    specs = {p.name: p for p in b.params}
    assert specs["head.weight"].dtype == "int8"
    q = specs["head.weight"].quant
    assert q["axis"] == 0
    assert q["zero_point"] == 0
    assert len(q["scale"]) == 10
    assert specs["head.weight.scale"].quant == {"role": "scale", "of": "head.weight"}
    store = b.load_store()
    np.testing.assert_array_equal(store["head.weight.scale"], np.float32(q["scale"]))
    assert store["layers.0.weight"].min() >= -127  # symmetric grid, -128 never used
    assert store.n_trainable("int8") == 64 * 64 + 10 * 64


@pytest.mark.parametrize("live", ["*", ""], ids=["live", "baked"])
def test_int8_parity_within_one_quantization_step(int8_mlp, live) -> None:
    """ORT QDQ outputs == torch int8 reference (per-channel fake quant, same scales) within one
    quantization step of the output (per-tensor int8 step max|out| / 127)."""
    import torch
    from edgelearn.export.quantize import fake_quant_model

    path, module = int8_mlp
    model = Model(load_bundle(path), trainable=live)
    scales = {n: torch.from_numpy(np.array(model.store[f"{n}.scale"]))
              for n in ("layers.0.weight", "head.weight")}
    ref_model = fake_quant_model(module, scales)
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    out = model.predict(x)
    step = np.abs(ref).max() / 127
    assert np.abs(out - ref).max() <= step
    np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance(ref))  # in fact float32-close
    # And the int8 weights in the arena are exactly torch's quantized integers.
    w = module.head.weight.detach()
    q = torch.fake_quantize_per_channel_affine(w, scales["head.weight"],
                                               torch.zeros(10, dtype=torch.int32), 0, -127, 127)
    np.testing.assert_array_equal(model.store["head.weight"],
                                  torch.round(q / scales["head.weight"][:, None]).numpy())


def test_int8_in_place_edit_is_seen(int8_mlp) -> None:
    path, _ = int8_mlp
    model = Model(load_bundle(path), trainable="head.weight")
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    before = model.predict(x)
    model.store["head.weight"][0, :] = 127
    after = model.predict(x)
    assert not np.allclose(before[:, 0], after[:, 0])
    assert np.allclose(before[:, 1:], after[:, 1:])


@pytest.mark.parametrize("rounding", ["deterministic", "stochastic"])
def test_polystep_int8_stays_on_grid_and_saturates(int8_mlp, rounding) -> None:
    path, _ = int8_mlp
    model = Model(load_bundle(path), trainable="head.weight")
    store = model.store
    store["head.weight"][:5] = 127  # at the rail: steps must saturate, never wrap
    store["head.weight"][5:] = -127
    x = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    y = np.arange(16) % 10
    opt = make_optimizer("polystep", rank=16, radius=20.0, rounding=rounding, seed=0)
    base = store.copy()
    records = []
    for _ in range(3):
        records.append(opt.step(store, lambda: cross_entropy(model.predict(x), y)).record)
    w = store["head.weight"]
    assert w.dtype == np.int8
    assert w.min() >= -127
    assert w.max() <= 127
    assert (w == 127).any()
    assert (w == -127).any()
    assert (w != base["head.weight"]).any()
    again = make_optimizer("polystep", rank=16, radius=20.0, rounding=rounding, seed=0)
    for r in records:
        again.replay(base, r)
    assert base.digest() == store.digest()


def test_polystep_int8_rounding_matches_numpy_reference(int8_mlp) -> None:
    """An int8 step == clip(rint(q0 + sum_i dx_i B_i), -127, 127) from the recorded dx."""
    from edgelearn.optim.polystep import projection_block

    path, _ = int8_mlp
    model = Model(load_bundle(path), trainable="head.weight")
    q0 = model.store["head.weight"].reshape(-1).astype(np.float32)
    x = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    y = np.arange(16) % 10
    opt = make_optimizer("polystep", rank=16, radius=3.0, seed=5)
    rec = opt.step(model.store, lambda: cross_entropy(model.predict(x), y)).record
    acc = np.zeros(q0.size, np.float32)
    for i, dx in enumerate(rec["dx"]):
        acc += np.float32(dx) @ projection_block(5, 0, i, q0.size)
    want = np.clip(np.rint(q0 + acc), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(model.store["head.weight"].reshape(-1), want)


def test_polystep_learns_int8_head(int8_mlp, digits, tmp_path) -> None:
    path, _ = int8_mlp
    bundle = load_bundle(path)
    # A new user: shifted pixels; only the int8 head weights are trained.
    x = np.roll(digits.x[1000:1400].reshape(-1, 8, 8), 1, axis=2).reshape(-1, 64)
    data = Dataset(np.ascontiguousarray(x), digits.y[1000:1400])
    before = Model(bundle).evaluate(data)["loss"]
    res = train(bundle, data, tmp_path / "run", optimizer="polystep", trainable="head.weight",
                options={"rank": 16, "radius": 2.0, "total_steps": 60}, steps=60,
                batch_size=64)
    after = Model(bundle, trainable="head.weight", weights=res["weights"]).evaluate(data)["loss"]
    assert after < 0.85 * before, (before, after)
    store, _ = replay_journal(bundle, res["journal"])
    assert store.digest() == res["sha256"]


def test_zo_scale_improves_int8_model_and_keeps_scales_positive(int8_mlp, digits,
                                                                 tmp_path) -> None:
    path, _ = int8_mlp
    bundle = load_bundle(path)
    x = (digits.x[1000:1400] * 0.4).astype(np.float32)  # a user with faint strokes
    data = Dataset(x, digits.y[1000:1400])
    before = Model(bundle).evaluate(data)["loss"]
    res = train(bundle, data, tmp_path / "run", optimizer="zo-scale",
                options={"lr": 0.1, "probes": 2}, steps=300, batch_size=64)
    assert res["trainable_params"] == 64 + 10  # only the per-channel scales
    model = Model(bundle, trainable="*.scale", weights=res["weights"])
    after = model.evaluate(data)["loss"]
    assert after < 0.6 * before, (before, after)
    for name in ("layers.0.weight.scale", "head.weight.scale"):
        assert (model.store[name] > 0).all()
    base = bundle.load_store()
    np.testing.assert_array_equal(model.store["head.weight"], base["head.weight"])  # frozen
    store, steps = replay_journal(bundle, res["journal"])
    assert steps == 300
    assert store.digest() == res["sha256"]


def test_zo_scale_floor_keeps_scales_positive() -> None:
    from edgelearn.params import ParamSpec, ParamStore

    specs = [ParamSpec("w", (4, 3), "int8", False),
             ParamSpec("w.scale", (4,), "float32", True, {"role": "scale", "of": "w"})]
    store = ParamStore(specs, values={"w": np.ones((4, 3), np.int8),
                                      "w.scale": np.full(4, 1e-3, np.float32)})
    opt = make_optimizer("zo-scale", lr=10.0, eps=1e-4, clip=None, seed=0)
    calls = iter(range(10**6))
    for _ in range(5):
        # A loss that rewards shrinking scales without bound: the floor must hold.
        opt.step(store, lambda: float(store["w.scale"].sum()) + 1e-9 * next(calls))
    assert (store["w.scale"] > 0).all()
    assert store["w.scale"].min() >= 1e-3 * 0.5**5 * (1 - 1e-6)


def test_cli_zo_scale_and_polystep_on_int8(int8_mlp, digits_npz, tmp_path, capsys) -> None:
    from edgelearn.cli import main

    path, _ = int8_mlp
    for opt, extra in (("zo-scale", ["--lr", "1e-4", "--eps", "1e-4"]),
                       ("polystep", ["--trainable", "head.weight", "--opt", "radius=2"])):
        code = main(["train", str(path), "--data", str(digits_npz), "--optimizer", opt,
                     "--steps", "5", "--out", str(tmp_path / opt), "--json", *extra])
        res = json.loads(capsys.readouterr().out)
        assert code == 0
        code = main(["replay", str(path), res["journal"], "--out",
                     str(tmp_path / f"{opt}.safetensors"), "--json"])
        assert code == 0
        assert json.loads(capsys.readouterr().out)["sha256"] == res["sha256"]


@pytest.mark.parametrize(("opt", "trainable"), [("zo-scale", None), ("polystep", "head.weight")])
def test_int8_trains_without_torch(int8_mlp, digits_npz, tmp_path, opt, trainable) -> None:
    from test_polystep import run_no_torch

    path, _ = int8_mlp
    res = run_no_torch(tmp_path, bundle=str(path), data=str(digits_npz), opt=opt,
                       options={}, trainable=trainable)
    assert res["steps"] == 3
    assert res["optimizer"] == opt
