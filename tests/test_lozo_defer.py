"""lozo's deferred update: steps with defer=True keep W += c U V^T in a pending sum P while V
stays the same, the probes carry P (graph and dense fallback alike), `settle` adds it, and a
Session run journals where each sum began, so replay, resume after a kill and reads in the
middle of a run (evaluate, save) all give the same bits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sessions import replay_journal, runtime
from zo_helpers import assert_close, demo

import edgelearn as el
from edgelearn.errors import InputError
from edgelearn.journal import read_journal
from edgelearn.losses import cross_entropy
from edgelearn.model import Model
from edgelearn.optim import make_optimizer
from edgelearn.training.evaluators import make_evaluator

OPTS = {"lr": 0.003, "eps": 1e-3, "rank": 2, "nu": 5, "seed": 7}


def steps(n: int, defer: bool, graph: bool = True, **opts):
    """(model, opt, records) after n lozo steps on the demo, all weights trainable."""
    bundle, data, _ = demo()
    model = Model(bundle, trainable="*")
    opt = make_optimizer("lozo", **{**OPTS, **opts})
    ev = make_evaluator(bundle, model.store, opt, backend="onnxruntime", model=model,
                        loss_fn=cross_entropy)
    records = []
    for t in range(n):
        fw = ev.forwards(*data.batch_at(t, 32, 7))
        records.append(opt.step(model.store, fw.evaluate, fw.population if graph else None,
                                defer=defer).record)
    return model, opt, records


def test_deferred_steps_equal_settled_ones_but_for_rounding() -> None:
    """7 deferred steps (nu 5: one sum added when V changes, one left pending): the records
    say where each sum began, the probes' losses are those of the dense fallback with the same
    pending sum, replay gives the same bits, and adding every step at once (the same losses)
    differs only by float rounding."""
    model, opt, recs = steps(7, defer=True)
    assert [r.get("from") for r in recs] == [None, 0, 0, 0, 0, None, 5]
    _, _, dense_recs = steps(7, defer=True, graph=False)
    # the runs part by float noise in g (1e-4 relative) from step 0 on; a missing P would
    # move the losses by ~1e-2
    assert_close([r["evals"] for r in dense_recs], [r["evals"] for r in recs], rtol=1e-4)
    trained = model.store.copy()
    opt.settle(trained)
    again = Model(demo()[0], trainable="*").store
    replayer = make_optimizer("lozo", **OPTS)
    for rec in recs:
        replayer.replay(again, rec, defer=True)
    replayer.settle(again)
    assert again.digest() == trained.digest()
    eager = Model(demo()[0], trainable="*").store
    eager_opt = make_optimizer("lozo", **OPTS)
    for rec in recs:  # the same losses, each update added at its step
        eager_opt.replay(eager, {k: v for k, v in rec.items() if k != "from"})
    base = Model(demo()[0], trainable="*").store
    for name in trained.names:
        assert_close(trained[name] - base[name], eager[name] - base[name], atol=1e-7,
                     rtol=1e-5)
    assert trained.digest() != model.store.digest()  # the store itself still held P apart


@pytest.mark.parametrize(("graph", "stacked"), [(True, True), (True, False), (False, True)],
                         ids=["stacked-graph", "graph-per-probe", "dense"])
def test_probes_carry_the_pending_sum(graph: bool, stacked: bool, monkeypatch) -> None:
    """Step 4's probes (a sum pending since step 0) score W + P V^T +- eps Z, checked against
    those weights written out densely and run by the plain model."""
    from edgelearn import lowrank_graph

    if not stacked:  # one run per probe, a scalar scale (a graph with MatMul weights)
        monkeypatch.setattr(lowrank_graph, "why_not_stacked", lambda *a: "forced for the test")
    bundle, data, _ = demo()
    model, opt, _ = steps(4, defer=True, graph=graph)
    with opt.settled(model.store):
        w_eff = model.store.copy()
    x, y = data.batch_at(4, 32, 7)
    ev = make_evaluator(bundle, model.store, opt, backend="onnxruntime", model=model,
                        loss_fn=cross_entropy)
    assert ev.runner.stacked == stacked
    fw = ev.forwards(x, y)
    got = opt.step(model.store, fw.evaluate, fw.population if graph else None,
                   defer=True).record
    assert got["from"] == 0
    factors = opt.factors(4)
    dense = [n for n in w_eff.trainable_names if n not in factors]
    z = opt.noise.fill(np.empty(sum(w_eff[n].size for n in dense), np.float32),
                       run_seed=OPTS["seed"], step=4, probe=2, start=0)
    ref = Model(bundle, trainable="*")
    want = []
    for s in (OPTS["eps"], -OPTS["eps"]):
        values, o = {}, 0
        for n in w_eff.trainable_names:
            if n in factors:
                u, v = factors[n]
                values[n] = w_eff[n] + np.float32(s) * (u @ v.T)
            else:
                values[n] = w_eff[n] + np.float32(s) * z[o : o + w_eff[n].size]
                o += w_eff[n].size
        ref.store.assign(values)
        want.append(cross_entropy(ref.predict(x), y))
    assert_close(got["evals"], want, rtol=1e-5)


@pytest.mark.torch
def test_a_deferred_step_matches_torch_reference() -> None:
    """Step 3 taken with steps 0-2 pending: torch's LOZO step from the weights they describe
    (W + P V^T) gives its losses, and the settled weights are that step's update."""
    import torch
    from torch_reference import lozo_step
    from zo_helpers import torch_demo_module

    bundle, data, _ = demo()
    model, opt, _ = steps(3, defer=True)
    with opt.settled(model.store):
        params = {n: torch.from_numpy(np.array(model.store[n])) for n in model.store.names}
    x, y = data.batch_at(3, 32, 7)
    ev = make_evaluator(bundle, model.store, opt, backend="onnxruntime", model=model,
                        loss_fn=cross_entropy)
    fw = ev.forwards(x, y)
    info = opt.step(model.store, fw.evaluate, fw.population, defer=True)
    assert info.record["from"] == 0
    factors = {n: tuple(torch.from_numpy(a) for a in uv) for n, uv in opt.factors(3).items()}
    zt = opt.noise.fill(np.empty(74, np.float32), run_seed=OPTS["seed"], step=3, probe=2,
                        start=0)
    z = {"layers.0.bias": torch.from_numpy(zt[:64].copy()),
         "head.bias": torch.from_numpy(zt[64:].copy())}
    module = torch_demo_module()
    module.load_state_dict(params)
    new, g, losses = lozo_step(module, params, factors, z, torch.from_numpy(x),
                               torch.from_numpy(y), lr=OPTS["lr"], eps=OPTS["eps"])
    assert_close(info.record["evals"], losses)
    assert_close(info.record["g"], g, atol=0, rtol=1e-3)  # (as test_lozo's step-0 parity)
    gd = info.record["g"]
    opt.settle(model.store)
    for name in model.store.names:
        d = factors[name][0] @ factors[name][1].T if name in factors else z[name]
        assert_close(model.store[name], (params[name] - (OPTS["lr"] * gd) * d).numpy())
        assert_close(model.store[name], new[name].numpy(), rtol=1e-4)


def test_without_defer_every_step_is_settled_as_before() -> None:
    """defer=False (direct `step` callers, ask/tell): no "from" in any record, nothing left
    pending, the bits of a per-step update."""
    model, opt, recs = steps(6, defer=False)
    assert all("from" not in r for r in recs)
    before = model.store.digest()
    opt.settle(model.store)
    assert model.store.digest() == before


def test_replay_refuses_a_record_whose_sum_began_elsewhere() -> None:
    _, _, recs = steps(3, defer=True)
    store = Model(demo()[0], trainable="*").store
    opt = make_optimizer("lozo", **OPTS)
    opt.replay(store, recs[0], defer=True)
    with pytest.raises(InputError, match="step 1"):
        opt.replay(store, {**recs[1], "from": 1}, defer=True)
    fresh = make_optimizer("lozo", **OPTS)
    with pytest.raises(InputError, match="step 1"):  # a sum that began before any step ran
        fresh.replay(Model(demo()[0], trainable="*").store, recs[1], defer=True)


def test_state_keeps_the_pending_sum() -> None:
    """A state taken mid-sum (a checkpoint) continues to the same bits; a bad one is refused."""
    model, opt, recs = steps(3, defer=True)
    state = opt.state_dict()
    assert state["pending_from"] == 0
    store = Model(demo()[0], trainable="*").store
    first = make_optimizer("lozo", **OPTS)
    for rec in recs[:2]:
        first.replay(store, rec, defer=True)
    mid = first.state_dict()
    resumed = make_optimizer("lozo", **OPTS)
    resumed.load_state_dict(mid)
    resumed.replay(store, recs[2], defer=True)
    assert resumed.state_dict() == state
    opt.settle(model.store)
    resumed.settle(store)
    assert store.digest() == model.store.digest()
    for bad, match in (({**state, "pending_from": 3}, "pending_from"),
                       ({**state, "pending": "!!"}, "base64")):
        with pytest.raises(InputError, match=match):
            make_optimizer("lozo", **OPTS).load_state_dict(bad)
    short = make_optimizer("lozo", **OPTS)
    short.load_state_dict({**state, "pending": state["pending"][:16]})
    with pytest.raises(InputError, match="pending sum"):
        short.settle(Model(demo()[0], trainable="*").store)


class EvaluateAt(el.Callback):
    """session.evaluate after the given steps (reads in the middle of a run)."""

    def __init__(self, data: el.Dataset, at: set[int]) -> None:
        self.data, self.at = data, at

    def on_step(self, session: el.Session, result: el.StepResult) -> None:
        if result.step in self.at:
            session.evaluate(self.data)


class CopyRunAt(el.Callback):
    """Copies the run directory after a step: the disk as a SIGKILL there would leave it."""

    def __init__(self, step: int, dst) -> None:
        self.step, self.dst = step, dst

    def on_step(self, session: el.Session, result: el.StepResult) -> None:
        if result.step == self.step:
            shutil.copytree(session.run_dir, self.dst)


def run(bundle, data, run_dir, n: int, callbacks=()) -> el.RunResult:
    config = el.TrainConfig(optimizer="lozo", trainable="*", batch_size=32, seed=1,
                            checkpoint_every=6, options={k: v for k, v in OPTS.items()
                                                         if k != "seed"})
    with el.Session(bundle, run_dir, config, runtime()) as s:
        return s.run(data, n, callbacks=callbacks)


def test_session_run_reads_mid_run_resumes_and_replays_to_the_same_bits(tmp_path) -> None:
    """A Session run defers (records with "from"); evaluate in the middle leaves its bits
    alone; a copy of the run directory taken mid-sum (after a checkpoint holding a pending
    sum) resumes to the uninterrupted run's weights; replay gives them too."""
    bundle, data, test = demo()
    plain = run(bundle, data, tmp_path / "plain", 20)
    read = run(bundle, data, tmp_path / "read", 20,
               [EvaluateAt(test, {3, 11}), CopyRunAt(8, tmp_path / "killed")])
    assert read.sha256 == plain.sha256
    records = [r for r in read_journal(tmp_path / "read" / "journal.bin")[0]
               if r.get("kind") == "step"]
    assert [r.get("from") for r in records[:7]] == [None, 0, 0, 0, 0, None, 5]
    store, n = replay_journal(bundle, tmp_path / "read" / "journal.bin")
    assert (n, store.digest()) == (20, plain.sha256)
    resumed = run(bundle, data, tmp_path / "killed", 20)
    assert resumed.sha256 == plain.sha256
    saved = el.ParamStore(list(store.specs.values()))
    saved.load(tmp_path / "plain" / "weights.safetensors")
    assert saved.digest() == plain.sha256


def test_session_store_settles_and_the_journal_says_so(tmp_path) -> None:
    """Getting `session.store` adds the pending sum for good: the next record begins a new
    sum there, and replay follows it."""
    bundle, data, _ = demo()
    config = el.TrainConfig(optimizer="lozo", trainable="*", batch_size=32, seed=1,
                            options={k: v for k, v in OPTS.items() if k != "seed"})
    with el.Session(bundle, tmp_path / "r", config, runtime()) as s:
        s.run(data, 3)
        w = np.array(s.store["head.weight"])
        s.run(data, 6)
        sha = s.digest()
    records = [r for r in read_journal(tmp_path / "r" / "journal.bin")[0]
               if r.get("kind") == "step"]
    assert [r.get("from") for r in records] == [None, 0, 0, None, 3, None]
    store, _ = replay_journal(bundle, tmp_path / "r" / "journal.bin")
    assert store.digest() == sha
    assert not np.array_equal(w, store["head.weight"])


def test_rollbacks_restore_the_pending_sum_and_replay(tmp_path) -> None:
    """A diverging lozo run (lr 1) rolls back to snapshots taken with a sum pending (nu 4,
    every 5): each rollback's sha256 is the weights the journal prefix up to its target
    replays to, and the whole journal replays to the run's weights."""
    from edgelearn.journal import Journal
    from edgelearn.training import DivergencePolicy

    bundle, data, _ = demo()
    pol = DivergencePolicy(factor=2.0, patience=3, lr_scale=0.25, every=5)
    config = el.TrainConfig(optimizer="lozo", trainable="*", batch_size=32, seed=6,
                            options={"lr": 1.0, "eps": 1e-3, "nu": 4}, divergence=pol)
    with el.Session(bundle, tmp_path / "r", config, runtime()) as s:
        res = s.run(data, 30)
    recs = read_journal(tmp_path / "r" / "journal.bin")[0]
    rolls = [r for r in recs if r.get("kind") == "rollback"]
    assert [r["to_step"] for r in rolls][:2] == [0, 5]  # step 5's snapshot: a sum from step 4
    for k, roll in enumerate(rolls[1:3]):
        prefix = tmp_path / f"prefix{k}.bin"
        with Journal(prefix) as j:
            for r in recs:
                if r.get("kind") == "step" and r["step"] >= roll["to_step"]:
                    break
                j.append(r)
        assert replay_journal(bundle, prefix)[0].digest() == roll["sha256"]
    assert replay_journal(bundle, tmp_path / "r" / "journal.bin")[0].digest() == res.sha256
