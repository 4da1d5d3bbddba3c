"""Parameter groups (edgelearn/optim/groups.py) in zo-sgd: parsing, the update rule, replay,
resume, the CLI, and a generated LayerNorm + head model that one lr cannot train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgelearn.cli import main
from edgelearn.errors import InputError
from edgelearn.journal import iter_journal
from edgelearn.optim import make_optimizer
from edgelearn.optim.groups import GroupScales, parse_groups, resolve
from edgelearn.params import ParamSpec, ParamStore

N, D, C = 256, 16, 4
DEMO = Path(__file__).resolve().parents[1] / "edgelearn" / "data" / "demo"


class NormHead:
    """x [256, 16] -> LayerNorm(16) -> frozen projection -> linear head (4 classes), numpy.

    The norm's gain and bias feed a frozen [16, 16] projection, so the loss is far steeper in
    them than in the head (as a transformer's norms sit under many layers).
    """

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.x = (rng.standard_normal((N, D)) * 3 + 1).astype(np.float32)
        t = rng.standard_normal((D, C))
        self.y = ((self.x - self.x.mean(1, keepdims=True)) @ t).argmax(1)
        self.values = {"norm.weight": np.ones(D, np.float32),
                       "norm.bias": np.zeros(D, np.float32),
                       "head.weight": np.zeros((C, D), np.float32),
                       "head.bias": np.zeros(C, np.float32),
                       "proj": rng.standard_normal((D, D)).astype(np.float32)}
        self.specs = [ParamSpec("norm.weight", (D,)), ParamSpec("norm.bias", (D,)),
                      ParamSpec("head.weight", (C, D)), ParamSpec("head.bias", (C,)),
                      ParamSpec("proj", (D, D), trainable=False)]

    def store(self) -> ParamStore:
        return ParamStore(self.specs, values=self.values)

    def loss(self, s: ParamStore) -> float:
        mu, var = self.x.mean(1, keepdims=True), self.x.var(1, keepdims=True)
        h = (self.x - mu) / np.sqrt(var + 1e-5) * s["norm.weight"] + s["norm.bias"]
        z = ((h @ s["proj"]) @ s["head.weight"].T + s["head.bias"]).astype(np.float64)
        z -= z.max(1, keepdims=True)
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(N), self.y]))


@pytest.fixture(scope="module")
def model() -> NormHead:
    return NormHead()


def train(model: NormHead, steps: int, **kw: Any) -> tuple[ParamStore, Any, list[dict]]:
    store = model.store()
    opt = make_optimizer("zo-sgd", **{"lr": 0.1, "eps": 1e-3, "probes": 4, "seed": 1, **kw})
    records = [opt.step(store, lambda: model.loss(store)).record for _ in range(steps)]
    return store, opt, records


def test_one_lr_diverges_or_stalls_where_groups_train(model: NormHead) -> None:
    """lr 0.1 moves the head but blows the norms up; the lr the norms tolerate (3e-4) leaves
    the head where it was. lr 0.1 with a norm group at 3e-4 trains."""
    start = model.loss(model.store())
    diverged, _, _ = train(model, 150)
    stalled, _, _ = train(model, 150, lr=3e-4)
    grouped, _, _ = train(model, 150, groups="norm.*:lr=3e-4")
    assert not model.loss(diverged) < 10 * start  # diverged (or NaN)
    assert model.loss(stalled) > 0.75 * start
    assert model.loss(grouped) < 0.45 * start


def test_parse_and_resolve() -> None:
    rules = parse_groups("head.*:lr=0.01; *norm*:lr=1e-4,eps=rms*0.5;*:eps=0.002")
    assert [r.pattern for r in rules] == ["head.*", "*norm*", "*"]
    views = {"head.weight": np.full(4, 2.0, np.float32),
             "ln_norm.w": np.full(3, 4.0, np.float32),
             "zero_norm.b": np.zeros(3, np.float32), "other": np.ones(2, np.float32)}
    got = resolve(rules, views, {"lr": 0.1, "eps": 0.001})
    assert got["head.weight"] == pytest.approx({"lr": 0.1, "eps": 2.0})
    assert got["ln_norm.w"] == pytest.approx({"lr": 1e-3, "eps": 2000.0})  # 0.5 * RMS 4
    assert got["zero_norm.b"] == pytest.approx({"lr": 1e-3})  # RMS 0: the base eps
    assert got["other"] == pytest.approx({"eps": 2.0})
    assert parse_groups(None) == parse_groups("  ") == ()
    for bad in ("head.*", "head.*:lr", "head.*:mom=1", "x:lr=1,lr=2", "x:eps=rms*-1",
                "x:lr=nan", ":lr=1"):
        with pytest.raises(InputError, match="groups must be"):
            parse_groups(bad)
        with pytest.raises(InputError, match="groups must be"):
            make_optimizer("zo-sgd", groups=bad)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_copy_step_is_exactly_the_grouped_update_rule(model: NormHead, noise: str) -> None:
    """theta == theta0 + float32(-lr g) z * m_lr per tensor; the probes saw theta0 +- eps m z."""
    from edgelearn.rng import Noise

    store = model.store()
    theta0 = store.flat().copy()
    opt = make_optimizer("zo-sgd", lr=0.05, eps=1e-3, seed=2, restore="copy", noise=noise,
                         groups="norm.weight:lr=0.005,eps=rms*0.01;head.*:eps=0.004")
    info = opt.step(store, lambda: model.loss(store))
    z = Noise(noise).fill(np.empty(theta0.size, np.float32), run_seed=2, step=0, probe=0,
                          start=0)
    m_lr, m_eps = np.ones_like(theta0), np.ones_like(theta0)
    for name, a, b in store.segments():
        m_lr[a:b] = np.float32(opt.groups.multiplier(name, "lr"))
        m_eps[a:b] = np.float32(opt.groups.multiplier(name, "eps"))
    assert opt.groups.multiplier("norm.weight", "lr") == pytest.approx(0.1)
    assert opt.groups.multiplier("norm.weight", "eps") == pytest.approx(10.0)  # RMS 1
    assert opt.groups.multiplier("head.bias", "eps") == pytest.approx(4.0)
    want = theta0 + np.float32(-(info.record["lr"] * info.record["g"][0])) * z * m_lr
    np.testing.assert_array_equal(store.flat(), want)
    store.flat()[...] = theta0 + np.float32(1e-3) * z * m_eps
    lp = model.loss(store)
    store.flat()[...] = theta0 + np.float32(-1e-3) * z * m_eps
    assert info.record["evals"] == [lp, model.loss(store)]


@pytest.mark.parametrize("restore", ["copy", "drift"])
def test_replay_and_resume_are_bit_exact(model: NormHead, restore: str) -> None:
    groups = "norm.*:lr=3e-4,eps=rms*0.002;head.bias:lr=0.02"
    store, _, records = train(model, 30, restore=restore, groups=groups)
    base = model.store()
    again = make_optimizer("zo-sgd", lr=0.1, eps=1e-3, probes=4, seed=1, restore=restore,
                           groups=groups)
    for rec in json.loads(json.dumps(records)):
        again.replay(base, rec)
    assert base.digest() == store.digest()
    # resume after 15 steps: the RMS-derived eps comes from step 0's weights (the state)
    half, first, _ = train(model, 15, restore=restore, groups=groups)
    state = json.loads(json.dumps(first.state_dict()))
    assert set(state["group_scales"]) == {"norm.weight", "norm.bias", "head.bias"}
    resumed = make_optimizer("zo-sgd", lr=0.1, eps=1e-3, probes=4, seed=1, restore=restore,
                             groups=groups)
    resumed.load_state_dict(state)
    for _ in range(15):
        resumed.step(half, lambda: model.loss(half))
    assert half.digest() == store.digest()
    with pytest.raises(InputError, match="group_scales"):
        GroupScales(parse_groups(groups)).load({"group_scales": {"a": {"lr": "x"}}})


def test_without_groups_the_update_and_header_are_unchanged(model: NormHead) -> None:
    plain, opt, records = train(model, 5, restore="copy")
    assert "groups" not in opt.config()
    assert "group_scales" not in opt.state_dict()
    unmatched, _, again = train(model, 5, restore="copy", groups="nothing.*:lr=1")
    assert unmatched.digest() == plain.digest()  # no multiplier: the very same float ops
    assert again == records


def test_cli_group_flags_reach_the_journal_header_and_replay(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgelearn.demo import demo_data

    pers, _, _ = demo_data(0)
    np.savez(tmp_path / "d.npz", x=pers.x, y=pers.y)
    assert main(["train", str(DEMO), "--data", str(tmp_path / "d.npz"), "--optimizer",
                 "zo-sgd", "--trainable", "*", "--lr", "0.01", "--steps", "10",
                 "--group", "head.*:lr=0.05", "--group", "layers.*:eps=rms*0.01",
                 "--out", str(tmp_path / "run"), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    header = next(iter_journal(Path(trained["journal"])))
    assert header["config"]["groups"] == "head.*:lr=0.05;layers.*:eps=rms*0.01"
    assert main(["replay", str(DEMO), trained["journal"], "--out",
                 str(tmp_path / "w.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == trained["sha256"]
    assert main(["train", str(DEMO), "--data", str(tmp_path / "d.npz"), "--optimizer",
                 "zo-sgd", "--steps", "1", "--group", "head.*:lr=oops", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "groups must be" in capsys.readouterr().err


def test_relative_lr_is_lr_times_each_tensors_rms_and_replays() -> None:
    """relative_lr: the multiplier of every tensor is its RMS at step 0 (lr * rms / lr), an
    all-zero tensor keeps lr itself, a --group rule that sets lr wins; the update is that of
    the equivalent group rule, bit for bit, and the journal replays."""
    model = NormHead()
    model.values["norm.weight"] = np.full(D, 0.5, np.float32)
    model.values["head.weight"] = np.random.default_rng(3).normal(0, 0.2, (C, D)).astype(
        np.float32)
    rel, opt, records = train(model, 6, restore="copy", relative_lr=True)
    rms = float(np.sqrt(np.mean(np.square(model.values["head.weight"], dtype=np.float64))))
    assert opt.groups.multiplier("norm.weight", "lr") == (0.1 * 0.5) / 0.1
    assert opt.groups.multiplier("head.weight", "lr") == (0.1 * rms) / 0.1
    assert opt.groups.multiplier("head.bias", "lr") == 1.0  # zeros: lr itself
    assert opt.config()["relative_lr"] is True
    plain, _, _ = train(model, 6, restore="copy")
    same, _, _ = train(model, 6, restore="copy", groups="*:lr=rms*0.1")
    assert rel.digest() == same.digest() != plain.digest()
    base = model.store()
    again = make_optimizer("zo-sgd", lr=0.1, eps=1e-3, probes=4, seed=1, restore="copy",
                           relative_lr=True)
    for rec in json.loads(json.dumps(records)):
        again.replay(base, rec)
    assert base.digest() == rel.digest()
    _, mixed, _ = train(model, 1, restore="copy", relative_lr=True,
                        groups="norm.weight:lr=0.005")
    assert mixed.groups.multiplier("norm.weight", "lr") == pytest.approx(0.05)
    assert mixed.groups.multiplier("head.weight", "lr") == (0.1 * rms) / 0.1
    _, other, _ = train(model, 1, restore="copy")
    assert "relative_lr" not in other.config()  # headers of other runs unchanged
