"""lozo: the low-rank graph against dense perturbed forwards, torch parity of one step, graph
and dense probes giving the same step, replay sha256 == trained, and learning on the demo."""

from __future__ import annotations

import numpy as np
import pytest
from sessions import replay_journal, train
from zo_helpers import assert_close, demo, torch_demo_module

from edgelearn import lowrank_graph
from edgelearn.losses import cross_entropy
from edgelearn.model import Model
from edgelearn.optim import make_optimizer
from edgelearn.training.evaluators import make_evaluator


def raw_graph(rng: np.random.Generator):
    """x [2, 3, 6] -> MatMul W1 [6, 5] -> Relu -> Gemm-free reshape -> Gemm(alpha 0.5,
    transB 0) W2 [5, 4] + C; W3 [7, 4] feeds a Gather (not a linear use)."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["r2"]),
             helper.make_node("Gemm", ["r2", "W2", "C"], ["y"], alpha=0.5, beta=2.0)]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", f, [2, 3, 6]),
         helper.make_tensor_value_info("W1", f, [6, 5]),
         helper.make_tensor_value_info("W2", f, [5, 4])],
        [helper.make_tensor_value_info("y", f, [6, 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [6, 5]),
         helper.make_tensor("C", f, [4], rng.standard_normal(4).tolist())])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pending", [False, True])
def test_rewritten_graph_equals_the_dense_perturbed_forward(pending: bool) -> None:
    """W + s U V^T; with a pending sum P fed as [P | U] and [V | V], W + (P + s U) V^T."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model = raw_graph(rng)
    w = {"W1": rng.standard_normal((6, 5)).astype(np.float32),
         "W2": rng.standard_normal((5, 4)).astype(np.float32)}
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    plain = ort.InferenceSession(model.SerializeToString())
    lowrank_graph.rewrite(model, {n: a.shape for n, a in w.items()}, 3, pending=pending)
    low = ort.InferenceSession(model.SerializeToString())
    uv = {n: (rng.standard_normal((a.shape[0], 3)).astype(np.float32),
              rng.standard_normal((a.shape[1], 3)).astype(np.float32)) for n, a in w.items()}
    p = {n: (rng.standard_normal(u.shape) if pending else np.zeros(u.shape)).astype(np.float32)
         for n, (u, _) in uv.items()}
    for s in (0.0, 1e-3, -0.7):
        feed = {"x": x, lowrank_graph.SCALE: np.array(s, np.float32)}
        for n, (u, v) in uv.items():
            feed[n] = w[n]
            feed[lowrank_graph.u_name(n)] = np.hstack([p[n], u]) if pending else u
            feed[lowrank_graph.v_name(n)] = np.hstack([v, v]) if pending else v
        got = low.run(None, feed)[0]
        dense = {n: w[n] + (p[n] + np.float32(s) * u) @ v.T for n, (u, v) in uv.items()}
        ref = plain.run(None, {"x": x, **dense})[0]
        assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_weight_with_another_use_is_named() -> None:
    from onnx import helper

    model = raw_graph(np.random.default_rng(0))
    model.graph.node.append(helper.make_node("Identity", ["W2"], ["w2copy"]))
    why = lowrank_graph.why_not(model, ["W1", "W2"])
    assert why is not None
    assert "W2" in why
    assert "Identity" in why
    with pytest.raises(ValueError, match="W2"):
        lowrank_graph.rewrite(model, {"W2": (5, 4)}, 2)
    assert lowrank_graph.why_not(model, ["W1"]) is None


def demo_step(graph: bool, seed: int = 5, stacked: bool = True, **opts):
    """(store, step info, losses, model) of one lozo step on the demo, all weights trainable,
    probes scored by the low-rank graph or densely (the evaluator's fallback)."""
    bundle, data, _ = demo()
    model = Model(bundle, trainable="*")
    x, y = data.x[:32], data.y[:32]
    opt = make_optimizer("lozo", **{"lr": 0.05, "eps": 1e-3, "rank": 2, "seed": seed, **opts})
    ev = make_evaluator(bundle, model.store, opt, backend="onnxruntime", model=model,
                        loss_fn=cross_entropy)
    assert ev.lowrank_info["graph"]
    assert ev.runner.stacked == stacked  # Gemm weights and biases: one stacked run
    fw = ev.forwards(x, y)
    info = opt.step(model.store, fw.evaluate, fw.population if graph else None)
    return model, opt, info, (x, y)


@pytest.mark.torch
def test_one_step_matches_torch_reference() -> None:
    import torch
    from torch_reference import lozo_step

    bundle = demo()[0]
    base = Model(bundle, trainable="*").store
    params = {n: torch.from_numpy(np.array(base[n])) for n in base.names}
    model, opt, info, (x, y) = demo_step(True)
    store = model.store
    module = torch_demo_module()
    module.load_state_dict(params)
    factors = {n: tuple(torch.from_numpy(a) for a in uv) for n, uv in opt.factors(0).items()}
    zt = opt.noise.fill(np.empty(74, np.float32), run_seed=5, step=0, probe=2, start=0)
    z = {"layers.0.bias": torch.from_numpy(zt[:64].copy()),
         "head.bias": torch.from_numpy(zt[64:].copy())}
    new, g, losses = lozo_step(module, params, factors, z, torch.from_numpy(x),
                               torch.from_numpy(y), lr=0.05, eps=1e-3)
    assert info.evaluations == 2
    assert_close(info.record["evals"], losses)
    # g divides a loss difference (~1e-3) by 2 eps: float32 forward noise (ORT vs torch, graph
    # vs dense) reaches it at ~1e-4 relative; the rule itself is checked from the device's g
    assert_close(info.record["g"], g, atol=0, rtol=1e-3)
    gd = info.record["g"]
    for name in store.names:
        d = factors[name][0] @ factors[name][1].T if name in factors else z[name]
        assert_close(store[name], (params[name] - (0.05 * gd) * d).numpy())
        assert_close(store[name], new[name].numpy(), rtol=1e-4)


def test_graph_and_dense_probes_give_the_same_step() -> None:
    """The graph's losses equal the dense candidates' within float rounding, and from the same
    losses the weights are bit-identical (the update never reads how they were scored)."""
    a, _, ia, _ = demo_step(True)
    _, opt_b, ib, _ = demo_step(False)
    assert_close(ia.record["evals"], ib.record["evals"])
    again = Model(demo()[0], trainable="*")
    make_optimizer("lozo", lr=0.05, eps=1e-3, rank=2, seed=5).replay(again.store, ia.record)
    assert again.store.digest() == a.store.digest()
    assert ib.evaluations == 2
    assert opt_b.memory_bytes(a.store) >= 4 * 64 * 74  # counts the fallback's weight copy


def test_session_trains_through_the_graph_and_replays_bit_exactly(tmp_path) -> None:
    bundle, data, test = demo()
    before = Model(bundle).evaluate(test)["loss"]
    res = train(bundle, data, tmp_path / "run", steps=150, seed=3, optimizer="lozo",
                trainable="*", batch_size=32, options={"lr": 0.003, "eps": 1e-3, "nu": 20})
    assert res["population_call_ms_median"] is not None  # the stacked graph scored the probes
    store, steps = replay_journal(bundle, res["journal"])
    assert steps == 150
    assert store.digest() == res["sha256"]
    model = Model(bundle, trainable="*", weights=res["weights"])
    assert model.evaluate(test)["loss"] < before


def test_litert_falls_back_to_dense_probes_with_the_reason() -> None:
    bundle = demo()[0]
    model = Model(bundle, trainable="*")
    opt = make_optimizer("lozo")
    ev = make_evaluator(bundle, model.store, opt, backend="litert", model=model,
                        loss_fn=cross_entropy)
    assert ev.lowrank_info == {"graph": False, "why": "backend litert has no low-rank graph"}


def test_onnxruntime_update_engine_equals_numpy_and_replays_bit_exactly() -> None:
    """The in-place Gemm engine: within rounding of numpy's row blocks, and a run with it
    replays to the same sha256 (replay runs the same engine: the option is recorded)."""
    from edgelearn.backends.ort_rank_update import OrtRankUpdate
    from edgelearn.optim.lozo import rank_update

    rng = np.random.default_rng(1)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    c = rng.standard_normal((300, 3)).astype(np.float32)
    vt = rng.standard_normal((3, 200)).astype(np.float32)
    ref = w.copy()
    rank_update(ref, c, vt)
    engine = OrtRankUpdate()
    got = w.copy()
    engine(got, c, vt)
    assert_close(got, ref)
    engine(got, -c, vt)  # the second call on the same weight reuses its binding
    assert_close(got, w, atol=1e-5)

    bundle, data, _ = demo()
    model = Model(bundle, trainable="*")
    base = model.store.copy()
    opts = {"lr": 0.003, "eps": 1e-3, "seed": 2, "update": "onnxruntime"}
    opt = make_optimizer("lozo", **opts)
    records = []
    for t in range(4):
        x, y = data.batch_at(t, 32, 2)
        records.append(opt.step(model.store, lambda x=x, y=y: cross_entropy(model.predict(x), y))
                       .record)
    again = make_optimizer("lozo", **opts)
    for rec in records:
        again.replay(base, rec)
    assert base.digest() == model.store.digest()


def test_one_run_per_probe_where_the_graph_cannot_stack(monkeypatch) -> None:
    """A graph that cannot take stacked probes (MatMul weights, norms) runs one probe per run
    with the dense part written into the store: the same losses within rounding, the dense
    part restored exactly (replay, which writes no probe, ends on the same weights)."""
    monkeypatch.setattr(lowrank_graph, "why_not_stacked", lambda *a: "forced for the test")
    a, _, ia, _ = demo_step(True, stacked=False)
    _, _, ib, _ = demo_step(False, stacked=False)
    assert_close(ia.record["evals"], ib.record["evals"])
    assert ia.evaluations == 2
    again = Model(demo()[0], trainable="*")
    make_optimizer("lozo", lr=0.05, eps=1e-3, rank=2, seed=5).replay(again.store, ia.record)
    assert again.store.digest() == a.store.digest()  # replay never perturbs: restore exact


def test_in_place_update_check_restores_and_names_the_way_out() -> None:
    """A wrong in-place result (as an onnxruntime that stopped copying C first would give) is
    refused on the first run per weight, the weight restored."""
    from edgelearn.backends.ort_rank_update import check_in_place
    from edgelearn.errors import EdgelearnError

    rng = np.random.default_rng(3)
    before = rng.standard_normal((40, 30)).astype(np.float32)
    c = rng.standard_normal((40, 2)).astype(np.float32)
    vt = rng.standard_normal((2, 30)).astype(np.float32)
    w = before + c @ vt
    check_in_place(w, before, c, vt)  # right: passes
    w[7, 3] += 0.5
    with pytest.raises(EdgelearnError, match="update=numpy"):
        check_in_place(w, before, c, vt)
    assert np.array_equal(w, before)


@pytest.mark.parametrize("rank", [1, 2])
def test_blas_products_equal_elementwise_for_rademacher_factors(rank: int) -> None:
    """Rademacher factors of rank <= 2: BLAS row blocks give the elementwise bits, in place
    and from a source copy (the update and the dense-probe fallback)."""
    from edgelearn.optim.lozo import exact_factors, rank_update

    assert exact_factors("rademacher", rank)
    assert not exact_factors("rademacher", 3)
    assert not exact_factors("gaussian", rank)
    rng = np.random.default_rng(rank)
    w = rng.standard_normal((700, 300)).astype(np.float32)
    u = (rng.integers(0, 2, (700, rank)) * 2 - 1).astype(np.float32)
    u *= np.float32(1.0 / np.sqrt(rank))
    vt = (rng.integers(0, 2, (rank, 300)) * 2 - 1).astype(np.float32)
    for c in (np.float32(-3.7e-4), np.float32(0.123456)):
        ref, got = w.copy(), w.copy()
        rank_update(ref, c * u, vt)
        rank_update(got, c * u, vt, exact=True)
        assert np.array_equal(ref, got)
        out = np.empty_like(w)
        rank_update(out, c * u, vt, src=w, threads=2, exact=True)
        assert np.array_equal(out, ref)


def test_auto_engine_gives_numpy_bits_and_falls_back_when_it_cannot() -> None:
    """update "auto" (the default): onnxruntime's Gemm with Rademacher factors of rank 2 ends
    on the numpy engine's weights (==); an engine whose first update differs is dropped for
    numpy, the weight given numpy's bits; gaussian factors take numpy directly."""
    from edgelearn.backends.ort_rank_update import OrtRankUpdate

    bundle, data, _ = demo()
    digests, engines = [], []
    for update in ("auto", "numpy"):
        model = Model(bundle, trainable="*")
        opt = make_optimizer("lozo", lr=0.003, seed=4, update=update)
        for t in range(3):
            x, y = data.batch_at(t, 32, 4)
            opt.step(model.store, lambda x=x, y=y, m=model: cross_entropy(m.predict(x), y))
        digests.append(model.store.digest())
        engines.append(opt.update_engine())
    assert digests[0] == digests[1]
    assert isinstance(engines[0], OrtRankUpdate)
    assert engines[0].unequal is None
    assert engines[1] is None
    assert make_optimizer("lozo", noise="gaussian").update_engine() is None

    def off_by_one_ulp(w: np.ndarray, c: np.ndarray, vt: np.ndarray) -> None:
        w += c @ vt
        w[0, 0] = np.nextafter(w[0, 0], np.float32(np.inf))

    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 40)).astype(np.float32)
    c = np.full((50, 1), 0.5, np.float32)
    vt = np.ones((1, 40), np.float32)
    want = w.copy()
    off_by_one_ulp(want, c, vt)
    engine = OrtRankUpdate(same_as=off_by_one_ulp)
    engine(w, c, vt)
    assert engine.unequal is not None
    assert np.array_equal(w, want)


def test_shared_first_layer_scores_the_same_probes(monkeypatch) -> None:
    """The demo's first Gemm reads x: the stacked graph takes the batch once and stacks that
    layer's products; its losses equal the fully stacked graph's within rounding."""
    model, _, shared, _ = demo_step(True)
    monkeypatch.setattr(lowrank_graph, "shares_input", lambda *a: False)
    _, _, full, _ = demo_step(True)
    assert_close(shared.record["evals"], full.record["evals"])
    assert model.store.digest() != Model(demo()[0], trainable="*").store.digest()


def test_shares_input_only_where_first_gemms_read_the_data() -> None:
    import onnx

    from edgelearn.backends.ort_lowrank import lowrank_weights

    bundle = demo()[0]
    model = onnx.load(str(bundle.path / bundle.files["onnx"]))
    store = Model(bundle, trainable="*").store
    weights = list(lowrank_weights(store))
    assert lowrank_graph.shares_input(model, weights, ["x"])
    head_only = [w for w in weights if w.startswith("head")]
    assert not lowrank_graph.shares_input(model, head_only, ["x"])  # x feeds a frozen Gemm
