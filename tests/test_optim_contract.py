"""Contract every registered optimizer must keep (optax-style shared suite).

Two pure-numpy problems (no runtime, no torch), so the suite is fast:
  * `Mlp`: a 2-layer classifier whose step inputs are a loss (`evaluate`), one taps forward
    (`taps=`, as the taps graph gives it) and the logits of K candidates (`outputs=`); every
    optimizer gets the same call and reads what it needs. The table `CASES` names every
    registered optimizer (tpSGD included) and `test_every_registered_optimizer_is_in_the_table`
    keeps it that way; the tests over `ALL` check options, state, resume, replay and dtype on
    it.
  * `problem()`: a least-squares fit for the loss-only optimizers (learning, restore policies,
    ask/tell, rejected steps, populations).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.layers import parse_layers
from edgelearn.losses import cross_entropy
from edgelearn.optim import REGISTRY, Optimizer, Population, make_optimizer, optimizer_from_config
from edgelearn.params import ParamSpec, ParamStore

ALL = sorted(REGISTRY)
#: optimizer -> (options of the shared tests, bad option values: (options, message part))
CASES: dict[str, tuple[dict[str, Any], list[tuple[dict[str, Any], str]]]] = {
    "zo-sgd": ({"lr": 0.01, "eps": 1e-3, "probes": 2, "noise": "gaussian", "clip": 5.0},
               [({"lr": -1.0}, "lr"), ({"eps": 0}, "eps"), ({"probes": 0}, "probes"),
                ({"noise": "uniform"}, "noise"), ({"chunk": 12}, "chunk"),
                ({"schedule": "cosine"}, "total_steps"), ({"reject_above": math.inf},
                                                          "reject_above")]),
    "zo-scale": ({"lr": 0.01, "eps": 1e-3, "probes": 2},
                 [({"min_ratio": 1.0}, "min_ratio"), ({"clip": 0.0}, "clip"),
                  ({"eps": math.nan}, "eps"), ({"lr": -1.0}, "lr")]),
    "polystep": ({"radius": 0.1, "rank": 16, "total_steps": 20},
                 [({"rank": 12}, "rank"), ({"radius": 0.0}, "radius"),
                  ({"arena": "int4"}, "arena"), ({"eps_final": -1.0}, "eps_final"),
                  ({"total_steps": 0}, "total_steps")]),
    "fzoo": ({"lr": 0.05, "eps": 1e-3, "probes": 3, "noise": "gaussian"},
             [({"lr": -1.0}, "lr"), ({"eps": 0}, "eps"), ({"probes": 1}, "probes"),
              ({"schedule": "linear"}, "total_steps"), ({"chunk": 12}, "chunk")]),
    "adamezo": ({"lr": 0.01, "eps": 1e-3, "probes": 2, "noise": "gaussian"},
                [({"lr": math.inf}, "lr"), ({"eps": -1.0}, "eps"), ({"probes": 0}, "probes"),
                 ({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2"),
                 ({"adam_eps": 0.0}, "adam_eps"), ({"schedule": "cosine"}, "total_steps")]),
    # fc1 by ZO, the head exactly: both parts of a step in every shared test
    "hybrid": ({"lr": 0.1, "zo_lr": 0.01, "eps": 1e-3, "exact": "head.*", "probes": 2},
               [({"zo_lr": -1.0}, "zo_lr"), ({"eps": 0.0}, "eps"), ({"probes": 0}, "probes"),
                ({"groups": "head.*:lr=x"}, "groups"), ({"noise": "uniform"}, "noise")]),
    # fc1 and the head low rank (dense fallback: no graph here), the biases dense
    "lozo": ({"lr": 0.02, "eps": 1e-3, "rank": 2, "nu": 3},
             [({"lr": -1.0}, "lr"), ({"eps": 0.0}, "eps"), ({"rank": 0}, "rank"),
              ({"nu": 0}, "nu"), ({"noise": "pool"}, "noise")]),
    "zo-gn": ({"lr": 1.0, "eps": 1e-3, "probes": 3, "damping": 0.1},
              [({"lr": -1.0}, "lr"), ({"eps": 0}, "eps"), ({"probes": 0}, "probes"),
               ({"damping": 0.0}, "damping"), ({"schedule": "cosine"}, "total_steps"),
               ({"chunk": 12}, "chunk")]),
    # the head alone (`TRAINS`): what the outputs read exactly
    "zo-readout": ({"lr": 0.3, "eps": 1e-2, "probes": 1},
                   [({"lr": -1.0}, "lr"), ({"eps": 0.0}, "eps"), ({"probes": 0}, "probes"),
                    ({"schedule": "cosine"}, "total_steps"), ({"trust": 0.0}, "trust")]),
    "tpsgd": ({"lr": 0.1, "hidden_lr": 0.05, "target_scale": 2.0},
              [({"lr": math.nan}, "lr"), ({"local_loss": "hinge"}, "local_loss"),
               ({"target_scale": 0.0}, "target_scale"), ({"head_loss": "bce"}, "head_loss")]),
}
#: optimizer -> the Mlp tensors it trains where not all (zo-readout: a linear head alone)
TRAINS = {"zo-readout": ("head.weight", "head.bias")}
LOSS_ONLY = sorted(n for n, cls in REGISTRY.items() if cls.needs == "loss")
OPTIONS = {"zo-sgd": {"lr": 0.01, "eps": 1e-3, "probes": 2},
           "polystep": {"radius": 0.1, "rank": 16},
           "zo-scale": {"lr": 0.01, "eps": 1e-3, "probes": 2},
           "adamezo": {"lr": 0.05},
           "lozo": {"lr": 0.02, "eps": 1e-3, "nu": 5}}


# -- every optimizer: one problem that offers both a loss and layer taps ----------------------
class Mlp:
    """x [64, 6] -> fc1 (linear + relu, 5) -> head (linear, 3 classes), batches of 16.

    `inputs(store, t)` are the step inputs of step t for the weights in `store`: evaluate()
    (cross-entropy of the batch) and taps=() -> (taps, y) (one forward's layer taps, named as a
    taps graph names them). A frozen tensor must never move.
    """

    SPECS = (ParamSpec("fc1.weight", (5, 6), "float32", True),
             ParamSpec("fc1.bias", (5,), "float32", True),
             ParamSpec("head.weight", (3, 5), "float32", True),
             ParamSpec("head.bias", (3,), "float32", True),
             ParamSpec("frozen", (4,), "float32", False))
    LAYERS = ({"name": "fc1", "kind": "linear", "activation": "relu", "input": "x",
               "preact": "fc1:pre", "output": "fc1:out",
               "params": {"weight": "fc1.weight", "bias": "fc1.bias"}},
              {"name": "head", "kind": "linear", "head": True, "activation": "none",
               "input": "fc1:out", "preact": "logits", "output": None,
               "params": {"weight": "head.weight", "bias": "head.bias"}})

    def __init__(self) -> None:
        rng = np.random.default_rng(11)
        self.x = rng.standard_normal((64, 6)).astype(np.float32)
        self.y = (self.x[:, :3].argmax(axis=1)).astype(np.int64)
        self.values = {s.name: (rng.standard_normal(s.shape) * 0.5).astype(np.float32)
                       for s in self.SPECS}
        self.layers = parse_layers({"layers": list(self.LAYERS)}, {s.name for s in self.SPECS})

    def specs(self, name: str | None = None) -> list[ParamSpec]:
        """SPECS with `name`'s trainable set (`TRAINS`; the frozen tensor stays frozen)."""
        keep = TRAINS.get(name or "")
        return [s if keep is None or s.name in keep else dataclasses.replace(s, trainable=False)
                for s in self.SPECS]

    def store(self, name: str | None = None) -> ParamStore:
        return ParamStore(self.specs(name), values=self.values)

    def forward(self, store: ParamStore, t: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        idx = np.random.default_rng([5, t]).choice(len(self.x), 16, replace=False)
        x, y = self.x[idx], self.y[idx]
        pre = x @ store["fc1.weight"].T + store["fc1.bias"]
        out = np.maximum(pre, np.float32(0))
        logits = out @ store["head.weight"].T + store["head.bias"]
        return {"x": x, "fc1:pre": pre, "fc1:out": out, "logits": logits}, y

    def inputs(self, store: ParamStore, t: int) -> dict[str, Any]:
        def evaluate() -> float:
            taps, y = self.forward(store, t)
            z = taps["logits"].astype(np.float64)
            z -= z.max(axis=1, keepdims=True)
            return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))

        def outputs(pop: Population) -> tuple[np.ndarray, np.ndarray, Any]:
            rows = []
            for j in range(pop.size):
                pop.place(j)
                taps, y = self.forward(store, t)
                rows.append(taps["logits"].copy())
            return np.stack(rows), y, cross_entropy

        return {"evaluate": evaluate, "taps": lambda: self.forward(store, t),
                "outputs": outputs}


@pytest.fixture(scope="module")
def mlp() -> Mlp:
    return Mlp()


def fresh(name: str, mlp: Mlp, store: ParamStore, **kw: Any) -> Optimizer:
    """The optimizer of the shared tests, set up for `store` (every optimizer gets the same
    setup call; those that need no layers ignore them)."""
    opt = make_optimizer(name, **{**CASES[name][0], "seed": 7, **kw})
    opt.setup(store, layers=mlp.layers)
    return opt


def run(opt: Optimizer, mlp: Mlp, store: ParamStore, steps: int, *,
        defer: bool = False) -> list[dict[str, Any]]:
    """`steps` steps from opt.t on; the journal records, through JSON as a journal keeps them.
    `defer`: as a `Session` run steps (an update may stay pending until `settle`)."""
    out = []
    for _ in range(steps):
        info = opt.step(store, **mlp.inputs(store, opt.t), defer=defer)
        out.append(json.loads(json.dumps(info.record)))
    return out


def test_every_registered_optimizer_is_in_the_table() -> None:
    assert set(CASES) == set(REGISTRY)


@pytest.mark.parametrize("name", ALL)
def test_options_round_trip_through_the_journal_header(name: str) -> None:
    for kw in ({}, CASES[name][0]):
        opt = make_optimizer(name, seed=3, **kw)
        header = json.loads(json.dumps({"optimizer": name, "config": opt.config()}))
        again = optimizer_from_config(header["optimizer"], header["config"])
        assert again.options == opt.options
        assert again.config() == opt.config()
        assert type(opt).Options.from_config(name, header["config"]) == opt.options
        with pytest.raises(dataclasses.FrozenInstanceError):
            opt.options.__setattr__("seed", 4)


@pytest.mark.parametrize("name", ALL)
def test_headers_without_a_newer_option_read_as_their_run(name: str) -> None:
    """A key an older header lacks takes the value that run used ("legacy"), else the
    default."""
    options = type(make_optimizer(name)).Options
    config = make_optimizer(name).config()
    for f in dataclasses.fields(options):
        if f.name not in config:
            continue
        old = {k: v for k, v in config.items() if k != f.name}
        legacy = {f.name: f.metadata["legacy"]} if "legacy" in f.metadata else {}
        try:
            want = options(**legacy)
        except InputError as e:  # that run's behaviour is gone (polystep rotation 1): refused
            with pytest.raises(InputError, match=re.escape(str(e))):
                options.from_config(name, old)
            continue
        assert options.from_config(name, old) == want, f.name


@pytest.mark.parametrize("name", ALL)
def test_every_option_has_help_and_known_metadata(name: str) -> None:
    for f in dataclasses.fields(REGISTRY[name].Options):
        assert f.metadata.get("help"), f.name
        assert f.metadata.get("record", "always") in ("always", "when-set", "never")
        assert f.metadata.get("cli") is None or f.metadata["cli"].startswith("--")


@pytest.mark.parametrize("name", ALL)
def test_unknown_option_is_refused_with_the_valid_keys(name: str) -> None:
    with pytest.raises(InputError, match="no option 'bogus'") as e:
        make_optimizer(name, bogus=1)
    assert f"valid keys: {', '.join(REGISTRY[name].Options.names())}" in str(e.value)
    with pytest.raises(InputError, match="bogus"):
        optimizer_from_config(name, {**make_optimizer(name).config(), "bogus": 1})


@pytest.mark.parametrize(("name", "bad", "part"),
                         [(n, bad, part) for n in ALL for bad, part in CASES[n][1]])
def test_bad_option_values_are_refused(name: str, bad: dict[str, Any], part: str) -> None:
    with pytest.raises(InputError, match=part):
        make_optimizer(name, **bad)


@pytest.mark.parametrize("name", ALL)
def test_wrongly_typed_options_are_refused_naming_the_option(name: str) -> None:
    for f in dataclasses.fields(REGISTRY[name].Options):
        for value in ([1], {"a": 1}, "7" if f.type != "str" else 7):
            with pytest.raises(InputError, match=f"^{f.name} must be"):
                make_optimizer(name, **{f.name: value})
    with pytest.raises(InputError, match="seed"):
        make_optimizer(name, seed=-1)
    with pytest.raises(InputError, match="seed"):
        make_optimizer(name, seed=True)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name: str, mlp: Mlp) -> None:
    store = mlp.store(name)
    opt = fresh(name, mlp, store)
    run(opt, mlp, store, 3)
    state = json.loads(json.dumps(opt.state_dict()))
    other = fresh(name, mlp, store)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.t == 3
    with pytest.raises(InputError, match="differ"):
        fresh(name, mlp, store, seed=8).load_state_dict(state)
    with pytest.raises(InputError, match="optimizer"):
        other.load_state_dict({**state, "name": "other"})


@pytest.mark.parametrize("name", ALL)
def test_n_plus_n_steps_with_save_and_load_equal_2n(name: str, mlp: Mlp,
                                                    tmp_path: Path) -> None:
    whole = mlp.store(name)
    a = fresh(name, mlp, whole)
    run(a, mlp, whole, 8)

    first = mlp.store(name)
    b = fresh(name, mlp, first)
    run(b, mlp, first, 4)
    first.save(tmp_path / "w.safetensors")
    state = json.loads(json.dumps(b.state_dict()))
    del b, first  # a new process: only the files are left
    second = ParamStore.from_file(tmp_path / "w.safetensors", mlp.specs(name))
    c = fresh(name, mlp, second)
    c.load_state_dict(state)
    run(c, mlp, second, 4)
    assert second.digest() == whole.digest()
    assert c.state_dict() == a.state_dict()


@pytest.mark.parametrize("name", ALL)
def test_replay_gives_the_trained_weights_bit_exactly(name: str, mlp: Mlp) -> None:
    store = mlp.store(name)
    records = run(fresh(name, mlp, store), mlp, store, 6)
    assert store.digest() != mlp.store(name).digest()  # the weights moved
    base = mlp.store(name)
    again = fresh(name, mlp, base)
    for rec in records:  # the same inputs as training; replay reads what it needs
        inputs = mlp.inputs(base, rec["step"])
        again.replay(base, rec, taps=inputs["taps"])
    assert base.digest() == store.digest()
    assert again.t == 6
    tampered = {**records[0], "accepted": not records[0]["accepted"]}
    base = mlp.store(name)
    with pytest.raises(InputError, match="does not reproduce"):
        fresh(name, mlp, base).replay(base, tampered, taps=mlp.inputs(base, 0)["taps"])


@pytest.mark.parametrize("name", ALL)
def test_deferred_steps_checkpoint_read_and_replay_to_the_same_bits(name: str, mlp: Mlp,
                                                                     tmp_path: Path) -> None:
    """Steps with defer=True (what `Session` runs pass): the arena and state saved mid-run
    continue to the same weights; a read inside `settled` sees what `settle` gives and leaves
    the run's bits alone; replay with defer=True and a final `settle` rebuilds the weights."""
    whole = mlp.store(name)
    a = fresh(name, mlp, whole)
    records = run(a, mlp, whole, 4, defer=True)
    arena = whole.digest()
    with a.settled(whole):
        seen = whole.digest()
    assert whole.digest() == arena
    state = json.loads(json.dumps(a.state_dict()))
    whole.save(tmp_path / "w.safetensors")
    records += run(a, mlp, whole, 4, defer=True)
    a.settle(whole)

    second = ParamStore.from_file(tmp_path / "w.safetensors", mlp.specs(name))
    c = fresh(name, mlp, second)
    c.load_state_dict(state)
    with c.settled(second):
        assert second.digest() == seen
    run(c, mlp, second, 4, defer=True)
    c.settle(second)
    assert second.digest() == whole.digest()

    base = mlp.store(name)
    again = fresh(name, mlp, base)
    for rec in records:
        again.replay(base, rec, taps=mlp.inputs(base, rec["step"])["taps"], defer=True)
    again.settle(base)
    assert base.digest() == whole.digest()


@pytest.mark.parametrize("name", ALL)
def test_dtype_and_frozen_tensors_preserved(name: str, mlp: Mlp) -> None:
    store = mlp.store(name)
    infos = [fresh(name, mlp, store).step(store, **mlp.inputs(store, 0), unused_input=1)]
    for spec in Mlp.SPECS:
        assert store[spec.name].dtype == np.dtype(spec.dtype)
        assert store[spec.name].shape == spec.shape
    np.testing.assert_array_equal(store["frozen"], mlp.values["frozen"])
    assert infos[0].evaluations >= 1
    assert math.isfinite(infos[0].loss)


@pytest.mark.parametrize("name", ALL)
def test_a_step_without_the_input_it_needs_is_refused(name: str, mlp: Mlp) -> None:
    store = mlp.store(name)
    opt = fresh(name, mlp, store)
    needed = {"loss": "evaluate", "taps": "taps", "outputs": "outputs"}[opt.needs]
    inputs = {k: v for k, v in mlp.inputs(store, 0).items() if k != needed}
    with pytest.raises(EdgelearnError, match=needed):
        opt.step(store, **inputs)


def test_cli_flags_and_their_defaults_come_from_the_options() -> None:
    """Each optimizer's train flags are the "cli" metadata of its Options; a flag left out
    is None, so the optimizer gets its own Options default, and a flag given reaches it."""
    from edgelearn.cli import _flag_options as flag_options
    from edgelearn.cli import build_parser, flag_users

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    flags = {o for a in sub.choices["train"]._actions for o in a.option_strings}
    users = flag_users()
    base = ["train", "b", "--data", "d.npz", "--out", "r", "--steps", "7"]
    for name in ALL:
        cli = REGISTRY[name].Options.cli_flags()
        for flag in cli:
            assert flag in flags, (name, flag)
            assert name in users[flag[2:].replace("-", "_")]
        got = flag_options(parser.parse_args([*base, "--optimizer", name]))
        assert set(got) <= {"total_steps"}, (name, got)  # every flag option: Options default
        if "--probes" in cli:
            got = flag_options(parser.parse_args([*base, "--optimizer", name, "--probes", "3",
                                                  "--schedule", "cosine"]))
            assert got == {"probes": 3, "schedule": "cosine", "total_steps": 7}, (name, got)


# -- loss-only optimizers: a least-squares problem ---------------------------------------------
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


@pytest.mark.parametrize("name", LOSS_ONLY)
def test_learns_and_preserves_dtype_and_frozen(name: str) -> None:
    store, loss = problem()
    opt = make(name)
    start = loss()
    for _ in range(300):
        opt.step(store, loss)
    assert loss() < 0.2 * start
    assert store["w"].dtype == np.float32
    np.testing.assert_array_equal(store["frozen"], np.ones(3, np.float32))


@pytest.mark.parametrize("name", LOSS_ONLY)
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


@pytest.mark.parametrize("name", LOSS_ONLY)
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


@pytest.mark.parametrize("name", LOSS_ONLY)
def test_state_dict_rejects_other_settings(name: str) -> None:
    state = make(name).state_dict()
    with pytest.raises(InputError, match="differ"):
        make(name, seed=8).load_state_dict(state)
    with pytest.raises(InputError, match="optimizer"):
        make(name).load_state_dict({**state, "name": "other"})


@pytest.mark.parametrize("name", LOSS_ONLY)
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


@pytest.mark.parametrize("name", LOSS_ONLY)
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


@pytest.mark.parametrize("name", LOSS_ONLY)
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
