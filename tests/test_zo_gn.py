"""zo-gn on the shipped demo bundle: torch parity of one step, its forwards (one population
call for K + 1 candidates, one check), undone steps restored exactly, replay sha256 ==
trained, and the Gauss-Newton system itself on a linear least-squares problem."""

from __future__ import annotations

import numpy as np
import pytest
from sessions import replay_journal, train
from zo_helpers import (
    assert_cached_prefix_run_is_the_plain_one,
    assert_close,
    assert_step_applied,
    demo,
    named_noise,
    outputs_of,
    torch_demo_module,
)

from edgelearn.errors import InputError
from edgelearn.journal import read_journal
from edgelearn.losses import cross_entropy, mse
from edgelearn.model import Model
from edgelearn.optim import Population, make_optimizer
from edgelearn.optim.zo_gn import gauss_newton_step, gauss_newton_system


@pytest.mark.torch
@pytest.mark.parametrize(("damping_scale", "damping", "trust"), [
    ("curvature", 3.0, 1.0), ("weights", 0.1, None), ("curvature", 0.3, 0.05)])
def test_one_step_matches_torch_reference(damping_scale: str, damping: float,
                                          trust: float | None) -> None:
    import torch
    from torch_reference import zo_gn_coefficients, zo_gn_step

    bundle, data, _ = demo()
    model = Model(bundle, trainable="head.*")
    store = model.store
    x, y = data.x[:32], data.y[:32]
    params = {n: torch.from_numpy(np.array(store[n])) for n in store.names}
    module = torch_demo_module()
    module.load_state_dict(params)
    lr, eps, k = 0.5, 1e-3, 6
    opt = make_optimizer("zo-gn", lr=lr, eps=eps, probes=k, damping=damping,
                         damping_scale=damping_scale, trust=trust, seed=5)
    calls: list[int] = []
    seen: list[np.ndarray] = []
    info = opt.step(store, lambda: cross_entropy(model.predict(x), y),
                    outputs=outputs_of(model, x, y, calls, seen))
    assert calls == [k + 1]
    assert info.evaluations == k + 2  # the K + 1 candidates and the check
    assert info.accepted
    zs = [named_noise(store, (5, 0, j)) for j in range(k)]
    new, a = zo_gn_step(module, params, zs, torch.from_numpy(x), torch.from_numpy(y),
                        lr=lr, eps=eps, damping=damping, damping_scale=damping_scale,
                        trust=trust)
    # forward differences of float32 logits (ORT vs torch ~1e-7) over eps = 1e-3: a agrees
    # to ~1e-4 relative (measured); the update rule is checked at 1e-6 from the device's a
    assert_close(info.record["a"], a, atol=0, rtol=1e-3)
    assert_step_applied(store, params, new, zs, info.record["a"], lr)
    # the step's algebra (Gauss-Newton system, damped solve, update) against torch on the
    # device's own candidate outputs: the same a to float64 rounding, the weights to 1e-6
    a_ref = zo_gn_coefficients(torch.from_numpy(seen[0]), torch.from_numpy(y), eps=eps,
                               damping=damping, n=store.n_trainable("float32"),
                               damping_scale=damping_scale, trust=trust).tolist()
    assert_close(info.record["a"], a_ref, atol=0, rtol=1e-9)
    *_, Q = gauss_newton_system(seen[0], y, cross_entropy, eps)
    rms = float(np.sqrt(np.asarray(a_ref) @ Q @ np.asarray(a_ref)))
    assert rms <= (trust or np.inf) * (1 + 1e-9)
    if trust == 0.05:  # the case whose damped step exceeds the region: scaled onto its edge
        assert rms == pytest.approx(trust, rel=1e-9)
    for name in zs[0]:
        ref = params[name] - lr * sum(c * z[name] for c, z in zip(a_ref, zs, strict=True))
        assert_close(store[name], ref.numpy())


def test_marquardt_damping_is_scale_free_and_old_headers_keep_theirs() -> None:
    """Outputs scaled by c (G by c^2, g by c): with Marquardt's scaling the coefficients are
    the unscaled ones over c (the outputs move the same), as a Gauss-Newton step's should;
    a damping per unit-norm direction shrinks them instead. A journal header written before
    the option existed resumes with the scale its run used."""
    from edgelearn.optim.zo_gn import ZOGNOptions, marquardt_scale

    rng = np.random.default_rng(0)
    J = rng.standard_normal((6, 40))
    G, g = J @ J.T, J @ rng.standard_normal(40)
    a = gauss_newton_step(G, g, 3.0 * marquardt_scale(G))
    for c in (1e-3, 10.0):
        Gc, gc = c * c * G, c * g
        np.testing.assert_allclose(c * gauss_newton_step(Gc, gc, 3.0 * marquardt_scale(Gc)),
                                   a, rtol=1e-10)
        per_unit = gauss_newton_step(Gc, gc, 0.1 * 40)
        assert not np.allclose(c * per_unit, gauss_newton_step(G, g, 0.1 * 40), rtol=1e-3)
    old = {k: v for k, v in ZOGNOptions().config().items() if k != "damping_scale"}
    assert ZOGNOptions.from_config("zo-gn", old).damping_scale == "weights"
    with pytest.raises(InputError, match="damping_scale"):
        make_optimizer("zo-gn", damping_scale="diagonal")


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_gauss_newton_solves_linear_least_squares_in_one_step(scale: float) -> None:
    """A linear model, mse, K = n independent directions and a tiny damping: one step lands
    on the least-squares solution (the system is exact for a linear model), inside the trust
    region at any scale of the targets (mse measures it in RMS errors); a region smaller
    than the step scales it onto its edge."""
    from edgelearn.optim.zo_gn import trust_scaled

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5))
    y = scale * rng.standard_normal((40, 1))
    theta = scale * rng.standard_normal(5)
    dirs = rng.standard_normal((5, 5))  # 5 independent directions
    eps = 1e-3 * scale
    out = np.stack([X @ (theta + eps * d) for d in [np.zeros(5), *dirs]])[..., None]
    G, g, l0, Q = gauss_newton_system(out, y, mse, eps)
    assert l0 == pytest.approx(mse(out[0], y))
    a = gauss_newton_step(G, g, 1e-12 * scale ** 2)
    assert trust_scaled(a, Q, 1.0) is a  # the step moves the outputs by less than the error
    got = theta - a @ dirs
    want = np.linalg.lstsq(X, y[:, 0], rcond=None)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale)
    edge = trust_scaled(a, Q, 0.1)
    assert float(np.sqrt(edge @ Q @ edge)) == pytest.approx(0.1, rel=1e-9)
    np.testing.assert_allclose(edge, a * (0.1 / float(np.sqrt(a @ Q @ a))), rtol=1e-12)


def test_a_step_that_makes_the_batch_loss_worse_is_undone_exactly() -> None:
    """With lr 50 the step overshoots: the check's loss is higher, the weights are restored
    bit for bit, the damping goes up x4 and the next record states it."""
    bundle, data, _ = demo()
    model = Model(bundle, trainable="head.*")
    store = model.store
    x, y = data.x[:32], data.y[:32]
    before = store.flat().copy()
    opt = make_optimizer("zo-gn", lr=50.0, damping=0.1, seed=1)
    info = opt.step(store, lambda: cross_entropy(model.predict(x), y),
                    outputs=outputs_of(model, x, y, []))
    assert not info.accepted
    assert info.record["evals"][0] > info.record["loss"]
    np.testing.assert_array_equal(store.flat(), before)
    assert opt.damping_now == pytest.approx(0.4)
    info = opt.step(store, lambda: cross_entropy(model.predict(x), y),
                    outputs=outputs_of(model, x, y, []))
    assert info.record["damping"] == pytest.approx(0.4)


def test_other_losses_and_a_bare_step_are_refused() -> None:
    bundle, data, _ = demo()
    model = Model(bundle, trainable="head.*")
    y = data.y[:8]
    opt = make_optimizer("zo-gn", probes=2)
    with pytest.raises(InputError, match="outputs"):
        opt.step(model.store, lambda: 0.0)

    def outputs(pop: Population):
        return np.zeros((pop.size, 8, 10), np.float32), y, lambda o, t: 0.0

    with pytest.raises(InputError, match="cross_entropy, binary_cross_entropy and mse"):
        make_optimizer("zo-gn", probes=2).step(model.store, lambda: 0.0, outputs=outputs)
    with pytest.raises(InputError, match="damping"):
        make_optimizer("zo-gn", damping=0.0)


@pytest.mark.parametrize("population", [True, False])
def test_run_replays_bit_exactly(tmp_path, population: bool) -> None:
    bundle, data, _ = demo()
    res = train(bundle, data, tmp_path / "run", steps=30, seed=3, optimizer="zo-gn",
                trainable="head.*", batch_size=32, options={"probes": 4},
                population=population)
    assert res["population_graph"] is population
    steps = [r for r in read_journal(res["journal"])[0] if r.get("kind") == "step"]
    assert len(steps) == 30
    assert all(len(r["a"]) == 4 for r in steps)
    assert res["loss_last"] < res["loss_first"]
    store, n = replay_journal(bundle, res["journal"])
    assert n == 30
    assert store.digest() == res["sha256"]


def test_mse_on_target_vectors_trains_and_labels_are_refused(tmp_path) -> None:
    """objective mse on a classifier: one-hot target vectors train (the mse Gauss-Newton
    system) and replay; its integer labels, one number per example, are refused before
    anything is journaled."""
    import edgelearn as el

    bundle, data, _ = demo()
    onehot = el.Dataset(data.x, np.eye(10, dtype=np.float32)[data.y])
    res = train(bundle, onehot, tmp_path / "run", steps=20, seed=3, optimizer="zo-gn",
                trainable="head.*", batch_size=32, objective="mse", options={"probes": 4})
    assert res["loss_last"] < res["loss_first"]
    store, _ = replay_journal(bundle, res["journal"])
    assert store.digest() == res["sha256"]
    with pytest.raises(InputError, match=r"mse needs targets shaped like the output \[10\]"):
        train(bundle, data, tmp_path / "labels", steps=1, optimizer="zo-gn",
              trainable="head.*", objective="mse")
    assert not (tmp_path / "labels" / "journal.bin").exists()


def test_samples_one_at_a_time_stay_inside_the_trust_region(tmp_path) -> None:
    """Fed one sample at a time (Session.step, batch 1), the demo's first sample is one the
    model gets confidently wrong: its softmax covariance, hence G and the damping, vanish
    while the gradient does not. Without the trust region the damped step fits that sample
    and wrecks the model; with it the held-out accuracy stays where it was (0.43)."""
    import edgelearn as el
    from edgelearn.demo import demo_data

    bundle, _, _ = demo()
    train_set, test_set, _ = demo_data(0)
    acc = {}
    for trust in (1.0, None):
        cfg = el.TrainConfig(optimizer="zo-gn", trainable="head.*", batch_size=1,
                             options={"trust": trust})
        with el.Session(bundle, tmp_path / str(trust), cfg) as s:
            for i in range(20):
                s.step((train_set.x[i], train_set.y[i]))
            acc[trust] = s.model.evaluate(test_set)["accuracy"]
    assert acc[1.0] > 0.35
    assert acc[None] < 0.15


def test_a_tampered_record_is_refused_on_replay(tmp_path) -> None:
    from edgelearn.journal import Journal

    bundle, data, _ = demo()
    res = train(bundle, data, tmp_path / "run", steps=3, seed=3, optimizer="zo-gn",
                trainable="head.*", batch_size=32, options={"probes": 2})
    records, _ = read_journal(res["journal"])
    bad = tmp_path / "bad.jsonl"
    with Journal(bad, fsync_every=1) as j:
        for r in records:
            if r.get("kind") == "step" and r["step"] == 1:
                r = {**r, "damping": 7.0}
            j.append(r)
    with pytest.raises(InputError, match="does not reproduce"):
        replay_journal(bundle, bad)


@pytest.mark.parametrize("restore", ["copy", "drift"])
def test_litert_runs_it_and_its_journal_replays(tmp_path, restore: str) -> None:
    """On LiteRT (no population graph: K + 1 forwards a step) the same records replay to the
    trained weights; the losses agree with onnxruntime's run to float rounding."""
    pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT (ai-edge-litert) absent")
    bundle, data, _ = demo()
    kw = {"steps": 6, "seed": 2, "optimizer": "zo-gn", "trainable": "head.*",
          "batch_size": 32, "options": {"probes": 3, "restore": restore}, "threads": 1}
    lite = train(bundle, data, tmp_path / "lite", backend="litert", **kw)
    ort = train(bundle, data, tmp_path / "ort", **kw)
    assert not lite["population_graph"]
    store, n = replay_journal(bundle, lite["journal"])
    assert n == 6
    assert store.digest() == lite["sha256"]
    assert_close(lite["loss_first"], ort["loss_first"], rtol=1e-5)


@pytest.mark.parametrize("restore", ["copy", "drift"])
def test_cached_prefix_and_plain_forwards_give_the_same_run(tmp_path, restore: str) -> None:
    assert_cached_prefix_run_is_the_plain_one(tmp_path, "zo-gn",
                                              {"probes": 4, "restore": restore})


def test_drift_writes_probes_in_place_without_a_copy() -> None:
    """restore drift: no copy of the slice, one forward per candidate (K + 1 requests of one),
    the weights after a step the copy policy's to float32 drift (same a to ~1e-6: the
    candidates' outputs differ by ulps), an undone step back to within that drift."""
    bundle, data, _ = demo()
    x, y = data.x[:32], data.y[:32]
    after = {}
    for restore in ("copy", "drift"):
        model = Model(bundle, trainable="head.*")
        before = model.store.flat().copy()
        opt = make_optimizer("zo-gn", probes=6, seed=5, restore=restore)
        calls: list[int] = []
        info = opt.step(model.store, lambda m=model: cross_entropy(m.predict(x), y),
                        outputs=outputs_of(model, x, y, calls))
        assert info.accepted
        assert info.evaluations == 6 + 2
        assert calls == ([1] * 7 if restore == "drift" else [7])
        assert (opt.arena.copy is None) is (restore == "drift")
        assert opt.population_size(model.store) == (1 if restore == "drift" else 7)
        n = before.size  # drift: no copy; its passes draw one probe's signs more
        assert (opt.memory_bytes(model.store) + 4 * n - (-(-n // 64) * 8)
                == make_optimizer("zo-gn", probes=6).memory_bytes(model.store)) is (
                    restore == "drift")
        after[restore] = (model.store.flat().copy(), info.record["a"], before)
    (w_copy, a_copy, before), (w_drift, a_drift, _) = after["copy"], after["drift"]
    assert_close(a_drift, a_copy, atol=0, rtol=1e-4)
    scale = float(np.max(np.abs(before)))
    assert np.max(np.abs(w_drift - w_copy)) <= 1e-5 * scale
    assert not np.array_equal(w_drift, before)

    model = Model(bundle, trainable="head.*")
    opt = make_optimizer("zo-gn", lr=50.0, damping=0.1, seed=1, restore="drift")
    info = opt.step(model.store, lambda: cross_entropy(model.predict(x), y),
                    outputs=outputs_of(model, x, y, []))
    assert not info.accepted
    assert info.record["loss"] is not None
    assert np.max(np.abs(model.store.flat() - before)) <= 1e-6 * scale


@pytest.mark.parametrize("population", [True, False])
def test_drift_run_replays_bit_exactly(tmp_path, population: bool) -> None:
    """A drift run (kept and undone steps) replays to the trained sha256, with or without a
    population graph (drift scores candidates one by one either way)."""
    bundle, data, _ = demo()
    res = train(bundle, data, tmp_path / "run", steps=25, seed=3, optimizer="zo-gn",
                trainable="head.*", batch_size=32, population=population,
                options={"probes": 4, "restore": "drift", "lr": 3.0, "damping": 0.3})
    steps = [r for r in read_journal(res["journal"])[0] if r.get("kind") == "step"]
    assert {r["accepted"] for r in steps} == {True, False}  # lr 3: some steps undone
    assert res["loss_last"] < res["loss_first"]
    store, n = replay_journal(bundle, res["journal"])
    assert n == 25
    assert store.digest() == res["sha256"]


def test_a_drift_step_without_a_finite_loss_is_taken_back_and_replays() -> None:
    """Non-finite outputs: no update, the last probe taken back (to float32 drift), and the
    record replayed on a fresh store gives the very same weights."""
    bundle, data, _ = demo()
    y = data.y[:32]
    model = Model(bundle, trainable="head.*")
    before = model.store.flat().copy()
    opt = make_optimizer("zo-gn", probes=3, seed=2, restore="drift")

    def outputs(pop: Population):
        pop.place(0)
        return np.full((1, 32, 10), np.nan, np.float32), y, cross_entropy

    info = opt.step(model.store, lambda: 0.0, outputs=outputs)
    assert not info.accepted
    assert info.record["loss"] is None
    assert np.max(np.abs(model.store.flat() - before)) <= 1e-6 * float(np.max(np.abs(before)))
    fresh = Model(bundle, trainable="head.*")
    again = make_optimizer("zo-gn", probes=3, seed=2, restore="drift")
    again.replay(fresh.store, {**info.record, "step": 0})
    np.testing.assert_array_equal(fresh.store.flat(), model.store.flat())


@pytest.mark.torch
def test_a_bce_step_on_a_sigmoid_head_matches_torch_reference(tmp_path) -> None:
    """bce (one sigmoid probability, a wake-word head prepared from plain ONNX): the step in
    logits against torch's two-class cross-entropy Gauss-Newton, from torch's own forwards (a
    to 1e-3: forward differences of float32 outputs) and from the device's outputs (1e-9),
    the weights the update rule's to 1e-6."""
    import torch
    from onnx_models import sigmoid_head_onnx
    from torch import nn
    from torch_reference import zo_gn_coefficients, zo_gn_step

    import edgelearn as el
    from edgelearn.losses import binary_cross_entropy

    el.tools.prepare(sigmoid_head_onnx(tmp_path / "ww.onnx"), tmp_path / "ww")
    model = Model(el.load_bundle(tmp_path / "ww"))
    store = model.store
    rng = np.random.default_rng(4)
    x = rng.standard_normal((24, 16, 8)).astype(np.float32)
    y = rng.integers(0, 2, 24)
    params = {n: torch.from_numpy(np.array(store[n])) for n in store.names}

    class WakeWord(nn.Module):  # the ONNX graph in torch, tensors named and laid out alike
        def __init__(self) -> None:
            super().__init__()
            self.dense, self.out = nn.Module(), nn.Module()
            for mod, (k, m) in ((self.dense, (128, 8)), (self.out, (8, 1))):
                mod.weight, mod.bias = nn.Parameter(torch.zeros(k, m)), nn.Parameter(
                    torch.zeros(m))

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            h = torch.relu(inp.flatten(1) @ self.dense.weight + self.dense.bias)
            return torch.sigmoid(h @ self.out.weight + self.out.bias)

    lr, eps, k = 0.5, 1e-3, 5
    opt = make_optimizer("zo-gn", lr=lr, eps=eps, probes=k, seed=2)
    seen: list[np.ndarray] = []

    def outputs(pop: Population):
        rows = []
        for j in range(pop.size):
            pop.place(j)
            rows.append(np.array(model.predict(x)))
        seen.append(np.stack(rows))
        return seen[-1], y, binary_cross_entropy

    info = opt.step(store, lambda: binary_cross_entropy(model.predict(x), y), outputs=outputs)
    assert info.accepted
    zs = [named_noise(store, (2, 0, j)) for j in range(k)]
    new, a = zo_gn_step(WakeWord(), params, zs, torch.from_numpy(x), torch.from_numpy(y),
                        lr=lr, eps=eps, damping=3.0, loss="bce")
    assert_close(info.record["a"], a, atol=0, rtol=1e-3)
    a_ref = zo_gn_coefficients(torch.from_numpy(seen[0]), torch.from_numpy(y), eps=eps,
                               damping=3.0, n=store.n_trainable("float32"),
                               loss="bce").tolist()
    assert_close(info.record["a"], a_ref, atol=0, rtol=1e-9)
    assert_step_applied(store, params, new, zs, info.record["a"], lr)
