"""Hybrid optimizer: one step == the torch reference, bit-exact replay, the CLI end to end.

The model is generated here in numpy (and mirrored in torch for parity): x [64, 6] -> fc1
(linear + relu, 5) -> LayerNorm(5) -> head (linear, 3 classes). fc1 and the head have layer
records (tpSGD's exact rules); the LayerNorm has none, so the hybrid trains it by ZO.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgelearn.cli import main
from edgelearn.errors import InputError
from edgelearn.journal import iter_journal
from edgelearn.layers import parse_layers
from edgelearn.optim import make_optimizer
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.parity import compare

SPECS = (ParamSpec("fc1.weight", (5, 6)), ParamSpec("fc1.bias", (5,)),
         ParamSpec("ln.weight", (5,)), ParamSpec("ln.bias", (5,)),
         ParamSpec("head.weight", (3, 5)), ParamSpec("head.bias", (3,)),
         ParamSpec("frozen", (2,), trainable=False))
LAYERS = [{"name": "fc1", "kind": "linear", "head": False, "activation": "relu", "input": "x",
           "preact": "fc1:pre", "output": "fc1:out",
           "params": {"weight": "fc1.weight", "bias": "fc1.bias"}},
          {"name": "head", "kind": "linear", "head": True, "activation": "none",
           "input": "ln:out", "preact": "logits", "output": None,
           "params": {"weight": "head.weight", "bias": "head.bias"}}]
DEMO = Path(__file__).resolve().parents[1] / "edgelearn" / "data" / "demo"


class LnNet:
    """The numpy model: its weights, data, and one taps forward per step (batches of 16)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(3)
        self.x = rng.standard_normal((64, 6)).astype(np.float32)
        self.y = self.x[:, :3].argmax(axis=1).astype(np.int64)
        self.values = {s.name: (rng.standard_normal(s.shape) * 0.5).astype(np.float32)
                       for s in SPECS}
        self.values["ln.weight"] += np.float32(1.0)
        self.layers = parse_layers({"layers": LAYERS}, {s.name for s in SPECS})

    def store(self) -> ParamStore:
        return ParamStore(list(SPECS), values=self.values)

    def batch(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.random.default_rng([9, t]).choice(len(self.x), 16, replace=False)
        return self.x[idx], self.y[idx]

    def taps(self, store: ParamStore, t: int) -> Any:
        def run() -> tuple[dict[str, np.ndarray], np.ndarray]:
            x, y = self.batch(t)
            pre = x @ store["fc1.weight"].T + store["fc1.bias"]
            out = np.maximum(pre, np.float32(0))
            mu = out.mean(axis=1, keepdims=True)
            var = ((out - mu) ** 2).mean(axis=1, keepdims=True)
            h = (out - mu) / np.sqrt(var + np.float32(1e-5)) * store["ln.weight"] \
                + store["ln.bias"]
            logits = h @ store["head.weight"].T + store["head.bias"]
            return {"x": x, "fc1:pre": pre, "fc1:out": out, "ln:out": h, "logits": logits}, y
        return run


@pytest.fixture(scope="module")
def net() -> LnNet:
    return LnNet()


def hybrid(net: LnNet, store: ParamStore, **kw: Any) -> Any:
    opt = make_optimizer("hybrid", **{"lr": 0.1, "zo_lr": 0.05, "eps": 1e-2, "seed": 3, **kw})
    opt.setup(store, layers=net.layers)
    return opt


def test_split_norms_go_to_zo_layers_to_the_exact_rule(net: LnNet) -> None:
    store = net.store()
    opt = hybrid(net, store)
    assert opt.exact_names == {"fc1.weight", "fc1.bias", "head.weight", "head.bias"}
    assert [s[0] for s in opt.segments] == ["ln.weight", "ln.bias"]
    info = opt.step(store, taps=net.taps(store, 0))
    assert info.evaluations == 2  # one +-eps pair of taps forwards, nothing else
    assert set(info.record) >= {"exact", "seeds", "g", "zo", "loss", "accepted"}
    head_only = hybrid(net, store, exact="head.*")
    assert head_only.exact_names == {"head.weight", "head.bias"}
    assert [s[0] for s in head_only.segments] == ["fc1.weight", "fc1.bias", "ln.weight",
                                                  "ln.bias"]
    only_layers = ParamStore([s if s.name.startswith(("fc1", "head")) else
                              ParamSpec(s.name, s.shape, trainable=False) for s in SPECS],
                             values=net.values)
    info = hybrid(net, only_layers).step(only_layers, taps=net.taps(only_layers, 0))
    assert info.evaluations == 1  # nothing for ZO: tpSGD's single forward
    with pytest.raises(InputError, match="taps"):
        make_optimizer("hybrid").setup(store, layers=[])


@pytest.mark.torch
@pytest.mark.parametrize("groups", [None, "ln.weight:lr=0.01,eps=rms*0.02;ln.*:eps=0.005"])
def test_one_step_equals_the_torch_reference(net: LnNet, groups: str | None) -> None:
    import torch
    from torch import nn
    from torch_reference import hybrid_step

    from edgelearn.optim.tpsgd import projection
    from edgelearn.rng import Noise

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.ln, self.head = nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.ln(torch.relu(self.fc1(x))))

    store = net.store()
    opt = hybrid(net, store, groups=groups)
    info = opt.step(store, taps=net.taps(store, 0))
    z = Noise("rademacher").fill(np.empty(10, np.float32), run_seed=3, step=0, probe=0, start=0)
    zs = {"ln.weight": torch.from_numpy(z[:5].copy()), "ln.bias": torch.from_numpy(z[5:].copy())}
    rms = float(np.sqrt(np.mean(net.values["ln.weight"].astype(np.float64) ** 2)))
    eps_scale = {} if groups is None else {"ln.weight": 0.02 * rms / 1e-2, "ln.bias": 0.5}
    lr_scale = {} if groups is None else {"ln.weight": 0.01 / 0.05}
    x, y = net.batch(0)
    params = {k: torch.from_numpy(v.copy()) for k, v in net.values.items() if k != "frozen"}
    new, (lp, lm) = hybrid_step(
        Twin().eval(), params, LAYERS, {0: torch.from_numpy(projection(3, 0, 3, 5, 3.0))}, zs,
        torch.from_numpy(x), torch.from_numpy(y), lr=0.1, zo_lr=0.05, eps=1e-2,
        exact={"fc1.weight", "fc1.bias", "head.weight", "head.bias"},
        eps_scale=eps_scale, lr_scale=lr_scale)
    assert compare({"L": info.record["zo"][0]}, {"L": [lp, lm]}, atol=1e-6, rtol=1e-6).ok
    got = {n: store[n] for n in new}
    res = compare(got, {n: t.numpy() for n, t in new.items()}, atol=1e-6, rtol=1e-6)
    assert res.ok, res.describe()
    assert sorted(new) == sorted(s.name for s in SPECS if s.trainable)
    np.testing.assert_array_equal(store["frozen"], net.values["frozen"])


@pytest.mark.parametrize("kw", [{}, {"exact": "head.*", "probes": 2, "noise": "gaussian"},
                                {"groups": "ln.*:lr=0.01,eps=rms*0.01;fc1.*:lr=0.2"},
                                {"exact": "head.*", "exact_each": True, "probes": 2}])
def test_replay_is_bit_exact_and_checks_the_record(net: LnNet, kw: dict[str, Any]) -> None:
    import hashlib

    store = net.store()
    opt = hybrid(net, store, **kw)
    records = [json.loads(json.dumps(opt.step(store, taps=net.taps(store, t)).record))
               for t in range(8)]
    assert store.digest() != net.store().digest()
    base = net.store()
    again = hybrid(net, base, **kw)
    for rec in records:
        again.replay(base, rec, taps=net.taps(base, rec["step"]))
    trained = hashlib.sha256(store.flat().tobytes()).hexdigest()
    assert hashlib.sha256(base.flat().tobytes()).hexdigest() == trained
    assert base.digest() == store.digest()
    bad = {**records[0], "g": [v + 1e-9 for v in records[0]["g"]]}
    fresh = net.store()
    opt = hybrid(net, fresh, **kw)
    with pytest.raises(InputError, match="does not reproduce"):
        opt.replay(fresh, bad, taps=net.taps(fresh, 0))


def test_a_non_finite_probe_rejects_the_zo_part_exactly(net: LnNet) -> None:
    store = net.store()
    opt = hybrid(net, store, exact="head.*")
    before = store.copy()
    taps = net.taps(store, 0)
    calls = []

    def poisoned() -> Any:
        arrays, y = taps()
        calls.append(1)
        if len(calls) == 1:
            arrays["logits"] = np.full_like(arrays["logits"], np.nan)
        return arrays, y

    info = opt.step(store, taps=poisoned)
    assert not info.accepted
    for name in ("fc1.weight", "fc1.bias", "ln.weight", "ln.bias"):  # ZO: restored exactly
        np.testing.assert_array_equal(store[name], before[name])


def test_cli_train_and_replay_on_the_demo_bundle(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from edgelearn.demo import demo_data

    pers, _, _ = demo_data(0)
    np.savez(tmp_path / "d.npz", x=pers.x, y=pers.y)
    args = ["train", str(DEMO), "--data", str(tmp_path / "d.npz"), "--optimizer", "hybrid",
            "--trainable", "*", "--exact", "head.*", "--zo-lr", "0.01", "--steps", "12",
            "--group", "layers.0.bias:lr=0.001", "--group", "layers.*:eps=rms*0.001",
            "--out", str(tmp_path / "run"), "--json"]
    assert main(args) == 0
    trained = json.loads(capsys.readouterr().out)
    header = next(iter_journal(Path(trained["journal"])))  # replay reads its groups there
    assert header["config"]["groups"] == "layers.0.bias:lr=0.001;layers.*:eps=rms*0.001"
    assert header["config"]["exact"] == "head.*"
    assert main(["replay", str(DEMO), trained["journal"], "--data", str(tmp_path / "d.npz"),
                 "--out", str(tmp_path / "w.safetensors"), "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["sha256"] == trained["sha256"]
    assert replayed["steps"] == 12


@pytest.mark.torch
def test_exact_each_equals_the_torch_reference(net: LnNet) -> None:
    """exact_each: two exact head updates per probe pair, the ZO losses at the starting head."""
    import torch
    from torch import nn
    from torch_reference import hybrid_step

    from edgelearn.rng import Noise

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.ln, self.head = nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.ln(torch.relu(self.fc1(x))))

    store = net.store()
    opt = hybrid(net, store, exact="head.*", exact_each=True)
    info = opt.step(store, taps=net.taps(store, 0))
    assert info.evaluations == 2
    assert len(info.record["exact"]) == 2
    z = Noise("rademacher").fill(np.empty(45, np.float32), run_seed=3, step=0, probe=0, start=0)
    zo = {"fc1.weight": (0, 30), "fc1.bias": (30, 35), "ln.weight": (35, 40),
          "ln.bias": (40, 45)}
    zs = {n: torch.from_numpy(z[a:b].copy()).reshape(net.values[n].shape)
          for n, (a, b) in zo.items()}
    x, y = net.batch(0)
    params = {k: torch.from_numpy(v.copy()) for k, v in net.values.items() if k != "frozen"}
    new, (lp, lm) = hybrid_step(
        Twin().eval(), params, LAYERS, {}, zs, torch.from_numpy(x), torch.from_numpy(y),
        lr=0.1, zo_lr=0.05, eps=1e-2, exact={"head.weight", "head.bias"}, each=True)
    assert compare({"L": info.record["zo"][0]}, {"L": [lp, lm]}, atol=1e-6, rtol=1e-6).ok
    res = compare({n: store[n] for n in new}, {n: t.numpy() for n, t in new.items()},
                  atol=1e-6, rtol=1e-6)
    assert res.ok, res.describe()
    assert sorted(new) == sorted(s.name for s in SPECS if s.trainable)
    # the head moved twice: once is the plain hybrid's update, a different point
    plain = net.store()
    hybrid(net, plain, exact="head.*").step(plain, taps=net.taps(plain, 0))
    assert not np.array_equal(plain["head.weight"], store["head.weight"])


def test_exact_each_needs_the_head_alone(net: LnNet) -> None:
    with pytest.raises(InputError, match="exact_each"):
        hybrid(net, net.store(), exact_each=True)  # exact: every layer, fc1 too
