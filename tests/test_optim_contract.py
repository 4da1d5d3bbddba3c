"""Contract every registered optimizer must keep (optax-style shared suite).

Runs on a pure-numpy objective (no runtime) so it is fast and torch-free: a least-squares fit
whose loss is computed from the store views the optimizer mutates in place.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.optim import REGISTRY, make_optimizer
from edgelearn.params import ParamSpec, ParamStore

# Optimizers whose evaluate() gives more than a loss cannot run on this loss-only problem:
# tpsgd needs layer taps and labels from one taps forward; its contract-equivalent tests
# (state round trip, N+N == 2N after resume, determinism, replay) are in tests/test_tpsgd.py.
NAMES = sorted(n for n, cls in REGISTRY.items() if cls.needs == "loss")
OPTIONS = {"zo-sgd": {"lr": 0.01, "eps": 1e-3, "probes": 2},
           "polystep": {"radius": 0.1, "rank": 16},
           "zo-scale": {"lr": 0.01, "eps": 1e-3, "probes": 2}}


def problem(seed: int = 0) -> tuple[ParamStore, callable]:
    """A 2-layer least-squares problem with a frozen tensor; returns (store, loss)."""
    rng = np.random.default_rng(seed)
    specs = [ParamSpec("w", (8, 4), "float32", True), ParamSpec("b", (4,), "float32", True),
             ParamSpec("frozen", (3,), "float32", False)]
    store = ParamStore(specs, values={
        "w": rng.standard_normal((8, 4)).astype(np.float32) * 0.1,
        "b": np.zeros(4, np.float32), "frozen": np.ones(3, np.float32)})
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = x @ rng.standard_normal((8, 4)).astype(np.float32) + 0.5

    def loss() -> float:
        d = (x @ store["w"] + store["b"] - y).astype(np.float64)
        return float(np.mean(d * d))

    return store, loss


def make(name: str, **kw: object):
    return make_optimizer(name, **{**OPTIONS.get(name, {}), "seed": 7, **kw})


@pytest.mark.parametrize("name", NAMES)
def test_learns_and_preserves_dtype_and_frozen(name: str) -> None:
    store, loss = problem()
    opt = make(name)
    start = loss()
    for _ in range(300):
        opt.step(store, loss)
    assert loss() < 0.2 * start
    assert store["w"].dtype == np.float32
    np.testing.assert_array_equal(store["frozen"], np.ones(3, np.float32))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("restore", ["copy", "drift"])
def test_replay_equals_training_bit_exactly(name: str, restore: str) -> None:
    store, loss = problem()
    opt = make(name, restore=restore)
    base = store.copy()
    records = [opt.step(store, loss).record for _ in range(50)]
    again = make(name, restore=restore)
    for r in records:
        again.replay(base, r)
    assert base.digest() == store.digest()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_n_plus_n_equals_2n(name: str) -> None:
    store_a, loss_a = problem()
    a = make(name)
    for _ in range(40):
        a.step(store_a, loss_a)

    store_b, loss_b = problem()
    b = make(name)
    for _ in range(20):
        b.step(store_b, loss_b)
    state = b.state_dict()
    c = make(name)
    c.load_state_dict(state)
    for _ in range(20):
        c.step(store_b, loss_b)
    assert store_a.digest() == store_b.digest()
    assert c.state_dict() == a.state_dict()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_rejects_other_settings(name: str) -> None:
    state = make(name).state_dict()
    with pytest.raises(InputError, match="differ"):
        make(name, seed=8).load_state_dict(state)
    with pytest.raises(InputError, match="optimizer"):
        make(name).load_state_dict({**state, "name": "other"})


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_other_seed_differs(name: str) -> None:
    digests = []
    for seed in (7, 7, 8):
        store, loss = problem()
        opt = make(name, seed=seed)
        for _ in range(10):
            opt.step(store, loss)
        digests.append(store.digest())
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


@pytest.mark.parametrize("name", NAMES)
def test_ask_tell_protocol(name: str) -> None:
    store, loss = problem()
    opt = make(name)
    with pytest.raises(EdgelearnError):
        opt.tell(1.0)
    assert opt.ask(store)
    with pytest.raises(EdgelearnError):
        opt.ask(store)
    opt.tell(loss())
    with pytest.raises(EdgelearnError, match="middle of a step"):
        opt.state_dict()
    while opt.ask(store):
        opt.tell(loss())
    assert opt.t == 1
    # The manual dialogue and step() give the same weights.
    store2, loss2 = problem()
    make(name).step(store2, loss2)
    assert store2.digest() == store.digest()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("restore", ["copy", "drift"])
def test_nan_loss_rejected_weights_exact_or_replayed(name: str, restore: str) -> None:
    store, loss = problem()
    opt = make(name, restore=restore)
    opt.step(store, loss)
    before = store.copy()
    calls = []

    def bad() -> float:
        calls.append(1)
        return math.nan if len(calls) == 2 else loss()

    info = opt.step(store, bad)
    assert not info.accepted
    if restore == "copy":
        assert store.digest() == before.digest()
    # Whatever happened, replay reproduces it and training continues.
    replayed = make(name, restore=restore)
    replayed.load_state_dict({**opt.state_dict(), "t": 1})
    replayed.replay(before, info.record)
    assert before.digest() == store.digest()
    info = opt.step(store, loss)
    assert info.accepted


@pytest.mark.parametrize("noise", ["rademacher", "gaussian", "pool"])
def test_zo_copy_policy_step_is_exactly_the_update_rule(noise: str) -> None:
    """After a copy-policy step: theta == theta0 + float32(-lr * g) * z, bit for bit."""
    from edgelearn.rng import Noise

    store, loss = problem()
    theta0 = store.flat().copy()
    opt = make_optimizer("zo-sgd", lr=0.01, eps=1e-3, seed=7, restore="copy", noise=noise,
                         pool_size=1 << 12)
    info = opt.step(store, loss)
    z = Noise(noise, pool_size=1 << 12, pool_seed=7).fill(
        np.empty(theta0.size, np.float32), run_seed=7, step=0, probe=0, start=0)
    expected = theta0 + np.float32(-(info.record["lr"] * info.record["g"][0])) * z
    np.testing.assert_array_equal(store.flat(), expected)
    # And the probes saw exactly theta0 +- eps z: recompute both losses.
    store.flat()[...] = theta0 + np.float32(1e-3) * z
    lp = loss()
    store.flat()[...] = theta0 + np.float32(-1e-3) * z
    assert info.record["evals"] == [lp, loss()]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_population_batched_equals_expanded(dtype: str) -> None:
    """A population scored in one go (fill -> K rows) == the same request expanded into single
    ask/tell candidates (place): same rows, same losses, same weights."""
    from edgelearn.optim import Population

    rng = np.random.default_rng(0)
    specs = [ParamSpec("w", (6, 5), dtype, True), ParamSpec("b", (3,), "float32", False)]
    w0 = (rng.integers(-120, 120, (6, 5)) if dtype == "int8"
          else rng.standard_normal((6, 5))).astype(dtype)
    target = rng.standard_normal((6, 5))
    opts = {"rank": 16, "radius": 3.0 if dtype == "int8" else 0.1, "seed": 4}

    def loss_of(w: np.ndarray) -> float:
        return float(np.mean((w.astype(np.float64) / 50 - target) ** 2))

    a = ParamStore(specs, values={"w": w0, "b": np.zeros(3, np.float32)})
    b = a.copy()
    opt_a, opt_b = make_optimizer("polystep", **opts), make_optimizer("polystep", **opts)
    for _ in range(3):
        opt_a.step(a, lambda: loss_of(a["w"]))
        def batched(pop: Population) -> list[float]:
            placed: list[np.ndarray] = []
            rows = {dtype: np.empty((pop.size, b.n_trainable(dtype)), dtype)}
            half = pop.size // 2  # in two chunks, as an evaluator may do
            pop.fill(rows, 0, half)
            tail = {dtype: np.empty((pop.size - half, rows[dtype].shape[1]), dtype)}
            pop.fill(tail, half, pop.size)
            rows[dtype][half:] = tail[dtype]
            for j in range(pop.size):  # fill's rows are exactly what place() writes
                pop.place(j)
                placed.append(b.flat(dtype).copy())
            np.testing.assert_array_equal(np.stack(placed), rows[dtype])
            return [loss_of(r.reshape(6, 5)) for r in rows[dtype]]

        opt_b.step(b, lambda: loss_of(b["w"]), batched)
        assert a.digest() == b.digest()
        assert opt_a.last_info.record == opt_b.last_info.record
    assert a["w"].dtype == np.dtype(dtype)
